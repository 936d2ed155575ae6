"""A bare pass-through proxy: the floor for a Python HTTP hop, on the multiplexer's own stack
(uvicorn with the same settings, the same garbage-collector settings, a raw ASGI handler, one
pooled aiohttp client). No logic: the request goes upstream as it came (method, path, query, body,
headers but the hop-by-hop ones), and the answer's status, headers and bytes come back unchanged,
streamed as they arrive. A benchmark fixture, not a product."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import aiohttp
import uvicorn

from dgxready.gc_settings import settle_gc

# Hop-by-hop headers (RFC 9110 7.6.1) and the ones the two HTTP stacks set themselves.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade", b"host", b"content-length", b"date", b"server"})


def request_headers(scope: dict) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
            if k.lower() not in HOP_BY_HOP]


def response_headers(resp: aiohttp.ClientResponse) -> list[tuple[bytes, bytes]]:
    return [(k.lower(), v) for k, v in resp.raw_headers if k.lower() not in HOP_BY_HOP]


async def read_all(receive) -> bytes:
    body = bytearray()
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return bytes(body)


@dataclass
class PassThrough:
    """The ASGI app; the client session opens at lifespan start."""
    upstream: str
    connections: int = 512
    client: aiohttp.ClientSession | None = field(default=None, init=False)

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
        elif scope["type"] == "http":
            await self.forward(scope, receive, send)

    async def lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.open_client()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.client:
                    await self.client.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def open_client(self) -> None:
        self.client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.connections, limit_per_host=0),
            timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"))

    def target(self, scope: dict) -> str:
        path = (scope.get("raw_path") or scope["path"].encode()).split(b"?", 1)[0].decode("latin-1")
        query = scope.get("query_string", b"").decode("latin-1")
        return self.upstream + path + ("?" + query if query else "")

    async def forward(self, scope: dict, receive, send) -> None:
        if self.client is None:
            self.open_client()
        body = await read_all(receive)
        async with self.client.request(scope["method"], self.target(scope), data=body or None,
                                       headers=request_headers(scope)) as resp:
            await send({"type": "http.response.start", "status": resp.status,
                        "headers": response_headers(resp)})
            async for chunk in resp.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="port to listen on (127.0.0.1)")
    parser.add_argument("--upstream", required=True, help="base URL to forward to, e.g. http://127.0.0.1:8080")
    args = parser.parse_args()
    settle_gc()
    uvicorn.run(PassThrough(args.upstream.rstrip("/")), host="127.0.0.1", port=args.port,
                log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
