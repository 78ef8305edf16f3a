"""The upkeep's timer (dlrhub/write/periodic.py): a failing round is logged, and the next one runs."""

from __future__ import annotations

import asyncio
import logging

import pytest

from dlrhub.write import periodic
from tests.helpers import TIMEOUT


async def test_a_round_that_fails_is_logged_and_the_next_one_runs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="dlrhub")
    rounds = 0
    second = asyncio.Event()

    async def work() -> None:
        nonlocal rounds
        rounds += 1
        if rounds == 1:
            raise OSError("disk I/O error")
        second.set()

    task = periodic.every(0.001, work, name="test-upkeep", failure="could not do the upkeep")
    try:
        await asyncio.wait_for(second.wait(), TIMEOUT)
    finally:
        await periodic.cancel(task)
    assert task.cancelled()
    [record] = [record for record in caplog.records if record.getMessage() == "could not do the upkeep"]
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], OSError)
