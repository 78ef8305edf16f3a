"""One frozen settings object, from command-line flags and DLRHUB_* environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DB = Path("data") / "dlrhub.db"
DEFAULT_HTTP_LISTEN = "127.0.0.1:8080"


@dataclass(frozen=True, slots=True)
class Settings:
    # gRPC listen address, host:port (port 0 picks a free port).
    listen: str = DEFAULT_LISTEN
    # The SQLite database file.
    db: Path = DEFAULT_DB
    # DEBUG, INFO, WARNING or ERROR.
    log_level: str = "INFO"
    # Operator files extending (or replacing) the shipped code tables.
    gms_codes: Path | None = None
    sent_sms_report_codes: Path | None = None
    # Changes buffered per Stream subscriber before it catches up from the store.
    stream_buffer: int = 1024
    # Seconds in-flight calls get to finish at shutdown.
    shutdown_grace: float = 10.0
    # Webhook HTTP listen address, host:port (port 0 picks a free port).
    http_listen: str = DEFAULT_HTTP_LISTEN
    # Largest webhook body accepted; larger ones get 413.
    http_max_body_bytes: int = 16 * 1024 * 1024
    # Webhook credentials: "basic:USER:PASSWORD" or "token:SECRET"; empty means open.
    gms_webhook_auth: str = ""
    sent_sms_report_webhook_auth: str = ""
    # The SentSMSReport poller; off unless both base URL and API key are set.
    poll_base_url: str = ""
    poll_api_key: str = ""
    poll_limit: int = 1000
    poll_interval: float = 5.0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ

        def path(name: str) -> Path | None:
            return Path(env[name]) if env.get(name) else None

        return cls(
            listen=env.get("DLRHUB_LISTEN") or DEFAULT_LISTEN,
            db=path("DLRHUB_DB") or DEFAULT_DB,
            log_level=(env.get("DLRHUB_LOG_LEVEL") or "INFO").upper(),
            gms_codes=path("DLRHUB_GMS_CODES"),
            sent_sms_report_codes=path("DLRHUB_SENT_SMS_REPORT_CODES"),
            http_listen=env.get("DLRHUB_HTTP_LISTEN") or DEFAULT_HTTP_LISTEN,
            http_max_body_bytes=int(env.get("DLRHUB_HTTP_MAX_BODY_BYTES") or 16 * 1024 * 1024),
            gms_webhook_auth=env.get("DLRHUB_GMS_WEBHOOK_AUTH", ""),
            sent_sms_report_webhook_auth=env.get("DLRHUB_SENT_SMS_REPORT_WEBHOOK_AUTH", ""),
            poll_base_url=env.get("DLRHUB_POLL_BASE_URL", ""),
            poll_api_key=env.get("DLRHUB_POLL_API_KEY", ""),
            poll_limit=int(env.get("DLRHUB_POLL_LIMIT") or 1000),
            poll_interval=float(env.get("DLRHUB_POLL_INTERVAL") or 5.0),
        )
