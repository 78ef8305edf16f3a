"""`dlrhub ingest | fetch | tail` as real processes against the real `dlrhub serve` process.

One server process (on a free port, its own SQLite file) serves the whole module: starting one per
test would cost seconds each. Every test uses its own message ids, references and bulk ids, and
filters its streams by them, so the tests do not see each other's reports.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import pty
import queue
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from dlrhub.config import Settings
from dlrhub_client import Client, DeliveryStatus
from tests.conftest import FIXTURES
from tests.helpers import PROCESS_TIMEOUT, gms_bare
from tools import debian, launcher

_SCRIPT = shutil.which("dlrhub", path=str(Path(sys.executable).parent))
DLRHUB = [_SCRIPT] if _SCRIPT else [sys.executable, "-m", "dlrhub.cli"]
ENV = {
    **{k: v for k, v in os.environ.items() if k not in {"DLRHUB_TARGET", "DLRHUB_TOKEN"}},
    "PYTHONUNBUFFERED": "1",
}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[launcher.Server]:
    """`dlrhub serve` (tools/launcher.py), shared by this module, stopped with SIGTERM."""
    with launcher.start(tmp_path_factory.mktemp("cli") / "dlrhub.db") as running:
        yield running


def dlrhub(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DLRHUB, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        env=ENV,
        check=False,
    )


def dlrhub_all(*commands: Sequence[str]) -> list[subprocess.CompletedProcess[str]]:
    """Independent commands run at the same time (each is a Python start-up)."""
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        return list(pool.map(lambda command: dlrhub(*command), commands))


def sent_sms(message_id: str, bulk_id: str) -> dict[str, Any]:
    return {
        "bulkId": bulk_id,
        "messageId": message_id,
        "to": "41793026727",
        "doneAt": "2019-11-09T16:00:00.000+0000",
        "status": {"groupId": 3, "groupName": "DELIVERED", "id": 5, "name": "DELIVERED_TO_HANDSET"},
    }


def write_json(path: Path, value: Any) -> str:
    path.write_text(json.dumps(value, indent=2), encoding="utf-8")
    return str(path)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


# ingest


def test_ingest_a_file_then_again_reports_duplicates(hub: launcher.Server, tmp_path: Path) -> None:
    batch = write_json(
        tmp_path / "batch.json", [gms_bare(f"file-{n}", extra_id="REF-FILE") for n in range(3)]
    )
    first = dlrhub("ingest", batch, "--target", hub.address)
    assert (first.returncode, first.stdout) == (0, "accepted 3, duplicate 0, rejected 0\n"), first.stderr
    again = dlrhub("ingest", batch, "--target", hub.address)
    assert (again.returncode, again.stdout) == (0, "accepted 0, duplicate 3, rejected 0\n"), again.stderr
    with Client(hub.address, timeout=10) as client:
        assert sorted(r.message_id for r in client.iter_reference("REF-FILE")) == [
            "file-0",
            "file-1",
            "file-2",
        ]


def test_ingest_from_stdin(hub: launcher.Server) -> None:
    payload = json.dumps([gms_bare("stdin-1"), gms_bare("stdin-2", status=3, substatus=35)])
    result = dlrhub("ingest", "-", "--target", hub.address, stdin=payload)
    assert (result.returncode, result.stdout) == (0, "accepted 2, duplicate 0, rejected 0\n"), result.stderr
    with Client(hub.address, timeout=10) as client:
        report = client.get_message("stdin-2").messages[0]
    assert report.status == DeliveryStatus.DELIVERY_STATUS_UNDELIVERED
    assert report.raw_payload == json.dumps(gms_bare("stdin-2", status=3, substatus=35))


def test_ingest_with_an_explicit_format(hub: launcher.Server) -> None:
    body = str(FIXTURES / "sent_sms_report_pull.json")
    as_gms, as_sent_sms_report = dlrhub_all(
        ["ingest", body, "--format", "gms", "--target", hub.address],
        ["ingest", body, "--format", "sent-sms-report", "--target", hub.address],
    )
    assert as_sent_sms_report.returncode == 0, as_sent_sms_report.stderr
    assert as_sent_sms_report.stdout == "accepted 2, duplicate 0, rejected 0\n"
    assert as_gms.returncode == 3  # the flag is sent: a SentSMSReport body is no GMS report
    assert "accepted 0" in as_gms.stdout
    with Client(hub.address, timeout=10) as client:
        assert sorted(r.message_id for r in client.iter_bulk("BULK-ID-123-xyz")) == [
            "12db39c3-7822-4e72-a3ec-c87442c0ffc5",
            "MESSAGE-ID-123-xyz",
        ]


def test_ingest_with_a_bad_item_stores_the_rest_and_exits_3(hub: launcher.Server, tmp_path: Path) -> None:
    batch = write_json(tmp_path / "bad.json", [gms_bare("bad-ok-1"), {"status": 2}, gms_bare("bad-ok-2")])
    result = dlrhub("ingest", batch, "--target", hub.address)
    assert result.returncode == 3
    assert result.stdout == "accepted 2, duplicate 0, rejected 1\n"
    assert "rejected item 1: [1].message_id" in result.stderr
    with Client(hub.address, timeout=10) as client:
        assert client.get_message("bad-ok-2").messages[0].message_id == "bad-ok-2"


def test_ingest_invalid_json_exits_3_with_line_and_column(hub: launcher.Server, tmp_path: Path) -> None:
    malformed = str(FIXTURES / "gms_single_malformed.json")
    result, as_json, missing = dlrhub_all(
        ["ingest", malformed, "--target", hub.address],
        ["ingest", malformed, "--json", "--target", hub.address],
        ["ingest", str(tmp_path / "missing.json"), "--target", hub.address],
    )
    assert result.returncode == 3
    assert result.stdout == "accepted 0, duplicate 0, rejected 1\n"
    assert "invalid JSON" in result.stderr
    assert "line 8 column 16" in result.stderr
    # With --json there is no response to print, but the reason still goes to stderr.
    assert (as_json.returncode, as_json.stdout) == (3, "")
    assert "line 8 column 16" in as_json.stderr
    assert missing.returncode == 1
    assert "missing.json" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_ingest_json_lines_are_batched_like_an_array(hub: launcher.Server, tmp_path: Path) -> None:
    """The reports of JSON lines go in calls of --batch-size, as an array's; each rejected item is named
    by its line (and its place in that line), and a line that is no batch goes alone."""
    lines = [
        json.dumps(gms_bare("lines-1")),
        json.dumps([gms_bare("lines-2"), gms_bare("lines-3")]),
        json.dumps({"results": [sent_sms("lines-4", "B-LINES")]}),
        json.dumps(gms_bare("lines-5")),
    ]
    path = tmp_path / "reports.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    as_json = dlrhub("ingest", str(path), "--json", "--target", hub.address)
    assert as_json.returncode == 0, as_json.stderr
    responses = json_lines(as_json.stdout)  # one Ingest response per call
    # A call holds one format: the GMS reports of lines 1-2, the SentSMSReport one, then line 4's.
    assert [len(response["results"]) for response in responses] == [3, 1, 1]
    assert [r["message_id"] for response in responses for r in response["results"]] == [
        "lines-1",
        "lines-2",
        "lines-3",
        "lines-4",
        "lines-5",
    ]
    again = dlrhub("ingest", str(path), "--batch-size", "2", "--json", "--target", hub.address)
    assert [len(response["results"]) for response in json_lines(again.stdout)] == [2, 1, 1, 1]
    assert all(
        response["duplicate_count"] == len(response["results"]) for response in json_lines(again.stdout)
    )

    bad = tmp_path / "bad.jsonl"
    get_answer = {"reports": [gms_bare("lines-get", extra_id="REF-LINES")]}  # a GMS GET answer: no batch
    bad.write_text(
        "\n".join(
            json.dumps(line)
            for line in (
                gms_bare("lines-6"),
                [gms_bare("lines-7"), {"status": 2, "time": 1}],
                {"message_id": "lines-8", "status": "two", "time": 1},
                get_answer,
            )
        ),
        encoding="utf-8",
    )
    result = dlrhub("ingest", str(bad), "--target", hub.address)
    assert result.returncode == 3
    assert result.stdout == "accepted 3, duplicate 0, rejected 2\n"
    assert result.stderr.splitlines() == [
        "rejected line 2: [1].message_id: [1].message_id is required",
        "rejected line 3: status: status must be an integer, not a str",
    ]
    with Client(hub.address, timeout=10) as client:
        assert [r.message_id for r in client.iter_reference("REF-LINES")] == ["lines-get"]


def test_a_large_batch_is_split_into_calls_and_all_of_it_is_stored(
    hub: launcher.Server, tmp_path: Path
) -> None:
    ids = [f"big-{n:04d}" for n in range(2500)]
    batch = write_json(
        tmp_path / "big.json", [gms_bare(message_id, extra_id="REF-BIG") for message_id in ids]
    )
    result = dlrhub("ingest", batch, "--batch-size", "1000", "--json", "--target", hub.address)
    assert result.returncode == 0, result.stderr
    responses = json_lines(result.stdout)
    assert [len(response["results"]) for response in responses] == [1000, 1000, 500]
    assert sum(response["accepted_count"] for response in responses) == 2500

    fetched = dlrhub("fetch", "--reference", "REF-BIG", "--json", "--target", hub.address)
    assert fetched.returncode == 0, fetched.stderr
    assert sorted(report["message_id"] for report in json_lines(fetched.stdout)) == ids


def test_request_id_makes_a_rerun_of_a_split_batch_a_replay(hub: launcher.Server, tmp_path: Path) -> None:
    batch = write_json(tmp_path / "rid.json", [gms_bare(f"rid-{n}") for n in range(3)])
    options = ["--batch-size", "2", "--request-id", "cli-rid", "--target", hub.address]
    first = dlrhub("ingest", batch, *options)
    assert (first.returncode, first.stdout) == (0, "accepted 3, duplicate 0, rejected 0\n"), first.stderr
    # The same request ids answer the first answers again (not "duplicate 3").
    replay = dlrhub("ingest", batch, *options)
    assert (replay.returncode, replay.stdout) == (0, "accepted 3, duplicate 0, rejected 0\n"), replay.stderr


# fetch


def test_fetch_prints_a_table_json_history_bulks_and_references(hub: launcher.Server) -> None:
    with Client(hub.address, timeout=10) as client:
        client.ingest_gms(
            [gms_bare("fetch-1", status=1, time_ms=1_000, extra_id="REF-FETCH", sent_via="sms")]
        )
        client.ingest_gms(
            [gms_bare("fetch-1", status=2, time_ms=2_000, extra_id="REF-FETCH", sent_via="sms")]
        )
        client.ingest_sent_sms_report(
            [sent_sms("fetch-bulk-1", "B-FETCH"), sent_sms("fetch-bulk-2", "B-FETCH")]
        )
    target = ["--target", hub.address]
    table, as_json, history, history_json, bulk, reference, empty_bulk, unknown = dlrhub_all(
        ["fetch", "--message-id", "fetch-1", *target],
        ["fetch", "--message-id", "fetch-1", "--json", *target],
        ["fetch", "--message-id", "fetch-1", "--history", *target],
        ["fetch", "--message-id", "fetch-1", "--history", "--json", *target],
        ["fetch", "--bulk-id", "B-FETCH", *target],
        ["fetch", "--reference", "REF-FETCH", "--json", *target],
        ["fetch", "--bulk-id", "B-NONE", *target],
        ["fetch", "--message-id", "no-such-message", *target],
    )
    for result in (table, as_json, history, history_json, bulk, reference, empty_bulk):
        assert result.returncode == 0, result.stderr

    header, row = table.stdout.splitlines()
    assert header.split() == [
        "SOURCE",
        "MESSAGE",
        "ID",
        "STATUS",
        "CHANNEL",
        "RECIPIENT",
        "EVENT",
        "TIME",
        "BULK",
        "ID",
        "REFERENCE",
    ]
    assert "MESSAGE ID" in header
    assert row.split() == ["GMS", "fetch-1", "DELIVERED", "SMS", "1970-01-01T00:00:02Z", "REF-FETCH"]
    assert row.index("DELIVERED") == header.index("STATUS")  # the columns line up

    [report] = json_lines(as_json.stdout)
    assert (report["message_id"], report["status"], report["reference"]) == (
        "fetch-1",
        "DELIVERY_STATUS_DELIVERED",
        "REF-FETCH",
    )

    _, state, blank, history_title, history_header, *history_rows = history.stdout.splitlines()
    assert state == row
    assert (blank, history_title, history_header) == ("", "history:", header)
    assert [line.split()[2] for line in history_rows] == ["SENT", "DELIVERED"]

    current, *previous = json_lines(history_json.stdout)
    assert current["status"] == "DELIVERY_STATUS_DELIVERED"
    assert [entry["history"]["status"] for entry in previous] == [
        "DELIVERY_STATUS_SENT",
        "DELIVERY_STATUS_DELIVERED",
    ]

    bulk_lines = bulk.stdout.splitlines()
    assert "BULK ID" in bulk_lines[0]
    assert sorted(line.split()[1] for line in bulk_lines[1:3]) == ["fetch-bulk-1", "fetch-bulk-2"]
    assert all("SENT_SMS_REPORT" in line and "B-FETCH" in line for line in bulk_lines[1:3])
    # Then the bulk's counts per status, and the total.
    assert [line.split() for line in bulk_lines[3:]] == [
        [],
        ["STATUS", "MESSAGES"],
        ["DELIVERED", "2"],
        ["total", "2"],
    ]

    assert [report["message_id"] for report in json_lines(reference.stdout)] == ["fetch-1"]
    assert empty_bulk.stdout.splitlines()[1:] == ["(no messages)"]

    assert unknown.returncode == 4
    assert unknown.stdout == ""
    assert "no message with message_id 'no-such-message'" in unknown.stderr


def test_nothing_listening_exits_5_saying_unavailable() -> None:
    fetch, ingest = dlrhub_all(
        ["fetch", "--message-id", "x", "--target", "127.0.0.1:1", "--timeout", "2"],
        ["ingest", str(FIXTURES / "gms_batch.json"), "--target", "127.0.0.1:1", "--timeout", "2"],
    )
    for result in (fetch, ingest):
        assert result.returncode == 5
        assert "unavailable at 127.0.0.1:1" in result.stderr
        assert "safe to retry" in result.stderr
        assert "Traceback" not in result.stderr


# tail


class Tail:
    """A running `dlrhub tail`, its stdout lines read on a thread so every read has a timeout."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [*DLRHUB, "tail", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def lines(self, count: int) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        while len(got) < count:
            try:
                line = self._lines.get(timeout=PROCESS_TIMEOUT)
            except queue.Empty:
                pytest.fail(f"tail printed {len(got)} of {count} lines in {PROCESS_TIMEOUT} s")
            if line is None:
                pytest.fail(f"tail ended ({self.process.wait(PROCESS_TIMEOUT)}) after {len(got)} lines")
            got.append(json.loads(line))
        return got

    def nothing_more(self, seconds: float) -> bool:
        try:
            self._lines.get(timeout=seconds)
        except queue.Empty:
            return True
        return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=PROCESS_TIMEOUT)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def tails() -> Iterator[list[Tail]]:
    started: list[Tail] = []
    try:
        yield started
    finally:
        for tail in started:
            tail.stop()


