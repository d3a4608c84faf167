"""The ceiling: a bare grpc.aio unary echo server, no interceptor, no serialisation work.

Every figure of the benchmark is reported as a ratio to this server, measured in the same run.
Usage: python -m bench.echo PORT [uvloop|asyncio]
"""

from __future__ import annotations

import asyncio
import signal
import sys

import grpc


async def _echo(request: bytes, context: object) -> bytes:
    return request


async def main(port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
            ),
        )
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)


if __name__ == "__main__":
    port = int(sys.argv[1])
    loop = sys.argv[2] if len(sys.argv) > 2 else "uvloop"
    if loop == "uvloop":
        try:
            import uvloop

            uvloop.run(main(port))
            raise SystemExit(0)
        except ImportError:
            pass
    asyncio.run(main(port))
