"""The admin port (DLRHUB_ADMIN_LISTEN, off by default): what operators' tools read, kept off the
provider-facing webhook port.

    GET /metrics   the Prometheus exposition text (observability/metrics.py)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

# Connections the admin port holds at once: enough for a scraper or two and a probe.
MAX_CONNECTIONS = 16


def create_app(render_metrics: Callable[[], Awaitable[bytes]]) -> web.Application:
    """The admin application; `render_metrics` gives the exposition text (from memory: a scrape never
    waits on the store)."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=await render_metrics(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app
