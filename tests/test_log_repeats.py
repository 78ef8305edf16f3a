"""RepeatFilter: a line that repeats is written once, then counted, one summary per interval.

The filter runs on a real handler writing JSON lines (the server's formatter); the intervals are
real and short, so the assertions count lines and sum the counts rather than time anything.
"""

from __future__ import annotations

import asyncio
import errno
import io
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dlrhub.observability.logs import JsonFormatter, RepeatFilter

INTERVAL = 0.3
WAIT = 10.0


class Lines:
    """The JSON lines a handler with a RepeatFilter wrote."""

    def __init__(self, repeats: RepeatFilter) -> None:
        self.repeats = repeats
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(JsonFormatter())
        self.handler.addFilter(repeats)

    def __call__(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]

    def wait_for_summaries(self, total: int) -> list[dict[str, Any]]:
        """The lines, once the summaries count `total` repeats."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            lines = self()
            if sum(line.get("repeated", 0) for line in lines) >= total:
                return lines
            time.sleep(0.05)
        raise AssertionError(f"the summaries never counted {total} repeats: {self()}")


@pytest.fixture
def lines() -> Iterator[Lines]:
    """A fresh logger under dlrhub.test, writing through the filter (and nowhere else)."""
    written = Lines(RepeatFilter(INTERVAL))
    logger = logging.getLogger("dlrhub.test.repeats")
    logger.handlers[:] = [written.handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        yield written
    finally:
        logger.handlers.clear()
        logger.propagate = True


def fail(logger: logging.Logger, number: int) -> None:
    try:
        raise OSError(errno.EIO, "disk I/O error")
    except OSError:
        logger.exception("commit failed for %d submissions", number)


def test_a_storm_is_its_first_line_with_traceback_then_counted(lines: Lines) -> None:
    logger = logging.getLogger("dlrhub.test.repeats")
    started = time.monotonic()
    for number in range(1000):
        fail(logger, number)
    logged = lines.wait_for_summaries(999)
    elapsed = time.monotonic() - started

    first, *summaries = logged
    assert first["message"] == "commit failed for 0 submissions"
    assert first["level"] == "ERROR"
    assert "OSError: [Errno 5] disk I/O error" in first["exception"]
    assert "repeated" not in first
    # One summary per interval the storm lasted, each the last line held back, without a traceback.
    assert 1 <= len(summaries) <= elapsed / INTERVAL + 1
    assert sum(summary["repeated"] for summary in summaries) == 999
    assert summaries[-1]["message"] == "commit failed for 999 submissions"
    assert all(summary["level"] == "ERROR" for summary in summaries)
    assert all(summary["interval_seconds"] == INTERVAL for summary in summaries)
    assert not any("exception" in summary for summary in summaries)


def test_each_logger_and_template_is_its_own_key_and_fields_stay(lines: Lines) -> None:
    logger = logging.getLogger("dlrhub.test.repeats")
    other = logging.getLogger("dlrhub.test.repeats.other")
    other.propagate = True  # to the handler of dlrhub.test.repeats
    for _ in range(3):
        logger.warning("poll: provider answered HTTP %d", 500, extra={"url": "http://provider"})
        logger.warning("poll: timed out")
        other.warning("poll: timed out")
    logged = lines.wait_for_summaries(6)
    firsts = [(line["logger"], line["message"]) for line in logged if "repeated" not in line]
    assert firsts == [
        ("dlrhub.test.repeats", "poll: provider answered HTTP 500"),
        ("dlrhub.test.repeats", "poll: timed out"),
        ("dlrhub.test.repeats.other", "poll: timed out"),
    ]
    summaries = {(line["logger"], line["message"]): line for line in logged if "repeated" in line}
    assert {key: line["repeated"] for key, line in summaries.items()} == {
        ("dlrhub.test.repeats", "poll: provider answered HTTP 500"): 2,
        ("dlrhub.test.repeats", "poll: timed out"): 2,
        ("dlrhub.test.repeats.other", "poll: timed out"): 2,
    }
    assert summaries["dlrhub.test.repeats", "poll: provider answered HTTP 500"]["url"] == "http://provider"


def test_lines_below_warning_pass_untouched(lines: Lines) -> None:
    logger = logging.getLogger("dlrhub.test.repeats")
    for number in range(500):
        logger.info("rpc", extra={"number": number})
    time.sleep(INTERVAL * 2)
    assert [line["number"] for line in lines()] == list(range(500))


def test_after_a_quiet_interval_the_next_line_is_written_in_full_again(lines: Lines) -> None:
    logger = logging.getLogger("dlrhub.test.repeats")
    fail(logger, 1)
    time.sleep(INTERVAL * 3)  # no repeat: no summary, and the key is forgotten
    assert len(lines()) == 1
    fail(logger, 2)
    fail(logger, 3)
    logged = lines.wait_for_summaries(1)
    assert [(line["message"], "exception" in line, line.get("repeated")) for line in logged] == [
        ("commit failed for 1 submissions", True, None),
        ("commit failed for 2 submissions", True, None),
        ("commit failed for 3 submissions", False, 1),
    ]


def test_flush_writes_the_count_of_an_interval_still_running(lines: Lines) -> None:
    lines.repeats.interval = 60.0  # no timer will end it during the test
    logger = logging.getLogger("dlrhub.test.repeats")
    for number in range(5):
        fail(logger, number)
    assert len(lines()) == 1
    lines.repeats.flush()  # at exit
    assert [line.get("repeated") for line in lines()] == [None, 4]


async def test_asyncios_accept_errors_go_through_it(lines: Lines) -> None:
    """The event loop's "out of system resource" lines, one per failed accept, become one and a count."""
    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.addHandler(lines.handler)
    try:
        loop = asyncio.get_running_loop()
        for _ in range(1000):
            # What asyncio's selector loop reports for each accept() that fails with EMFILE.
            loop.call_exception_handler(
                {
                    "message": "socket.accept() out of system resource",
                    "exception": OSError(errno.EMFILE, "Too many open files"),
                    "socket": "<asyncio.TransportSocket fd=7, laddr=('127.0.0.1', 8080)>",
                }
            )
        logged = lines.wait_for_summaries(999)
    finally:
        asyncio_logger.removeHandler(lines.handler)
    assert all(line["logger"] == "asyncio" for line in logged)
    assert logged[0]["message"].startswith("socket.accept() out of system resource")
    assert "Too many open files" in logged[0]["exception"]
    assert sum(line.get("repeated", 0) for line in logged) == 999
