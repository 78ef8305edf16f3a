"""The `dlrhub` command: the client commands, and those that installed packages add (`serve`).

    dlrhub ingest FILE|- [--format gms|sent-sms-report] [--request-id ID] [--batch-size N] [--json]
    dlrhub fetch (--message-id ID [--history] | --bulk-id ID | --reference REF) [--json]
    dlrhub tail [--bulk-id ID] [--message-id ID ...] [--status S ...] [--channel C ...] [--source S]
                [--cursor C | --from-beginning] [--heartbeats [--heartbeat-interval SECONDS]]
    dlrhub quarantine [--all] [--json]          list rejected items
    dlrhub quarantine dismiss (ID ... | --older-than DURATION)   close junk items without storing them
    dlrhub prune [--older-than DURATION] [--json]   delete final messages older than that (default:
                                                the server's DLRHUB_RETENTION) and closed items
    dlrhub renormalise [ID ...] [--json]        run them (default: all open) through the normaliser again
    dlrhub health [--service NAME]              the server's health (grpc.health.v1)
    dlrhub completion bash|zsh                  a shell completion script

Connection, before or after the command: --target (env DLRHUB_TARGET, default 127.0.0.1:50051),
--token (env DLRHUB_TOKEN), --tls-ca / --tls-cert / --tls-key for TLS and mutual TLS, --timeout.

Exit codes: 0 done; 1 other error; 2 bad usage; 3 invalid input (some or all items rejected, or a
request id already used by another request); 4 not found; 5 dlrhub unavailable (safe to retry);
130 interrupted (Ctrl-C); 141 the reader of the output went away (`| head`), quietly.

dlrhub-client owns the command; another package adds a command to it through an entry point of the
group "dlrhub.commands", named as the command, naming a function that takes the sub-command parser
(the server, dlrhub, adds `serve` so). Installing dlrhub-client alone gives the client commands only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.message import Message
from grpc_health.v1.health_pb2 import HealthCheckResponse

from deliveryreport.v1.delivery_report_pb2 import Channel, DeliveryReport, DeliveryStatus, Source
from deliveryreport.v1.delivery_report_service_pb2 import Format, QuarantinedItem, StatusCount
from dlrhub_client import __version__, completion
from dlrhub_client.aio import DEFAULT_TARGET, AsyncClient, TlsConfig
from dlrhub_client.durations import parse_duration
from dlrhub_client.errors import DlrhubClientError, InvalidArgumentError, NotFoundError, UnavailableError
from dlrhub_client.payloads import Document, InvalidJson, batch, batch_items, decode

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INVALID, EXIT_NOT_FOUND, EXIT_UNAVAILABLE = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for `yes | head`'s yes
FORMATS = {
    "auto": Format.FORMAT_UNSPECIFIED,
    "gms": Format.FORMAT_GMS,
    "sent-sms-report": Format.FORMAT_SENT_SMS_REPORT,
}
SOURCES = {"gms": Source.SOURCE_GMS, "sent-sms-report": Source.SOURCE_SENT_SMS_REPORT}
COMMANDS_GROUP = "dlrhub.commands"
# An Ingest call carries at most this much payload text, whatever --batch-size says (the server
# refuses a request over DLRHUB_MAX_REQUEST_BYTES, 16 MiB by default).
CALL_BYTES = 4 * 1024 * 1024

Register = Callable[[Any], None]

DESCRIPTION = "dlrhub, the delivery-report hub: provider delivery reports, normalised, stored and served."
EPILOG = """\
examples:
  dlrhub ingest reports.json                  a provider payload: JSON, JSON lines, or - for stdin
  dlrhub fetch --message-id ID --history      a message's current state and its reports
  dlrhub fetch --bulk-id BULK                 a bulk's messages, with their counts per status
  dlrhub tail --from-beginning | jq .change   every stored change, then the live ones
  dlrhub --target dlrhub.internal:50051 --token "$TOKEN" tail --status delivered
  dlrhub completion bash >> ~/.bashrc         completion of commands, flags and values

