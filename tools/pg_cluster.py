"""A throwaway PostgreSQL cluster for the tests: Debian's server, a temporary directory, a Unix socket.

    python tools/pg_cluster.py run -- CMD ...  # CMD runs with DLRHUB_TEST_POSTGRES set to the cluster's URL
    python tools/pg_cluster.py start           # prints the URL, serves until SIGTERM or Ctrl-C

As a library, `with cluster() as running: running.url` (tests/postgres.py does this once per session).

The server comes from /usr/lib/postgresql/<newest>/bin; Debian's `postgresql` package is installed when
none is there (as root). initdb and the server refuse to run as root, so as root they run as the
`postgres` user. The cluster listens on a socket in its own directory only (no TCP port), trusts
local connections, keeps fsync and synchronous_commit on (so durability and throughput behave as in
production), and is stopped and removed at the end. Only the standard library is used, so this runs
before any virtualenv exists.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

try:
    from tools import debian
except ImportError:  # run as a script: tools/ itself is on sys.path
    import debian  # type: ignore[no-redef,import-not-found]

DEBIAN_ROOT = Path("/usr/lib/postgresql")
SERVER_USER = "postgres"  # the OS user the server runs as when we are root, and the database superuser
DATABASE = "dlrhub"
PORT = 5432  # only names the socket file: the socket directory is the cluster's own
URL_ENV = "DLRHUB_TEST_POSTGRES"

# Test settings: Unix socket only; fsync and synchronous_commit stay at their (durable) defaults.
SETTINGS = {
    "listen_addresses": "",
    "port": str(PORT),
    "max_connections": "200",
    "shared_buffers": "128MB",
    "timezone": "UTC",
    "log_timezone": "UTC",
    "log_min_messages": "warning",
}


class ClusterError(RuntimeError):
    """PostgreSQL could not be installed, initialised or started; the message says what to do."""


@dataclass(frozen=True)
class Cluster:
    """A running cluster: its libpq URL (to `database`), socket directory and binaries."""

    socket_dir: Path
    data_dir: Path
    bin_dir: Path
    database: str = DATABASE

    @property
    def url(self) -> str:
        return database_url(self.socket_dir, self.database)


def database_url(socket_dir: Path, database: str, *, user: str = SERVER_USER, port: int = PORT) -> str:
    """`postgresql:///DB?host=/socket/dir&port=P&user=U`: libpq's URL for a Unix-socket server."""
    return f"postgresql:///{quote(database, safe='')}?host={quote(str(socket_dir))}&port={port}&user={user}"


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.name))


def find_bin_dir() -> Path | None:
    """Debian's newest /usr/lib/postgresql/<version>/bin holding initdb (not /usr/local/bin's)."""
    candidates = [path for path in DEBIAN_ROOT.glob("*/bin") if (path / "initdb").is_file()]
    if not candidates:
        return None
    return max(candidates, key=lambda path: _version_key(path.parent))


def _is_root() -> bool:
    return os.geteuid() == 0


def install_postgresql() -> Path:
    """Debian's `postgresql` package, installed (as root only); its bin directory."""
    try:
        debian.install(["postgresql"], f", or set {URL_ENV} to a server's URL")
    except debian.PackageError as error:
        raise ClusterError(str(error)) from None
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise ClusterError(f"Debian's postgresql is installed, but {DEBIAN_ROOT}/*/bin/initdb is missing")
    return bin_dir


def _as_server_user(command: Sequence[str]) -> list[str]:
    return ["runuser", "-u", SERVER_USER, "--", *command] if _is_root() else list(command)


def _run(command: Sequence[str], what: str) -> None:
    result = subprocess.run(
        _as_server_user(command),
        capture_output=True,
        text=True,
        check=False,
        start_new_session=True,  # Ctrl-C at the terminal must not reach the server; we stop it ourselves
    )
    if result.returncode != 0:
        raise ClusterError(f"{what} failed ({result.returncode}):\n{result.stdout}{result.stderr}")


def _make_directory() -> Path:
    """A private temporary directory the server's user owns (the socket path must stay short)."""
    root = Path(tempfile.mkdtemp(prefix="dlrhub-pg-"))
    if _is_root():
        try:
            account = pwd.getpwnam(SERVER_USER)
        except KeyError:
            shutil.rmtree(root)
            raise ClusterError(f"no `{SERVER_USER}` user: reinstall Debian's postgresql package") from None
        os.chown(root, account.pw_uid, account.pw_gid)
    return root