def test_tail_prints_changes_resumes_from_a_cursor_and_filters(
    hub: launcher.Server, tails: list[Tail]
) -> None:
    ids = ["tail-a", "tail-b", "tail-c", "tail-d"]
    only_ours = [option for message_id in ids for option in ("--message-id", message_id)]
    with Client(hub.address, timeout=10) as client:
        stored = client.ingest_gms([gms_bare("tail-a"), gms_bare("tail-b", status=3), gms_bare("tail-c")])
        cursors = [result.cursor for result in stored.results]

        everything = Tail("--from-beginning", *only_ours, "--target", hub.address)
        resumed = Tail("--cursor", cursors[0], *only_ours, "--target", hub.address)
        delivered = Tail("--from-beginning", "--status", "delivered", *only_ours, "--target", hub.address)
        heartbeats = Tail("--heartbeats", "--message-id", "tail-none", "--target", hub.address)
        tails.extend([everything, resumed, delivered, heartbeats])

        first = everything.lines(3)
        assert [line["cursor"] for line in first] == cursors
        assert [line["change"]["report"]["message_id"] for line in first] == ["tail-a", "tail-b", "tail-c"]
        assert [line["change"]["state"]["status"] for line in first] == [
            "DELIVERY_STATUS_DELIVERED",
            "DELIVERY_STATUS_FAILED",
            "DELIVERY_STATUS_DELIVERED",
        ]
        assert not any("heartbeat" in line for line in first)  # heartbeats only with --heartbeats

        # Live: a change stored now arrives too.
        live = client.ingest_gms([gms_bare("tail-d")])
        [fourth] = everything.lines(1)
        assert (fourth["cursor"], fourth["change"]["report"]["message_id"]) == (
            live.results[0].cursor,
            "tail-d",
        )

    assert [line["change"]["report"]["message_id"] for line in resumed.lines(3)] == [
        "tail-b",
        "tail-c",
        "tail-d",
    ]
    assert [line["change"]["report"]["message_id"] for line in delivered.lines(3)] == [
        "tail-a",
        "tail-c",
        "tail-d",
    ]
    [start] = heartbeats.lines(1)
    assert start["heartbeat"] == {}
    assert int(start["cursor"]) >= int(cursors[-1])  # the latest position when it started
    assert "change" not in start
    assert everything.nothing_more(0.3)


