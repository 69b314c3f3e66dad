"""Async tasks: fetch 1,000 URLs with an async HTTP client, a rate limit and a ledger.

The script starts its own HTTP server on 127.0.0.1 (so it runs offline; each page takes
20 ms to answer, as a real one would take a while) and fetches 1,000 pages from it with
aiohttp. ``fetch`` is an ``async def``, so it runs on ``AsyncTaskRun``: one event loop
thread holds the requests in flight (up to ``max_concurrency``; a thread per request would
top out at a few dozen). A rate limit spaces the requests out (``RATE`` a second), failed
requests are retried, and the ledger remembers the pages fetched: run the script twice and
the second run answers every page from the ledger without a request.

Run it: ``pip install aiohttp`` (it comes with ``taskrun[test]``), then
``python examples/async_fetch.py`` (twice, to see the ledger; ``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import threading
import time

import aiohttp

import taskrun
from taskrun import AsyncTaskRun, task

PAGES = 1000
RATE = 2000  # requests started per second, at most
LEDGER_PATH = os.path.join(tempfile.gettempdir(), "taskrun-example-async-fetch.db")


class RateLimit:
    """Lets at most ``per_second`` callers through per second, evenly spaced.

    Used only on the runner's one event loop, so it needs no lock: each caller takes the
    next free moment and sleeps until then.
    """

    def __init__(self, per_second: float) -> None:
        self.interval = 1 / per_second
        self.next_free = 0.0

    async def wait(self) -> None:
        now = time.monotonic()
        at = max(now, self.next_free)
        self.next_free = at + self.interval
        if at > now:
            await asyncio.sleep(at - now)


#: The runner of every task here: one event loop thread, up to 500 requests in flight. The client
#: session belongs to that loop, so the task that closes it runs there too (same runner).
Fetcher = AsyncTaskRun.configure(max_concurrency=500)
rate_limit = RateLimit(RATE)
site = "http://127.0.0.1"  # where the pages are: set once the local server has its port
client: aiohttp.ClientSession | None = None


def session() -> aiohttp.ClientSession:
    """The client session, made on first use (on the runner's event loop, which it belongs to)."""
    global client
    if client is None:
        client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),  # no cap of its own: max_concurrency is the cap
            timeout=aiohttp.ClientTimeout(total=30),
        )
    return client


def make_fetch(ledger: taskrun.Ledger | None) -> taskrun.Task[[str], int]:
    @task(
        runner=Fetcher, retries=3, retry_sleep_time=0.1, backoff=2, retry_on=aiohttp.ClientError,
        timeout=10, ledger=ledger, name="fetch",
    )
    async def fetch(path: str) -> int:
        """Download one page of the site; its length is the result (what the ledger stores, by path)."""
        await rate_limit.wait()
        async with session().get(site + path) as response:
            response.raise_for_status()
            return len(await response.read())

    return fetch


@task(runner=Fetcher)
async def close_session() -> None:
    global client
    if client is not None:
        await client.close()
        client = None


# ---- a local server to fetch from (a stand-in for the internet) -----------------------------------


async def serve_page(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """HTTP/1.1 with keep-alive: every GET answers after 20 ms with a small page."""
    try:
        while request := await reader.readline():
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            path = request.split()[1]
            await asyncio.sleep(0.02)
            body = b"<html>page " + path + b"</html>"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def start_server() -> tuple[int, threading.Event]:
    """Serve on a free port of 127.0.0.1 from a thread of its own; set the returned Event to stop it."""
    ready, stop = threading.Event(), threading.Event()
    port: list[int] = []

    async def main() -> None:
        server = await asyncio.start_server(serve_page, "127.0.0.1", 0, backlog=4096)
        port.append(server.sockets[0].getsockname()[1])
        ready.set()
        async with server:
            while not stop.is_set():
                await asyncio.sleep(0.05)

    threading.Thread(target=asyncio.run, args=(main(),), name="example-server", daemon=True).start()
    ready.wait(10)
    return port[0], stop


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--fresh", action="store_true", help="forget what earlier runs fetched")
    parser.add_argument("--no-ledger", action="store_true", help="remember nothing between runs")
    parser.add_argument("--ledger", default=LEDGER_PATH, help=f"the ledger file (default {LEDGER_PATH})")
    options = parser.parse_args()
    if options.fresh and os.path.exists(options.ledger):
        os.remove(options.ledger)
    ledger = None if options.no_ledger else taskrun.Ledger(options.ledger)
    fetch = make_fetch(ledger)

    global site
    port, stop_server = start_server()
    site = f"http://127.0.0.1:{port}"
    paths = [f"/page/{n}" for n in range(PAGES)]
    try:
        start = time.monotonic()
        group = fetch.map(paths)
        sizes = group.results(timeout=120)
        elapsed = time.monotonic() - start
        summary = group.summary()
        print(f"{len(sizes)} pages, {sum(sizes):,} bytes in {elapsed:.2f} s: {summary['succeeded'] - summary['cached']} "
              f"fetched, {summary['cached']} from the ledger")
        if ledger is not None and summary["cached"] < len(sizes):
            print(f"run it again to have them all from the ledger; --fresh starts over (ledger: {options.ledger})")
    finally:
        close_session().wait(10)
        stop_server.set()
        taskrun.shutdown()


if __name__ == "__main__":
    main()
