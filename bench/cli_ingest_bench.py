"""Benchmark: `dlrhub ingest` of a JSON-lines file against the same reports as one JSON array.

    .venv/bin/python -m bench.cli_ingest_bench                      # 5,000 lines vs 5,000 items
    .venv/bin/python -m bench.cli_ingest_bench --lines 5000 --items 30000

It starts the real `dlrhub serve` on a fresh SQLite file and runs the real command twice, as a user
would: a file of `--lines` GMS reports, one JSON object per line, and a file of `--items` GMS
reports in one JSON array (split by the command into calls of `--batch-size`). Every report has its
own message id, so everything is stored. It prints each run's wall time and items per second, and
the ratio of the two rates (JSON lines / array): a JSON-lines file is batched like an array when
that ratio is near 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tools import launcher


def report(n: int) -> dict[str, object]:
    return {
        "number": "380961111111",
        "time": 1_700_000_000_000 + n,
        "status": 2,
        "substatus": 23,
        "hyber_status": 23011,
        "message_id": f"bench-cli-{n:08d}",
        "extra_id": "BENCH-CLI",
        "sent_via": "sms",
    }


def ingest(path: Path, target: str, batch_size: int) -> float:
    command = shutil.which("dlrhub", path=str(Path(sys.executable).parent)) or "dlrhub"
    started = time.perf_counter()
    subprocess.run(
        [command, "ingest", str(path), "--target", target, "--batch-size", str(batch_size)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lines", type=int, default=5000, help="reports in the JSON-lines file")
    parser.add_argument("--items", type=int, default=5000, help="reports in the JSON array file")
    parser.add_argument("--batch-size", type=int, default=1000)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        lines = directory / "reports.jsonl"
        lines.write_text("".join(json.dumps(report(n)) + "\n" for n in range(options.lines)))
        array = directory / "reports.json"
        array.write_text(json.dumps([report(options.lines + n) for n in range(options.items)]))
        with launcher.start(directory / "dlrhub.db") as hub:
            seconds_lines = ingest(lines, hub.address, options.batch_size)
            seconds_array = ingest(array, hub.address, options.batch_size)
    rate_lines = options.lines / seconds_lines
    rate_array = options.items / seconds_array
    print(f"JSON lines: {options.lines} reports in {seconds_lines:.2f} s ({rate_lines:,.0f}/s)")
    print(f"JSON array: {options.items} reports in {seconds_array:.2f} s ({rate_array:,.0f}/s)")
    print(f"ratio (lines / array, per report): {rate_lines / rate_array:.2f}")


if __name__ == "__main__":
    main()