def test_tail_stops_on_ctrl_c_with_status_130_and_nothing_on_stderr(
    hub: launcher.Server, tails: list[Tail]
) -> None:
    with Client(hub.address, timeout=10) as client:
        stored = client.ingest_gms([gms_bare("ctrl-c-1")])
    tail = Tail("--from-beginning", "--message-id", "ctrl-c-1", "--target", hub.address)
    tails.append(tail)
    assert [line["cursor"] for line in tail.lines(1)] == [stored.results[0].cursor]
    tail.process.send_signal(signal.SIGINT)
    assert tail.process.wait(timeout=PROCESS_TIMEOUT) == 130  # 128 + SIGINT, as shells report it
    assert tail.process.stderr is not None
    assert tail.process.stderr.read() == ""


def test_tail_into_head_ends_quietly_when_head_has_enough(hub: launcher.Server) -> None:
    """`dlrhub tail | head -n 2`: once head exits, tail's next line finds the pipe closed; it ends with
    128 + SIGPIPE, as `yes | head` does, and writes nothing on stderr."""
    command = [*DLRHUB, "tail", "--heartbeats", "--heartbeat-interval", "0.2", "--target", hub.address]
    tail = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    assert tail.stdout is not None
    assert tail.stderr is not None
    head = subprocess.run(
        ["head", "-n", "2"],
        stdin=tail.stdout,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        check=True,
    )
    tail.stdout.close()  # head holds the only reading end now, and it has exited
    try:
        assert tail.wait(timeout=PROCESS_TIMEOUT) == 141
    finally:
        tail.kill()
        tail.wait()
    assert [json.loads(line)["heartbeat"] for line in head.stdout.splitlines()] == [{}, {}]
    assert tail.stderr.read() == ""


