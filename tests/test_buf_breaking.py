"""`make lint`'s buf breaking check (tools/buf_breaking.py) on a real git history of the contract:
it compares with the last commit on main, or a branch with where it left main, and never with a
commit older than protos/BREAKING_BASELINE."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tools import buf_breaking

SERVICE = Path("protos", "deliveryreport", "v1", "delivery_report_service.proto")
# Breaking: a field changes type (buf's FIELD_SAME_TYPE), in two different messages.
RETYPE_INDEX = ("  int32 index = 1;", "  int64 index = 1;")
RETYPE_ID = (
    "  int64 id = 1;\n  // When dlrhub received it.",
    "  string id = 1;\n  // When dlrhub received it.",
)
# Compatible: a new message.
ADD_MESSAGE = ("message StreamHeartbeat {}", "message StreamHeartbeat {}\n\n// New.\nmessage Added {}")


@dataclass
class Repo:
    path: Path

    def git(self, *args: str) -> str:
        identity = ["-c", "user.name=Test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false"]
        done = subprocess.run(
            ["git", "-C", str(self.path), *identity, *args], capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    def commit(self, message: str, edit: tuple[str, str] | None = None, baseline: str | None = None) -> str:
        if edit is not None:
            path = self.path / SERVICE
            old, new = edit
            text = path.read_text()
            assert text.count(old) == 1, old
            path.write_text(text.replace(old, new))
        if baseline is not None:
            (self.path / buf_breaking.BASELINE).write_text(f"# The commit that settled v1.\n{baseline}\n")
        self.git("add", "--all")
        self.git("commit", "--quiet", "--message", message)
        return self.git("rev-parse", "HEAD")

    def check(self) -> tuple[int, str]:
        """The check's exit status and output, as `make lint` runs it."""
        done = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "buf_breaking.py"), "--root", str(self.path)],
            capture_output=True,
            text=True,
            check=False,
        )
        return done.returncode, done.stdout + done.stderr


@dataclass
class Settled:
    """main before v1 was settled (`old`), the branch that settled it with a break (`settling`),
    recording that commit as the baseline, and main after merging that branch (`merged`)."""

    repo: Repo
    old: str
    settling: str
    merged: str


@pytest.fixture
def settled(tmp_path: Path) -> Settled:
    repo = Repo(tmp_path / "repo")
    shutil.copytree(ROOT / "protos", repo.path / "protos")
    shutil.copy(ROOT / "buf.yaml", repo.path)
    (repo.path / buf_breaking.BASELINE).unlink()
    repo.git("init", "--quiet", "--initial-branch", "main")
    old = repo.commit("the contract before v1 was settled")
    repo.git("switch", "--quiet", "--create", "settle")
    settling = repo.commit("settle v1, breaking it once", RETYPE_INDEX)
    repo.commit("record the baseline", baseline=settling)
    repo.git("switch", "--quiet", "main")
    repo.git("merge", "--quiet", "--no-ff", "--message", "merge settle", "settle")
    return Settled(repo, old, settling, repo.git("rev-parse", "HEAD"))


def test_the_merge_that_settles_v1_is_compared_with_the_baseline_not_the_main_before(
    settled: Settled,
) -> None:
    assert buf_breaking.against(settled.repo.path) == settled.settling
    status, output = settled.repo.check()
    assert status == 0, output
    assert f"against {settled.settling[:12]}" in output
    # Against main's commit before it, that merge breaks the contract: the baseline is what lets it in.
    before = buf_breaking.check(settled.repo.path, settled.old)
    assert before.returncode != 0
    assert 'changed type from "int32" to "int64"' in before.stdout


def test_a_breaking_commit_on_main_fails_against_the_commit_before_it(settled: Settled) -> None:
    settled.repo.commit("break v1", RETYPE_ID)
    status, output = settled.repo.check()
    assert status == 1
    assert f"against {settled.merged[:12]}" in output
    assert (
        'Field "1" with name "id" on message "QuarantinedItem" changed type from "int64" to "string"'
        in output
    )


def test_a_compatible_commit_on_main_passes(settled: Settled) -> None:
    settled.repo.commit("add a message", ADD_MESSAGE)
    status, output = settled.repo.check()
    assert status == 0, output


def test_a_branch_is_compared_with_where_it_left_main_so_an_earlier_commit_counts(settled: Settled) -> None:
    settled.repo.git("switch", "--quiet", "--create", "feature")
    settled.repo.commit("break v1", RETYPE_ID)
    settled.repo.commit("then something compatible", ADD_MESSAGE)  # alone against its parent, fine
    status, output = settled.repo.check()
    assert status == 1
    assert f"against {settled.merged[:12]}" in output
    assert 'on message "QuarantinedItem" changed type' in output


def test_a_baseline_outside_the_history_fails_and_says_so(settled: Settled) -> None:
    settled.repo.commit("a rewritten baseline", baseline="0" * 40)
    status, output = settled.repo.check()
    assert status == 1
    assert f"{buf_breaking.BASELINE} must name one commit of this repository" in output
