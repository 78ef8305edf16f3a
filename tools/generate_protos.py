"""Generate the Python modules and type stubs for protos/ into gen/.

    python tools/generate_protos.py          # regenerate gen/
    python tools/generate_protos.py --check  # fail if gen/ is not current

The proto package path is the Python import path (`deliveryreport.v1`), so
nothing is rewritten after protoc. gen/ holds generated files only: what protoc
and mypy-protobuf write, and the PEP 561 marker `py.typed` that says their .pyi
stubs are the package's types (in deliveryreport/v1/, as PEP 561 asks of a
namespace package), so a caller's mypy checks its use of DeliveryReport.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GEN = ROOT / "gen"


def generate(out: Path) -> None:
    """Run protoc (bundled with grpcio-tools) and mypy-protobuf into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    well_known = Path(protoc.__file__).parent / "_proto"
    bindir = Path(sys.executable).parent  # mypy-protobuf's plugins live beside python
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for package in {path.parent for path in out.rglob("*.pyi")}:
        (package / "py.typed").touch()


def differences(left: Path, right: Path) -> list[str]:
    """Relative paths that differ between two generated trees."""
    names = {p.relative_to(left) for p in left.rglob("*") if p.is_file()}
    names |= {p.relative_to(right) for p in right.rglob("*") if p.is_file()}
    return sorted(
        str(n)
        for n in names
        if not (
            (left / n).is_file() and (right / n).is_file() and filecmp.cmp(left / n, right / n, shallow=False)
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only check that gen/ is current")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "gen"
        generate(fresh)
        if options.check:
            stale = differences(fresh, GEN)
            if stale:
                print(
                    "gen/ is stale; run `python tools/generate_protos.py`:",
                    *stale,
                    sep="\n  ",
                    file=sys.stderr,
                )
                return 1
            print("gen/ is current")
            return 0
        shutil.rmtree(GEN, ignore_errors=True)
        shutil.copytree(fresh, GEN)
    print(f"generated {GEN.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
