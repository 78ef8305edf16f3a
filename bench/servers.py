"""The servers a run measures, as processes: `dlrhub serve` and the echo ceiling (bench/echo_server.py).

`start_dlrhub` and `start_echo` start one and return it once it serves. Its stdout and stderr are
read all along (dlrhub logs a line per call: a pipe left unread would block it), and the last lines
are kept for the error raised when it does not start or dies.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

import grpc
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from bench.common import ROOT

# Environment variables the load processes cannot follow (they speak plaintext, without a token):
# dropped from the server's environment. Every other DLRHUB_* setting the caller has set applies.
_UNSUPPORTED_ENV = ("DLRHUB_TOKENS", "DLRHUB_TOKENS_FILE", "DLRHUB_TLS_CERT", "DLRHUB_TLS_KEY")
START_TIMEOUT = 60.0  # seconds


class Output:
    """A server process's stdout and stderr, each read by a thread until it ends: the last lines are
    kept, and the first JSON line that `ready` accepts is handed to `wait`."""

    def __init__(self, process: subprocess.Popen[str], ready: Callable[[dict[str, Any]], bool]) -> None:
        self.lines: list[str] = []
        self._found: queue.Queue[dict[str, Any] | None] = queue.Queue()  # None: a pipe ended
        for stream in (process.stdout, process.stderr):
            assert stream is not None
            threading.Thread(target=self._drain, args=(stream, ready), daemon=True).start()

    def _drain(self, stream: IO[str], ready: Callable[[dict[str, Any]], bool]) -> None:
        waiting = True
        for line in stream:
            self.lines.append(line)
            if len(self.lines) > 400:
                del self.lines[:-200]
            if waiting:  # after that, the lines are only kept
                with contextlib.suppress(json.JSONDecodeError):
                    entry = json.loads(line)
                    if isinstance(entry, dict) and ready(entry):
                        self._found.put(entry)
                        waiting = False
        self._found.put(None)

    def wait(self, timeout: float, probe: Callable[[], bool] | None = None) -> dict[str, Any] | None:
        """The ready line ({} if `probe` says the server serves first); None if both pipes ended (the
        process exited) or `timeout` seconds passed."""
        deadline = time.monotonic() + timeout
        ended = 0
        while time.monotonic() < deadline and ended < 2:
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


@dataclass(frozen=True)
class Server:
    """A running server process."""

    name: str
    process: subprocess.Popen[str]
    port: int
    output: Output
    http_port: int = 0  # dlrhub's webhooks and /metrics
    loop: str = ""  # the echo's event loop, as it reports it

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def uvloop(self) -> bool:
        """Whether uvloop's extension is mapped into the process (it really runs on uvloop)."""
        try:
            return "uvloop/loop." in Path(f"/proc/{self.pid}/maps").read_text()
        except OSError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_dlrhub(db: Path, event_loop: str) -> Server:
    """`dlrhub serve` with its real settings: only the addresses (free ports) and the database file
    are set, and the DLRHUB_* variables of the environment apply (but the token and TLS ones). On
    uvloop it runs through bench/serve_uvloop.py. Returned once it serves: its "serving" log line,
    or its health service where a log level above INFO hides that line."""
    module = "bench.serve_uvloop" if event_loop == "uvloop" else "dlrhub.cli"
    port, http_port = _free_port(), _free_port()
    listen = ["--listen", f"127.0.0.1:{port}", "--http-listen", f"127.0.0.1:{http_port}"]
    process = _spawn([sys.executable, "-m", module, "serve", *listen, "--db", str(db)])
    output = Output(process, ready=lambda entry: entry.get("message") == "serving")
    if output.wait(START_TIMEOUT, probe=lambda: process.poll() is None and _health_serving(port)) is None:
        _failed("dlrhub", process, output)
    server = Server("dlrhub", process, port, output, http_port=http_port)
    if server.uvloop != (event_loop == "uvloop"):
        server.stop()
        raise RuntimeError(f"dlrhub was to run on {event_loop}, but uvloop loaded: {server.uvloop}")
    return server


def start_echo(event_loop: str) -> Server:
    """bench/echo_server.py on a free port; returned once it prints its port."""
    process = _spawn([sys.executable, "-m", "bench.echo_server", "--event-loop", event_loop])
    output = Output(process, ready=lambda entry: "port" in entry)
    ready = output.wait(START_TIMEOUT)
    if ready is None:
        _failed("echo", process, output)
    return Server("echo", process, int(ready["port"]), output, loop=str(ready.get("loop", "")))


def _spawn(command: list[str]) -> subprocess.Popen[str]:
    env = {key: value for key, value in os.environ.items() if key not in _UNSUPPORTED_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _failed(name: str, process: subprocess.Popen[str], output: Output) -> NoReturn:
    process.kill()
    raise RuntimeError(f"{name} did not start:\n{''.join(output.lines)}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _health_serving(port: int) -> bool:
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
