"""TLS and mutual TLS on the gRPC and webhook ports, with throwaway certificates (tests/certs.py).

The real server runs in-process; callers are the real client (AsyncClient with TlsConfig), httpx
for the webhooks and the `dlrhub` CLI as a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from dlrhub import app
from dlrhub.config import Settings
from dlrhub_client import AsyncClient, TlsConfig, UnavailableError
from tests.certs import Certs, make_certs
from tests.conftest import FakeClock, serving
from tests.helpers import TIMEOUT, connect, gms_batch

DLRHUB = shutil.which("dlrhub", path=str(Path(sys.executable).parent)) or "dlrhub"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
async def tls_server(tmp_path: Path, certs: Certs) -> AsyncIterator[app.App]:
    async with serving(tmp_path, tls_cert=certs.server_cert, tls_key=certs.server_key) as running:
        yield running


@pytest.fixture
async def mtls_server(tmp_path: Path, certs: Certs) -> AsyncIterator[app.App]:
    async with serving(
        tmp_path, tls_cert=certs.server_cert, tls_key=certs.server_key, tls_client_ca=certs.ca
    ) as running:
        yield running


def https_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """What httpx's verify=CA (and cert=(cert, key)) builds, without its deprecated str forms."""
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


async def round_trip(client: AsyncClient, message_id: str) -> None:
    """Ingest a report and fetch it back."""
    response = await client.ingest(gms_batch(message_id))
    assert response.accepted_count == 1
    [state] = (await client.get_message(message_id)).messages
    assert state.message_id == message_id


# gRPC.


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_a_client_trusting_the_ca_can_ingest_and_fetch(
    tls_server: app.App, certs: Certs, host: str
) -> None:
    async with connect(tls_server, tls=TlsConfig(root_certificates=certs.ca), host=host) as client:
        await round_trip(client, f"tls-{host}")


async def test_an_insecure_client_cannot_call_a_tls_server(tls_server: app.App, certs: Certs) -> None:
    async with connect(tls_server, tls=None) as client:
        with pytest.raises(UnavailableError):
            await client.ingest(gms_batch("plain-1"))
        with pytest.raises(UnavailableError):
            await client.get_message("plain-1")
    assert tls_server.store.latest_cursor() == 0


async def test_a_client_not_trusting_the_servers_ca_cannot_call(tls_server: app.App, certs: Certs) -> None:
    async with connect(tls_server, tls=TlsConfig(root_certificates=certs.stranger_ca)) as client:
        with pytest.raises(UnavailableError):
            await client.ingest(gms_batch("untrusted-1"))
    assert tls_server.store.latest_cursor() == 0


async def test_a_tls_client_cannot_call_a_plaintext_server(tmp_path: Path, certs: Certs) -> None:
    async with serving(tmp_path) as running, connect(running, tls=TlsConfig(certs.ca)) as client:
        with pytest.raises(UnavailableError):
            await client.ingest(gms_batch("mismatch-1"))


async def test_mutual_tls_refuses_a_client_without_a_certificate(mtls_server: app.App, certs: Certs) -> None:
    async with connect(mtls_server, tls=TlsConfig(root_certificates=certs.ca)) as client:
        with pytest.raises(UnavailableError):
            await client.ingest(gms_batch("anonymous-1"))
        with pytest.raises(UnavailableError):
            await client.get_message("anonymous-1")
    assert mtls_server.store.latest_cursor() == 0


async def test_mutual_tls_refuses_a_certificate_from_another_ca(mtls_server: app.App, certs: Certs) -> None:
    tls = TlsConfig(certs.ca, certificate_chain=certs.stranger_cert, private_key=certs.stranger_key)
    async with connect(mtls_server, tls=tls) as client:
        with pytest.raises(UnavailableError):
            await client.ingest(gms_batch("stranger-1"))
    assert mtls_server.store.latest_cursor() == 0


async def test_mutual_tls_accepts_a_client_certificate(mtls_server: app.App, certs: Certs) -> None:
    tls = TlsConfig(certs.ca, certificate_chain=certs.client_cert, private_key=certs.client_key)
    async with connect(mtls_server, tls=tls) as client:
        await round_trip(client, "mtls-1")


