"""Provider status codes to unified statuses, as data rather than code.

A code table is a JSON file of rules tried in order; the first rule whose
every condition equals the report's fact wins, and no match gives
DELIVERY_STATUS_UNSPECIFIED (the raw codes stay on the report):

    {"rules": [
        {"when": {"hyber_status": 35015}, "status": "EXPIRED", "note": "SMS expired"},
        {"when": {"status": 2}, "status": "DELIVERED"}
    ]}

The package ships one table per provider format (`gms_codes.json`,
`sent_sms_report_codes.json`). An operator's file, given by configuration,
puts its rules before the shipped ones, or replaces them with
`"extends_default": false`; so new GMS codes need no release.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from deliveryreport.v1.delivery_report_pb2 import DeliveryStatus
from dlrhub.statuses import status_by_name

Fact = int | str | bool | None
_CACHE_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class Rule:
    """Conditions (fact position, required value) and the status they give."""

    conditions: tuple[tuple[int, Fact], ...]
    status: DeliveryStatus.ValueType


class CodeTable:
    """First-match rules over a fixed tuple of facts, with a lookup cache."""

    def __init__(self, facts: Sequence[str], rules: Sequence[Rule]) -> None:
        self.facts = tuple(facts)
        self.rules = tuple(rules)
        self._cache: dict[tuple[Fact, ...], DeliveryStatus.ValueType] = {}

    @classmethod
    def from_json(cls, facts: Sequence[str], document: Any, origin: str) -> CodeTable:
        """Build a table from a decoded JSON document; ValueError names the bad rule."""
        if not isinstance(document, dict) or not isinstance(document.get("rules"), list):
            raise ValueError(f"{origin}: expected an object with a `rules` array")
        positions = {name: index for index, name in enumerate(facts)}
        rules = []
        for number, entry in enumerate(document["rules"]):
            where = f"{origin}: rules[{number}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("when"), dict):
                raise ValueError(f"{where}: expected an object with a `when` object")
            unknown = sorted(set(entry["when"]) - set(positions))
            if unknown:
                raise ValueError(f"{where}: unknown fact {unknown[0]!r}; known: {', '.join(facts)}")
            try:
                status = status_by_name(str(entry.get("status")))
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
            conditions = tuple((positions[name], value) for name, value in entry["when"].items())
            rules.append(Rule(conditions, status))
        return cls(facts, rules)

    @classmethod
    def load(cls, facts: Sequence[str], shipped: str, override: Path | None = None) -> CodeTable:
        """The shipped table, extended or replaced by an operator's file."""
        default = cls.from_json(
            facts, json.loads(resources.files(__package__).joinpath(shipped).read_text()), shipped
        )
        if override is None:
            return default
        document = json.loads(override.read_text())
        table = cls.from_json(facts, document, str(override))
        if document.get("extends_default", True):
            return cls(facts, table.rules + default.rules)
        return table

    def status(self, key: tuple[Fact, ...]) -> DeliveryStatus.ValueType:
        """The status for facts given in the order of `self.facts`."""
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        status: DeliveryStatus.ValueType = DeliveryStatus.DELIVERY_STATUS_UNSPECIFIED
        for rule in self.rules:
            if all(key[position] == value for position, value in rule.conditions):
                status = rule.status
                break
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = status
        return status
