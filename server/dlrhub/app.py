"""The composition root: builds the store, hub, committer, servicer and gRPC server."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from aiohttp import web
from grpc_health.v1 import _async as health_aio  # public as grpc_health.v1.health.aio; not in grpc-stubs
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from deliveryreport.v1 import delivery_report_service_pb2, delivery_report_service_pb2_grpc
from dlrhub import webhooks
from dlrhub.committer import Committer
from dlrhub.config import Settings
from dlrhub.hub import Hub
from dlrhub.intake import Intake
from dlrhub.normalise import Normaliser
from dlrhub.poller import HEALTH_SERVICE as POLLER_HEALTH_SERVICE
from dlrhub.poller import Poller, PollerSettings
from dlrhub.service import DeliveryReportService
from dlrhub.store import SqliteStore

log = logging.getLogger(__name__)

SERVICE_NAME = delivery_report_service_pb2.DESCRIPTOR.services_by_name["DeliveryReportService"].full_name

SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    # Long-lived streams: ping idle connections, and allow clients' keepalive pings.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


@dataclass
class App:
    """A running dlrhub: its server, bound port and parts."""

    server: grpc.aio.Server
    port: int
    store: SqliteStore
    hub: Hub
    committer: Committer
    health: health_aio.HealthServicer
    reads: ThreadPoolExecutor
    settings: Settings
    http: web.AppRunner
    http_port: int
    poller: Poller | None = None

    async def stop(self) -> None:
        """Graceful: NOT_SERVING, streams end, in-flight calls finish, writes commit, store closes."""
        await self.health.enter_graceful_shutdown()
        if self.poller is not None:
            await self.poller.stop()
        self.hub.close()
        await self.http.cleanup()
        await self.server.stop(self.settings.shutdown_grace)
        await self.committer.stop()
        self.reads.shutdown(wait=True)
        self.store.close()
        log.info("stopped")


async def start(settings: Settings, *, clock: Callable[[], int] = time.time_ns) -> App:
    """Opens the store and starts serving; the bound port is in `App.port`."""
    store = SqliteStore(settings.db)
    hub = Hub(capacity=settings.stream_buffer, latest_cursor=store.latest_cursor())
    committer = Committer(store, hub)
    committer.start()
    reads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dlrhub-reader")
    http: web.AppRunner | None = None
    try:
        intake = Intake(Normaliser.load(settings.gms_codes, settings.sent_sms_report_codes), committer, clock)
        service = DeliveryReportService(intake=intake, store=store, hub=hub, reads=reads)
        server = grpc.aio.server(options=SERVER_OPTIONS)
        delivery_report_service_pb2_grpc.add_DeliveryReportServiceServicer_to_server(service, server)
        health_servicer = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            [
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        try:
            port = server.add_insecure_port(settings.listen)
        except RuntimeError as error:  # grpcio raises when it cannot bind
            raise OSError(f"cannot listen on {settings.listen}: {error}") from None
        await server.start()
        http, http_port = await _start_webhooks(intake, settings)
    except BaseException:
        if http is not None:
            await http.cleanup()
        await committer.stop()
        reads.shutdown()
        store.close()
        raise
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    poller = _start_poller(intake, settings, health_servicer)
    log.info(
        "serving",
        extra={
            "listen": settings.listen,
            "port": port,
            "http_listen": settings.http_listen,
            "http_port": http_port,
            "db": str(settings.db),
            "poller": poller is not None,
        },
    )
    return App(server, port, store, hub, committer, health_servicer, reads, settings, http, http_port, poller)


async def _start_webhooks(intake: Intake, settings: Settings) -> tuple[web.AppRunner, int]:
    auth = {
        path: webhooks.WebhookAuth.parse(spec)
        for path, spec in (
            ("/webhooks/gms", settings.gms_webhook_auth),
            ("/webhooks/sent-sms-report", settings.sent_sms_report_webhook_auth),
        )
        if spec
    }
    runner = web.AppRunner(webhooks.create_app(intake, auth, settings.http_max_body_bytes), access_log=None)
    await runner.setup()
    host, _, port = settings.http_listen.rpartition(":")
    try:
        await web.TCPSite(runner, host, int(port)).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    return runner, int(bound)


def _start_poller(
    intake: Intake, settings: Settings, health_servicer: health_aio.HealthServicer
) -> Poller | None:
    if not (settings.poll_base_url and settings.poll_api_key):
        return None

    async def set_serving(serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await health_servicer.set(POLLER_HEALTH_SERVICE, status)

    poller = Poller(
        PollerSettings(
            settings.poll_base_url,
            settings.poll_api_key,
            limit=settings.poll_limit,
            interval=settings.poll_interval,
        ),
        intake,
        set_serving=set_serving,
    )
    poller.start()
    return poller
