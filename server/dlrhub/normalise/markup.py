"""XML callbacks: GMS pushes a report as `<DeliveryReport>` when a client asks for XML.

The shape is GMS's own (developers.gms-worldwide.com, "Receive single delivery
reports", XML): one `<DeliveryReport>` element whose children are the GET-report
fields (`phone_number`, `last_partner`, `message_id`, `time`, ...), each holding
text. It becomes a Document whose value maps each child's name to its text, so
the GMS normaliser reads it like the same report in JSON (its integer fields
given as text). A child with children of its own becomes an object and a
repeated child a list, so reading them names the field and its wrong type.

Only what GMS documents is read: any other root element is a PayloadError. A
document type declaration is refused before it is read, so no entity is ever
defined or expanded, and so is a document of more than MAX_ELEMENTS elements
(a report has a few dozen), as soon as it has one too many.
"""

from __future__ import annotations

from typing import Any
from xml.parsers import expat

from deliveryreport.v1.error_reason_pb2 import ErrorReason
from dlrhub.normalise.document import Document
from dlrhub.normalise.results import PayloadError, Rejection

ROOT = "DeliveryReport"
MAX_ELEMENTS = 1000


def is_markup(text: str) -> bool:
    """Whether a payload is XML rather than JSON (JSON never starts with "<")."""
    return text.removeprefix("\ufeff").lstrip(" \t\n\r").startswith("<")


def decode(text: str) -> Document:
    """A GMS `<DeliveryReport>`; raises PayloadError (INVALID_XML, or UNKNOWN_FORMAT for another root)."""
    builder = _Builder()
    parser = expat.ParserCreate()
    parser.StartDoctypeDeclHandler = builder.refuse_doctype
    parser.StartElementHandler = builder.start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.characters
    body = text.removeprefix("\ufeff").strip(" \t\n\r")
    try:
        parser.Parse(body, True)
    except expat.ExpatError as error:
        raise _invalid(
            f"{expat.ErrorString(error.code)}: line {error.lineno} column {error.offset + 1}"
        ) from None
    except _Refused as refused:
        raise _invalid(str(refused)) from None
    if builder.root != ROOT:
        raise PayloadError(
            Rejection(
                "",
                ErrorReason.UNKNOWN_FORMAT,
                f"an XML payload must be a GMS <{ROOT}> report, not <{builder.root}>",
            )
        )
    return Document(builder.value, body)


def _invalid(description: str) -> PayloadError:
    return PayloadError(Rejection("", ErrorReason.INVALID_XML, f"invalid XML: {description}"))


class _Refused(Exception):
    """XML that is well formed but not accepted (a document type declaration)."""


class _Builder:
    """Builds the root element's children as {name: text | object | list} with an explicit stack."""

    def __init__(self) -> None:
        self.root = ""
        self.value: dict[str, Any] = {}
        # One frame per open element: its name, its children so far, its text so far.
        self._stack: list[tuple[str, dict[str, Any], list[str]]] = []
        self._elements = 0

    def refuse_doctype(self, *_: object) -> None:
        raise _Refused("a document type declaration is not accepted")

    def start(self, name: str, _attributes: dict[str, str]) -> None:
        if not self._stack:
            self.root = name
        self._elements += 1
        if self._elements > MAX_ELEMENTS:
            raise _Refused(f"more than {MAX_ELEMENTS} elements: not one report")
        self._stack.append((name, {}, []))

    def characters(self, data: str) -> None:
        self._stack[-1][2].append(data)

    def end(self, _name: str) -> None:
        name, children, text = self._stack.pop()
        if not self._stack:
            self.value = children
            return
        value: Any = children or ("".join(text).strip() or None)
        siblings = self._stack[-1][1]
        if name not in siblings:
            siblings[name] = value
        elif isinstance(siblings[name], list):  # a list only a repeated child makes
            siblings[name].append(value)
        else:
            siblings[name] = [siblings[name], value]
