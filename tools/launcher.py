"""`dlrhub serve` as a process, for the tests and the benchmarks: started on free ports, returned once it
serves, stopped with SIGTERM (SIGKILL when that does not end it).

    with launcher.start(db, ["--log-level", "DEBUG"], env={**os.environ, "DLRHUB_TRACING": "console"}) as hub:
        ... hub.address, hub.http_address, hub.admin_address, hub.process, hub.output.stderr ...

Its stdout and stderr are read all along by two threads (dlrhub logs a line per call: a pipe left
unread would block it) and kept, so that a test can read its log after it stops and an error can show
why it did not start. `launch` does the same for any server that prints a JSON line once it serves.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import grpc
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60.0  # seconds: a busy machine can take long to import grpc and open the store
STOP_TIMEOUT = 30.0  # seconds from the signal to the exit, before SIGKILL

Ready = Callable[[dict[str, Any]], bool]


def serving(entry: dict[str, Any]) -> bool:
    """dlrhub's "serving" log line, which carries its ports."""
    return entry.get("message") == "serving"


class Output:
    """A process's stdout and stderr lines (the last `keep` of each; all of them by default), and the
    first JSON line of either that `ready` accepts, handed to `wait`."""

    def __init__(self, process: subprocess.Popen[str], ready: Ready, keep: int | None = None) -> None:
        self.stdout: deque[str] = deque(maxlen=keep)
        self.stderr: deque[str] = deque(maxlen=keep)
        self._lock = threading.Lock()
        self._found: queue.Queue[dict[str, Any] | None] = queue.Queue()  # None: a pipe ended
        self._readers = [
            threading.Thread(target=self._drain, args=(stream, lines, ready), daemon=True)
            for stream, lines in ((process.stdout, self.stdout), (process.stderr, self.stderr))
            if stream is not None
        ]
        for reader in self._readers:
            reader.start()

    def _drain(self, stream: IO[str], lines: deque[str], ready: Ready) -> None:
        waiting = True
        for line in stream:
            with self._lock:
                lines.append(line)
            if waiting:  # after that, the lines are only kept
                with contextlib.suppress(json.JSONDecodeError):
                    entry = json.loads(line)
                    if isinstance(entry, dict) and ready(entry):
                        self._found.put(entry)
                        waiting = False
        self._found.put(None)

    def wait(self, timeout: float, probe: Callable[[], bool] | None = None) -> dict[str, Any] | None:
        """The ready line ({} if `probe` says the server serves first); None if the pipes ended (the
        process exited) or `timeout` seconds passed."""
        deadline = time.monotonic() + timeout
        ended = 0
        while time.monotonic() < deadline and ended < len(self._readers):
            try:
                entry = self._found.get(timeout=0.5)
            except queue.Empty:
                if probe is not None and probe():
                    return {}
                continue
            if entry is not None:
                return entry
            ended += 1
        return None

    def join(self, timeout: float = STOP_TIMEOUT) -> None:
        """Waits until both pipes are read to their end (the process has exited)."""
        for reader in self._readers:
            reader.join(timeout)

    def lines(self) -> list[str]:
        """What it wrote so far: stderr, then stdout."""
        with self._lock:
            return [*self.stderr, *self.stdout]

    def text(self) -> str:
        return "".join(self.lines())


@dataclass(frozen=True)
class Server:
    """A server process that serves; a context manager that stops it."""

    name: str
    process: subprocess.Popen[str]
    output: Output
    port: int
    http_port: int = 0  # dlrhub's webhooks
    admin_port: int = 0  # dlrhub's /metrics
    ready: dict[str, Any] = field(default_factory=dict)  # its ready line ({} where health said so)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_address(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def admin_address(self) -> str:
        return f"127.0.0.1:{self.admin_port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, signum: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Sends `signum` (if it still runs) and waits for the exit, killing it after `timeout` seconds;
        its exit code. Its output is then complete."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.output.join()
        return self.process.returncode

    def __enter__(self) -> Server:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()


def start(
    db: Path | str | None,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    *,
    listen: str | None = "127.0.0.1:0",
    http_listen: str | None = "127.0.0.1:0",
    admin_listen: str | None = "127.0.0.1:0",
    module: str = "dlrhub.cli",
    timeout: float = START_TIMEOUT,
    keep: int | None = None,
) -> Server:
    """`python -m {module} serve` with `--db db` (a path or a URL), the addresses (None: not given, so
    the environment's apply), then `args`, in the environment `env` (default: this one). Returned once it logs
    "serving" (with the ports it bound) or, where the gRPC port is given and a log level above INFO
    hides that line, once its health service answers SERVING."""
    command = [sys.executable, "-m", module, "serve"]
    addresses = (("--listen", listen), ("--http-listen", http_listen), ("--admin-listen", admin_listen))
    for flag, value in (("--db", db), *addresses):
        if value is not None:
            command += [flag, str(value)]
    known = (_port_of(listen), _port_of(http_listen), _port_of(admin_listen))
    return launch("dlrhub", [*command, *args], serving, env, known_ports=known, timeout=timeout, keep=keep)


def launch(
    name: str,
    command: Sequence[str],
    ready: Ready,
    env: Mapping[str, str] | None = None,
    *,
    known_ports: tuple[int, int, int] = (0, 0, 0),
    timeout: float = START_TIMEOUT,
    keep: int | None = None,
    cwd: Path = ROOT,
) -> Server:
    """Runs `command` from `cwd` (the repository root; `cwd` is put on PYTHONPATH); returned once it
    writes a JSON line `ready` accepts, whose "port", "http_port" and "admin_port" are its ports (or,
    for a known gRPC port, once health says SERVING)."""
    environment = dict(os.environ if env is None else env)
    environment["PYTHONUNBUFFERED"] = "1"
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd), environment.get("PYTHONPATH")]))
    process = subprocess.Popen(
        command, cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    output = Output(process, ready, keep)
    port, http_port, admin_port = known_ports
    probe = (lambda: process.poll() is None and health_serving(port)) if port else None
    entry = output.wait(timeout, probe)
    if entry is None:
        process.kill()
        process.wait()
        output.join()
        raise RuntimeError(f"{name} did not start within {timeout:.0f} s:\n{output.text()}")
    return Server(
        name,
        process,
        output,
        port=int(entry.get("port", port)),
        http_port=int(entry.get("http_port", http_port)),
        admin_port=int(entry.get("admin_port") or admin_port),
        ready=entry,
    )


def free_port() -> int:
    """A port free now (for a server that must be started on a port known in advance)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def health_serving(port: int) -> bool:
    """Whether the gRPC health service on `port` answers SERVING."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            answer = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=HealthCheckRequest.SerializeToString,
                response_deserializer=HealthCheckResponse.FromString,
            )(HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return bool(answer.status == HealthCheckResponse.SERVING)


def _port_of(address: str | None) -> int:
    return int(address.rsplit(":", 1)[1]) if address else 0
