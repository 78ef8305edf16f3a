"""py-spy on the server process, summarised into hotspots.

`Profiler(pid, seconds)` runs `py-spy record --gil --native --threads --format raw` (collapsed
stacks of the thread holding the GIL; native frames tell time in grpc's Cython core, protobuf's upb
and libsqlite3 apart) while a load point runs, and `summarise` turns the stacks into:
  - the share of busy samples per thread (the event loop, the writer, the readers, grpc's poller);
  - the share per layer, by the innermost frame's library (grpc, protobuf, sqlite, asyncio, ...);
  - the top Python functions by self time (the innermost Python frame of each sample) and by
    inclusive time (every Python function on the stack, once per sample), as file:function.
Only samples holding the GIL are kept: the server's Python work is bound to one core by the GIL, so
these percentages are shares of that core's budget. Waiting (fsync, epoll, queue gets, the GIL itself)
is not in them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import ROOT

# Frames under everything (the interpreter's start, the event loop's run, a thread's start): left out
# of the inclusive list, where they would only say "100%".
_BOILERPLATE = (
    "<frozen runpy>",
    "server/dlrhub/cli.py:",
    "asyncio/runners.py:",
    "asyncio/base_events.py:BaseEventLoop.run_",
    "threading.py:Thread._bootstrap",
    "bench/serve_uvloop.py:",
)
_FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^()]*)\)$")
_THREAD = re.compile(r"^thread \((?P<tid>\d+)\): ?(?P<name>.*)$")


def py_spy() -> str | None:
    """The py-spy executable beside this interpreter, or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


class Profiler:
    """`py-spy record` attached to `pid` for `seconds`, starting now."""

    def __init__(self, pid: int, seconds: float, output: Path, *, rate: int = 100) -> None:
        executable = py_spy()
        if executable is None:
            raise RuntimeError("py-spy is not installed: pip install -e '.[bench]'")
        self.output = output
        self.command = [
            executable,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, round(seconds))),
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--gil",
            "--threads",
            "--native",
            "--full-filenames",
            "--nolineno",
            "--output",
            str(output),
        ]
        for _ in range(5):  # attaching now and then fails at once ("Failed to find python version")
            self.process = subprocess.Popen(
                self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
            time.sleep(0.5)
            if self.process.poll() is None:
                break

    def wait(self, timeout: float = 60) -> str:
        """Waits for py-spy to finish; its error output."""
        try:
            _, errors = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, errors = self.process.communicate()
        return errors or ""


@dataclass
class Profile:
    samples: int = 0
    threads: Counter[str] = field(default_factory=Counter)
    layers: Counter[str] = field(default_factory=Counter)
    self_python: Counter[str] = field(default_factory=Counter)
    inclusive_python: Counter[str] = field(default_factory=Counter)

    def as_dict(self, top: int = 25) -> dict[str, Any]:
        def shares(counter: Counter[str], n: int) -> list[tuple[str, float]]:
            return [(name, round(100 * count / self.samples, 1)) for name, count in counter.most_common(n)]

        return {
            "samples": self.samples,
            "threads_pct": shares(self.threads, 10),
            "layers_pct": shares(self.layers, 12),
            "self_pct": shares(self.self_python, top),
            "inclusive_pct": shares(self.inclusive_python, top),
        }


def summarise(raw: Path) -> Profile:
    profile = Profile()
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = _THREAD.match(frames[0])
        if thread:
            frames = frames[1:]
            profile.threads[_thread_name(thread.group("name"))] += count
        profile.samples += count
        parsed = [_parse(frame) for frame in frames]
        profile.layers[_layer(parsed)] += count
        python = [f"{_short(file)}:{name}" for name, file in parsed if _is_python(file)]
        if python:
            profile.self_python[python[-1]] += count
        for name in dict.fromkeys(python):
            if not name.startswith(_BOILERPLATE):
                profile.inclusive_python[name] += count
    return profile


def format_profile(title: str, data: dict[str, Any]) -> str:
    lines = [f"== {title}: {data['samples']} samples holding the GIL (100 Hz)"]
    for key, heading in (
        ("threads_pct", "by thread"),
        ("layers_pct", "by layer (innermost frame)"),
        ("self_pct", "self time, innermost Python function"),
        ("inclusive_pct", "inclusive time, Python function on the stack"),
    ):
        lines.append(f"  -- {heading}")
        lines.extend(f"    {pct:5.1f}%  {name}" for name, pct in data[key])
    return "\n".join(lines)


def _parse(frame: str) -> tuple[str, str]:
    match = _FRAME.match(frame)
    if match is None:
        return frame, ""
    return match.group("name"), match.group("file")


def _is_python(file: str) -> bool:
    return file.endswith(".py") or file.startswith("<frozen")


def _thread_name(name: str) -> str:
    # "dlrhub-reader_0" and "dlrhub-reader_3" are one kind of thread.
    return re.sub(r"_\d+$", "_N", name.strip() or "?")


def _short(file: str) -> str:
    for marker in ("/site-packages/", "/lib/python3.11/", "/lib/python3.12/", "/lib/python3.13/"):
        if marker in file:
            return file.split(marker, 1)[1]
    root = str(ROOT) + "/"
    return file.removeprefix(root)


def _layer(frames: list[tuple[str, str]]) -> str:
    """Which layer the innermost frame belongs to; interpreter frames count for the Python code above."""
    for name, file in reversed(frames):
        layer = _native_layer(name, file)
        if layer is not None:
            return layer
        if _is_python(file):
            return _python_layer(file)
    return "other"


def _native_layer(name: str, file: str) -> str | None:
    if "cygrpc" in file or "libgrpc" in file:
        return "grpc (Cython/C core)"
    if "_message" in file or "upb" in file or "protobuf" in file:
        return "protobuf (upb)"
    if "sqlite" in file:
        return "sqlite3 (C)"
    if "libc.so" in file or "libpthread" in file:
        if name in ("fsync", "fdatasync", "__fsync", "__libc_fsync"):
            return "fsync"
        return f"libc ({name})" if not name.startswith("0x") else "libc"
    if "uvloop" in file:
        return "uvloop (C)"
    if "libpython" in file or "python3" in file.rsplit("/", 1)[-1] or "/Python-" in file:
        return None  # the interpreter: attribute to the Python frame it runs
    if file.endswith(".so") or ".so." in file:
        return f"native ({Path(file).name})"
    return None


def _python_layer(file: str) -> str:
    short = _short(file)
    if short.startswith("grpc"):
        return "grpc (Python)"
    if short.startswith("google/protobuf"):
        return "protobuf (Python)"
    if short.startswith("asyncio/") or short == "selectors.py":
        return "asyncio"
    if short.startswith("server/dlrhub/"):
        return "dlrhub: " + short.removeprefix("server/dlrhub/")
    if short.startswith(("gen/", "deliveryreport/")):
        return "generated code"
    return "python: " + short
