"""`buf breaking`: the contract (buf.yaml's protos/, as the working tree has it) against the last
commit on main; `make lint` runs it.

    python tools/buf_breaking.py  # prints the commit compared against; exit status 1, with buf's
                                  # findings, on a breaking change

The commit compared against:
- on a branch (HEAD is not on main): the main commit the branch started from (the merge base), so
  every change of the branch counts, however many commits it has;
- on main (CI's clean clone): HEAD's first parent, main before the last commit or merge landed;
- never one older than protos/BREAKING_BASELINE, the commit that settled v1 after its one allowed
  breaking cleanup: an older commit is replaced by the baseline. Once main holds the baseline, every
  commit compared against is newer, so the file plays no further part.
`main` is the local branch, or else `origin/main`. This needs the history back to the baseline: a
shallow clone fails, saying so. Only the standard library is used.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = Path("protos", "BREAKING_BASELINE")
MAINS = ("main", "origin/main")
BUF = ROOT / "node_modules" / ".bin" / "buf"


class BreakingError(RuntimeError):
    """No commit to compare against could be found; the message says why."""


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=False)


def _commit(root: Path, ref: str) -> str | None:
    found = _git(root, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    return found.stdout.strip() if found.returncode == 0 else None


def _is_ancestor(root: Path, older: str, newer: str) -> bool:
    """Whether `older` is `newer` or one of its ancestors."""
    return _git(root, "merge-base", "--is-ancestor", older, newer).returncode == 0


def baseline(root: Path) -> str:
    """The commit protos/BREAKING_BASELINE names (its one line that is not a # comment)."""
    path = root / BASELINE
    lines = [line.strip() for line in path.read_text().splitlines()]
    names = [line for line in lines if line and not line.startswith("#")]
    commit = _commit(root, names[0]) if len(names) == 1 else None
    if commit is None:
        raise BreakingError(f"{BASELINE} must name one commit of this repository: {names}")
    return commit


def against(root: Path) -> str:
    """The commit the working tree's contract is compared against (see the module docstring)."""
    if _git(root, "rev-parse", "--is-shallow-repository").stdout.strip() == "true":
        raise BreakingError("a shallow clone lacks the commits to compare with: `git fetch --unshallow`")
    head = _commit(root, "HEAD")
    main = next(filter(None, (_commit(root, name) for name in MAINS)), None)
    if head is None or main is None:
        raise BreakingError(f"need a git checkout with a commit and a branch {' or '.join(MAINS)}")
    if _is_ancestor(root, head, main):
        last = _commit(root, "HEAD^1")
        if last is None:
            raise BreakingError("HEAD is main's first commit: there is nothing to compare with")
    else:
        last = _git(root, "merge-base", head, main).stdout.strip()
    settled = baseline(root)
    if not _is_ancestor(root, settled, head):
        raise BreakingError(f"{BASELINE} names {settled}, which is not in HEAD's history")
    return last if _is_ancestor(root, settled, last) else settled


def check(root: Path, commit: str, buf: Path = BUF) -> subprocess.CompletedProcess[str]:
    """`buf breaking` (buf.yaml's rules) of the working tree's contract against `commit`."""
    return subprocess.run(
        [str(buf), "breaking", "--against", f".git#ref={commit}"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this one)")
    args = parser.parse_args(argv)
    try:
        commit = against(args.root)
    except BreakingError as error:
        print(f"buf_breaking: {error}", file=sys.stderr)
        return 1
    result = check(args.root, commit)
    print(result.stdout + result.stderr, end="")
    verdict = "breaks" if result.returncode else "keeps to"
    print(f"the contract {verdict} buf.yaml's breaking rules against {commit[:12]}")
    return 1 if result.returncode else 0


if __name__ == "__main__":
    sys.exit(main())