async def test_the_cli_speaks_mutual_tls_with_tokens(tmp_path: Path, certs: Certs) -> None:
    async with serving(
        tmp_path,
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        tls_client_ca=certs.ca,
        tokens="ingest+read:cli-tls-token",
        webhooks_open=True,
    ) as running:
        tls = TlsConfig(certs.ca, certificate_chain=certs.client_cert, private_key=certs.client_key)
        async with AsyncClient(f"localhost:{running.port}", tls=tls, token="cli-tls-token") as client:
            assert (await client.ingest(gms_batch("cli-tls-1"))).accepted_count == 1
        env = {k: v for k, v in os.environ.items() if not k.startswith("DLRHUB_")}
        env["DLRHUB_TOKEN"] = "cli-tls-token"
        base = [DLRHUB, "fetch", "--message-id", "cli-tls-1", "--json", "--timeout", str(TIMEOUT)]
        base += ["--target", f"localhost:{running.port}", "--tls-ca", str(certs.ca)]
        client_cert = ["--tls-cert", str(certs.client_cert), "--tls-key", str(certs.client_key)]

        code, out, err = await run(*base, *client_cert, env=env)
        assert code == 0, err
        assert json.loads(out)["message_id"] == "cli-tls-1"

        code, out, err = await run(*base, env=env)  # no client certificate
        assert code != 0
        assert "unavailable" in err
        assert out == ""


async def run(*command: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        async with asyncio.timeout(TIMEOUT * 2):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


# The webhook port.


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_the_webhook_port_speaks_https(tls_server: app.App, certs: Certs, host: str) -> None:
    async with httpx.AsyncClient(verify=https_context(certs.ca), timeout=TIMEOUT) as http:
        response = await http.post(
            f"https://{host}:{tls_server.http_port}/webhooks/gms", content=gms_batch("hook-1")
        )
    assert response.status_code == 200, response.text
    assert response.json()["accepted"] == 1
    async with connect(tls_server, tls=TlsConfig(certs.ca)) as client:
        assert [r.message_id for r in (await client.get_message("hook-1")).messages] == ["hook-1"]


async def test_the_webhook_port_refuses_plain_http(tls_server: app.App) -> None:
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        with pytest.raises(httpx.HTTPError):
            await http.post(
                f"http://127.0.0.1:{tls_server.http_port}/webhooks/gms", content=gms_batch("hook-2")
            )
    assert tls_server.store.latest_cursor() == 0


async def test_the_webhook_port_refuses_an_untrusted_server_certificate(
    tls_server: app.App, certs: Certs
) -> None:
    async with httpx.AsyncClient(verify=https_context(certs.stranger_ca), timeout=TIMEOUT) as http:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await http.post(
                f"https://127.0.0.1:{tls_server.http_port}/webhooks/gms", content=gms_batch("hook-3")
            )


async def test_the_webhook_port_with_mutual_tls(mtls_server: app.App, certs: Certs) -> None:
    url = f"https://127.0.0.1:{mtls_server.http_port}/webhooks/gms"
    with_cert = https_context(certs.ca, certs.client_cert, certs.client_key)
    async with httpx.AsyncClient(verify=with_cert, timeout=TIMEOUT) as http:
        response = await http.post(url, content=gms_batch("hook-mtls-1"))
    assert response.status_code == 200, response.text
    assert response.json()["accepted"] == 1
    cursor = mtls_server.store.latest_cursor()
    assert cursor == 1

    for context in (
        https_context(certs.ca),
        https_context(certs.ca, certs.stranger_cert, certs.stranger_key),
    ):
        async with httpx.AsyncClient(verify=context, timeout=TIMEOUT) as http:
            with pytest.raises(httpx.HTTPError):
                await http.post(url, content=gms_batch("hook-mtls-2"))
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        with pytest.raises(httpx.HTTPError):
            await http.post(url.replace("https:", "http:"), content=gms_batch("hook-mtls-2"))
    assert mtls_server.store.latest_cursor() == cursor


# Configuration.


@pytest.mark.parametrize(
    ("files", "problem"),
    [
        ({"tls_cert": "server_cert"}, "needs both"),
        ({"tls_key": "server_key"}, "needs both"),
        ({"tls_client_ca": "ca"}, "CLIENT_CA"),
        ({"tls_key": "server_key", "tls_client_ca": "ca"}, "needs both"),
    ],
)
async def test_a_partial_tls_configuration_does_not_start(
    tmp_path: Path, certs: Certs, files: dict[str, str], problem: str
) -> None:
    settings = {name: getattr(certs, attribute) for name, attribute in files.items()}
    with pytest.raises(ValueError, match=problem):
        await app.start(
            Settings(listen="127.0.0.1:0", http_listen="127.0.0.1:0", db=tmp_path / "x.db", **settings),
            clock=FakeClock(),
        )
    assert not (tmp_path / "x.db").exists()  # refused before anything started
