"""`dlrhub serve`: the server's command, which this package adds to the `dlrhub` command of
dlrhub-client (dlrhub_client.cli; the entry point group "dlrhub.commands" names `register`).

    dlrhub serve [--listen HOST:PORT] [--http-listen HOST:PORT] [--admin-listen HOST:PORT] [--db PATH] ...
    dlrhub ingest | fetch | tail ...     (the client commands: dlrhub_client.cli)

Every flag has a DLRHUB_* environment variable; a flag wins over it. Only `serve` imports the
server: the client commands, --help and --version start without loading it. When the server cannot
start (a setting, the database, a listen address), it exits with status 2 and one line on stderr,
`dlrhub: cannot start: ...`, saying why.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import resource
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlrhub_client import cli as client_cli

if TYPE_CHECKING:
    from dlrhub.app import App
    from dlrhub.config import Settings

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """The `dlrhub` command with `serve` (also where no entry point is installed: `python -m dlrhub`)."""
    return client_cli.main(argv, commands=[register])


SERVE_EXAMPLES = """\
examples:
  dlrhub serve                                   SQLite in ./data/, gRPC on 127.0.0.1:50051, webhooks on :8080
  dlrhub serve --listen 0.0.0.0:50051 --admin-listen 127.0.0.1:9464    reachable; /metrics on 9464
  DLRHUB_TOKENS=ingest:SECRET1,read:SECRET2 dlrhub serve             with authentication

Logs go to stderr: readable lines on a terminal, JSON lines elsewhere (--log-format).
"""


def register(commands: Any) -> None:
    """Adds `serve` to the `dlrhub` sub-command parser."""
    serve = commands.add_parser(
        "serve",
        help="run the gRPC service",
        description="Run dlrhub: the gRPC service, the provider webhooks and, if set, the poller and"
        " the admin port. Every setting has a DLRHUB_* environment variable; a flag wins over it.",
        epilog=SERVE_EXAMPLES + _environment(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "--listen", help="gRPC address, host:port (env DLRHUB_LISTEN; default 127.0.0.1:50051)"
    )
    serve.add_argument(
        "--http-listen",
        help="webhook HTTP address, host:port (env DLRHUB_HTTP_LISTEN; default 127.0.0.1:8080)",
    )
    serve.add_argument(
        "--admin-listen",
        help="admin HTTP address for /metrics, host:port (env DLRHUB_ADMIN_LISTEN; default off)",
    )
    serve.add_argument(
        "--db",
        help="SQLite file or postgresql:// URL (env DLRHUB_DB; default data/dlrhub.db)",
    )
    serve.add_argument(
        "--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="env DLRHUB_LOG_LEVEL"
    )
    serve.add_argument(
        "--log-format",
        choices=["json", "text"],
        help="env DLRHUB_LOG_FORMAT; default: text on a terminal, JSON otherwise",
    )
    serve.add_argument(
        "--gms-codes", type=Path, help="GMS code table extending the shipped one (env DLRHUB_GMS_CODES)"
    )
    serve.add_argument(
        "--sent-sms-report-codes",
        type=Path,
        help="SentSMSReport code table extending the shipped one (env DLRHUB_SENT_SMS_REPORT_CODES)",
    )
    serve.add_argument(
        "--tokens-file", type=Path, help="JSON file of bearer tokens and roles (env DLRHUB_TOKENS_FILE)"
    )
    serve.add_argument("--tls-cert", type=Path, help="server certificate, turns TLS on (env DLRHUB_TLS_CERT)")
    serve.add_argument("--tls-key", type=Path, help="server private key (env DLRHUB_TLS_KEY)")
    serve.add_argument(
        "--tls-client-ca", type=Path, help="CA for client certificates: mutual TLS (env DLRHUB_TLS_CLIENT_CA)"
    )
    serve.set_defaults(run=_run_serve)


def _environment() -> str:
    """Every DLRHUB_* variable of the settings, with its default (the README says what each means)."""
    from dlrhub.config import Settings  # noqa: PLC0415 - light, but only `serve` needs it

    lines = []
    for setting in dataclasses.fields(Settings):
        default = setting.default
        if isinstance(default, bool):
            default = "on" if default else "off"
        elif default in (None, ""):
            default = "(unset)"
        lines.append(f"  {setting.metadata['env']:<44} {default}")
    return (
        "\nenvironment (the README's Configuration section says what each means):\n" + "\n".join(lines) + "\n"
    )


_SERVE_FLAGS = (
    "listen",
    "http_listen",
    "admin_listen",
    "db",
    "log_level",
    "log_format",
    "gms_codes",
    "sent_sms_report_codes",
    "tokens_file",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
)


def _run_serve(options: argparse.Namespace) -> int:
    # The server loads only here: the client commands, --help and --version start without it.
    from dlrhub import app  # noqa: PLC0415
    from dlrhub.config import Settings  # noqa: PLC0415
    from dlrhub.observability import logs  # noqa: PLC0415

    try:
        settings = Settings.from_env()
    except ValueError as error:
        return _cannot_start(error)
    overrides = {name: value for name in _SERVE_FLAGS if (value := getattr(options, name, None)) is not None}
    settings = dataclasses.replace(settings, **overrides)
    try:
        logs.configure(settings.log_level, settings.log_repeat_interval, settings.log_format)
    except ValueError as error:
        return _cannot_start(ValueError(f"DLRHUB_LOG_FORMAT: {error}"))
    _raise_file_limit()
    try:
        asyncio.run(_serve(settings, app.start))
    except CannotStart as error:
        return _cannot_start(error)
    return 0


class CannotStart(Exception):
    """The server could not start: a setting, the database or a listen address; the message says
    which, in words for the operator."""


def _cannot_start(error: Exception) -> int:
    """One line on stderr naming the problem (no traceback), and exit status 2."""
    print(f"dlrhub: cannot start: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
    return 2


def _raise_file_limit() -> None:
    """Raises the soft limit on open files to the hard one: each connection takes a file descriptor,
    and the HTTP port's connection limit follows what is left (transport/listener.py). The limits
    are in the "serving" line."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as error:  # e.g. macOS, where the hard limit is "unlimited"
        log.warning("cannot raise the open-file limit to %s (it stays %s): %s", hard, soft, error)


def _tune_gc() -> None:
    """Fewer, cheaper cyclic collections for a long-running server (2-5% of the loop otherwise).

    Everything alive after start-up (modules, descriptors, the app) is frozen out of the
    collector's scans, and the youngest generation is collected after 10,000 allocations instead
    of 700: each Ingest allocates hundreds of short-lived objects, nearly all freed by refcounting.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


async def _serve(settings: Settings, start: Callable[[Settings], Awaitable[App]]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    from dlrhub.store import StoreError  # noqa: PLC0415  # the server loads only for serve

    try:
        running = await start(settings)
    except (StoreError, OSError, ValueError) as error:  # what start raises for what it was given
        raise CannotStart(str(error)) from error
    _tune_gc()
    await stop.wait()
    running.flush_logs()  # the lines of calls that ended before, then this one
    log.info("shutting down")
    await running.stop()


if __name__ == "__main__":
    sys.exit(main())
