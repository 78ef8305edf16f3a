"""`dlrhub serve --workers N`: N server processes on the same ports, over one shared database.

The parent starts N `dlrhub serve` processes (workers) with its settings in their environment and
supervises them; it serves nothing itself. The workers share the gRPC and webhook ports (SO_REUSEPORT:
the kernel spreads new connections over them), and each has its own admin port (/metrics): the
configured port plus the worker's number (0, 1, ...), so a scrape sees one worker, never a random one
(port 0: each picks a free port, named in its "serving" line).

- SIGTERM or SIGINT to the parent is passed on to every worker; each stops gracefully, and the parent
  exits once all have: 0 if all stopped cleanly, else 1.
- A worker that exits on its own (a crash, SIGKILL) is not restarted: the parent stops the others and
  exits non-zero (that worker's status, or 1), so a supervisor above it (systemd, Kubernetes) sees
  the failure and restarts the whole service.
- A worker dies with the parent (Linux: PR_SET_PDEATHSIG), so none is left behind when the parent is
  killed.
- The fetchers (the SentSMSReport poller, the GMS seen fetcher) run in worker 0 only: N of them would
  ask the providers N times as often and replay the same staged bodies at once.

Refused at start (the CLI's one line, exit 2): a store that only one process may write (SQLite), and
gRPC or webhook port 0 (each worker would get a different free port, which no client could find).
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

from dlrhub.config import Settings

log = logging.getLogger(__name__)

# Set in a worker's environment: its number (0 to N-1), and the parent's pid.
WORKER_ENV = "DLRHUB_WORKER"
PARENT_ENV = "DLRHUB_WORKER_PARENT"


def check(settings: Settings) -> None:
    """Raises ValueError when `settings` cannot run as several workers on the same ports."""
    for name, address in (("DLRHUB_LISTEN", settings.listen), ("DLRHUB_HTTP_LISTEN", settings.http_listen)):
        if address.rpartition(":")[2] in ("0", ""):
            raise ValueError(
                f"--workers {settings.workers} needs fixed ports, but {name} is {address}:"
                " each worker would listen on a different free port"
            )


def worker_admin_listen(admin_listen: str, worker: int) -> str:
    """Worker `worker`'s admin address: the port plus its number (port 0 stays 0; empty stays off)."""
    if not admin_listen:
        return ""
    host, _, port = admin_listen.rpartition(":")
    return f"{host}:{int(port) + worker}" if int(port) else admin_listen


def environment(settings: Settings, base: Mapping[str, str]) -> dict[str, str]:
    """`base` with every setting as its DLRHUB_* variable (unset ones removed), so a worker started
    with it has exactly these settings, whatever flags the parent was given."""
    env = dict(base)
    for setting in dataclasses.fields(Settings):
        name, value = setting.metadata["env"], getattr(settings, setting.name)
        if value is None or value == "":
            env.pop(name, None)
        elif isinstance(value, bool):
            env[name] = "on" if value else "off"
        else:
            env[name] = str(value)
    return env


# The settings that turn a fetcher on: only worker 0 keeps them.
FETCHER_ENV = ("DLRHUB_POLL_BASE_URL", "DLRHUB_GMS_SEEN_BASE_URL")


def worker_environment(
    base: Mapping[str, str], settings: Settings, number: int, parent: int
) -> dict[str, str]:
    """Worker `number`'s environment: `base` (every setting, see `environment`) with its admin port,
    its number and its parent's pid; without the fetchers unless it is worker 0."""
    env = {
        **base,
        "DLRHUB_ADMIN_LISTEN": worker_admin_listen(settings.admin_listen, number),
        WORKER_ENV: str(number),
        PARENT_ENV: str(parent),
    }
    if not env["DLRHUB_ADMIN_LISTEN"]:
        del env["DLRHUB_ADMIN_LISTEN"]
    if number:
        for name in FETCHER_ENV:
            env.pop(name, None)
    return env


def is_worker(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is a worker started by `supervise`."""
    return WORKER_ENV in environ


def die_with_parent(environ: Mapping[str, str] = os.environ) -> None:
    """In a worker: be sent SIGTERM when the parent dies (Linux), or stop now if it has already."""
    parent = int(environ.get(PARENT_ENV, "0"))
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if parent and os.getppid() != parent:  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def supervise(settings: Settings, environ: Mapping[str, str] = os.environ) -> int:
    """Runs `settings.workers` workers until they stop (see the module's text); the exit status."""
    workers: dict[int, tuple[int, subprocess.Popen[bytes]]] = {}  # by pid: number, process
    stopping: list[int] = []  # the signal passed on, once there is one

    def stop_all(signum: int) -> None:
        for _, process in workers.values():
            if process.returncode is None:
                process.send_signal(signum)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if not stopping:
            log.info("stopping the workers", extra={"signal": signal.Signals(signum).name})
        stopping.append(signum)
        stop_all(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    base = environment(settings, environ)
    for number in range(settings.workers):
        if stopping:
            break
        env = worker_environment(base, settings, number, os.getpid())
        # A session of its own: Ctrl-C at a terminal reaches the parent only, which passes it on once.
        command = [sys.executable, "-m", "dlrhub", "serve"]
        process = subprocess.Popen(command, env=env, cwd=Path.cwd(), start_new_session=True)
        workers[process.pid] = (number, process)
        if stopping:  # a signal came while it was being started: stop_all did not know it yet
            process.send_signal(stopping[0])
    log.info("workers started", extra={"workers": {number: pid for pid, (number, _) in workers.items()}})
    status = 0
    while any(process.returncode is None for _, process in workers.values()):
        pid, wait_status = os.wait()  # a signal runs its handler, then the wait goes on
        if pid not in workers:
            continue
        number, process = workers[pid]
        process.returncode = code = os.waitstatus_to_exitcode(wait_status)
        if stopping:
            if code != 0:
                status = status or 1
            continue
        log.error(
            "a worker exited: stopping the others",
            extra={"worker": number, "pid": pid, "status": code},
        )
        status = code if code > 0 else 1
        stopping.append(signal.SIGTERM)
        stop_all(signal.SIGTERM)
    log.info("workers stopped", extra={"status": status})
    return status
