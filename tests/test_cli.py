"""`dlrhub serve` as a real process: settings from flags and environment, its logs (JSON, or text on a
terminal), graceful stop."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deliveryreport.v1.delivery_report_service_pb2 import IngestRequest
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from dlrhub.config import DEFAULT_DB, DEFAULT_LISTEN, Settings
from tools import launcher

REPORT = '{"message_id": "cli-1", "status": 2, "time": 1477417294667}'


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_gracefully_and_keeps_acknowledged_reports(tmp_path: Path, signum: int) -> None:
    db = tmp_path / "cli.db"
    with launcher.start(db) as server:
        with grpc.insecure_channel(server.address) as channel:
            response = DeliveryReportServiceStub(channel).Ingest(IngestRequest(payload=REPORT), timeout=10)
            assert response.accepted_count == 1
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING

        assert server.stop(signum, timeout=20) == 0
    logs = [json.loads(line) for line in server.output.stderr]
    assert [entry["message"] for entry in logs][-2:] == ["shutting down", "stopped"]
    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in logs)

    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT raw FROM reports").fetchall() == [(REPORT,)]
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_environment_configures_and_flags_win(tmp_path: Path) -> None:
    env_db = tmp_path / "from-env.db"
    flag_db = tmp_path / "from-flag.db"
    environment = {
        **os.environ,
        "DLRHUB_DB": str(env_db),
        "DLRHUB_LISTEN": "127.0.0.1:0",
        "DLRHUB_LOG_LEVEL": "debug",
    }
    with launcher.start(flag_db, env=environment, listen=None) as server:
        serving = server.ready
    assert serving["message"] == "serving"
    assert serving["listen"] == "127.0.0.1:0"
    assert serving["port"] > 0
    assert serving["db"] == str(flag_db)
    assert flag_db.exists()
    assert not env_db.exists()


def test_settings_defaults() -> None:
    settings = Settings.from_env({})
    assert (settings.listen, settings.db, settings.log_level) == (DEFAULT_LISTEN, DEFAULT_DB, "INFO")
    assert DEFAULT_LISTEN == "127.0.0.1:50051"
    assert Path("data") / "dlrhub.db" == DEFAULT_DB


def test_unusable_listen_address_exits_non_zero(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dlrhub.cli",
            "serve",
            "--listen",
            "256.0.0.1:1",
            "--db",
            str(tmp_path / "x.db"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == "dlrhub: cannot start: cannot listen on 256.0.0.1:1: Name or service not known\n"


def _serve_on_a_terminal(tmp_path: Path, environment: dict[str, str]) -> list[str]:
    """`dlrhub serve` with stderr on a pseudo-terminal until it serves, then stopped: its stderr lines."""
    leader, follower = pty.openpty()
    command = [
        sys.executable,
        "-m",
        "dlrhub",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ]
    process = subprocess.Popen(
        [*command, "--db", str(tmp_path / "tty.db")],
        stdout=subprocess.DEVNULL,
        stderr=follower,
        env=environment,
    )
    os.close(follower)
    seen = b""
    try:
        deadline = time.monotonic() + 60
        while b"serving" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1)
            if ready:
                seen += os.read(leader, 65536)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the process has exited and everything was read
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(leader)
    return seen.decode().replace("\r\n", "\n").splitlines()


def test_logs_are_readable_lines_on_a_terminal_and_json_otherwise(tmp_path: Path) -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DLRHUB_")}
    lines = _serve_on_a_terminal(tmp_path, environment)
    serving = next(line for line in lines if "serving" in line)
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d\.\d{3} INFO    dlrhub\.app: serving listen=127\.0\.0\.1:0 port=\d+ .*", serving
    )
    assert 'db="' not in serving  # a value without spaces is not quoted
    assert lines[-1].endswith("dlrhub.app: stopped")
    assert not any(line.startswith("{") for line in lines)

    # DLRHUB_LOG_FORMAT wins: JSON on a terminal, text into a pipe.
    as_json = _serve_on_a_terminal(tmp_path, {**environment, "DLRHUB_LOG_FORMAT": "json"})
    assert json.loads(next(line for line in as_json if "serving" in line))["message"] == "serving"
    port = launcher.free_port()
    text = {**environment, "DLRHUB_LOG_FORMAT": "text"}
    with launcher.start(tmp_path / "text.db", env=text, listen=f"127.0.0.1:{port}") as server:
        pass
    assert any(
        re.match(r"\d\d:\d\d:\d\d\.\d{3} INFO    dlrhub\.app: serving ", line)
        for line in server.output.stderr
    )


def test_an_unknown_log_format_stops_start_up(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dlrhub", "serve", "--db", str(tmp_path / "x.db")],
        env={**os.environ, "DLRHUB_LOG_FORMAT": "xml"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert (
        result.stderr
        == "dlrhub: cannot start: DLRHUB_LOG_FORMAT: the log format must be json or text, not 'xml'\n"
    )
