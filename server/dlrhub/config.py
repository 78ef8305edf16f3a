"""One frozen settings object, from command-line flags and DLRHUB_* environment variables.

Every setting has an environment variable (in its field's metadata); `dlrhub serve`
flags override them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlrhub_client.durations import parse_duration

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DB = Path("data") / "dlrhub.db"
DEFAULT_HTTP_LISTEN = "127.0.0.1:8080"
# A number of seconds, written in the environment as a duration: 90s, 15m, 12h, 30d, 2w.
Seconds = int


def _env(name: str, default: Any) -> Any:
    return field(default=default, metadata={"env": name})


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected on or off, not {text!r}")


_PARSERS: dict[str, Callable[[str], Any]] = {
    "str": str,
    "str | Path": str,  # a path or a URL: Path would spoil a URL's "//"
    "Path": Path,
    "Path | None": Path,
    "int": int,
    "float": float,
    "bool": _boolean,
    "Seconds | None": lambda text: int(parse_duration(text).total_seconds()),
}


@dataclass(frozen=True, slots=True)
class Settings:
    # gRPC listen address, host:port (port 0 picks a free port).
    listen: str = _env("DLRHUB_LISTEN", DEFAULT_LISTEN)
    # Server processes sharing the ports (over a shared PostgreSQL database only; see README).
    workers: int = _env("DLRHUB_WORKERS", 1)
    # The database: a SQLite file, or a postgresql:// URL (store/engine.py).
    db: str | Path = _env("DLRHUB_DB", DEFAULT_DB)
    # DEBUG, INFO, WARNING or ERROR.
    log_level: str = _env("DLRHUB_LOG_LEVEL", "INFO")
    # json or text; empty: text when stderr is a terminal, JSON otherwise.
    log_format: str = _env("DLRHUB_LOG_FORMAT", "")
    # Operator files extending (or replacing) the shipped code tables.
    gms_codes: Path | None = _env("DLRHUB_GMS_CODES", None)
    sent_sms_report_codes: Path | None = _env("DLRHUB_SENT_SMS_REPORT_CODES", None)
    # The live feed's window of recent changes, which every Stream subscriber reads at its own pace:
    # at most this many changes and this many encoded bytes; a subscriber that falls further behind
    # catches up from the store.
    stream_buffer: int = _env("DLRHUB_STREAM_BUFFER", 8192)
    stream_buffer_bytes: int = _env("DLRHUB_STREAM_BUFFER_BYTES", 16 * 1024 * 1024)
    # Seconds in-flight calls get to finish at shutdown.
    shutdown_grace: float = _env("DLRHUB_SHUTDOWN_GRACE", 10.0)
    # Webhook HTTP listen address, host:port (port 0 picks a free port).
    http_listen: str = _env("DLRHUB_HTTP_LISTEN", DEFAULT_HTTP_LISTEN)
    # Largest webhook body accepted; larger ones get 413.
    http_max_body_bytes: int = _env("DLRHUB_HTTP_MAX_BODY_BYTES", 16 * 1024 * 1024)
    # Open webhook connections at most (fewer if the open-file limit leaves less room); more wait.
    http_max_connections: int = _env("DLRHUB_HTTP_MAX_CONNECTIONS", 1000)
    # Seconds a connection may go without a complete request head (slow headers, idle keep-alive),
    # and seconds a request body may take to arrive.
    http_idle_timeout: float = _env("DLRHUB_HTTP_IDLE_TIMEOUT", 15.0)
    http_body_timeout: float = _env("DLRHUB_HTTP_BODY_TIMEOUT", 60.0)
    # Webhook credentials: "basic:USER:PASSWORD" or "token:SECRET"; empty means none.
    gms_webhook_auth: str = _env("DLRHUB_GMS_WEBHOOK_AUTH", "")
    sent_sms_report_webhook_auth: str = _env("DLRHUB_SENT_SMS_REPORT_WEBHOOK_AUTH", "")
    # Source networks the webhooks accept ("10.0.0.0/8,2001:db8::/32"), for all of them or one
    # (a route's own list replaces the common one); empty means any address.
    webhook_allow_from: str = _env("DLRHUB_WEBHOOK_ALLOW_FROM", "")
    gms_webhook_allow_from: str = _env("DLRHUB_GMS_WEBHOOK_ALLOW_FROM", "")
    sent_sms_report_webhook_allow_from: str = _env("DLRHUB_SENT_SMS_REPORT_WEBHOOK_ALLOW_FROM", "")
    # With gRPC tokens configured, start although a webhook takes anyone's POSTs.
    webhooks_open: bool = _env("DLRHUB_WEBHOOKS_OPEN", False)
    # The admin HTTP address (/metrics), host:port; empty: off.
    admin_listen: str = _env("DLRHUB_ADMIN_LISTEN", "")
    # The SentSMSReport poller; off unless both base URL and API key are set.
    poll_base_url: str = _env("DLRHUB_POLL_BASE_URL", "")
    poll_api_key: str = _env("DLRHUB_POLL_API_KEY", "")
    poll_limit: int = _env("DLRHUB_POLL_LIMIT", 1000)
    poll_interval: float = _env("DLRHUB_POLL_INTERVAL", 5.0)
    # Seconds one poll request may take in all, its answer read whole (a dripping answer is cut).
    poll_timeout: float = _env("DLRHUB_POLL_TIMEOUT", 30.0)
    # The largest answer the poller reads: a larger one is logged, counted and backed off from.
    poll_max_body_bytes: int = _env("DLRHUB_POLL_MAX_BODY_BYTES", 64 * 1024 * 1024)
    # The channel the polled endpoint serves (sms, viber, whatsapp, rcs, mms, ...): the channel of a
    # report whose body names none. Empty: SMS.
    poll_channel: str = _env("DLRHUB_POLL_CHANNEL", "")
    # The GMS seen fetcher (GMS's GET report, HTTP Basic); off unless the base URL is set, which is
    # everything before /api/dr/: https://dr-v2-{site}.hyber.im/{client_id}.
    gms_seen_base_url: str = _env("DLRHUB_GMS_SEEN_BASE_URL", "")
    gms_seen_login: str = _env("DLRHUB_GMS_SEEN_LOGIN", "")
    gms_seen_password: str = _env("DLRHUB_GMS_SEEN_PASSWORD", "")
    # advanced (every channel attempt) or simple.
    gms_seen_report: str = _env("DLRHUB_GMS_SEEN_REPORT", "advanced")
    # Seconds after delivery that a message is asked about, then no longer.
    gms_seen_window: float = _env("DLRHUB_GMS_SEEN_WINDOW", 86_400.0)
    gms_seen_concurrency: int = _env("DLRHUB_GMS_SEEN_CONCURRENCY", 4)
    # Seconds from delivery to the first request, doubling after each request up to the maximum.
    gms_seen_interval: float = _env("DLRHUB_GMS_SEEN_INTERVAL", 300.0)
    gms_seen_interval_max: float = _env("DLRHUB_GMS_SEEN_INTERVAL_MAX", 3600.0)
    # Seconds a request may take in all.
    gms_seen_timeout: float = _env("DLRHUB_GMS_SEEN_TIMEOUT", 30.0)
    # gRPC bearer tokens with roles ("ingest:TOKEN,read:TOKEN"), or a JSON file of them;
    # with neither, the API is open (the local quick start).
    tokens: str = _env("DLRHUB_TOKENS", "")
    tokens_file: Path | None = _env("DLRHUB_TOKENS_FILE", None)
    # Server reflection (for grpcurl list/describe).
    reflection: bool = _env("DLRHUB_REFLECTION", True)
    # TLS for the gRPC and HTTP ports; with a client CA, clients must present a certificate.
    tls_cert: Path | None = _env("DLRHUB_TLS_CERT", None)
    tls_key: Path | None = _env("DLRHUB_TLS_KEY", None)
    tls_client_ca: Path | None = _env("DLRHUB_TLS_CLIENT_CA", None)
    # Limits: request size (RESOURCE_EXHAUSTED above), items per Ingest, open streams.
    max_request_bytes: int = _env("DLRHUB_MAX_REQUEST_BYTES", 16 * 1024 * 1024)
    max_batch_items: int = _env("DLRHUB_MAX_BATCH_ITEMS", 10_000)
    # The largest item of a payload, in UTF-8 bytes (ITEM_TOO_LARGE above; it is quarantined).
    max_item_bytes: int = _env("DLRHUB_MAX_ITEM_BYTES", 64 * 1024)
    max_streams: int = _env("DLRHUB_MAX_STREAMS", 1000)
    # Seconds an Ingest request id is remembered (its answer replayed to a retry); then it is new.
    request_id_ttl: int = _env("DLRHUB_REQUEST_ID_TTL", 86_400)
    # Retention: messages in a final status, with their history and raw text, and resolved or
    # dismissed quarantined items, are deleted once their last change is older than this
    # (write/retention.py); unset: kept forever.
    retention: Seconds | None = _env("DLRHUB_RETENTION", None)
    # Payload bytes being normalised and committed at once; more waits its turn. It bounds memory:
    # a payload takes many times its size until its commit is answered.
    write_budget_bytes: int = _env("DLRHUB_WRITE_BUDGET_BYTES", 16 * 1024 * 1024)
    # OpenTelemetry tracing: off, console or otlp (OTEL_EXPORTER_OTLP_* configure the exporter).
    tracing: str = _env("DLRHUB_TRACING", "off")
    # A WARNING or ERROR line that repeats is logged once, then counted: one summary per interval.
    log_repeat_interval: float = _env("DLRHUB_LOG_REPEAT_INTERVAL", 10.0)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"DLRHUB_WORKERS: at least 1, not {self.workers}")
        if self.retention is not None and self.retention < 1:
            raise ValueError(f"DLRHUB_RETENTION: at least 1 second, not {self.retention}")
        if self.request_id_ttl < 1:
            raise ValueError(f"DLRHUB_REQUEST_ID_TTL: at least 1 second, not {self.request_id_ttl}")
        for name, size in (
            ("DLRHUB_STREAM_BUFFER", self.stream_buffer),
            ("DLRHUB_STREAM_BUFFER_BYTES", self.stream_buffer_bytes),
        ):
            if size < 1:
                raise ValueError(f"{name}: at least 1, not {size}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Defaults, overridden by every DLRHUB_* variable that is set and not empty."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for setting in dataclasses.fields(cls):
            name = setting.metadata["env"]
            if env.get(name):
                try:
                    values[setting.name] = _PARSERS[str(setting.type)](env[name])
                except ValueError as error:
                    raise ValueError(f"{name}: {error}") from None
        if "log_level" in values:
            values["log_level"] = values["log_level"].upper()
        return cls(**values)


def env_name(setting: str) -> str:
    """The environment variable of a Settings field, e.g. "DLRHUB_GMS_WEBHOOK_AUTH"."""
    return str(next(f for f in dataclasses.fields(Settings) if f.name == setting).metadata["env"])