environment:
  DLRHUB_TARGET   the server's host:port for the client commands (default 127.0.0.1:50051)
  DLRHUB_TOKEN    the bearer token they send
  DLRHUB_*        the server's settings: `dlrhub serve --help` lists them

Connection flags go before or after the command. Exit codes: 0 done, 1 error, 2 usage,
3 invalid input, 4 not found, 5 unavailable (safe to retry), 130 interrupted.
"""


def main(argv: Sequence[str] | None = None, *, commands: Sequence[Register] = ()) -> int:
    """Runs `dlrhub`: the commands of `commands` and of the installed entry points, then the client's."""
    try:
        options = parser(commands).parse_args(argv)
        code: int = options.run(options)
        sys.stdout.flush()  # a pipe closed early fails here, not at exit
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Nothing more can be written; make the interpreter's last flush at exit a no-op too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return code


def parser(commands: Sequence[Register] = ()) -> argparse.ArgumentParser:
    """The whole `dlrhub` parser: `commands`, then the entry points' commands, then the client's."""
    top = argparse.ArgumentParser(
        prog="dlrhub", description=DESCRIPTION, epilog=EPILOG, formatter_class=_Formatter
    )
    plugins = entry_points(group=COMMANDS_GROUP)
    versions = [f"dlrhub-client {__version__}"]
    versions += [f"{plugin.dist.name} {plugin.dist.version}" for plugin in plugins if plugin.dist is not None]
    top.add_argument("--version", action="version", version=", ".join(dict.fromkeys(versions)))
    _connection_flags(top, given=True)
    subcommands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in commands:
        add(subcommands)
    for plugin in plugins:  # an entry point's name is the command it adds
        if plugin.name not in subcommands.choices:
            plugin.load()(subcommands)
    register(subcommands)
    completion_command = subcommands.add_parser(
        "completion",
        help="print a shell completion script",
        description="A completion script for bash or zsh: commands, flags and their values.",
        epilog="examples:\n"
        "  dlrhub completion bash > ~/.local/share/bash-completion/completions/dlrhub\n"
        '  eval "$(dlrhub completion zsh)"           in ~/.zshrc\n',
        formatter_class=_Formatter,
    )
    completion_command.add_argument("shell", choices=completion.SHELLS)
    completion_command.set_defaults(run=lambda options: _print_completion(top, options.shell))
    return top


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """The epilogs keep their layout (examples, one per line)."""


def _connection_flags(parser: argparse.ArgumentParser, *, given: bool) -> None:
    """The connection flags: on the top-level parser with their defaults (`given`), and on each
    command without (SUPPRESS), so a flag after the command wins and one before it is kept."""

    def default(value: Any) -> Any:
        return value if given else argparse.SUPPRESS

    group = parser.add_argument_group("connection (before or after the command)")
    group.add_argument(
        "--target",
        default=default(os.environ.get("DLRHUB_TARGET", DEFAULT_TARGET)),
        help=f"the server's host:port (env DLRHUB_TARGET; default {DEFAULT_TARGET})",
    )
    group.add_argument(
        "--token", default=default(os.environ.get("DLRHUB_TOKEN")), help="bearer token (env DLRHUB_TOKEN)"
    )
    group.add_argument("--tls-ca", type=Path, default=default(None), help="CA certificate to trust (TLS)")
    group.add_argument("--tls-cert", type=Path, default=default(None), help="client certificate (mutual TLS)")
    group.add_argument("--tls-key", type=Path, default=default(None), help="client private key (mutual TLS)")
    group.add_argument("--timeout", type=float, default=default(60.0), help="seconds per call (default 60)")


