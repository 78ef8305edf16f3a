"""The composition root: builds the store, hub, committer, servicer and gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import resource
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import _async as health_aio  # public as grpc_health.v1.health.aio; not in grpc-stubs
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from deliveryreport.v1.delivery_report_pb2 import Channel
from dlrhub.config import Settings, env_name
from dlrhub.feed.follower import Follower
from dlrhub.feed.hub import Hub
from dlrhub.normalise import Normaliser
from dlrhub.observability.calls import CallInterceptor, CallLog
from dlrhub.observability.health import StoreHealth
from dlrhub.observability.metrics import Metrics
from dlrhub.observability.tracing import tracing_interceptor
from dlrhub.store import database_name, open_store
from dlrhub.store.base import Change, ReadRunner, Store
from dlrhub.store.engine import is_shared
from dlrhub.transport import admin, tls, webhooks
from dlrhub.transport.auth import AuthInterceptor, Tokens
from dlrhub.transport.channels import channel_named
from dlrhub.transport.gms_seen import HEALTH_SERVICE as GMS_SEEN_HEALTH_SERVICE
from dlrhub.transport.gms_seen import BadSetting, GmsSeenFetcher, GmsSeenSettings
from dlrhub.transport.handlers import SERVICE_NAME, add_to_server
from dlrhub.transport.listener import HttpListener, connection_budget
from dlrhub.transport.poller import HEALTH_SERVICE as POLLER_HEALTH_SERVICE
from dlrhub.transport.poller import Poller, PollerSettings
from dlrhub.transport.service import DeliveryReportService
from dlrhub.transport.webhook_access import Access, AllowList, WebhookAuth
from dlrhub.write.committer import Committer
from dlrhub.write.expiry import RequestIdExpiry
from dlrhub.write.retention import Retention
from dlrhub.write.writer import Writer

log = logging.getLogger(__name__)
T = TypeVar("T")


SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    # Long-lived streams: ping idle connections, and allow clients' keepalive pings.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


# The settings of each webhook route: its credentials, and its own allow list.
_ROUTE_SETTINGS = {
    "/webhooks/gms": ("gms_webhook_auth", "gms_webhook_allow_from"),
    "/webhooks/sent-sms-report": ("sent_sms_report_webhook_auth", "sent_sms_report_webhook_allow_from"),
}


@dataclass
class App:
    """A running dlrhub: its server, bound port and parts."""

    server: grpc.aio.Server
    port: int
    store: Store
    hub: Hub
    committer: Committer
    health: health_aio.HealthServicer
    reads: ThreadPoolExecutor
    settings: Settings
    http: HttpListener
    call_log: CallLog
    http_log: CallLog
    metrics: Metrics
    store_health: StoreHealth
    normalisers: ThreadPoolExecutor
    writer: Writer
    expiry: RequestIdExpiry
    retention: Retention
    poller: Poller | None = None
    admin: HttpListener | None = None
    # Reads other processes' changes into the hub when the store is shared; None otherwise.
    follower: Follower | None = None
    gms_seen: GmsSeenFetcher | None = None

    @property
    def http_port(self) -> int:
        return self.http.port

    @property
    def admin_port(self) -> int | None:
        """The admin port (/metrics), or None when DLRHUB_ADMIN_LISTEN is not set."""
        return self.admin.port if self.admin is not None else None

    def flush_logs(self) -> None:
        """Logs the queued per-call lines now (see observability.calls.CallLog)."""
        self.call_log.flush()
        self.http_log.flush()

    async def stop(self) -> None:
        """Graceful: NOT_SERVING, streams end, in-flight calls finish, writes commit, store closes."""
        await self.health.enter_graceful_shutdown()
        await self.store_health.stop()
        if self.poller is not None:
            await self.poller.stop(self.settings.shutdown_grace)
        if self.gms_seen is not None:
            await self.gms_seen.stop()
        self.hub.close()
        if self.follower is not None:
            await self.follower.stop()
        await self.http.stop()
        if self.admin is not None:
            await self.admin.stop()
        self.http_log.close()
        await self.server.stop(self.settings.shutdown_grace)
        self.call_log.close()  # and lines of streams that end later are logged at once
        self.normalisers.shutdown(wait=True)
        await self.expiry.stop()
        await self.retention.stop()
        await self.committer.stop()
        await _runner(self.reads)(self.store.close)
        self.reads.shutdown(wait=True)
        log.info("stopped")


async def start(
    settings: Settings,
    *,
    store: Store | None = None,
    normaliser: Normaliser | None = None,
    poller_settings: PollerSettings | None = None,
    gms_seen_settings: GmsSeenSettings | None = None,
    clock: Callable[[], int] = time.time_ns,
) -> App:
    """Opens the store and starts serving; the bound ports are in `App.port`, `App.http_port` and
    `App.admin_port`.

    The parts not given are built from `settings`: the store `settings.db` names (SQLite or PostgreSQL), the
    normaliser with the configured code tables, the poller from the DLRHUB_POLL_* settings (off
    unless they are set), the GMS seen fetcher from DLRHUB_GMS_SEEN_* (likewise). A store given
    here is the app's: it closes it at stop, or if starting fails. `clock` gives nanoseconds since
    the epoch (the received time of reports, and the GMS seen fetcher's schedule).

    Configuration is checked before anything starts; if starting fails half-way, whatever had
    started is stopped again.
    """
    async with contextlib.AsyncExitStack() as started:
        reads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dlrhub-reader")
        started.callback(reads.shutdown)
        read = _runner(reads)
        # Normalising big payloads: Python code, so two threads are plenty (the GIL runs one at a time).
        normalisers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dlrhub-normaliser")
        started.callback(normalisers.shutdown)
        if store is not None:
            started.push_async_callback(read, store.close)
        if normaliser is None:
            normaliser = Normaliser.load(settings.gms_codes, settings.sent_sms_report_codes)
        poller_settings = _poller_settings(settings, poller_settings)
        gms_seen_settings = gms_seen_settings or _gms_seen_settings(settings)
        tokens = _tokens(settings)
        webhook_access = _webhook_access(settings, tokens is not None)
        _check_http_limits(settings)
        http_max_connections = connection_budget(settings.http_max_connections)
        tls_files = tls.files(settings)
        tracing = tracing_interceptor(settings.tracing)

        if store is None:
            store = await read(functools.partial(open_store, settings.db))  # it migrates: blocking
            started.push_async_callback(read, store.close)
        hub = Hub(
            capacity=settings.stream_buffer,
            max_bytes=settings.stream_buffer_bytes,
            latest_cursor=await read(store.latest_cursor),
            cursors=store.cursor_format,
        )
        health_servicer = health_aio.HealthServicer()
        metrics = Metrics()
        committer, store_health, follower = await _committing(store, hub, metrics, health_servicer, started)
        expiry, retention = _upkeep(committer, clock, settings, started)
        writer = Writer(
            normaliser,
            committer,
            clock,
            max_items=settings.max_batch_items,
            max_item_bytes=settings.max_item_bytes,
            request_id_ttl=settings.request_id_ttl,
            metrics=metrics,
            offload=_runner(normalisers),
            budget_bytes=settings.write_budget_bytes,
        )

        service = DeliveryReportService(
            writer=writer,
            store=store,
            hub=hub,
            read=read,
            committer=committer,
            retention=retention,
            clock=clock,
            max_streams=settings.max_streams,
        )
        call_log = CallLog(traced=tracing is not None)
        http_log = CallLog(logging.getLogger(webhooks.__name__), "http")
        server, port = _grpc_server(
            settings, service, health_servicer, _interceptors(tracing, metrics, call_log, tokens)
        )
        await server.start()
        started.push_async_callback(server.stop, None)

        ssl_context = tls.http_context(*tls_files) if tls_files is not None else None
        http = HttpListener(
            webhooks.create_app(
                writer,
                webhook_access,
                settings.http_max_body_bytes,
                settings.http_body_timeout,
                metrics,
                call_log=http_log,
            ),
            max_connections=http_max_connections,
            idle_timeout=settings.http_idle_timeout,
            ssl_context=ssl_context,
            on_count=metrics.http_connections.set,
        )
        metrics.http_max_connections.set(http_max_connections)
        admin_listener = _admin_listener(settings, _renderer(metrics), ssl_context)
        await _start_listeners(settings, http, admin_listener, started)

        await _health_setter(health_servicer, "", SERVICE_NAME)(store_health.serving)
        poller, gms_seen = await _fetchers(
            poller_settings, gms_seen_settings, writer, store, read, clock, metrics, health_servicer
        )
        started.pop_all()  # running: App.stop owns everything now

    app = App(
        server,
        port,
        store,
        hub,
        committer,
        health_servicer,
        reads,
        settings,
        http,
        call_log,
        http_log,
        metrics,
        store_health,
        normalisers,
        writer,
        expiry,
        retention,
        poller,
        admin_listener,
        follower,
        gms_seen,
    )
    open_files, open_files_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    log.info(
        "serving",
        extra={
            "listen": settings.listen,
            "port": app.port,
            "http_listen": settings.http_listen,
            "http_port": app.http_port,
            "http_max_connections": http_max_connections,
            "admin_listen": settings.admin_listen,
            "admin_port": app.admin_port,
            "open_files_limit": open_files,
            "open_files_hard_limit": open_files_hard,
            "db": database_name(settings.db),
            "poller": poller is not None,
            "shared_store": store.shared,
            "pid": os.getpid(),
            "gms_seen": gms_seen is not None,
            "tls": tls_files is not None,
            "auth": tokens is not None,
            "retention_seconds": settings.retention,
        },
    )
    return app


def _following(store: Store, hub: Hub, started: contextlib.AsyncExitStack) -> Follower | None:
    """The follower, started, when other processes may write the store too (stopped by `started` if
    starting fails later); None when this process commits every change itself."""
    if not store.shared:
        return None
    follower = Follower(store, hub, newest=store.committed_cursor)
    hub.refresh = follower.refresh
    follower.start()
    started.push_async_callback(follower.stop)
    return follower


def check_shared(settings: Settings) -> None:
    """Raises ValueError unless the database of `settings` may be written by several processes at
    once (for --workers), before anything is opened; StoreError if it cannot be opened. It is opened
    (and migrated) once here, so that a database that is not there fails in one line, not N."""
    if not is_shared(settings.db):
        raise ValueError(
            f"--workers {settings.workers} needs a database several processes can write"
            f" (PostgreSQL: --db postgresql://...); {settings.db} is SQLite, which one process writes"
        )
    open_store(settings.db).close()


async def _fetchers(
    poller_settings: PollerSettings | None,
    gms_seen_settings: GmsSeenSettings | None,
    writer: Writer,
    store: Store,
    read: ReadRunner,
    clock: Callable[[], int],
    metrics: Metrics,
    health_servicer: health_aio.HealthServicer,
) -> tuple[Poller | None, GmsSeenFetcher | None]:
    """The adapters that pull, those configured, started; each NOT_SERVING on its own health service
    until it has done its work once."""
    poller = gms_seen = None
    if poller_settings is not None:
        poller = Poller(
            poller_settings,
            writer,
            set_serving=_health_setter(health_servicer, POLLER_HEALTH_SERVICE),
            metrics=metrics,
        )
        await health_servicer.set(POLLER_HEALTH_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        poller.start()
    if gms_seen_settings is not None:
        gms_seen = GmsSeenFetcher(
            gms_seen_settings,
            writer,
            store,
            read,
            clock,
            set_serving=_health_setter(health_servicer, GMS_SEEN_HEALTH_SERVICE),
            metrics=metrics,
        )
        await health_servicer.set(GMS_SEEN_HEALTH_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        gms_seen.start()
    return poller, gms_seen


async def _committing(
    store: Store,
    hub: Hub,
    metrics: Metrics,
    health_servicer: health_aio.HealthServicer,
    started: contextlib.AsyncExitStack,
) -> tuple[Committer, StoreHealth, Follower | None]:
    """The committer, started, the store's health, probing, and the follower when the store is shared
    (all stopped by `started` if starting fails later). The committer publishes its changes to the
    hub itself, unless a follower reads them (with other processes' changes) from the store: then it
    wakes the follower."""
    follower = _following(store, hub, started)
    store_health = StoreHealth(store, _health_setter(health_servicer, "", SERVICE_NAME))
    # Read when /metrics is scraped: from memory (the open quarantine as of the last count).
    lag = (lambda: follower.lag_seconds) if follower is not None else (lambda: 0.0)
    metrics.watch(hub, lambda: store_health.open_quarantine, lag)
    publish: Callable[[Iterable[Change]], None] = hub.publish
    if follower is not None:
        wake = follower.wake

        def publish(changes: Iterable[Change]) -> None:
            wake()

    committer = Committer(
        store, publish, on_commit=_commit_recorder(metrics), on_outcome=_commit_outcome(metrics, store_health)
    )
    committer.start()
    started.push_async_callback(committer.stop)
    await store_health.start(committer.check)
    started.push_async_callback(store_health.stop)
    return committer, store_health, follower


def _upkeep(
    committer: Committer, clock: Callable[[], int], settings: Settings, started: contextlib.AsyncExitStack
) -> tuple[RequestIdExpiry, Retention]:
    """The expiry of request ids and the retention, started (stopped by `started` if starting fails
    later)."""
    expiry = RequestIdExpiry(committer, clock, settings.request_id_ttl)
    expiry.start()
    started.push_async_callback(expiry.stop)
    retention = Retention(committer, clock, settings.retention)
    retention.start()
    started.push_async_callback(retention.stop)
    return expiry, retention


def _grpc_server(
    settings: Settings, service: DeliveryReportService, health_servicer: Any, interceptors: list[Any]
) -> tuple[grpc.aio.Server, int]:
    """The gRPC server with every service registered, bound (not yet started); and its port."""
    shared_port = settings.workers > 1  # workers share the port (dlrhub/workers.py)
    server = grpc.aio.server(
        options=[
            *(option for option in SERVER_OPTIONS if option[0] != "grpc.so_reuseport"),  # the first wins
            ("grpc.so_reuseport", int(shared_port)),
            ("grpc.max_receive_message_length", settings.max_request_bytes),
        ],
        interceptors=interceptors,
    )
    add_to_server(service, server, max_items=settings.max_batch_items)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.reflection:
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection([SERVICE_NAME, health_name, reflection.SERVICE_NAME], server)
    tls_files = tls.files(settings)
    if not shared_port:  # the other workers have bound it
        _check_listen(settings.listen)
    try:
        if tls_files is not None:
            return server, server.add_secure_port(settings.listen, tls.grpc_credentials(*tls_files))
        return server, server.add_insecure_port(settings.listen)
    except RuntimeError as error:  # grpcio raises when it cannot bind
        raise OSError(f"cannot listen on {settings.listen}: {error}") from None


def _admin_listener(
    settings: Settings, render_metrics: Callable[[], Awaitable[bytes]], ssl_context: ssl.SSLContext | None
) -> HttpListener | None:
    """The admin port's listener (not yet started), or None when DLRHUB_ADMIN_LISTEN is not set."""
    if not settings.admin_listen:
        return None
    return HttpListener(
        admin.create_app(render_metrics),
        max_connections=admin.MAX_CONNECTIONS,
        idle_timeout=settings.http_idle_timeout,
        ssl_context=ssl_context,
    )


async def _start_listeners(
    settings: Settings, http: HttpListener, admin: HttpListener | None, started: contextlib.AsyncExitStack
) -> None:
    """Starts the webhook and admin listeners (stopped by `started` if starting fails later). Workers
    share the webhook port; each has an admin port of its own (dlrhub/workers.py)."""
    await _listen(http, settings.http_listen, reuse_port=settings.workers > 1)
    started.push_async_callback(http.stop)
    if admin is not None:
        await _listen(admin, settings.admin_listen)
        started.push_async_callback(admin.stop)


async def _listen(listener: HttpListener, address: str, *, reuse_port: bool = False) -> None:
    try:
        await listener.start(address, reuse_port=reuse_port)
    except OSError as error:  # its words repeat the address: the system's are enough
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise OSError(f"cannot listen on {address} (HTTP): {reason}") from None


def _check_listen(listen: str) -> None:
    """Raises OSError naming `listen` when it cannot be bound (in use, not an address of this host):
    grpc would write its own error line first, and the command says what failed in one line."""
    host, _, port = listen.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return  # grpc says what is wrong with it; a free port is always found
    try:
        addresses = socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else None
        raise OSError(f"cannot listen on {listen}: {reason or error}") from None
    for family, kind, protocol, _, address in addresses:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc binds
            try:
                probe.bind(address)
            except OSError as error:
                raise OSError(f"cannot listen on {listen}: {error.strerror}") from None


def _interceptors(tracing: Any, metrics: Metrics, call_log: CallLog, tokens: Tokens | None) -> list[Any]:
    """Outermost first: tracing (when on), then per-call logs and metrics, then authentication."""
    chain: list[Any] = [tracing, CallInterceptor(metrics, call_log)]
    if tokens is not None:
        chain.append(AuthInterceptor(tokens))
    return [interceptor for interceptor in chain if interceptor is not None]


def _commit_outcome(metrics: Metrics, store_health: StoreHealth) -> Callable[[Exception | None], None]:
    """Counts a group commit that failed, and tells the store's health how each went."""
    failures = metrics.store_failures.labels("commit")

    def told(error: Exception | None) -> None:
        if error is not None:
            failures.inc()
        store_health.committed(error)

    return told


def _commit_recorder(metrics: Metrics) -> Callable[[float, int], None]:
    def record(seconds: float, items: int) -> None:
        metrics.commit_seconds.observe(seconds)
        metrics.commit_reports.observe(items)

    return record


def _tokens(settings: Settings) -> Tokens | None:
    """The configured tokens; None (the API open) when there are none."""
    tokens = Tokens.parse(settings.tokens).tokens
    if settings.tokens_file is not None:
        tokens += Tokens.load(settings.tokens_file).tokens
    return Tokens(tokens) if tokens else None


def _webhook_access(settings: Settings, tokens: bool) -> dict[str, Access]:
    """What each webhook route requires. With gRPC tokens configured (`tokens`), a route that takes
    anyone's POSTs is refused unless DLRHUB_WEBHOOKS_OPEN says so: the webhooks store reports as
    Ingest does, and the provider-facing port is the one most exposed."""
    try:
        common = AllowList.parse(settings.webhook_allow_from) if settings.webhook_allow_from else None
    except ValueError as error:
        raise ValueError(f"{env_name('webhook_allow_from')}: {error}") from None
    access = {}
    for path, (auth_setting, allow_setting) in _ROUTE_SETTINGS.items():
        auth_spec, allow_spec = getattr(settings, auth_setting), getattr(settings, allow_setting)
        try:
            auth = WebhookAuth.parse(auth_spec) if auth_spec else None
        except ValueError as error:
            raise ValueError(f"{env_name(auth_setting)}: {error}") from None
        try:
            allow_from = AllowList.parse(allow_spec) if allow_spec else common
        except ValueError as error:
            raise ValueError(f"{env_name(allow_setting)}: {error}") from None
        access[path] = Access(auth, allow_from)
    open_routes = [path for path, route in access.items() if route.open]
    if tokens and open_routes and not settings.webhooks_open:
        auth_names = " and ".join(env_name(_ROUTE_SETTINGS[path][0]) for path in open_routes)
        raise ValueError(
            f"gRPC tokens are configured, but {' and '.join(open_routes)} would take anyone's POSTs:"
            f" set {auth_names} (or an allow list, {env_name('webhook_allow_from')}),"
            f" or {env_name('webhooks_open')}=1 to leave them open"
        )
    return access


def _check_http_limits(settings: Settings) -> None:
    """Refuses limits that would stop the HTTP ports (no connection at all, no time at all)."""
    if settings.http_max_connections < 1:
        raise ValueError(f"{env_name('http_max_connections')} must be at least 1")
    for name in ("http_idle_timeout", "http_body_timeout", "log_repeat_interval"):
        if not getattr(settings, name) > 0:
            raise ValueError(f"{env_name(name)} must be a number of seconds above 0")


def _poller_settings(settings: Settings, given: PollerSettings | None) -> PollerSettings | None:
    """The poller's settings: those given, else from DLRHUB_POLL_* (None, the poller off, unless both
    base URL and key are set)."""
    if given is None and not (settings.poll_base_url and settings.poll_api_key):
        return None
    limit = settings.poll_limit if given is None else given.limit
    if limit > settings.max_batch_items:
        raise ValueError(
            f"DLRHUB_POLL_LIMIT ({limit}) is over DLRHUB_MAX_BATCH_ITEMS"
            f" ({settings.max_batch_items}): a fetched batch could never be stored"
        )
    if given is not None:
        return given
    for name in ("poll_timeout", "poll_max_body_bytes"):
        if not getattr(settings, name) > 0:
            raise ValueError(f"{env_name(name)} must be above 0")
    try:
        channel = (
            channel_named(settings.poll_channel) if settings.poll_channel else Channel.CHANNEL_UNSPECIFIED
        )
    except ValueError as error:
        raise ValueError(f"{env_name('poll_channel')}: {error}") from None
    return PollerSettings(
        settings.poll_base_url,
        settings.poll_api_key,
        limit=settings.poll_limit,
        interval=settings.poll_interval,
        timeout=settings.poll_timeout,
        max_body_bytes=settings.poll_max_body_bytes,
        channel=channel,
    )


def _gms_seen_settings(settings: Settings) -> GmsSeenSettings | None:
    """The GMS seen fetcher's settings from DLRHUB_GMS_SEEN_* (None, the fetcher off, unless the base
    URL is set); ValueError names the setting that is wrong."""
    if not settings.gms_seen_base_url:
        return None
    if not (settings.gms_seen_login and settings.gms_seen_password):
        raise ValueError(
            f"{env_name('gms_seen_base_url')} is set: set {env_name('gms_seen_login')} and"
            f" {env_name('gms_seen_password')} too (GMS's GET report takes HTTP Basic credentials)"
        )
    try:
        return GmsSeenSettings(
            settings.gms_seen_base_url,
            settings.gms_seen_login,
            settings.gms_seen_password,
            report=settings.gms_seen_report,
            window=settings.gms_seen_window,
            concurrency=settings.gms_seen_concurrency,
            interval=settings.gms_seen_interval,
            interval_max=settings.gms_seen_interval_max,
            timeout=settings.gms_seen_timeout,
        )
    except BadSetting as error:
        raise ValueError(f"{env_name('gms_seen_' + error.setting)} must be {error.expected}") from None


def _runner(threads: Executor) -> ReadRunner:
    """Runs blocking calls on `threads` (store calls on the reader threads: never on the event loop)."""

    def run(call: Callable[[], T]) -> Awaitable[T]:
        return asyncio.get_running_loop().run_in_executor(threads, call)

    return run


def _renderer(metrics: Metrics) -> Callable[[], Awaitable[bytes]]:
    """/metrics, rendered on the event loop from memory: a scrape never waits on the store."""

    async def render() -> bytes:
        return metrics.render()

    return render


def _health_setter(
    health_servicer: health_aio.HealthServicer, *services: str
) -> Callable[[bool], Awaitable[None]]:
    """Reports a state as the health of `services`: the store's as the server's ("") and the
    DeliveryReportService's, a fetcher's (the poller's, the GMS seen fetcher's) as its own."""

    async def set_serving(serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in services:
            await health_servicer.set(name, status)

    return set_serving
