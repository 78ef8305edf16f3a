"""dlrhub-client as its users get it: the wheel built from client/, installed into a clean virtualenv
with its dependencies from the package index, used against the real server, and typed for a caller's
mypy.

The virtualenv is made once per test session (about 20 s with a warm pip cache).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from dlrhub_client import AsyncClient, Client
from tests.conftest import FIXTURES, ROOT
from tests.helpers import PROCESS_TIMEOUT
from tools import launcher

INSTALL_TIMEOUT = 600.0  # seconds: pip may download every dependency
# What the client must never bring along: the server's dependencies, and code generation.
SERVER_ONLY = {"dlrhub", "aiohttp", "httpx", "sqlite-utils", "prometheus-client", "grpcio-tools"}
SERVER_ONLY_FAMILIES = ("opentelemetry-", "psycopg")


@dataclass(frozen=True)
class ClientEnv:
    """A virtualenv holding only the dlrhub-client wheel and what it depends on."""

    wheel: Path
    root: Path
    setup_seconds: float

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    def run(
        self, *command: str | Path, cwd: Path, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`command` with the virtualenv's bin/ first on PATH, outside the repository, without PYTHONPATH."""
        environment = {
            k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "DLRHUB_", "VIRTUAL_ENV"))
        }
        environment["PATH"] = f"{self.root / 'bin'}{os.pathsep}{environment.get('PATH', '')}"
        return subprocess.run(
            [str(part) for part in command],
            cwd=cwd,
            env=environment,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=PROCESS_TIMEOUT,
            check=False,
        )


def _pip(python: Path, *args: str | Path) -> None:
    subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", "--quiet", *map(str, args)],
        check=True,
        timeout=INSTALL_TIMEOUT,
        capture_output=True,
    )


@pytest.fixture(scope="session")
def client_env(tmp_path_factory: pytest.TempPathFactory) -> ClientEnv:
    started = time.monotonic()
    work = tmp_path_factory.mktemp("client-wheel")
    _pip(Path(sys.executable), "wheel", "--no-deps", "--wheel-dir", work / "dist", ROOT / "client")
    [wheel] = (work / "dist").glob("dlrhub_client-*.whl")
    root = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=INSTALL_TIMEOUT)
    _pip(root / "bin" / "python", "install", f"{wheel}[types]")  # with the stubs a typed caller adds
    return ClientEnv(wheel, root, time.monotonic() - started)


def installed(env: ClientEnv, tmp_path: Path) -> dict[str, str]:
    listed = env.run(
        env.python, "-m", "pip", "list", "--format", "json", "--disable-pip-version-check", cwd=tmp_path
    )
    assert listed.returncode == 0, listed.stderr
    return {entry["name"].lower(): entry["version"] for entry in json.loads(listed.stdout)}


def test_the_client_wheel_brings_no_server_dependency(client_env: ClientEnv, tmp_path: Path) -> None:
    names = installed(client_env, tmp_path)
    assert {"dlrhub-client", "grpcio", "protobuf", "googleapis-common-protos", "tqdm"} <= names.keys()
    assert {"types-protobuf", "grpc-stubs"} <= names.keys()  # the `types` extra
    brought = [name for name in names if name in SERVER_ONLY or name.startswith(SERVER_ONLY_FAMILIES)]
    assert brought == [], f"the client wheel brought server dependencies: {brought}"
    # The server's package is not in the wheel either.
    with zipfile.ZipFile(client_env.wheel) as wheel:
        packages = {name.split("/")[0] for name in wheel.namelist() if not name.startswith("dlrhub_client-")}
    assert packages == {"dlrhub_client", "deliveryreport"}
    missing_server = client_env.run(client_env.python, "-c", "import dlrhub", cwd=tmp_path)
    assert "No module named 'dlrhub'" in missing_server.stderr
    # The licence's text travels with it.
    licence = client_env.run(
        client_env.python,
        "-c",
        "from importlib.metadata import distribution as d; "
        "print(d('dlrhub-client').read_text('licenses/LICENSE'), end='')",
        cwd=tmp_path,
    )
    assert licence.stdout == (ROOT / "LICENSE").read_text(encoding="utf-8")


