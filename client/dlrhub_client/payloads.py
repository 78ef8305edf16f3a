"""Provider payloads as text: their batch shapes, and the exact text of every item.

GMS batches reports as a top-level JSON array, `[{...}, ...]`; SentSMSReport as the array member
`results` of a top-level object, `{"results": [{...}, ...]}`. dlrhub keeps every item byte for byte,
so both the server's normaliser and the client's batch splitting work on item texts:

- `decode` parses a payload strictly and records the text of each element of a top-level array and
  of each array-valued member of a top-level object. It walks only those outer levels itself; every
  value inside is decoded by the standard library's C scanner in one pass. Floats become
  `decimal.Decimal`, so prices stay exact; NaN and Infinity are rejected. Errors are `InvalidJson`,
  whose text gives line and column. With `max_items`, an array of those outer levels with more
  elements raises `TooManyItems` as soon as it has one too many: the rest is never decoded.
- `batch_items` gives a batch body's format and item texts; `batch` wraps item texts back into the
  body of a format.

The server imports this module (the client never imports the server).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from deliveryreport.v1.delivery_report_service_pb2 import Format

_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_float=Decimal, parse_constant=_reject_constant)


@dataclass(frozen=True, slots=True)
class Document:
    """A decoded JSON payload and the original text of its batch items."""

    value: Any
    # The whole payload without surrounding white space.
    text: str
    # For a top-level array: the text of each element, in order.
    elements: list[str] = field(default_factory=list)
    # For a top-level object: the text of each element of each array member.
    member_elements: dict[str, list[str]] = field(default_factory=dict)


class InvalidJson(ValueError):
    """The text is not JSON; the message says why, with line and column where there are some."""


class TooManyItems(Exception):
    """A batch holds more than `limit` items (decoding stopped at the first one over)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} items in one payload (at most {limit}): split the batch")
        self.limit = limit


def decode(text: str, *, max_items: int | None = None) -> Document:
    """Decode `text`; raises InvalidJson if it is not JSON, TooManyItems if one of its outer arrays
    has more than `max_items` elements."""
    try:
        return _Walker(text, max_items).document()
    except json.JSONDecodeError as error:
        raise InvalidJson(f"{error.msg}: line {error.lineno} column {error.colno}") from None
    except RecursionError:
        raise InvalidJson("nested too deeply") from None
    except ValueError as error:  # an integer too long to convert, NaN, Infinity
        raise InvalidJson(str(error)) from None


def batch_items(document: Document) -> tuple[Format.ValueType, list[str]] | None:
    """The format of a batch body and the text of each of its items: a GMS array, a SentSMSReport
    object whose only member is `results`, or one GMS report (an object with `message_id`, which
    the server reads as a batch of one); None for anything else (a GMS GET answer, say)."""
    value = document.value
    if isinstance(value, list):
        return Format.FORMAT_GMS, document.elements
    if not isinstance(value, dict):
        return None
    results = document.member_elements.get("results")
    if set(value) == {"results"} and results is not None:
        return Format.FORMAT_SENT_SMS_REPORT, results
    if "message_id" in value and "results" not in value:
        return Format.FORMAT_GMS, [document.text]
    return None


def batch(format: Format.ValueType, items: Sequence[str]) -> str:
    """Item texts as one body of `format` (each item's text kept as it is)."""
    joined = ",".join(items)
    if format == Format.FORMAT_GMS:
        return "[" + joined + "]"
    if format == Format.FORMAT_SENT_SMS_REPORT:
        return '{"results":[' + joined + "]}"
    raise ValueError(f"no batch shape for format {format}")


class _Walker:
    """Walks the outer one or two levels of a JSON text, recording item spans."""

    def __init__(self, text: str, max_items: int | None = None) -> None:
        self.text = text.removeprefix("\ufeff")
        self.pos = 0
        self.max_items = max_items

    def document(self) -> Document:
        self._skip()
        start = self.pos
        elements: list[str] = []
        members: dict[str, list[str]] = {}
        if self._peek() == "[":
            value: Any = self._array(elements)
        elif self._peek() == "{" and "[" in self.text:
            value = self._object(members)  # may have array members: walk it for their spans
        else:
            value = self._value()
        end = self.pos
        self._skip()
        if self.pos != len(self.text):
            self._fail("Extra data")
        return Document(value, self.text[start:end], elements, members)

    def _array(self, texts: list[str]) -> list[Any]:
        items: list[Any] = []
        self.pos += 1
        self._skip()
        if self._peek() == "]":
            self.pos += 1
            return items
        while True:
            self._skip()
            start = self.pos
            if len(items) == self.max_items:
                raise TooManyItems(self.max_items)
            items.append(self._value())
            texts.append(self.text[start : self.pos])
            self._skip()
            char = self._peek()
            self.pos += 1
            if char == "]":
                return items
            if char != ",":
                self.pos -= 1
                self._fail("Expecting ',' delimiter")

    def _object(self, members: dict[str, list[str]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        self.pos += 1
        self._skip()
        if self._peek() == "}":
            self.pos += 1
            return result
        while True:
            self._skip()
            if self._peek() != '"':
                self._fail("Expecting property name enclosed in double quotes")
            key = self._value()
            self._skip()
            if self._peek() != ":":
                self._fail("Expecting ':' delimiter")
            self.pos += 1
            self._skip()
            if self._peek() == "[":
                texts: list[str] = []
                result[key] = self._array(texts)
                members[key] = texts
            else:
                result[key] = self._value()
                members.pop(key, None)
            self._skip()
            char = self._peek()
            self.pos += 1
            if char == "}":
                return result
            if char != ",":
                self.pos -= 1
                self._fail("Expecting ',' delimiter")

    def _value(self) -> Any:
        value, self.pos = _DECODER.raw_decode(self.text, self.pos)
        return value

    def _peek(self) -> str:
        return self.text[self.pos : self.pos + 1]

    def _skip(self) -> None:
        match = _WHITESPACE.match(self.text, self.pos)
        assert match is not None  # the pattern matches the empty string
        self.pos = match.end()

    def _fail(self, message: str) -> None:
        raise json.JSONDecodeError(message, self.text, self.pos)