def register(commands: Any) -> None:
    """Adds the client commands to the `dlrhub` sub-command parser."""
    connection = argparse.ArgumentParser(add_help=False)
    _connection_flags(connection, given=False)

    def add(name: str, summary: str, examples: str, description: str = "") -> argparse.ArgumentParser:
        return commands.add_parser(  # type: ignore[no-any-return]
            name,
            parents=[connection],
            help=summary,
            description=description or summary[0].upper() + summary[1:] + ".",
            epilog="examples:\n" + examples,
            formatter_class=_Formatter,
        )

    ingest = add(
        "ingest",
        "ingest provider payloads from a file or stdin",
        "  dlrhub ingest callback.json                 one payload: GMS or SentSMSReport, detected\n"
        "  dlrhub ingest reports.jsonl                 JSON lines: one payload per line, sent in batches\n"
        "  zcat export.json.gz | dlrhub ingest -       from stdin\n"
        "  dlrhub ingest big.json --request-id import-7   safe to run again: the calls are replays\n",
        "Ingest provider payloads: one JSON document (a large batch is split into calls), or JSON lines,"
        " one payload per line, whose reports are sent in batches like an array's. A progress bar shows"
        " on a terminal; each rejected item is named by its position in the input.",
    )
    ingest.add_argument(
        "file", type=Path, help="a JSON payload, or JSON lines (one payload per line); - for stdin"
    )
    ingest.add_argument("--format", choices=list(FORMATS), default="auto")
    ingest.add_argument(
        "--request-id", default="", help="idempotency key (with several calls: ID-1, ID-2, ...)"
    )
    ingest.add_argument("--batch-size", type=int, default=1000, help="items per Ingest call (default 1000)")
    ingest.add_argument("--json", action="store_true", help="print each Ingest response as a JSON line")
    ingest.set_defaults(run=lambda options: _run(options, _ingest))

    fetch = add(
        "fetch",
        "show messages by id, bulk or reference",
        "  dlrhub fetch --message-id 9f60ac8f-e721-5027-b838-e6fcb95fcd7a --history\n"
        "  dlrhub fetch --bulk-id BULK-ID-123-xyz     the bulk's messages, then their counts per status\n"
        "  dlrhub fetch --reference AD-6640-7006 --json | jq .status\n",
    )
    selector = fetch.add_mutually_exclusive_group(required=True)
    selector.add_argument("--message-id")
    selector.add_argument("--bulk-id")
    selector.add_argument("--reference")
    fetch.add_argument("--source", choices=list(SOURCES))
    fetch.add_argument("--history", action="store_true", help="with --message-id: every report, too")
    fetch.add_argument("--json", action="store_true", help="JSON (one object per line) instead of a table")
    fetch.set_defaults(run=lambda options: _run(options, _fetch))

    tail = add(
        "tail",
        "follow the stream of changes (JSON lines)",
        "  dlrhub tail                                 changes from now on\n"
        "  dlrhub tail --from-beginning --bulk-id BULK-1 --status delivered --status seen\n"
        "  dlrhub tail --cursor 1842                   resume after a cursor you saw\n"
        "  dlrhub tail --from-beginning | head -n 100  ends quietly when head has enough\n",
        "Follow the stream of changes, one JSON object per line: reconnects and resumes after the last"
        " cursor if the connection drops. Fails at once if the server does not answer.",
    )
    tail.add_argument("--bulk-id", default="")
    tail.add_argument("--message-id", action="append", default=[], dest="message_ids")
    tail.add_argument(
        "--status", action="append", default=[], type=_EnumValue(DeliveryStatus, "DELIVERY_STATUS_")
    )
    tail.add_argument("--channel", action="append", default=[], type=_EnumValue(Channel, "CHANNEL_"))
    tail.add_argument("--source", choices=list(SOURCES))
    start = tail.add_mutually_exclusive_group()
    start.add_argument("--cursor", help="resume after this cursor")
    start.add_argument("--from-beginning", action="store_true")
    tail.add_argument("--heartbeats", action="store_true", help="print heartbeats too")
    tail.add_argument(
        "--heartbeat-interval",
        type=float,
        metavar="SECONDS",
        help="between heartbeats (0.1 to 3600; default 15)",
    )
    tail.set_defaults(run=lambda options: _run(options, _tail))

    quarantine = add(
        "quarantine",
        "list rejected (quarantined) items, or dismiss them",
        "  dlrhub quarantine                           the open items, as a table\n"
        "  dlrhub quarantine --all --json              closed ones too, as JSON lines\n"
        "  dlrhub quarantine dismiss 12 13             these items stop counting as open\n"
        "  dlrhub quarantine dismiss --older-than 7d   every open item not received for 7 days\n",
        "List rejected (quarantined) items; or, with `dismiss`, close junk items without storing them:"
        " they stop counting as open (the dlrhub_quarantine_open gauge) and are kept until retention"
        " prunes them. Dismissing needs a token with the admin role.",
    )
    quarantine.add_argument("action", nargs="?", choices=["dismiss"], help="dismiss items instead of listing")
    quarantine.add_argument("ids", nargs="*", type=int, help="with dismiss: quarantine ids")
    quarantine.add_argument(
        "--older-than",
        type=_duration,
        metavar="DURATION",
        help="with dismiss: every open item last received longer ago than this (90m, 12h, 7d)",
    )
    quarantine.add_argument("--all", action="store_true", help="closed (resolved, dismissed) items too")
    quarantine.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    quarantine.set_defaults(run=lambda options: _run_quarantine(quarantine, options))

    prune = add(
        "prune",
        "delete final messages and closed quarantined items older than a duration",
        "  dlrhub prune                                what the server's DLRHUB_RETENTION allows, now\n"
        "  dlrhub prune --older-than 90d               final messages not changed for 90 days\n",
        "Delete, now, every message in a final status whose last report was received longer ago than"
        " the duration, with its history and raw text, and every resolved or dismissed quarantined item"
        " closed longer ago than that. Streams resumed from a cursor before a pruned change are then"
        " refused (OUT_OF_RANGE). Needs a token with the admin role.",
    )
    prune.add_argument(
        "--older-than",
        type=_duration,
        metavar="DURATION",
        help="default: the server's DLRHUB_RETENTION (90m, 12h, 30d, 2w, or seconds)",
    )
    prune.add_argument("--json", action="store_true", help="the response as JSON")
    prune.set_defaults(run=lambda options: _run(options, _prune))

    renormalise = add(
        "renormalise",
        "run quarantined items through the current normaliser again",
        "  dlrhub renormalise                          every open item\n"
        "  dlrhub renormalise 12 13                    these items (exit 3 while some are still rejected)\n",
    )
    renormalise.add_argument("ids", nargs="*", type=int, help="quarantine ids (default: every open item)")
    renormalise.add_argument("--json", action="store_true", help="the response as JSON")
    renormalise.set_defaults(run=lambda options: _run(options, _renormalise))

    health = add(
        "health",
        "check the server's health (grpc.health.v1)",
        "  dlrhub health                               exit 0 when SERVING, 1 when not, 5 when unreachable\n"
        "  dlrhub health --service dlrhub.SentSmsReportPoller\n",
    )
    health.add_argument(
        "--service", default="", help="one of the server's health services (default: the server)"
    )
    health.set_defaults(run=lambda options: _run(options, _health))


