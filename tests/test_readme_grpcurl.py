"""Every grpcurl example in README.md, run verbatim, in README order, against a fresh server.

The only changes to a command are the address (127.0.0.1:50051 becomes the test server's) and the
leading `grpcurl` (the venv's binary). Each runs through `bash -c`, so the quoting is exactly what a
user pastes into a shell.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import ROOT
from tests.helpers import PROCESS_TIMEOUT
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


def readme_examples() -> list[Example]:
    """The grpcurl commands of README.md's ```sh blocks, in order (backslash continuations joined)."""
    blocks = re.findall(r"^```sh\n(.*?)^```", README.read_text(), re.MULTILINE | re.DOTALL)
    examples = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("grpcurl "):
                examples.append(Example(line, shlex.split(line)))
    return examples


def grpcurl_path() -> str:
    found = shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    assert found is not None, f"grpcurl is not installed next to {sys.executable}"
    return found


def as_run(example: Example, address: str) -> str:
    """The README command with only the binary and the address replaced."""
    assert example.command.count(README_ADDRESS) == 1, example.command
    command = example.command.replace(README_ADDRESS, address)
    return shlex.quote(grpcurl_path()) + command.removeprefix("grpcurl")


def json_messages(text: str) -> list[dict[str, Any]]:
    """grpcurl's JSON output: one object per message, concatenated."""
    decoder = json.JSONDecoder()
    messages: list[dict[str, Any]] = []
    index = 0
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index == len(text):
            return messages
        message, index = decoder.raw_decode(text, index)
        assert isinstance(message, dict)
        messages.append(message)


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


def test_readme_grpcurl_examples_run_verbatim(server_process: launcher.Server) -> None:
    examples = readme_examples()
    assert len(examples) >= 9
    assert [e.is_error_example for e in examples].count(True) == 1, "the README's error example is gone"
    problems: list[str] = []
    accepted = 0

    for example in examples:
        done = subprocess.run(
            ["bash", "-c", as_run(example, server_process.address)],
            capture_output=True,
            text=True,
            timeout=PROCESS_TIMEOUT,
            check=False,
        )
        output = done.stdout + done.stderr

        def check(ok: bool, what: str, example: Example = example, output: str = output) -> None:
            if not ok:
                problems.append(f"{example.command}\n  {what}\n  output: {output[:2000]}")

        if example.is_error_example:
            check(done.returncode == EXIT_INVALID_ARGUMENT, f"exit {done.returncode}, not InvalidArgument")
            check("Code: InvalidArgument" in output, "no InvalidArgument in the output")
            check('"reason":"INVALID_JSON"' in output, "no ErrorInfo reason INVALID_JSON in the output")
            check('"domain":"deliveryreport.dlrhub.io"' in output, "no ErrorInfo domain in the output")
            check(re.search(r"line \d+ column \d+", output) is not None, "no line and column in the error")
            continue

        if example.is_timed_stream:
            # `-max-time` is how the README stops a live stream: grpcurl then ends the call with
            # DeadlineExceeded (exit 68) after printing everything the stream sent.
            check(done.returncode == EXIT_DEADLINE_EXCEEDED, f"exit {done.returncode}, not 68 (-max-time)")
            check("Code: DeadlineExceeded" in done.stderr, "did not end at -max-time")
            messages = json_messages(done.stdout)
            if example.method.endswith("/StreamBatches"):
                check(all(set(m) == {"responses"} for m in messages), "not StreamBatchesResponses")
                messages = [response for m in messages for response in m.get("responses", [])]
            replayed = [m for m in messages if "change" in m]
            check(len(replayed) == accepted, f"replayed {len(replayed)} changes, {accepted} were accepted")
            check(any(m.get("heartbeat") == {} for m in messages), "no heartbeat")
            continue

        check(done.returncode == 0, f"exit {done.returncode}")
        if done.returncode != 0:
            continue
        if example.method == "list":
            check(SERVICE in done.stdout.split(), "the service is not listed")
        elif example.args[-2] == "describe":
            check(f"{example.method} is a " in done.stdout, "nothing described")
        else:
            answer = json.loads(done.stdout)
            if example.method == "grpc.health.v1.Health/Check":
                check(answer == {"status": "SERVING"}, "not SERVING")
            elif example.method.endswith("/Ingest"):
                outcomes = [result["outcome"] for result in answer.get("results", [])]
                check(outcomes == ["INGEST_OUTCOME_ACCEPTED"] * len(outcomes) != [], f"outcomes {outcomes}")
                accepted += len(outcomes)
            elif example.method.endswith(("/GetMessage", "/ListMessages")):
                # Each example finds what the Ingest examples before it stored.
                check(len(answer.get("messages", [])) >= 1, "found nothing")

    assert not problems, "README grpcurl examples that do not work as documented:\n" + "\n".join(problems)
