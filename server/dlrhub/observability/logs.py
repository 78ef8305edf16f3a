"""Structured logs on stderr: one JSON object per line, or, for a person at a terminal, one
readable line per record (`text`: the default when stderr is a terminal; DLRHUB_LOG_FORMAT chooses).

A line per call is on the hot path, so lines are written in batches: when
`capacity` lines are waiting, at once for a WARNING or worse, and otherwise at
most `interval` seconds after they were logged (and at exit).

A failure that repeats (a store that cannot commit, a port out of file
descriptors) would write a line per occurrence; RepeatFilter turns such a storm
into its first line and one count per interval.
"""

from __future__ import annotations

import atexit
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from dlrhub.observability.tracing import current_trace_id

# Attributes every LogRecord has; anything else was passed with `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}


# One encoder for every line (json.dumps with `default` builds a new one per call).
_ENCODER = json.JSONEncoder(default=str)


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        # The current second, formatted once (a line per call is on the hot path); one tuple, so a
        # thread never sees the text of one second with the number of another.
        self._second: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        created = record.created
        # Rounded to the microsecond first, as datetime.fromtimestamp does, then cut to milliseconds.
        whole = int(created)
        micros = round((created - whole) * 1e6)
        if micros >= 1_000_000:
            whole, micros = whole + 1, micros - 1_000_000
        second, second_text = self._second
        if whole != second:
            second_text = datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = (whole, second_text)
        entry: dict[str, object] = {
            "time": f"{second_text}.{micros // 1000:03d}+00:00",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update((key, value) for key, value in vars(record).items() if key not in _STANDARD)
        if "trace_id" not in entry:  # a call's line brings the trace id of its call (CallLog)
            trace_id = current_trace_id()
            if trace_id is not None:
                entry["trace_id"] = trace_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _ENCODER.encode(entry)


class TextFormatter(logging.Formatter):
    """A line for a person: local time, level, logger and message, then the fields as key=value
    (quoted where they hold a space), and a traceback below."""

    def format(self, record: logging.LogRecord) -> str:
        moment = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = {key: value for key, value in vars(record).items() if key not in _STANDARD}
        if "trace_id" not in fields and (trace_id := current_trace_id()) is not None:
            fields["trace_id"] = trace_id
        line = f"{moment}.{int(record.msecs):03d} {record.levelname:<7} {record.name}: {record.getMessage()}"
        line += "".join(f" {key}={_text(value)}" for key, value in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text(value: object) -> str:
    text = value if isinstance(value, str) else _ENCODER.encode(value)
    return _ENCODER.encode(text) if not text or any(c.isspace() or c in '"=' for c in text) else text


FORMATS = ("json", "text")


class BatchingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that writes many lines per system call."""

    def __init__(self, stream: Any, capacity: int = 256, interval: float = 0.2) -> None:
        super().__init__(stream)
        self.capacity = capacity
        self.interval = interval
        self._lines: list[str] = []
        self._timer: threading.Timer | None = None

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held
        try:
            self._lines.append(self.format(record))
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING or len(self._lines) >= self.capacity:
            self._write()
        elif self._timer is None:
            self._timer = threading.Timer(self.interval, self.flush)
            self._timer.daemon = True
            self._timer.start()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write()

    def _write(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._lines:
            self.stream.write("\n".join(self._lines) + "\n")
            self._lines.clear()
        self.stream.flush()


@dataclass(slots=True)
class _Repeats:
    """The repeats of one line held back in the current interval."""

    count: int = 0
    last: logging.LogRecord | None = None


class RepeatFilter(logging.Filter):
    """Rate-limits repeated lines, process-wide when set on the handler (as `configure` does).

    A line at `level` or above (WARNING by default) is keyed by its logger and its message template
    (the format string before its arguments, up to its first line break: asyncio's event-loop errors
    add per-event details after one). The first line of a key is logged as it is, with its
    traceback. Lines of that key in the next `interval` seconds are counted, not logged; when the
    interval ends, if there were any, one summary is logged: the last of them, at its level and
    with its fields but no traceback, plus `repeated` (how many were held back) and
    `interval_seconds`. A key repeating for an hour so logs its first line and one summary per
    interval; after an interval without a repeat, its next line is logged in full again.

    Lines below `level` pass untouched: the per-call INFO lines are one per call by design.
    """

    def __init__(self, interval: float = 10.0, level: int = logging.WARNING) -> None:
        super().__init__()
        self.interval = interval
        self.level = level
        self._lock = threading.Lock()
        # Keys seen in the current interval: those with a timer running.
        self._repeats: dict[tuple[str, str], _Repeats] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level or hasattr(record, "repeated"):  # a summary passes
            return True
        key = (record.name, str(record.msg).partition("\n")[0])
        with self._lock:
            repeats = self._repeats.get(key)
            if repeats is None:
                self._repeats[key] = _Repeats()
                self._start_timer(key)
                return True
            repeats.count += 1
            repeats.last = record
            return False

    def flush(self) -> None:
        """Logs the summaries of every interval still running now (at exit)."""
        with self._lock:
            pending, self._repeats = self._repeats, {}
        for repeats in pending.values():
            self._log_summary(repeats)

    def _start_timer(self, key: tuple[str, str]) -> None:
        timer = threading.Timer(self.interval, self._interval_ended, (key,))
        timer.daemon = True
        timer.start()

    def _interval_ended(self, key: tuple[str, str]) -> None:
        with self._lock:
            repeats = self._repeats.pop(key, None)
            if repeats is None or repeats.count == 0:
                return  # quiet for a whole interval (or flushed): the next line is a first line again
            self._repeats[key] = _Repeats()  # still repeating: count the next interval too
            self._start_timer(key)
        self._log_summary(repeats)

    def _log_summary(self, repeats: _Repeats) -> None:
        last = repeats.last
        if last is None:
            return
        fields = {**vars(last), "exc_info": None, "exc_text": None, "stack_info": None}
        summary = logging.makeLogRecord(fields | {"created": time.time()})
        summary.repeated = repeats.count
        summary.interval_seconds = self.interval
        logging.getLogger(last.name).handle(summary)


def configure(level: str, repeat_interval: float = 10.0, format: str = "") -> None:
    """Logging for the server: `format` json or text (FORMATS), or "" for text on a terminal and
    JSON elsewhere. Raises ValueError for another format."""
    if format not in ("", *FORMATS):
        raise ValueError(f"the log format must be json or text, not {format!r}")
    text = format == "text" or (not format and sys.stderr.isatty())
    # A line per call is on the hot path: skip what these lines never show (the caller's file and
    # line, thread and process names), as the logging documentation's optimisation notes advise.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = BatchingStreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter() if text else JsonFormatter())
    repeats = RepeatFilter(repeat_interval)
    handler.addFilter(repeats)
    atexit.register(repeats.flush)  # before logging's own exit hook writes the last lines
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
