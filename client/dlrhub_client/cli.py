"""The `dlrhub` command: the client commands, and those that installed packages add (`serve`).

    dlrhub ingest FILE|- [--format gms|sent-sms-report] [--request-id ID] [--batch-size N] [--json]
    dlrhub fetch (--message-id ID [--history] | --bulk-id ID | --reference REF) [--json]
    dlrhub tail [--bulk-id ID] [--message-id ID ...] [--status S ...] [--channel C ...] [--source S]
                [--cursor C | --from-beginning] [--heartbeats]
    dlrhub quarantine [--all] [--json]          list rejected items
    dlrhub renormalise [ID ...] [--json]        run them (default: all open) through the normaliser again

Connection: --target (env DLRHUB_TARGET, default 127.0.0.1:50051), --token (env DLRHUB_TOKEN),
--tls-ca / --tls-cert / --tls-key for TLS and mutual TLS.

Exit codes: 0 done; 1 other error; 2 bad usage; 3 invalid input (some or all items rejected);
4 not found; 5 dlrhub unavailable (safe to retry).

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
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.message import Message

from deliveryreport.v1.delivery_report_pb2 import Channel, DeliveryReport, DeliveryStatus, Source
from deliveryreport.v1.delivery_report_service_pb2 import Format, IngestResponse
from dlrhub_client import __version__
from dlrhub_client.aio import DEFAULT_TARGET, AsyncClient, TlsConfig
from dlrhub_client.errors import DlrhubClientError, InvalidArgumentError, NotFoundError, UnavailableError
from dlrhub_client.payloads import InvalidJson, batch, batch_items, decode

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INVALID, EXIT_NOT_FOUND, EXIT_UNAVAILABLE = 0, 1, 2, 3, 4, 5
FORMATS = {
    "auto": Format.FORMAT_UNSPECIFIED,
    "gms": Format.FORMAT_GMS,
    "sent-sms-report": Format.FORMAT_SENT_SMS_REPORT,
}
SOURCES = {"gms": Source.SOURCE_GMS, "sent-sms-report": Source.SOURCE_SENT_SMS_REPORT}
COMMANDS_GROUP = "dlrhub.commands"

Register = Callable[[Any], None]


def main(argv: Sequence[str] | None = None, *, commands: Sequence[Register] = ()) -> int:
    """Runs `dlrhub`: the commands of `commands` and of the installed entry points, then the client's."""
    parser = argparse.ArgumentParser(prog="dlrhub", description="Delivery-report hub.")
    plugins = entry_points(group=COMMANDS_GROUP)
    versions = [f"dlrhub-client {__version__}"]
    versions += [f"{plugin.dist.name} {plugin.dist.version}" for plugin in plugins if plugin.dist is not None]
    parser.add_argument("--version", action="version", version=", ".join(dict.fromkeys(versions)))
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in commands:
        add(subcommands)
    for plugin in plugins:  # an entry point's name is the command it adds
        if plugin.name not in subcommands.choices:
            plugin.load()(subcommands)
    register(subcommands)
    options = parser.parse_args(argv)
    code: int = options.run(options)
    return code


def register(commands: Any) -> None:
    """Adds ingest, fetch and tail to the `dlrhub` sub-command parser."""
    connection = argparse.ArgumentParser(add_help=False)
    group = connection.add_argument_group("connection")
    group.add_argument("--target", default=os.environ.get("DLRHUB_TARGET", DEFAULT_TARGET), help="host:port")
    group.add_argument(
        "--token", default=os.environ.get("DLRHUB_TOKEN"), help="bearer token (env DLRHUB_TOKEN)"
    )
    group.add_argument("--tls-ca", type=Path, help="CA certificate to trust (turns TLS on)")
    group.add_argument("--tls-cert", type=Path, help="client certificate, for mutual TLS")
    group.add_argument("--tls-key", type=Path, help="client private key, for mutual TLS")
    group.add_argument("--timeout", type=float, default=60.0, help="seconds per call")

    ingest = commands.add_parser(
        "ingest", parents=[connection], help="ingest a provider payload from a file or stdin"
    )
    ingest.add_argument("file", help="a JSON payload, or JSON lines (one payload per line); - for stdin")
    ingest.add_argument("--format", choices=list(FORMATS), default="auto")
    ingest.add_argument("--request-id", default="", help="idempotency key (with batching: ID-1, ID-2, ...)")
    ingest.add_argument(
        "--batch-size", type=int, default=1000, help="items per Ingest call for large batches"
    )
    ingest.add_argument("--json", action="store_true", help="print each Ingest response as a JSON line")
    ingest.set_defaults(run=lambda options: _run(options, _ingest))

    fetch = commands.add_parser("fetch", parents=[connection], help="show messages by id, bulk or reference")
    selector = fetch.add_mutually_exclusive_group(required=True)
    selector.add_argument("--message-id")
    selector.add_argument("--bulk-id")
    selector.add_argument("--reference")
    fetch.add_argument("--source", choices=list(SOURCES))
    fetch.add_argument("--history", action="store_true", help="with --message-id: every report, too")
    fetch.add_argument("--json", action="store_true", help="JSON (one object per line) instead of a table")
    fetch.set_defaults(run=lambda options: _run(options, _fetch))

    tail = commands.add_parser("tail", parents=[connection], help="follow the stream of changes (JSON lines)")
    tail.add_argument("--bulk-id", default="")
    tail.add_argument("--message-id", action="append", default=[], dest="message_ids")
    tail.add_argument("--status", action="append", default=[], type=_enum(DeliveryStatus, "DELIVERY_STATUS_"))
    tail.add_argument("--channel", action="append", default=[], type=_enum(Channel, "CHANNEL_"))
    tail.add_argument("--source", choices=list(SOURCES))
    start = tail.add_mutually_exclusive_group()
    start.add_argument("--cursor", help="resume after this cursor")
    start.add_argument("--from-beginning", action="store_true")
    tail.add_argument("--heartbeats", action="store_true", help="print heartbeats too")
    tail.set_defaults(run=lambda options: _run(options, _tail))

    quarantine = commands.add_parser(
        "quarantine", parents=[connection], help="list rejected (quarantined) items"
    )
    quarantine.add_argument("--all", action="store_true", help="resolved items too")
    quarantine.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    quarantine.set_defaults(run=lambda options: _run(options, _quarantine))

    renormalise = commands.add_parser(
        "renormalise", parents=[connection], help="run quarantined items through the current normaliser again"
    )
    renormalise.add_argument("ids", nargs="*", type=int, help="quarantine ids (default: every open item)")
    renormalise.add_argument("--json", action="store_true", help="the response as JSON")
    renormalise.set_defaults(run=lambda options: _run(options, _renormalise))