def test_the_installed_client_talks_to_a_real_server(
    client_env: ClientEnv, server_process: launcher.Server, tmp_path: Path
) -> None:
    target = ["--target", server_process.address]
    ingested = client_env.run("dlrhub", "ingest", FIXTURES / "gms_batch.json", *target, cwd=tmp_path)
    assert (ingested.returncode, ingested.stdout) == (0, "accepted 3, duplicate 0, rejected 0\n"), (
        ingested.stderr
    )
    fetched = client_env.run(
        "dlrhub",
        "fetch",
        "--message-id",
        "9f60ac8f-e721-5027-b838-e6fcb95fcd7a",
        "--json",
        *target,
        cwd=tmp_path,
    )
    assert fetched.returncode == 0, fetched.stderr
    assert json.loads(fetched.stdout)["status"] == "DELIVERY_STATUS_DELIVERED"

    script = (
        "import sys\n"
        "from dlrhub_client import Client, DeliveryStatus\n"
        "with Client(sys.argv[1], timeout=10) as client:\n"
        "    state = client.get_message('9f60ac8f-e721-5027-b838-e6fcb95fcd7a').messages[0]\n"
        "print(DeliveryStatus.Name(state.status))\n"
    )
    library = client_env.run(client_env.python, "-c", script, server_process.address, cwd=tmp_path)
    assert (library.returncode, library.stdout) == (0, "DELIVERY_STATUS_DELIVERED\n"), library.stderr


def test_the_client_command_offers_the_client_commands_only(client_env: ClientEnv, tmp_path: Path) -> None:
    helped = client_env.run("dlrhub", "--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    for command in ("ingest", "fetch", "tail", "quarantine", "renormalise"):
        assert command in helped.stdout
    serve = client_env.run("dlrhub", "serve", cwd=tmp_path)
    assert serve.returncode == 2
    assert "invalid choice: 'serve'" in serve.stderr
    assert client_env.run("dlrhub", "--version", cwd=tmp_path).stdout == "dlrhub-client 0.1.0\n"
    as_module = client_env.run(client_env.python, "-m", "dlrhub_client", "--version", cwd=tmp_path)
    assert as_module.stdout == "dlrhub-client 0.1.0\n"


def _command_help(command: Sequence[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=PROCESS_TIMEOUT, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_with_the_server_installed_the_same_command_serves_too() -> None:
    """In the development virtualenv both distributions are installed: `serve` joins the command."""
    script = Path(sys.executable).parent / "dlrhub"
    assert "serve" in _command_help([str(script), "--help"])
    assert _command_help([str(script), "--version"]) == "dlrhub-client 0.1.0, dlrhub 0.1.0\n"
    assert "--listen" in _command_help([sys.executable, "-m", "dlrhub", "serve", "--help"])


# Typed for its users.

CONSUMER = """
from dlrhub_client import Client, DeliveryReport, DeliveryStatus


def delivered(target: str) -> list[str]:
    with Client(target, timeout=5) as client:
        reports: list[DeliveryReport] = list(client.iter_bulk("B1", page_size=100))
        state = client.get_message("m1", include_history=True)
    done = DeliveryStatus.DELIVERY_STATUS_DELIVERED
    return [r.message_id for r in [*reports, *state.messages] if r.status == done]
"""


def mypy(env: ClientEnv, source: str, directory: Path) -> subprocess.CompletedProcess[str]:
    """mypy --strict on `source` as a caller's module, seeing only what the client wheel installed."""
    (directory / "consumer.py").write_text(source, encoding="utf-8")
    return subprocess.run(
        [
            *(sys.executable, "-m", "mypy", "--strict", "--python-executable", str(env.python)),
            *("--cache-dir", str(directory / ".mypy_cache"), "consumer.py"),
        ],
        cwd=directory,  # outside the repository: none of its configuration or source paths
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT * 4,
        check=False,
    )


def test_a_callers_mypy_sees_the_client_and_the_generated_types(
    client_env: ClientEnv, tmp_path: Path
) -> None:
    checked = mypy(client_env, CONSUMER, tmp_path)
    assert checked.returncode == 0, checked.stdout
    misspelt_keyword = CONSUMER.replace("include_history=True", "include_histroy=True")
    checked = mypy(client_env, misspelt_keyword, tmp_path)
    assert checked.returncode == 1
    assert 'Unexpected keyword argument "include_histroy" for "get_message" of "Client"' in checked.stdout
    misspelt_field = CONSUMER.replace("r.message_id", "r.mesage_id")
    checked = mypy(client_env, misspelt_field, tmp_path)
    assert checked.returncode == 1
    assert '"DeliveryReport" has no attribute "mesage_id"' in checked.stdout


def test_the_blocking_client_has_the_async_clients_signatures() -> None:
    def public(cls: type) -> set[str]:
        return {name for name in vars(cls) if not name.startswith("_")} | {"__init__"}

    assert public(Client) == public(AsyncClient)
    for name in sorted(public(Client)):
        blocking, asynchronous = (
            inspect.signature(getattr(Client, name)),
            inspect.signature(getattr(AsyncClient, name)),
        )
        # A grpc.aio channel belongs to one event loop: the blocking client makes its own, on its loop.
        parameters = [
            p for p in asynchronous.parameters.values() if (name, p.name) != ("__init__", "channel")
        ]
        assert list(blocking.parameters.values()) == parameters, name
        returns = str(asynchronous.return_annotation).replace("AsyncIterator[", "Iterator[")
        assert blocking.return_annotation == returns, name