def test_tail_where_nothing_listens_says_so_within_seconds() -> None:
    started = time.monotonic()
    result = dlrhub("tail", "--target", f"127.0.0.1:{launcher.free_port()}")
    assert time.monotonic() - started < 10  # not the minutes of every reconnection's backoff
    assert result.returncode == 5
    assert "unavailable at 127.0.0.1:" in result.stderr
    assert "Connection refused" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_tail_options_are_usage_errors() -> None:
    bad_status, both_starts = dlrhub_all(
        ["tail", "--status", "nonsense", "--target", "127.0.0.1:1"],
        ["tail", "--cursor", "1", "--from-beginning", "--target", "127.0.0.1:1"],
    )
    assert bad_status.returncode == 2
    assert bad_status.stderr.startswith("usage: dlrhub tail")
    assert "unknown value 'nonsense'" in bad_status.stderr
    assert "delivered" in bad_status.stderr  # the valid values are listed
    assert both_starts.returncode == 2
    assert "not allowed with argument" in both_starts.stderr


def test_a_large_file_shows_a_progress_bar_on_a_terminal_only(hub: launcher.Server, tmp_path: Path) -> None:
    """On a terminal (a pseudo-terminal here) stderr shows tqdm's bar; piped, it shows nothing."""
    ids = [f"bar-{n:04d}" for n in range(40)]
    batch = write_json(tmp_path / "bar.json", [gms_bare(message_id) for message_id in ids])
    terminal, out, code = _on_a_terminal(
        [*DLRHUB, "ingest", batch, "--batch-size", "10", "--target", hub.address]
    )
    assert code == 0
    assert out == "accepted 40, duplicate 0, rejected 0\n"
    assert b"40/40" in terminal, terminal
    assert b"item" in terminal, terminal

    piped = dlrhub("ingest", batch, "--batch-size", "10", "--target", hub.address)
    assert (piped.returncode, piped.stderr) == (0, "")


