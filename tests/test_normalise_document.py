"""Strict JSON decoding: error positions, no NaN, no crash on hostile input, exact item text, decimals."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from deliveryreport.v1.delivery_report_service_pb2 import Format
from deliveryreport.v1.error_reason_pb2 import ErrorReason
from dlrhub.normalise import Normaliser, PayloadError
from dlrhub.normalise.document import Document, decode

FIXTURES = Path(__file__).parent / "fixtures"
RECEIVED = Timestamp(seconds=1_700_000_000)


def decode_error(text: str) -> str:
    """The description of the INVALID_JSON PayloadError that decoding `text` raises."""
    with pytest.raises(PayloadError) as raised:
        decode(text)
    rejection = raised.value.rejection
    assert rejection.reason == ErrorReason.INVALID_JSON
    assert rejection.field == ""
    assert rejection.description.startswith("invalid JSON: ")
    return rejection.description


# --- errors carry line and column ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "position"),
    [
        ("", "Expecting value: line 1 column 1"),
        ("   \n  ", "Expecting value: line 2 column 3"),
        ('{\n  "a": 1,\n  "b": x\n}', "Expecting value: line 3 column 8"),
        ('[{"a": 1} {"b": 2}]', "Expecting ',' delimiter: line 1 column 11"),
        ('[{"a": 1},]', "Expecting value: line 1 column 11"),
        ('{"results" [1]}', "Expecting ':' delimiter: line 1 column 12"),
        ("{results: []}", "Expecting property name enclosed in double quotes: line 1 column 2"),
        ('{"results": [1, 2}', "Expecting ',' delimiter: line 1 column 18"),
        ('{"a": 1}\n{"b": 2}', "Extra data: line 2 column 1"),
        ('{"a": "x\ny"}', "Invalid control character at: line 1 column 9"),
        ('[\n  {"message_id": "a",\n   "status": 02}\n]', "Expecting ',' delimiter: line 3 column 15"),
        ("[1, 2", "Expecting ',' delimiter: line 1 column 6"),
    ],
)
def test_invalid_json_names_line_and_column(text: str, position: str) -> None:
    assert decode_error(text) == f"invalid JSON: {position}"


def test_seed_malformed_single_report_position() -> None:
    text = (FIXTURES / "gms_single_malformed.json").read_text()
    assert text.splitlines()[7][15:] == 'AD-6640-7006",'  # line 8, column 16: the unquoted value
    assert decode_error(text) == "invalid JSON: Expecting value: line 8 column 16"


@pytest.mark.parametrize(
    "text",
    [
        "NaN",
        '{"status": NaN}',
        '[{"price": Infinity}]',
        '{"results": [{"price": {"pricePerMessage": -Infinity}}]}',
        '[{"a": [1, NaN]}]',
    ],
)
def test_nan_and_infinity_are_rejected(text: str) -> None:
    assert "is not valid JSON" in decode_error(text)


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"results": [' + '{"a":' * 100_000 + "1" + "}" * 100_000 + "]}",
        "[" * 100_000,
    ],
)
def test_deep_nesting_is_a_payload_error_not_a_crash(text: str) -> None:
    decode_error(text)


@pytest.mark.parametrize(
    "text",
    [
        "1" * 10_000,
        "[" + "9" * 10_000 + "]",
        '{"results": [{"messageId": "a", "smsCount": ' + "9" * 10_000 + "}]}",
    ],
)
def test_huge_integers_are_a_payload_error_not_a_crash(text: str) -> None:
    decode_error(text)


def test_long_but_decodable_integer_is_rejected_per_item() -> None:
    items = Normaliser.load().normalise(
        '[{"message_id": "a", "status": ' + "9" * 400 + '}, {"message_id": "b", "status": 2}]',
        Format.FORMAT_UNSPECIFIED,
        RECEIVED,
    )
    assert items[0].rejection is not None
    assert (items[0].rejection.field, items[0].rejection.reason) == ("[0].status", ErrorReason.INVALID_VALUE)
    assert items[1].report is not None


# --- item text, byte for byte ------------------------------------------------------------------------------


def test_array_element_text_is_kept_byte_for_byte() -> None:
    text = ' \n[ {"a" : 1}\n,\t{"b":[1, 2 ],"c":"\\u00e9"} ,"x",  3 ,null]\r\n'
    document = decode(text)
    assert document.elements == ['{"a" : 1}', '{"b":[1, 2 ],"c":"\\u00e9"}', '"x"', "3", "null"]
    assert document.value == [{"a": 1}, {"b": [1, 2], "c": "é"}, "x", 3, None]
    assert document.text == text.strip()
    assert document.member_elements == {}


def test_member_array_element_text_is_kept_byte_for_byte() -> None:
    text = (
        '{"count": 2, "results" : [\n{"messageId":"A", "to":"é"} ,\n  {"messageId" : "B"}\n],'
        ' "x": {"y": [1]}}'
    )
    document = decode(text)
    assert document.member_elements == {"results": ['{"messageId":"A", "to":"é"}', '{"messageId" : "B"}']}
    assert document.elements == []
    assert document.value == {
        "count": 2,
        "results": [{"messageId": "A", "to": "é"}, {"messageId": "B"}],
        "x": {"y": [1]},
    }


def test_every_array_member_records_its_elements() -> None:
    document = decode('{"results": [1], "other": [ 2 , 3 ], "empty": []}')
    assert document.member_elements == {"results": ["1"], "other": ["2", "3"], "empty": []}


def test_duplicate_member_last_one_wins() -> None:
    document = decode('{"results": [1], "results": "x"}')
    assert document.value == {"results": "x"}
    assert document.member_elements == {}


def test_byte_order_mark_is_dropped() -> None:
    document = decode('\ufeff[{"a": 1}]')
    assert document.value == [{"a": 1}]
    assert document.text == '[{"a": 1}]'
    assert document.elements == ['{"a": 1}']


def test_normalised_items_keep_their_text() -> None:
    items = Normaliser.load().normalise(
        '[ {"message_id":"a",  "status":2, "extra_id":"ü\\n"}\n,{"message_id":"b","status":2} ]',
        Format.FORMAT_UNSPECIFIED,
        RECEIVED,
    )
    assert [item.raw for item in items] == [
        '{"message_id":"a",  "status":2, "extra_id":"ü\\n"}',
        '{"message_id":"b","status":2}',
    ]
    assert [item.report.raw_payload for item in items if item.report] == [item.raw for item in items]


def test_single_object_text_is_the_payload_without_surrounding_white_space() -> None:
    text = '\n  {"message_id": "a",\n   "status": 2}  \n'
    items = Normaliser.load().normalise(text, Format.FORMAT_UNSPECIFIED, RECEIVED)
    assert items[0].raw == '{"message_id": "a",\n   "status": 2}'
    assert items[0].report is not None
    assert items[0].report.raw_payload == items[0].raw


# --- numbers -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "value"),
    [
        ("0.0075", Decimal("0.0075")),
        ("0.12345678901234567890", Decimal("0.12345678901234567890")),
        ("0.010", Decimal("0.010")),
        ("1e-3", Decimal("0.001")),
        ("-2.5E+2", Decimal("-250")),
    ],
)
def test_floats_become_exact_decimals(number: str, value: Decimal) -> None:
    decoded = decode(f'{{"p": {number}}}').value["p"]
    assert isinstance(decoded, Decimal)
    assert decoded == value
    assert decoded.as_tuple() == Decimal(number).as_tuple()  # digits and exponent as written


def test_integers_stay_integers() -> None:
    value = decode("[1, -7, 12345678901234567890]").value
    assert value == [1, -7, 12345678901234567890]
    assert all(type(number) is int for number in value)


def test_scalar_document() -> None:
    assert decode(' "x" ') == Document("x", '"x"')
