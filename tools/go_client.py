"""Build the Go client (client/go) offline, from Debian's packages and the code `buf generate` makes.

    python tools/go_client.py build [--out DIR]  # prints the path of DIR/build/bin/dlrhub-go-client

Debian's Go toolchain, protoc, protoc-gen-go, protoc-gen-go-grpc and the Go libraries (grpc-go,
google.golang.org/protobuf, genproto's google.rpc details) are apt-get installed when missing (as
root, like tools/pg_cluster.py's PostgreSQL). Debian ships Go libraries as source under
/usr/share/gocode and no module proxy is reachable, so the build runs in GOPATH mode, as Debian
builds its own Go packages: GO111MODULE=off, GOPROXY=off, and GOPATH = the generated tree
(DIR/build/gen/go, per buf.gen.yaml), then /usr/share/gocode. The generated code is made fresh for
every build and never committed. Before building, the client must be gofmt-clean and pass go vet.
Only the standard library is used, so this runs before any virtualenv exists.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

try:
    from tools import debian
except ImportError:  # run as a script: tools/ itself is on sys.path
    import debian  # type: ignore[no-redef,import-not-found]

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "client" / "go"
BUF = ROOT / "node_modules" / ".bin" / "buf"
GO_TREE = Path("build", "gen", "go")  # buf.gen.yaml's Go output (a GOPATH), under the output directory
DEBIAN_GOPATH = "/usr/share/gocode"
BINARY = "dlrhub-go-client"

PACKAGES = (
    "golang-go",
    "protobuf-compiler",  # protoc, for buf.gen.yaml's protoc_builtin plugins
    "protoc-gen-go",
    "protoc-gen-go-grpc",
    "golang-google-protobuf-dev",
    # grpc-go 1.33 accepts either; 1.3 predates google.golang.org/protobuf and cannot encode its
    # messages, so name 1.5.
    "golang-github-golang-protobuf-1-5-dev",
    "golang-google-grpc-dev",
    "golang-google-genproto-dev",  # google.golang.org/genproto/googleapis/rpc/errdetails
)


class BuildError(RuntimeError):
    """The client could not be built; the message says why."""


def install() -> None:
    """The Debian packages, installed when missing."""
    try:
        debian.install(PACKAGES)
    except debian.PackageError as error:
        raise BuildError(str(error)) from None


def generate(out: Path) -> Path:
    """`buf generate` (buf.gen.yaml) into `out`; the GOPATH tree of the Go code it made."""
    if not BUF.is_file():
        raise BuildError(f"{BUF.relative_to(ROOT)} is missing: run `make setup` (npm ci) first")
    _run([str(BUF), "generate", "--output", str(out)], ROOT)
    return out / GO_TREE


def build(out: Path) -> Path:
    """Installs what is missing, generates into `out`, checks and builds the client; its path."""
    install()
    tree = generate(out)
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPROXY": "off",
        "GOFLAGS": "",
        "GOPATH": os.pathsep.join([str(tree), DEBIAN_GOPATH]),
        "CGO_ENABLED": "0",  # a static binary, and no C compiler needed
    }
    unformatted = _run(["gofmt", "-l", "."], SOURCE, env)
    if unformatted.strip():
        raise BuildError(f"not gofmt-clean (run `gofmt -w client/go`): {unformatted.split()}")
    _run(["go", "vet", "."], SOURCE, env)
    binary = out / "build" / "bin" / BINARY
    _run(["go", "build", "-o", str(binary), "."], SOURCE, env)
    return binary


def _run(command: Sequence[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BuildError(
            f"`{' '.join(command)}` failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        )
    return result.stdout


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="install, generate, check and build; print the binary")
    build_parser.add_argument("--out", type=Path, default=ROOT, help="output directory (default: the repo)")
    args = parser.parse_args(argv)
    try:
        print(build(args.out.resolve()))
    except BuildError as error:
        print(f"go_client: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