def _enum(enum: Any, prefix: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        name = text.upper().replace("-", "_")
        try:
            return int(enum.Value(name if name.startswith(prefix) else prefix + name))
        except ValueError:
            names = ", ".join(n.removeprefix(prefix).lower() for n in enum.keys()[1:])
            raise argparse.ArgumentTypeError(f"unknown value {text!r}; one of: {names}") from None

    return parse


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
    except KeyboardInterrupt:
        return EXIT_OK
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
    except (OSError, ValueError) as error:
        print(f"dlrhub: {error}", file=sys.stderr)
        return EXIT_ERROR


# ingest


async def _ingest(client: AsyncClient, options: argparse.Namespace) -> int:
    text = await asyncio.to_thread(_read_input, options.file)
    payloads, total = _payloads(text, options.batch_size)
    accepted = duplicate = rejected = 0
    from tqdm import tqdm  # noqa: PLC0415 - only ingest shows progress: the other commands start sooner

    progress = tqdm(
        total=total, unit="item", disable=not sys.stderr.isatty() or total < 2 * options.batch_size
    )
    try:
        for number, payload in enumerate(payloads, 1):
            request_id = (
                f"{options.request_id}-{number}" if options.request_id and total > 1 else options.request_id
            )
            try:
                response = await client.ingest(payload, format=FORMATS[options.format], request_id=request_id)
            except InvalidArgumentError as error:
                # On stderr even with --json: a wholly rejected payload has no response to print.
                _print_violations(error, sys.stderr)
                rejected += max(1, len(error.violations))
                continue
            accepted += response.accepted_count
            duplicate += response.duplicate_count
            rejected += response.rejected_count
            progress.update(len(response.results))
            if options.json:
                print(_json(response), flush=True)
            else:
                _print_rejections(response, sys.stderr)
    finally:
        progress.close()
    if not options.json:
        print(f"accepted {accepted}, duplicate {duplicate}, rejected {rejected}")
    return EXIT_INVALID if rejected else EXIT_OK


def _read_input(name: str) -> str:
    return sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")


def _payloads(text: str, batch_size: int) -> tuple[Iterator[str], int]:
    """Payloads to send: one per JSON line, or a large batch split into chunks of verbatim items."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and all(line.lstrip()[:1] in "{[" for line in lines):
        try:
            for line in lines:
                decode(line)
        except InvalidJson:
            pass  # not JSON lines: one document over several lines
        else:
            return iter(lines), len(lines)
    try:
        found = batch_items(decode(text))
    except InvalidJson:
        return iter([text]), 1  # the server says what is wrong with it
    if found is not None and len(found[1]) > batch_size:
        format, items = found
        chunks = (batch(format, items[i : i + batch_size]) for i in range(0, len(items), batch_size))
        return chunks, len(items)
    return iter([text]), 1


def _print_rejections(response: IngestResponse, out: TextIO) -> None:
    for result in response.results:
        if result.HasField("error"):
            print(f"rejected item {result.index}: {result.error.field}: {result.error.description}", file=out)


def _print_violations(error: DlrhubClientError, out: TextIO) -> None:
    print(f"rejected: {error.message}", file=out)
    for violation in error.violations:
        print(f"  {violation.field or '(payload)'}: {violation.description}", file=out)


# fetch


async def _fetch(client: AsyncClient, options: argparse.Namespace) -> int:
    source = SOURCES[options.source] if options.source else Source.SOURCE_UNSPECIFIED
    history: list[DeliveryReport] = []
    truncated = False
    if options.message_id:
        response = await client.get_message(
            options.message_id, source=source, include_history=options.history
        )
        reports = list(response.messages)
        history = list(response.history)
        truncated = response.history_truncated
    elif options.bulk_id:
        reports = [report async for report in client.iter_bulk(options.bulk_id, source=source)]
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
    return EXIT_OK


COLUMNS = ("SOURCE", "MESSAGE ID", "STATUS", "CHANNEL", "RECIPIENT", "EVENT TIME", "BULK ID", "REFERENCE")


def _print_table(reports: list[DeliveryReport]) -> None:
    rows = [COLUMNS] + [
        (
            Source.Name(r.source).removeprefix("SOURCE_"),
            r.message_id,
            DeliveryStatus.Name(r.status).removeprefix("DELIVERY_STATUS_"),
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
    stream = client.stream(
        bulk_id=options.bulk_id,
        message_ids=options.message_ids,
        statuses=options.status,
        channels=options.channel,
        source=SOURCES[options.source] if options.source else Source.SOURCE_UNSPECIFIED,
        cursor=options.cursor,
        from_beginning=options.from_beginning,
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
            "resolved" if item.HasField("resolved_time") else "open",
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
