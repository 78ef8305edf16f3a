"""The ceiling: a grpc.aio server with dlrhub's own server options and nothing behind it.

    python -m bench.echo_server [--event-loop asyncio|uvloop]

prints one JSON line {"port": N} on stdout once it serves, and runs until SIGTERM or SIGINT.
Generic handlers with identity (bytes) serializers, service `bench.Echo`:
  Unary         answers the request bytes;
  ClientStream  counts the messages of the stream, answers the count once (8 bytes, big-endian);
  ServerStream  the request is struct "!QI" (count, size): sends `count` messages of `size` bytes.
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

from dlrhub.app import SERVER_OPTIONS
from dlrhub.config import Settings

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


def handlers() -> grpc.GenericRpcHandler[bytes, bytes]:
    return grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        },
    )


async def serve(listen: str) -> None:
    # Exactly what dlrhub.app.start passes to grpc.aio.server (without the optional auth interceptor).
    options = [*SERVER_OPTIONS, ("grpc.max_receive_message_length", Settings().max_request_bytes)]
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((handlers(),))
    port = server.add_insecure_port(listen)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(json.dumps({"port": port, "loop": type(loop).__module__ + "." + type(loop).__name__}), flush=True)
    await stop.wait()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.echo_server")
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--event-loop", choices=["asyncio", "uvloop"], default="asyncio")
    options = parser.parse_args(argv)
    if options.event_loop == "uvloop":
        import uvloop  # noqa: PLC0415  # optional: the bench extra

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(options.listen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
