"""The servers a run measures, as processes: `dlrhub serve` and the echo ceiling (bench/echo_server.py).

`start_dlrhub` and `start_echo` start one (tools/launcher.py) and return it once it serves. Its
stdout and stderr are read all along (dlrhub logs a line per call: a pipe left unread would block
it), and the last lines are kept for the error raised when it does not start or dies.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tools import launcher
from tools.launcher import Server

__all__ = ["Server", "runs_uvloop", "start_dlrhub", "start_echo"]

# Environment variables the load processes cannot follow (they speak plaintext, without a token):
# dropped from the server's environment. Every other DLRHUB_* setting the caller has set applies.
_UNSUPPORTED_ENV = ("DLRHUB_TOKENS", "DLRHUB_TOKENS_FILE", "DLRHUB_TLS_CERT", "DLRHUB_TLS_KEY")
_KEEP_LINES = 200  # of each pipe: dlrhub logs a line per call


def start_dlrhub(db: Path | str, event_loop: str) -> Server:
    """`dlrhub serve` with its real settings: only the addresses (free ports) and the database (a
    file, or a postgresql:// URL) are set, and the DLRHUB_* variables of the environment apply (but
    the token and TLS ones). On uvloop it runs through bench/serve_uvloop.py. Returned once it
    serves: its "serving" log line, or its health service where a log level above INFO hides that
    line (so its ports are chosen here, not by the server)."""
    server = launcher.start(
        db,
        env=_environment(),
        listen=f"127.0.0.1:{launcher.free_port()}",
        http_listen=f"127.0.0.1:{launcher.free_port()}",
        admin_listen=f"127.0.0.1:{launcher.free_port()}",
        module="bench.serve_uvloop" if event_loop == "uvloop" else "dlrhub.cli",
        keep=_KEEP_LINES,
    )
    if runs_uvloop(server) != (event_loop == "uvloop"):
        server.stop()
        raise RuntimeError(f"dlrhub was to run on {event_loop}, but uvloop loaded: {runs_uvloop(server)}")
    return server


def start_echo(event_loop: str) -> Server:
    """bench/echo_server.py on a free port; returned once it prints its port (and its event loop, in
    `ready["loop"]`)."""
    command = [sys.executable, "-m", "bench.echo_server", "--event-loop", event_loop]
    return launcher.launch("echo", command, lambda entry: "port" in entry, _environment(), keep=_KEEP_LINES)


def runs_uvloop(server: Server) -> bool:
    """Whether uvloop's extension is mapped into the process (it really runs on uvloop)."""
    try:
        return "uvloop/loop." in Path(f"/proc/{server.pid}/maps").read_text()
    except OSError:
        return False


def _environment() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key not in _UNSUPPORTED_ENV}