def _duration(text: str) -> timedelta:
    """An argument type: a duration such as 7d (dlrhub_client.durations)."""
    try:
        duration = parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if not duration:
        raise argparse.ArgumentTypeError("a duration of at least 1 second")
    return duration


class _EnumValue:
    """An argument type: a value of a protobuf enum, named without its prefix ("delivered"); its
    `names` are what the completion script offers."""

    def __init__(self, enum: Any, prefix: str) -> None:
        self._enum = enum
        self._prefix = prefix
        self.names = [name.removeprefix(prefix).lower() for name in enum.keys()[1:]]

    def __call__(self, text: str) -> int:
        name = text.upper().replace("-", "_")
        try:
            return int(self._enum.Value(name if name.startswith(self._prefix) else self._prefix + name))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"unknown value {text!r}; one of: {', '.join(self.names)}"
            ) from None


def _run(
    options: argparse.Namespace, command: Callable[[AsyncClient, argparse.Namespace], Awaitable[int]]
) -> int:
    tls = None
    if options.tls_ca or options.tls_cert:
        tls = TlsConfig(options.tls_ca, options.tls_cert, options.tls_key)

    async def main() -> int:
        async with AsyncClient(
            options.target, token=options.token, tls=tls, timeout=options.timeout
        ) as client:
            return await command(client, options)

    try:
        return asyncio.run(main())
    except InvalidArgumentError as error:
        print(f"dlrhub: rejected: {error}", file=sys.stderr)
        return EXIT_INVALID
    except NotFoundError as error:
        print(f"dlrhub: {error.message}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except UnavailableError as error:
        print(f"dlrhub: unavailable at {options.target}: {error.message} (safe to retry)", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except DlrhubClientError as error:
        print(f"dlrhub: {error}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        raise  # main ends quietly
    except (OSError, ValueError) as error:
        print(f"dlrhub: {error}", file=sys.stderr)
        return EXIT_ERROR


# ingest


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an item of a call came from in the input: `where` names it ("item 1500", "line 3") and
    `path` is its field path there ("[1500]", "results[2]", "" for a line that is one report)."""

    where: str
    path: str


@dataclass(frozen=True, slots=True)
class Call:
    """One Ingest call: its payload and format, and the origin of each item; or a payload of the
    input sent as it is (`origins` None), whose item positions the server's answer gives, and the
    line it is (of JSON lines), if any."""

    payload: str
    format: Format.ValueType
    origins: list[Origin] | None = None
    line: str = ""

    @property
    def size(self) -> int:
        return 1 if self.origins is None else len(self.origins)


# The reports of one part of the input, to be batched: their format, their texts and their origins.
Reports = tuple[Format.ValueType, list[str], list[Origin]]


async def _ingest(client: AsyncClient, options: argparse.Namespace) -> int:
    # Read before any call, on this thread: Ctrl-C while reading a terminal must not wait for a thread.
    calls = _calls(_read_input(options.file), FORMATS[options.format], options.batch_size)
    accepted = duplicate = rejected = 0
    from tqdm import tqdm  # noqa: PLC0415 - only ingest shows progress: the other commands start sooner

    progress = tqdm(
        total=sum(call.size for call in calls), unit="item", disable=not sys.stderr.isatty() or len(calls) < 2
    )

    def say(line: str, out: TextIO) -> None:
        """A line on stdout or stderr: the progress bar makes way for it and comes back under it."""
        progress.write(line, file=out)

    try:
        for number, call in enumerate(calls, 1):
            several = options.request_id and len(calls) > 1
            request_id = f"{options.request_id}-{number}" if several else options.request_id
            try:
                response = await client.ingest(call.payload, format=call.format, request_id=request_id)
            except InvalidArgumentError as error:
                if error.reason == "REQUEST_ID_REUSED":  # nothing of it was stored: stop here
                    say(f"dlrhub: request id {request_id!r}: {error.message}", sys.stderr)
                    return EXIT_INVALID
                # On stderr even with --json: a wholly rejected payload has no response to print.
                say(f"rejected: {error.message}", sys.stderr)
                for violation in error.violations:
                    where, path, text = _in_input(call, violation.field, violation.description)
                    place = f"{where}: {path}" if where and path else where or path or "(payload)"
                    say(f"  {place}: {text}", sys.stderr)
                rejected += call.size if call.origins is not None else max(1, len(error.violations))
                progress.update(call.size)
                continue
            if response.replayed:
                say(
                    f"dlrhub: request id {request_id!r} was answered before: its first answer again"
                    " (nothing applied twice)",
                    sys.stderr,
                )
            accepted += response.accepted_count
            duplicate += response.duplicate_count
            rejected += response.rejected_count
            progress.update(call.size)
            if options.json:
                say(_json(response), sys.stdout)
            else:
                for result in response.results:
                    if result.HasField("error"):
                        where, path, text = _in_input(call, result.error.field, result.error.description)
                        where = where or _item(call, result.index)
                        say(f"rejected {where}: {path or '(item)'}: {text}", sys.stderr)
    finally:
        progress.close()
    if not options.json:
        print(f"accepted {accepted}, duplicate {duplicate}, rejected {rejected}")
    return EXIT_INVALID if rejected else EXIT_OK


def _read_input(path: Path) -> str:
    return sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")


def _calls(text: str, format: Format.ValueType, batch_size: int) -> list[Call]:
    """The Ingest calls for an input: the reports of JSON lines gathered into calls of `batch_size`
    items, as a document's batch is split into such calls; anything else goes as it is."""
    lines = _json_lines(text, format)
    if lines is not None:
        return list(_batched(lines, batch_size))
    try:
        found = batch_items(decode(text))
    except InvalidJson:
        found = None  # the server says what is wrong with it
    if found is None or (format and found[0] != format) or len(found[1]) <= batch_size:
        return [Call(text, format)]
    shape, items = found
    prefix = "" if shape == Format.FORMAT_GMS else "results"
    origins = [Origin(f"item {i}", f"{prefix}[{i}]") for i in range(len(items))]
    return list(_batched([(shape, items, origins)], batch_size))


def _json_lines(text: str, format: Format.ValueType) -> list[Reports | Call] | None:
    """Each line of a JSON-lines input as its reports, or as a call of its own when it is no batch of
    `format` (when given); None when the text is not JSON lines (one document over several lines)."""
    numbered = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if len(numbered) < 2 or not all(line.lstrip()[:1] in "{[" for _, line in numbered):
        return None
    documents: list[tuple[str, Document]] = []
    for number, line in numbered:
        try:
            documents.append((f"line {number}", decode(line)))
        except InvalidJson:
            return None
    parts: list[Reports | Call] = []
    for where, document in documents:
        found = batch_items(document)
        if found is None or (format and found[0] != format):
            parts.append(Call(document.text, format, line=where))
            continue
        shape, items = found
        if isinstance(document.value, list):
            paths = [f"[{i}]" for i in range(len(items))]
        elif shape == Format.FORMAT_SENT_SMS_REPORT:
            paths = [f"results[{i}]" for i in range(len(items))]
        else:
            paths = [""]  # the line is one report
        parts.append((shape, items, [Origin(where, path) for path in paths]))
    return parts


def _batched(parts: Sequence[Reports | Call], batch_size: int) -> Iterator[Call]:
    """Calls of up to `batch_size` reports (and CALL_BYTES of text), each of one format, in input
    order; a part that is a call already goes alone."""
    shape: Format.ValueType = Format.FORMAT_UNSPECIFIED
    items: list[str] = []
    origins: list[Origin] = []
    size = 0

    def flush() -> Iterator[Call]:
        nonlocal items, origins, size
        if items:
            yield Call(batch(shape, items), shape, origins)
        items, origins, size = [], [], 0

    for part in parts:
        if isinstance(part, Call):
            yield from flush()
            yield part
            continue
        part_shape, texts, where = part
        if part_shape != shape:
            yield from flush()
            shape = part_shape
        for text, origin in zip(texts, where, strict=True):
            if len(items) >= batch_size or (items and size + len(text) > CALL_BYTES):
                yield from flush()
            items.append(text)
            origins.append(origin)
            size += len(text) + 1
    yield from flush()


def _in_input(call: Call, field: str, description: str) -> tuple[str, str, str]:
    """A field path of the server's answer about `call` as a place in the input: the line it is on
    (of JSON lines; "" for a document, whose path says which item), the path there, and
    `description` naming that path: ("line 3", "[1].status", "[1].status must be ...")."""
    where, path = call.line, field
    for prefix in ("[", "results["):
        index, found, rest = field.removeprefix(prefix).partition("]")
        if call.origins is not None and field.startswith(prefix) and found and index.isdigit():
            origin = call.origins[int(index)]
            where = origin.where if origin.where.startswith("line") else ""
            path = (origin.path + rest).removeprefix(".")
            description = description.replace(field, path or where)
            break
    return where, path, description


def _item(call: Call, index: int) -> str:
    """The item of `call` at `index`, as a place in the input ("item 1500", "line 3")."""
    if call.origins is not None:
        return call.origins[index].where
    return call.line or f"item {index}"


# fetch


async def _fetch(client: AsyncClient, options: argparse.Namespace) -> int:
    source = SOURCES[options.source] if options.source else Source.SOURCE_UNSPECIFIED
    history: list[DeliveryReport] = []
    counts: list[StatusCount] = []
    total = 0
    truncated = False
    if options.message_id:
        response = await client.get_message(
            options.message_id, source=source, include_history=options.history
        )
        reports = list(response.messages)
        history = list(response.history)
        truncated = response.history_truncated
    elif options.bulk_id:
        reports, token = [], ""
        while True:
            page = await client.list_messages(
                bulk_id=options.bulk_id, source=source, page_size=500, page_token=token
            )
            if not token:  # the counts are of the whole bulk, on every page
                counts, total = list(page.status_counts), page.total_size
            reports.extend(page.messages)
            token = page.next_page_token
            if not token:
                break
    else:
        reports = [report async for report in client.iter_reference(options.reference, source=source)]
    if options.json:
        for report in reports:
            print(_json(report))
        for report in history:
            print(json.dumps({"history": json.loads(_json(report))}))
        if truncated:
            print(json.dumps({"history_truncated": True}))
        return EXIT_OK
    _print_table(reports)
    if history:
        print("\nhistory:")
        _print_table(history)
    if truncated:
        print("(the history goes on: `dlrhub tail --from-beginning --message-id ID` shows every report)")
    if counts:
        print()
        _print_rows(
            [("STATUS", "MESSAGES")]
            + [(_status_name(count.status), str(count.count)) for count in counts]
            + [("total", str(total))]
        )
    return EXIT_OK


COLUMNS = ("SOURCE", "MESSAGE ID", "STATUS", "CHANNEL", "RECIPIENT", "EVENT TIME", "BULK ID", "REFERENCE")


def _status_name(status: int) -> str:
    return DeliveryStatus.Name(DeliveryStatus.ValueType(status)).removeprefix("DELIVERY_STATUS_")


def _print_table(reports: list[DeliveryReport]) -> None:
    rows = [COLUMNS] + [
        (
            Source.Name(r.source).removeprefix("SOURCE_"),
            r.message_id,
            _status_name(r.status),
            Channel.Name(r.channel).removeprefix("CHANNEL_"),
            r.recipient,
            r.event_time.ToJsonString() if r.HasField("event_time") else "",
            r.bulk_id,
            r.reference,
        )
        for r in reports
    ]
    _print_rows(rows)
    if not reports:
        print("(no messages)")


def _print_rows(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


# tail


async def _tail(client: AsyncClient, options: argparse.Namespace) -> int:
    await client.check_health()  # nothing answers: say so now, not after every reconnection failed
    interval = options.heartbeat_interval
    stream = client.stream(
        bulk_id=options.bulk_id,
        message_ids=options.message_ids,
        statuses=options.status,
        channels=options.channel,
        source=SOURCES[options.source] if options.source else Source.SOURCE_UNSPECIFIED,
        cursor=options.cursor,
        from_beginning=options.from_beginning,
        heartbeat_interval=timedelta(seconds=interval) if interval is not None else None,
        include_heartbeats=options.heartbeats,
    )
    async for response in stream:
        print(_json(response), flush=True)
    return EXIT_OK


def _json(message: Message) -> str:
    return json.dumps(
        json_format.MessageToDict(message, preserving_proto_field_name=True), separators=(",", ":")
    )


# quarantine


def _state(item: QuarantinedItem) -> str:
    if item.HasField("resolved_time"):
        return "resolved"
    return "dismissed" if item.HasField("dismissed_time") else "open"


async def _quarantine(client: AsyncClient, options: argparse.Namespace) -> int:
    items = [item async for item in client.iter_quarantine(include_resolved=options.all)]
    if options.json:
        for item in items:
            print(_json(item))
        return EXIT_OK
    rows = [("ID", "RECEIVED", "FORMAT", "STATE", "FIELD", "REASON", "DESCRIPTION")] + [
        (
            str(item.id),
            item.received_time.ToJsonString(),
            Format.Name(item.format).removeprefix("FORMAT_").lower(),
            _state(item),
            item.error.field,
            item.error.reason,
            item.error.description,
        )
        for item in items
    ]
    _print_rows(rows)
    if not items:
        print("(nothing quarantined)")
    return EXIT_OK


def _run_quarantine(parser: argparse.ArgumentParser, options: argparse.Namespace) -> int:
    """`quarantine` lists; `quarantine dismiss` dismisses by ids or by age (exactly one)."""
    if options.action != "dismiss":
        if options.ids or options.older_than is not None:
            parser.error("ids and --older-than go with dismiss: dlrhub quarantine dismiss ID ...")
        return _run(options, _quarantine)
    if bool(options.ids) == (options.older_than is not None):
        parser.error("dismiss takes ids or --older-than DURATION, not both")
    return _run(options, _dismiss)


async def _dismiss(client: AsyncClient, options: argparse.Namespace) -> int:
    before = None if options.older_than is None else datetime.now(UTC) - options.older_than
    response = await client.dismiss_quarantine(options.ids, received_before=before)
    if options.json:
        print(_json(response))
    else:
        print(f"dismissed {response.dismissed_count}, still open {response.open_count}")
    return EXIT_OK


async def _prune(client: AsyncClient, options: argparse.Namespace) -> int:
    response = await client.prune_messages(options.older_than)
    if options.json:
        print(_json(response))
    else:
        print(
            f"pruned {response.message_count} messages ({response.report_count} reports) and"
            f" {response.quarantined_count} quarantined items; streams resume after cursor"
            f" {response.pruned_through_cursor} or later"
        )
    return EXIT_OK


async def _renormalise(client: AsyncClient, options: argparse.Namespace) -> int:
    response = await client.renormalise_quarantine(options.ids)
    if options.json:
        print(_json(response))
    else:
        for result in response.results:
            errors = "; ".join(
                f"{r.error.field}: {r.error.description}" for r in result.results if r.HasField("error")
            )
            print(f"{result.id}: {'resolved' if result.resolved else 'still rejected: ' + errors}")
        print(f"resolved {response.resolved_count}, still rejected {response.still_rejected_count}")
    return EXIT_INVALID if response.still_rejected_count else EXIT_OK


# health and completion


async def _health(client: AsyncClient, options: argparse.Namespace) -> int:
    try:
        status = await client.check_health(options.service)
    except NotFoundError:
        print(f"dlrhub: the server has no health service {options.service!r}", file=sys.stderr)
        return EXIT_NOT_FOUND
    print(HealthCheckResponse.ServingStatus.Name(status))
    return EXIT_OK if status == HealthCheckResponse.SERVING else EXIT_ERROR


def _print_completion(parser: argparse.ArgumentParser, shell: str) -> int:
    print(completion.script(parser, shell), end="")
    return EXIT_OK
