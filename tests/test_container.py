"""The Dockerfile and deploy/compose.yaml, without Docker (the machines that run the tests have none):
what the image would run is run here.

The files the Dockerfile copies (as a clean clone has them) go into a build directory; its
`pip install` runs there in a clean virtualenv (the image's Python); its command starts with its
environment and the compose file's, the volume /data being a directory here and the addresses free
ports; and its health check runs against that server. Set-up: about 35 s with a warm pip cache.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT
from tests.helpers import PROCESS_TIMEOUT
from tools import launcher

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "deploy" / "compose.yaml"
INSTALL_TIMEOUT = 900.0  # seconds: pip may download every dependency


@dataclass(frozen=True)
class Instruction:
    name: str  # upper case, e.g. "RUN"
    arguments: str  # the rest of the instruction, continuation lines joined


def dockerfile() -> list[Instruction]:
    text = DOCKERFILE.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    instructions = []
    for line in joined.splitlines():
        if line.strip():
            name, _, arguments = line.strip().partition(" ")
            instructions.append(Instruction(name.upper(), " ".join(arguments.split())))
    return instructions


def only(name: str) -> Instruction:
    [found] = [instruction for instruction in dockerfile() if instruction.name == name]
    return found


def environment() -> dict[str, str]:
    """The ENV of the Dockerfile (KEY=VALUE pairs)."""
    pairs = [pair for env in dockerfile() if env.name == "ENV" for pair in shlex.split(env.arguments)]
    return dict(pair.split("=", 1) for pair in pairs)


def exec_form(arguments: str) -> list[str]:
    command = json.loads(arguments)
    assert isinstance(command, list), f"not the exec form: {arguments}"
    return [str(part) for part in command]


def compose_service() -> dict[str, Any]:
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    services = compose["services"]
    assert isinstance(services, dict)
    service = services["dlrhub"]
    assert isinstance(service, dict)
    return service


def test_the_image_runs_as_a_user_with_the_database_on_a_volume() -> None:
    assert only("FROM").arguments.startswith("python:3.")
    assert only("FROM").arguments.endswith("-slim")
    user = only("USER").arguments
    assert user not in {"root", "0"}
    assert any(
        instruction.name == "RUN" and "useradd" in instruction.arguments and user in instruction.arguments
        for instruction in dockerfile()
    )
    assert only("VOLUME").arguments == "/data"
    assert environment()["DLRHUB_DB"].startswith("/data/")
    assert exec_form(only("CMD").arguments) == ["dlrhub", "serve"]
    healthcheck = only("HEALTHCHECK").arguments
    assert exec_form(healthcheck.partition(" CMD ")[2])[:2] == ["dlrhub", "health"]
    # The health check's default target is the port the server listens on.
    assert environment()["DLRHUB_LISTEN"] == "0.0.0.0:50051"
    exposed = {int(port) for port in only("EXPOSE").arguments.split()}
    listening = {
        int(environment()[name].rsplit(":", 1)[1])
        for name in ("DLRHUB_LISTEN", "DLRHUB_HTTP_LISTEN", "DLRHUB_ADMIN_LISTEN")
    }
    assert listening == exposed


def test_the_compose_file_builds_this_dockerfile_and_keeps_data_on_a_volume() -> None:
    service = compose_service()
    build = service["build"]
    assert (COMPOSE.parent / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE
    [volume] = service["volumes"]
    assert volume.split(":")[1] == only("VOLUME").arguments
    published = {int(str(port).rsplit(":", 1)[1]) for port in service["ports"]}
    assert published <= {int(port) for port in only("EXPOSE").arguments.split()}


SCALE_OUT = ROOT / "deploy" / "compose.postgres.yaml"


def test_the_scale_out_compose_file_runs_replicas_of_this_image_over_one_postgresql() -> None:
    services = yaml.safe_load(SCALE_OUT.read_text(encoding="utf-8"))["services"]
    postgres = services.pop("postgres")
    assert int(postgres["image"].split(":")[1]) >= 13  # the oldest supported
    assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert "idle_in_transaction_session_timeout=60s" in postgres["command"]
    assert len(services) >= 2  # replicas
    exposed = {int(port) for port in only("EXPOSE").arguments.split()}
    host_ports: list[str] = []
    urls = set()
    for service in services.values():
        assert (SCALE_OUT.parent / service["build"]["context"]).resolve() == ROOT
        assert (ROOT / service["build"]["dockerfile"]).resolve() == DOCKERFILE
        assert service["depends_on"] == {"postgres": {"condition": "service_healthy"}}
        environment = service["environment"]
        url = environment["DLRHUB_DB"]
        assert url.startswith("postgresql://")
        assert ":" not in url.removeprefix("postgresql://").split("@")[0]  # no password in the URL
        assert environment["PGPASSWORD"] == postgres["environment"]["POSTGRES_PASSWORD"]
        urls.add(url)
        for port in service["ports"]:
            host, container = str(port).rsplit(":", 1)[0], int(str(port).rsplit(":", 1)[1])
            assert container in exposed
            host_ports.append(host)
    assert len(urls) == 1  # one database for all
    assert len(host_ports) == len(set(host_ports))  # each replica reachable on its own ports


@dataclass(frozen=True)
class Image:
    """What the image would hold: the build directory (/src) and the virtualenv its pip installed into."""

    src: Path
    venv: Path

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    work = tmp_path_factory.mktemp("image")
    src = work / "src"
    workdir = Path("/")
    for instruction in dockerfile():
        if instruction.name == "WORKDIR":
            workdir = Path(instruction.arguments)
        elif instruction.name == "COPY":
            *sources, destination = instruction.arguments.split()
            target = src / (workdir / destination).relative_to("/src")
            for source in sources:
                _copy_as_cloned(source, target)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=INSTALL_TIMEOUT)
    [install] = [
        i.arguments for i in dockerfile() if i.name == "RUN" and i.arguments.startswith("pip install")
    ]
    environment = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    environment.pop("PYTHONPATH", None)
    subprocess.run(
        ["bash", "-c", install],
        cwd=src,
        env=environment,
        check=True,
        timeout=INSTALL_TIMEOUT,
        capture_output=True,
    )
    return Image(src, venv)


def _copy_as_cloned(source: str, target: Path) -> None:
    """Copies what a clean clone holds of `source` (a file, or a directory ending in /) to `target`."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", source],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    names = [name for name in listed.stdout.decode().split("\0") if name and (ROOT / name).exists()]
    assert names, f"COPY {source}: nothing in the repository"
    for name in names:
        relative = (
            Path(name).relative_to(source.rstrip("/")) if source.endswith("/") else Path(Path(name).name)
        )
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, destination, follow_symlinks=False)


