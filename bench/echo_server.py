"""The ceiling: a grpc.aio server with dlrhub's own server options and nothing behind it, and beside
it on the same event loop, as in dlrhub, an aiohttp application with do-nothing webhook handlers.

    python -m bench.echo_server [--event-loop asyncio|uvloop]

prints one JSON line {"port": N, "http_port": M} on stdout once it serves, and runs until SIGTERM or
SIGINT. Generic handlers with identity (bytes) serializers, service `bench.Echo`:
  Unary         answers the request bytes;
  ClientStream  counts the messages of the stream, answers the count once (8 bytes, big-endian);
  ServerStream  the request is struct "!QI" (count, size): sends `count` messages of `size` bytes.
HTTP, POST /webhooks/gms and /webhooks/sent-sms-report: reads the body and answers 200 with `{}`.
It is served by dlrhub's own listener (dlrhub.transport.listener) with dlrhub's default connection
limit, idle timeout and body limit, so the stack is the webhooks' own, less dlrhub's work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import struct
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
from aiohttp import web

from dlrhub.app import SERVER_OPTIONS
from dlrhub.config import Settings
from dlrhub.transport.listener import HttpListener, connection_budget
from dlrhub.transport.webhooks import ROUTES

SERVER_STREAM_REQUEST = struct.Struct("!QI")


async def unary(request: bytes, context: Any) -> bytes:
    return request


async def client_stream(requests: AsyncIterator[bytes], context: Any) -> bytes:
    count = 0
    async for _ in requests:
        count += 1
    return count.to_bytes(8, "big")


async def server_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
    count, size = SERVER_STREAM_REQUEST.unpack(request)
    payload = b"\x5a" * size
    for _ in range(count):
        yield payload


async def webhook(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(text="{}", content_type="application/json")


def webhooks(settings: Settings) -> HttpListener:
    """The do-nothing webhooks, on a listener set up as dlrhub's webhook port is (dlrhub.app)."""
    app = web.Application(client_max_size=settings.http_max_body_bytes)
    for path in ROUTES:
        app.router.add_post(path, webhook)
    return HttpListener(
        app,
        max_connections=connection_budget(settings.http_max_connections),
        idle_timeout=settings.http_idle_timeout,
    )


def handlers() -> grpc.GenericRpcHandler[bytes, bytes]:
    return grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        },
    )


async def serve(listen: str, http_listen: str) -> None:
    settings = Settings.from_env()  # dlrhub honours the DLRHUB_* variables set: so does its ceiling
    # Exactly what dlrhub.app.start passes to grpc.aio.server (without the optional auth interceptor).
    options = [*SERVER_OPTIONS, ("grpc.max_receive_message_length", settings.max_request_bytes)]
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((handlers(),))
    port = server.add_insecure_port(listen)
    await server.start()
    http = webhooks(settings)
    await http.start(http_listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop_name = type(loop).__module__ + "." + type(loop).__name__
    print(json.dumps({"port": port, "http_port": http.port, "loop": loop_name}), flush=True)
    await stop.wait()
    await http.stop()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.echo_server")
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--http-listen", default="127.0.0.1:0")
    parser.add_argument("--event-loop", choices=["asyncio", "uvloop"], default="asyncio")
    options = parser.parse_args(argv)
    if options.event_loop == "uvloop":
        import uvloop  # noqa: PLC0415  # optional: the bench extra

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(options.listen, options.http_listen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
