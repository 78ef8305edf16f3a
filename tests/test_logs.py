"""The JSON log formatter: the time field, and fields passed with `extra`."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dlrhub.observability.logs import JsonFormatter


@pytest.mark.parametrize(
    "moments",
    [
        [1_700_000_000.0, 1_700_000_000.9996, 1_700_000_001.0005, 1_700_000_000.25],  # back in time too
        [0.5, 86_399.999, 1_800_000_000.123, 1_700_000_000.9999996],
    ],
)
def test_the_time_is_utc_iso_8601_with_milliseconds_whatever_the_order(moments: list[float]) -> None:
    formatter = JsonFormatter()  # one formatter: the cached second must never leak into another
    for moment in moments:
        record = logging.LogRecord("dlrhub.test", logging.INFO, "", 0, "hello", (), None)
        record.created = moment
        line = json.loads(formatter.format(record))
        assert line["time"] == datetime.fromtimestamp(moment, UTC).isoformat(timespec="milliseconds")


def test_extra_fields_become_keys_of_the_line() -> None:
    logger = logging.getLogger("dlrhub.test")
    record = logger.makeRecord(
        "dlrhub.test", logging.INFO, "", 0, "rpc", (), None, extra={"rpc": "X", "code": "OK"}
    )
    line = json.loads(JsonFormatter().format(record))
    assert line["rpc"] == "X"
    assert line["code"] == "OK"
    assert line["level"] == "INFO"
    assert line["message"] == "rpc"


@given(st.lists(st.floats(min_value=0, max_value=4_000_000_000, allow_nan=False), min_size=1, max_size=5))
def test_the_time_matches_datetime_for_any_moment(moments: list[float]) -> None:
    formatter = JsonFormatter()
    for moment in moments:
        record = logging.LogRecord("dlrhub.test", logging.INFO, "", 0, "hello", (), None)
        record.created = moment
        expected = datetime.fromtimestamp(moment, UTC).isoformat(timespec="milliseconds")
        assert json.loads(formatter.format(record))["time"] == expected