def start(database: str = DATABASE) -> Cluster:
    """initdb, start and create `database` in a new temporary directory; `stop` undoes it all."""
    bin_dir = find_bin_dir() or install_postgresql()
    root = _make_directory()
    running = Cluster(socket_dir=root, data_dir=root / "data", bin_dir=bin_dir, database=database)
    try:
        _run(
            [
                str(bin_dir / "initdb"),
                "--pgdata",
                str(running.data_dir),
                "--username",
                SERVER_USER,
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--locale",
                "C",
                "--no-sync",  # initdb's own final flush only: the server still fsyncs every commit
            ],
            "initdb",
        )
        settings = {**SETTINGS, "unix_socket_directories": str(root)}
        with (running.data_dir / "postgresql.conf").open("a") as conf:  # later lines win
            conf.writelines(f"{name} = '{value}'\n" for name, value in settings.items())
        start_server(running)
        _run(
            [
                str(bin_dir / "createdb"),
                "--host",
                str(root),
                "--port",
                str(PORT),
                "--username",
                SERVER_USER,
                database,
            ],
            f"createdb {database}",
        )
    except ClusterError as error:
        log = root / "server.log"
        detail = log.read_text(errors="replace")[-4000:] if log.is_file() else ""
        stop(running)
        raise ClusterError(f"{error}\n{detail}".rstrip()) from None
    return running


def start_server(running: Cluster) -> None:
    """Starts the cluster's server (again, after `stop_server`), returning once it accepts connections."""
    _run(
        [
            str(running.bin_dir / "pg_ctl"),
            "start",
            "--pgdata",
            str(running.data_dir),
            "--wait",
            "--timeout",
            "60",
            "--log",
            str(running.socket_dir / "server.log"),
        ],
        "pg_ctl start",
    )


def stop_server(running: Cluster) -> None:
    """Stops the server as a crash would (every connection cut, no checkpoint), keeping its data:
    `start_server` brings it back with everything committed (a restart under load, in the tests)."""
    _run(
        [str(running.bin_dir / "pg_ctl"), "stop", "--pgdata", str(running.data_dir), "--mode", "immediate"],
        "pg_ctl stop",
    )


def stop(running: Cluster) -> None:
    """Stop the server at once (its data is thrown away, so no checkpoint) and remove the directory."""
    if (running.data_dir / "postmaster.pid").exists():
        with contextlib.suppress(ClusterError):
            stop_now = ["stop", "--pgdata", str(running.data_dir), "--mode", "immediate"]
            _run([str(running.bin_dir / "pg_ctl"), *stop_now], "pg_ctl stop")
    shutil.rmtree(running.socket_dir, ignore_errors=True)


@contextlib.contextmanager
def cluster(database: str = DATABASE) -> Iterator[Cluster]:
    """A running throwaway cluster for the `with` block."""
    running = start(database)
    try:
        yield running
    finally:
        stop(running)


def _run_command(running: Cluster, command: Sequence[str]) -> int:
    """Run `command` against the cluster like a wrapper does: SIGTERM and SIGHUP are passed on, and
    Ctrl-C (which the terminal sends to both of us) is left to the command."""
    child = subprocess.Popen(command, env={**os.environ, URL_ENV: running.url})
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda signum, _frame: child.send_signal(signum))
    return child.wait()


def _serve(running: Cluster) -> None:
    """Print the URL and wait for SIGTERM, SIGHUP or Ctrl-C."""
    received: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda signum, _frame: received.append(signum))
    print(running.url, flush=True)
    while not received:
        signal.pause()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help=f"run a command with {URL_ENV} set to the cluster's URL")
    run_parser.add_argument("argv", nargs=argparse.REMAINDER, help="the command, after --")
    commands.add_parser("start", help="print the URL and keep the cluster until SIGTERM or Ctrl-C")
    args = parser.parse_args(argv)
    command: list[str] = []
    if args.command == "run":
        command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not command:
            parser.error("run needs a command: run -- CMD ...")

    try:
        with cluster() as running:
            if args.command == "run":
                return _run_command(running, command)
            _serve(running)
    except ClusterError as error:
        print(f"pg_cluster: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