def test_a_message_never_breaks_the_progress_bar(hub: launcher.Server, tmp_path: Path) -> None:
    """A rejection said while the bar shows starts on a line of its own (the bar is cleared first)
    and the bar comes back below it, never glued to it."""
    items = [gms_bare(f"bar-msg-{n:02d}") if n % 7 else {"status": 2, "time": 1} for n in range(40)]
    batch = write_json(tmp_path / "bar-msg.json", items)
    terminal, _, code = _on_a_terminal(
        [*DLRHUB, "ingest", batch, "--batch-size", "10", "--target", hub.address]
    )
    assert code == 3
    lines = terminal.replace(b"\r\n", b"\n").split(b"\n")
    said = [line for line in lines if b"rejected item" in line]
    assert len(said) == 6, terminal
    for line in said:
        shown = line.split(b"\r")[-1]  # what stays on the row after the carriage returns
        assert shown.startswith(b"rejected item "), line
        assert b"it/s" not in shown, line
        assert b"%|" not in shown, line
    assert b"40/40" in terminal


def _on_a_terminal(command: list[str]) -> tuple[bytes, str, int]:
    """Runs `command` with stderr on a 100-column pseudo-terminal: what the terminal got, what stdout
    got, and the exit status."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    terminal = b""
    try:
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=follower, env=ENV, text=True
        ) as process:
            os.close(follower)
            out, _ = process.communicate(timeout=PROCESS_TIMEOUT)
            while True:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # the follower side is closed: everything was read
                    break
                if not chunk:
                    break
                terminal += chunk
    finally:
        os.close(leader)
    return terminal, out, process.returncode


def test_connection_flags_go_before_or_after_the_command(hub: launcher.Server) -> None:
    with Client(hub.address, timeout=10) as client:
        client.ingest_gms([gms_bare("flags-1")])
    before, after, both = dlrhub_all(
        ["--target", hub.address, "--timeout", "10", "fetch", "--message-id", "flags-1", "--json"],
        ["fetch", "--message-id", "flags-1", "--json", "--target", hub.address],
        # After the command wins: the first target answers nothing.
        ["--target", "127.0.0.1:1", "fetch", "--message-id", "flags-1", "--json", "--target", hub.address],
    )
    for result in (before, after, both):
        assert result.returncode == 0, result.stderr
        assert json_lines(result.stdout)[0]["message_id"] == "flags-1"


def test_help_shows_examples_and_the_environment() -> None:
    top, ingest, tail, serve = dlrhub_all(
        ["--help"], ["ingest", "--help"], ["tail", "-h"], ["serve", "--help"]
    )
    for result in (top, ingest, tail, serve):
        assert result.returncode == 0, result.stderr
        assert "examples:\n  dlrhub " in result.stdout
    assert "DLRHUB_TARGET" in top.stdout
    assert "DLRHUB_TOKEN" in top.stdout
    assert "before or after the command" in top.stdout
    assert "(env DLRHUB_TARGET" in ingest.stdout
    every = [field.metadata["env"] for field in dataclasses.fields(Settings)]
    assert [name for name in every if name not in serve.stdout] == []


def test_health_says_serving_and_names_what_fails(hub: launcher.Server) -> None:
    serving, unknown, nothing = dlrhub_all(
        ["health", "--target", hub.address],
        ["health", "--service", "no.such.Service", "--target", hub.address],
        ["health", "--target", f"127.0.0.1:{launcher.free_port()}"],
    )
    assert (serving.returncode, serving.stdout) == (0, "SERVING\n"), serving.stderr
    assert unknown.returncode == 4
    assert "no health service 'no.such.Service'" in unknown.stderr
    assert nothing.returncode == 5
    assert "unavailable at" in nothing.stderr


# completion


def _completion(shell: str) -> str:
    result = dlrhub("completion", shell)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _bash_complete(script: Path, words: Sequence[str], cwd: Path) -> list[str]:
    """What bash's completion offers for `words` (the last one being completed) with `script` loaded."""
    quoted = " ".join(shlex.quote(word) for word in words)
    program = (
        f"source {shlex.quote(str(script))}; COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; _dlrhub;"
        ' printf "%s\\n" "${COMPREPLY[@]}"'
    )
    done = subprocess.run(
        ["bash", "-c", program], cwd=cwd, capture_output=True, text=True, timeout=PROCESS_TIMEOUT, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout.split()


def test_bash_completion_offers_commands_flags_and_values(tmp_path: Path) -> None:
    script = tmp_path / "dlrhub.bash"
    script.write_text(_completion("bash"), encoding="utf-8")
    (tmp_path / "reports.json").write_text("[]", encoding="utf-8")
    assert _bash_complete(script, ["dlrhub", "ta"], tmp_path) == ["tail"]
    assert set(_bash_complete(script, ["dlrhub", ""], tmp_path)) >= {
        "serve",
        "ingest",
        "fetch",
        "tail",
        "--target",
    }
    assert _bash_complete(script, ["dlrhub", "tail", "--st"], tmp_path) == ["--status"]
    assert _bash_complete(script, ["dlrhub", "tail", "--status", "de"], tmp_path) == ["delivered"]
    assert _bash_complete(script, ["dlrhub", "ingest", "--format", ""], tmp_path) == [
        "auto",
        "gms",
        "sent-sms-report",
    ]
    assert _bash_complete(script, ["dlrhub", "ingest", "rep"], tmp_path) == ["reports.json"]
    # A connection flag before the command: the command is still found, and so are its flags.
    assert _bash_complete(script, ["dlrhub", "--target", "h:1", "fetch", "--bul"], tmp_path) == ["--bulk-id"]
    assert _bash_complete(script, ["dlrhub", "fetch", "--message-id", ""], tmp_path) == []


def test_zsh_completion_loads_and_completes() -> None:
    debian.install(["zsh"])
    program = (
        f"eval {shlex.quote(_completion('zsh'))}\n"
        "print -r -- ${_comps[dlrhub]}\n"
        "setopt ksharrays\n"  # bash's array indexes, as zsh's bash layer runs the function
        "COMP_WORDS=(dlrhub tail --status de); COMP_CWORD=3; _dlrhub; print -r -- ${COMPREPLY[@]}\n"
    )
    done = subprocess.run(
        ["zsh", "-f", "-c", program], capture_output=True, text=True, timeout=PROCESS_TIMEOUT, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    registered, offered = done.stdout.splitlines()
    assert registered  # the completion function zsh runs for `dlrhub`
    # zsh's compgen leaves the matching to zsh's completion system, which offers "delivered" of these.
    assert offered.split() == [
        "accepted",
        "sent",
        "delivered",
        "undelivered",
        "expired",
        "rejected",
        "failed",
        "seen",
    ]
