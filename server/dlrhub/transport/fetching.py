"""Fetching from a provider, for the adapters that pull (the SentSMSReport poller, the GMS seen fetcher).

    fetched = await fetch(client, "GET", url, deadline=30.0, max_body_bytes=64 * 2**20, headers=...)
    delay = backoff_delay(failures, initial=1.0, maximum=300.0)
    await stop_task(task, grace=5.0)

`fetch` gives a request one deadline for the whole of it (httpx's timeouts are per read: a provider
that drips a byte a second never trips them) and reads the body as a stream, stopping past a cap, so
that neither a slow nor a huge answer holds a fetcher or its memory without bound.

Exceptions: FetchFailure, with `kind` one of timeout, connection or body_too_large; any HTTP
status is an answer (Fetched.status), for the caller to judge.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

__all__ = ["FetchFailure", "Fetched", "backoff_delay", "fetch", "stop_task"]

# The largest body read by default: a full SentSMSReport batch (1000 reports) of 64 KiB items.
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Fetched:
    """A provider's answer, read whole."""

    status: int
    headers: httpx.Headers
    body: bytes


class FetchFailure(Exception):
    """A request got no whole answer; `kind` is timeout, connection or body_too_large."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


async def fetch(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    deadline: float,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    params: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Fetched:
    """Sends a request and reads its answer within `deadline` seconds in all; a body over
    `max_body_bytes` (declared, or once read that far) ends the read. Raises FetchFailure."""
    try:
        async with asyncio.timeout(deadline):
            async with client.stream(method, url, params=params, headers=headers) as response:
                declared = response.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > max_body_bytes:
                    raise _too_large(f"{declared} bytes declared", max_body_bytes)
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > max_body_bytes:
                        raise _too_large(f"over {len(body) - len(chunk)} bytes read", max_body_bytes)
                return Fetched(response.status_code, response.headers, bytes(body))
    except TimeoutError:
        raise FetchFailure("timeout", f"no whole answer within {deadline:g} s") from None
    except httpx.TimeoutException as error:
        raise FetchFailure("timeout", str(error) or type(error).__name__) from error
    except httpx.RequestError as error:  # connection refused or reset, bad content encoding, ...
        raise FetchFailure("connection", str(error) or type(error).__name__) from error


def _too_large(read: str, limit: int) -> FetchFailure:
    return FetchFailure("body_too_large", f"the body is over the {limit}-byte limit ({read})")


def backoff_delay(
    failures: int, initial: float, maximum: float, jitter: Callable[[], float] = random.random
) -> float:
    """Seconds to wait after `failures` failures in a row: a ceiling doubling from `initial` per
    failure, capped at `maximum`, with full jitter (`jitter()`, 0 to 1) on its upper half."""
    doubling: float = 2.0 ** min(max(failures - 1, 0), 30)
    ceiling = min(maximum, initial * doubling)
    return ceiling / 2 + jitter() * ceiling / 2


async def stop_task(task: asyncio.Task[Any], grace: float) -> None:
    """Lets `task` finish for up to `grace` seconds, then cancels it; returns once it has ended."""
    done, _ = await asyncio.wait({task}, timeout=grace)
    if not done:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
