"""Code tables: the shipped tables, operator files that extend or replace them, bad rules, unknown codes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from deliveryreport.v1.delivery_report_pb2 import DeliveryStatus, GmsStatusCodes
from deliveryreport.v1.delivery_report_service_pb2 import Format
from dlrhub.normalise import CodeTable, Normaliser, gms, sent_sms_report
from dlrhub.normalise.codes import Rule

S = DeliveryStatus
RECEIVED = Timestamp(seconds=1_700_000_000)
GMS = ("status", "substatus", "hyber_status", "error_code", "sent_via")


def gms_key(
    status: int, substatus: int | None = None, hyber_status: int | None = None, sent_via: str = "sms"
) -> tuple[int | str | None, ...]:
    return (status, substatus, hyber_status, None, sent_via)


def write(tmp_path: Path, document: dict[str, Any]) -> Path:
    path = tmp_path / "codes.json"
    path.write_text(json.dumps(document))
    return path


# --- the shipped tables ------------------------------------------------------------------------------------


def test_shipped_tables_load() -> None:
    normaliser = Normaliser.load()
    assert normaliser.gms_table.facts == gms.FACTS == GMS
    assert (
        normaliser.sent_sms_report_table.facts
        == sent_sms_report.FACTS
        == (
            "seen",
            "group_id",
            "id",
            "group_name",
        )
    )
    assert len(normaliser.gms_table.rules) == 10
    assert len(normaliser.sent_sms_report_table.rules) == 16


def test_shipped_gms_rules_in_order() -> None:
    table = Normaliser.load().gms_table
    assert table.rules == (
        Rule(((4, "hyber"), (0, 3)), S.DELIVERY_STATUS_REJECTED),
        Rule(((2, 35015),), S.DELIVERY_STATUS_EXPIRED),
        Rule(((3, 35015),), S.DELIVERY_STATUS_EXPIRED),
        Rule(((1, 36),), S.DELIVERY_STATUS_REJECTED),
        Rule(((1, 35),), S.DELIVERY_STATUS_UNDELIVERED),
        Rule(((0, 3),), S.DELIVERY_STATUS_FAILED),
        Rule(((0, 2),), S.DELIVERY_STATUS_DELIVERED),
        Rule(((0, 1), (1, 12)), S.DELIVERY_STATUS_ACCEPTED),
        Rule(((0, 1),), S.DELIVERY_STATUS_SENT),
        Rule(((0, -1),), S.DELIVERY_STATUS_ACCEPTED),
    )


@pytest.mark.parametrize(
    ("key", "status"),
    [
        ((True, None, None, None), S.DELIVERY_STATUS_SEEN),
        ((False, 3, 5, "DELIVERED"), S.DELIVERY_STATUS_DELIVERED),
        ((False, 3, 2, "DELIVERED"), S.DELIVERY_STATUS_SENT),
        ((False, 1, 26, None), S.DELIVERY_STATUS_ACCEPTED),
        ((False, 2, 4, None), S.DELIVERY_STATUS_UNDELIVERED),
        ((False, 4, 29, None), S.DELIVERY_STATUS_EXPIRED),
        ((False, 5, 6, None), S.DELIVERY_STATUS_REJECTED),
        ((False, 6, 1, None), S.DELIVERY_STATUS_UNSPECIFIED),
        # By group name, where the ids are missing or unknown (docs/normalisation.md §5).
        ((False, None, None, "DELIVERED"), S.DELIVERY_STATUS_DELIVERED),
        ((False, 6, 1, "REJECTED"), S.DELIVERY_STATUS_REJECTED),
        ((False, None, None, "FUTURE"), S.DELIVERY_STATUS_UNSPECIFIED),
    ],
)
def test_shipped_sent_sms_report_table(
    key: tuple[bool, int | None, int | None, str | None], status: int
) -> None:
    assert Normaliser.load().sent_sms_report_table.status(key) == status


@pytest.mark.parametrize(
    "key",
    [gms_key(4), gms_key(0, 47, 47001), gms_key(99, sent_via="hyber"), gms_key(5, sent_via="")],
)
def test_unknown_codes_give_unspecified(key: tuple[int | str | None, ...]) -> None:
    assert Normaliser.load().gms_table.status(key) == S.DELIVERY_STATUS_UNSPECIFIED


def test_unknown_codes_are_kept_on_the_report() -> None:
    items = Normaliser.load().normalise(
        '{"message_id": "m", "status": 5, "substatus": 51, "hyber_status": 51007, "sent_via": "rcs"}',
        Format.FORMAT_GMS,
        RECEIVED,
    )
    report = items[0].report
    assert report is not None
    assert report.status == S.DELIVERY_STATUS_UNSPECIFIED
    assert report.raw.gms == GmsStatusCodes(status=5, substatus=51, hyber_status=51007, sent_via="rcs")


def test_lookups_are_cached_and_stay_correct_past_the_cache_limit() -> None:
    table = Normaliser.load().gms_table
    known = {
        -1: S.DELIVERY_STATUS_ACCEPTED,
        1: S.DELIVERY_STATUS_SENT,
        2: S.DELIVERY_STATUS_DELIVERED,
        3: S.DELIVERY_STATUS_FAILED,
    }
    for _ in range(2):
        for status in range(-1, 5000):
            assert table.status(gms_key(status)) == known.get(status, S.DELIVERY_STATUS_UNSPECIFIED), status
    assert table.status(gms_key(2)) == S.DELIVERY_STATUS_DELIVERED
    assert table.status(gms_key(3, 35, 35015)) == S.DELIVERY_STATUS_EXPIRED
    assert table.status(gms_key(3, 35, 35015)) == S.DELIVERY_STATUS_EXPIRED


# --- rule semantics ----------------------------------------------------------------------------------------


def test_first_match_wins_and_every_condition_must_hold() -> None:
    table = CodeTable.from_json(
        ("a", "b"),
        {
            "rules": [
                {"when": {"a": 1, "b": 2}, "status": "SEEN"},
                {"when": {"a": 1}, "status": "SENT"},
                {"when": {"b": 2}, "status": "DELIVERY_STATUS_FAILED"},
                {"when": {}, "status": "ACCEPTED"},
            ]
        },
        "test",
    )
    assert table.status((1, 2)) == S.DELIVERY_STATUS_SEEN
    assert table.status((1, 3)) == S.DELIVERY_STATUS_SENT
    assert table.status((0, 2)) == S.DELIVERY_STATUS_FAILED
    assert table.status((0, 0)) == S.DELIVERY_STATUS_ACCEPTED


def test_empty_table_gives_unspecified() -> None:
    table = CodeTable.from_json(GMS, {"rules": []}, "empty")
    assert table.status(gms_key(2)) == S.DELIVERY_STATUS_UNSPECIFIED


# --- operator files ----------------------------------------------------------------------------------------


def test_operator_file_extends_the_shipped_table_by_default(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "rules": [
                {"when": {"hyber_status": 23011}, "status": "SEEN", "note": "operator says so"},
                {"when": {"status": 4}, "status": "DELIVERED"},
            ]
        },
    )
    table = Normaliser.load(gms_codes=path).gms_table
    assert len(table.rules) == 12
    # The operator's rules come first...
    assert table.status(gms_key(2, 23, 23011)) == S.DELIVERY_STATUS_SEEN
    assert table.status(gms_key(4)) == S.DELIVERY_STATUS_DELIVERED
    # ...and the shipped ones still apply.
    assert table.status(gms_key(2, 23, 23033)) == S.DELIVERY_STATUS_DELIVERED
    assert table.status(gms_key(3, 35, 35015)) == S.DELIVERY_STATUS_EXPIRED


def test_operator_file_with_extends_default_true_extends(tmp_path: Path) -> None:
    path = write(tmp_path, {"extends_default": True, "rules": [{"when": {"status": 4}, "status": "SENT"}]})
    table = Normaliser.load(gms_codes=path).gms_table
    assert table.status(gms_key(4)) == S.DELIVERY_STATUS_SENT
    assert table.status(gms_key(2)) == S.DELIVERY_STATUS_DELIVERED


def test_operator_file_replaces_the_shipped_table(tmp_path: Path) -> None:
    path = write(
        tmp_path, {"extends_default": False, "rules": [{"when": {"status": 4}, "status": "DELIVERED"}]}
    )
    table = Normaliser.load(gms_codes=path).gms_table
    assert len(table.rules) == 1
    assert table.status(gms_key(4)) == S.DELIVERY_STATUS_DELIVERED
    assert table.status(gms_key(2)) == S.DELIVERY_STATUS_UNSPECIFIED


def test_operator_file_reaches_the_reports(tmp_path: Path) -> None:
    gms_path = tmp_path / "gms.json"
    gms_path.write_text(json.dumps({"rules": [{"when": {"status": 4, "substatus": 41}, "status": "SENT"}]}))
    sent_path = tmp_path / "sent.json"
    sent_path.write_text(
        json.dumps({"extends_default": False, "rules": [{"when": {"group_id": 3}, "status": "FAILED"}]})
    )
    normaliser = Normaliser.load(gms_codes=gms_path, sent_sms_report_codes=sent_path)

    gms_items = normaliser.normalise(
        '{"message_id": "m", "status": 4, "substatus": 41}', Format.FORMAT_GMS, RECEIVED
    )
    assert gms_items[0].report is not None
    assert gms_items[0].report.status == S.DELIVERY_STATUS_SENT
    assert not gms_items[0].report.final

    sent_items = normaliser.normalise(
        '{"results": [{"messageId": "m", "status": {"groupId": 3, "id": 5}}]}',
        Format.FORMAT_UNSPECIFIED,
        RECEIVED,
    )
    assert sent_items[0].report is not None
    assert sent_items[0].report.status == S.DELIVERY_STATUS_FAILED
    assert sent_items[0].report.final


# --- bad rule files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "expected an object with a `rules` array"),
        ({"rule": []}, "expected an object with a `rules` array"),
        ({"rules": {"when": {}}}, "expected an object with a `rules` array"),
        ({"rules": ["status 2 is DELIVERED"]}, "rules[0]: expected an object with a `when` object"),
        ({"rules": [{"status": "DELIVERED"}]}, "rules[0]: expected an object with a `when` object"),
        (
            {
                "rules": [
                    {"when": {"status": 2}, "status": "DELIVERED"},
                    {"when": {"colour": 1}, "status": "SENT"},
                ]
            },
            "rules[1]: unknown fact 'colour'; known: status, substatus, hyber_status, error_code, sent_via",
        ),
        (
            {
                "rules": [
                    {"when": {"status": 2}, "status": "DELIVERED"},
                    {"when": {"status": 9}, "status": "ARRIVED"},
                ]
            },
            "rules[1]: unknown status 'ARRIVED'",
        ),
        ({"rules": [{"when": {"status": 2}}]}, "rules[0]: unknown status 'None'"),
    ],
)
def test_bad_rule_file_raises_value_error_naming_the_rule(
    tmp_path: Path, document: Any, message: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        Normaliser.load(gms_codes=path)
    assert str(raised.value) == f"{path}: {message}"


def test_from_json_names_its_origin() -> None:
    with pytest.raises(ValueError, match=r"^shipped\.json: rules\[0\]: unknown status 'NOPE'$"):
        CodeTable.from_json(GMS, {"rules": [{"when": {}, "status": "NOPE"}]}, "shipped.json")
