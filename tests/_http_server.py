"""A small HTTP/1.1 server on 127.0.0.1 for the async tests: asyncio streams, on a loop in a thread of its own.

Every ``GET /<path>`` is answered ``200`` with the body ``echo:<path>``, over keep-alive
connections. With ``hold_until=N`` it answers nothing until N requests are in flight at once
(or ``hold_timeout`` passes), so a test can show that N requests really were concurrent:
``peak`` is the most seen at once.
"""

import asyncio
import threading


class LocalHTTPServer:
    def __init__(self, hold_until=None, hold_timeout=10.0):
        self.hold_until = hold_until
        self.hold_timeout = hold_timeout
        self.requests = 0
        self.in_flight = 0
        self.peak = 0
        self.port = None
        self._loop = None
        self._stop = None
        self._full = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-http-server", daemon=True)
        self._error = None

    def url(self, path):
        return f"http://127.0.0.1:{self.port}/{path}"

    def __enter__(self):
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the test HTTP server did not start within 10 s")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc_info):
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        assert not self._thread.is_alive(), "the test HTTP server did not stop"

    def _serve(self):
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by __enter__ if it happens before the server is ready
            self._error = exc
            self._ready.set()

    async def _main(self):
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._full = asyncio.Event()
        server = await asyncio.start_server(self._connection, "127.0.0.1", 0, backlog=4096)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()
            self._full.set()  # let held requests go
        await asyncio.sleep(0)

    async def _connection(self, reader, writer):
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    break
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # headers: nothing to read in them
                path = request_line.split()[1].decode().lstrip("/")
                self.requests += 1
                self.in_flight += 1
                self.peak = max(self.peak, self.in_flight)
                try:
                    if self.hold_until is not None:
                        if self.in_flight >= self.hold_until:
                            self._full.set()
                        try:
                            await asyncio.wait_for(self._full.wait(), self.hold_timeout)
                        except asyncio.TimeoutError:
                            self._full.set()  # answer everyone: the test then sees the peak fell short
                    body = f"echo:{path}".encode()
                    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(body)
                    writer.write(head + body)
                    await writer.drain()
                finally:
                    self.in_flight -= 1
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
