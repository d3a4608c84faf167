"""A loopback TCP proxy that tests (and the soak) can cut: ``refuse`` (connections reset at
once, like a stopped server) or ``hang`` (connections accepted, nothing ever answered, like a
frozen one), then ``restore``. It fronts Redis or PostgreSQL alike.

It also records the client's *round trips*: ``requests`` holds, per connection, each burst of
bytes the client sent before the server answered (a pipeline of commands is one burst, however
the kernel splits it), so a test can count round trips and the commands in each."""

from __future__ import annotations

import asyncio
import contextlib


class Proxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.mode = "up"
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        #: The client's round trips, in order: (connection number, bytes sent before an answer).
        self.requests: list[tuple[int, bytes]] = []
        self._connections = 0

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def database_url(self, url: str) -> str:
        """``url`` (SQLAlchemy) pointed at this proxy."""
        from sqlalchemy import make_url

        return make_url(url).set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "refuse":
            writer.transport.abort()
            return
        if self.mode == "hang":
            self._writers.add(writer)
            with contextlib.suppress(Exception):
                while await reader.read(65536):
                    pass
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        self._connections += 1
        connection = self._connections
        current = [-1]  # this connection's round trip in ``requests``; -1: the server answered

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            upstream = dst is up_writer
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    if self.mode != "up":
                        # frozen: swallow the bytes, answer nothing
                        continue
                    if not upstream:
                        current[0] = -1
                    elif current[0] < 0:
                        current[0] = len(self.requests)
                        self.requests.append((connection, data))
                    else:
                        self.requests[current[0]] = (connection, self.requests[current[0]][1] + data)
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.transport.abort()

        for task in (
            asyncio.create_task(pipe(reader, up_writer)),
            asyncio.create_task(pipe(up_reader, writer)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _drop_all(self) -> None:
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self._writers.clear()

    def refuse(self) -> None:
        """Like a stopped server: every connection is reset."""
        self.mode = "refuse"
        self._drop_all()

    def hang(self) -> None:
        """Like a frozen server: connections stay open, nothing is answered."""
        self.mode = "hang"

    def restore(self) -> None:
        self.mode = "up"
        self._drop_all()

    async def close(self) -> None:
        self._drop_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
