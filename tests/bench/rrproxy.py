"""A small round-robin HTTP reverse proxy on 127.0.0.1, for benchmarks of several replicas.

Each request goes to the next upstream in turn, over a pool of kept-alive connections, and
its answer (status, body, content type) comes back as is; a request an upstream does not
answer gets a 502. `GET /_proxy/stats` gives the requests, statuses and errors per upstream.
It stands in for the load balancer in front of `eventsync serve` replicas (nginx, HAProxy):
unlike those it is Python, so its own CPU counts against what it can pass on.

    .venv/bin/python tests/bench/rrproxy.py --listen 127.0.0.1:8000 \\
        --upstream http://127.0.0.1:8781 --upstream http://127.0.0.1:8782
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import time

import aiohttp
from aiohttp import web

# Hop-by-hop headers (RFC 9110, 7.6.1) and the ones aiohttp sets itself for the new request.
DROPPED = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}
STATS = "/_proxy/stats"


class Proxy:
    def __init__(self, upstreams: list[str], connections: int) -> None:
        self.upstreams = [u.rstrip("/") for u in upstreams]
        self._next = itertools.cycle(range(len(self.upstreams)))
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None
        self.requests = [0] * len(self.upstreams)
        self.statuses: list[dict[str, int]] = [{} for _ in self.upstreams]
        self.errors: list[dict[str, int]] = [{} for _ in self.upstreams]
        self.started = time.monotonic()

    async def start(self, app: web.Application) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=self._connections),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=60),
        )

    async def stop(self, app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "upstreams": [
                    {"url": u, "requests": n, "statuses": s, "errors": e}
                    for u, n, s, e in zip(
                        self.upstreams, self.requests, self.statuses, self.errors, strict=True
                    )
                ],
                "seconds": time.monotonic() - self.started,
            }
        )

    async def forward(self, request: web.Request) -> web.StreamResponse:
        if request.path == STATS and request.method == "GET":
            return await self.stats(request)
        assert self._session is not None
        i = next(self._next)
        self.requests[i] += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() not in DROPPED}
        headers["X-Forwarded-For"] = request.remote or ""
        body = await request.read()
        try:
            async with self._session.request(
                request.method,
                self.upstreams[i] + request.path_qs,
                data=body,
                headers=headers,
                allow_redirects=False,
            ) as upstream:
                payload = await upstream.read()
                status = upstream.status
                content_type = upstream.headers.get("Content-Type")
        except (aiohttp.ClientError, TimeoutError) as exc:
            name = type(exc).__name__
            self.errors[i][name] = self.errors[i].get(name, 0) + 1
            return web.Response(status=502, text=f"upstream {i}: {name}\n")
        key = str(status)
        self.statuses[i][key] = self.statuses[i].get(key, 0) + 1
        response = web.Response(status=status, body=payload)
        if content_type:
            response.headers["Content-Type"] = content_type
        return response


async def serve(listen: str, upstreams: list[str], connections: int) -> None:
    host, _, port = listen.rpartition(":")
    proxy = Proxy(upstreams, connections)
    # No access log: its formatting alone would cost a share of the proxy's CPU.
    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", proxy.forward)
    app.on_startup.append(proxy.start)
    app.on_cleanup.append(proxy.stop)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, int(port), backlog=1024).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"proxy listening on http://{listen}", flush=True)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT (127.0.0.1 only)")
    parser.add_argument("--upstream", action="append", required=True, help="an upstream's URL")
    parser.add_argument(
        "--connections", type=int, default=128, help="kept-alive connections per upstream"
    )
    args = parser.parse_args()
    if not args.listen.startswith("127.0.0.1:"):
        parser.error("--listen must be on 127.0.0.1")
    if not all(u.startswith("http://127.0.0.1:") for u in args.upstream):
        parser.error("--upstream must be http://127.0.0.1:PORT")
    asyncio.run(serve(args.listen, args.upstream, args.connections))


if __name__ == "__main__":
    main()
