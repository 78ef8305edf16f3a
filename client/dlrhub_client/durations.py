"""Durations as people write them: `90s`, `15m`, `12h`, `30d`, `2w`, or a number of seconds.

The server's DLRHUB_RETENTION and the CLI's `--older-than` read them the same way.
"""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_DURATION = re.compile(r"(\d+)\s*([smhdw]?)")


def parse_duration(text: str) -> timedelta:
    """`text` as a duration of whole seconds; ValueError saying what is expected otherwise."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"expected a duration such as 90s, 15m, 12h, 30d or 2w, not {text!r}")
    return timedelta(seconds=int(match[1]) * _UNITS[match[2]])