def test_the_image_installs_serves_and_passes_its_health_check(image: Image, tmp_path: Path) -> None:
    # Only the two distributions and their runtime dependencies: no dev tool came along.
    listed = subprocess.run(
        [image.bin("python"), "-m", "pip", "list", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=PROCESS_TIMEOUT,
    )
    installed = {entry["name"].lower() for entry in json.loads(listed.stdout)}
    assert {"dlrhub", "dlrhub-client"} <= installed
    assert installed.isdisjoint({"pytest", "grpcio-tools", "mypy"})
    help_text = subprocess.run(
        [image.bin("dlrhub"), "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        check=False,
    )
    assert help_text.returncode == 0, help_text.stderr

    data = tmp_path / "data"  # the volume
    data.mkdir()
    settings = {**environment(), **{k: str(v) for k, v in compose_service()["environment"].items()}}
    settings = {key: value.replace("/data", str(data)) for key, value in settings.items()}
    # Free ports of this machine in place of the container's own (0.0.0.0:50051 and the rest).
    settings |= {
        "DLRHUB_LISTEN": "127.0.0.1:0",
        "DLRHUB_HTTP_LISTEN": "127.0.0.1:0",
        "DLRHUB_ADMIN_LISTEN": "127.0.0.1:0",
    }
    base = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("DLRHUB_") and key != "PYTHONPATH"
    }
    command = exec_form(only("CMD").arguments)
    with launcher.launch(
        "image", [image.bin(command[0]), *command[1:]], launcher.serving, {**base, **settings}, cwd=data
    ) as server:
        healthcheck = exec_form(only("HEALTHCHECK").arguments.partition(" CMD ")[2])
        checked = subprocess.run(
            [image.bin(healthcheck[0]), *healthcheck[1:]],
            env={**base, "DLRHUB_TARGET": server.address},
            capture_output=True,
            text=True,
            timeout=PROCESS_TIMEOUT,
            check=False,
        )
        assert (checked.returncode, checked.stdout) == (0, "SERVING\n"), checked.stderr
    assert (data / "dlrhub.db").exists()
