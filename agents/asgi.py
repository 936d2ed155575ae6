"""Raw ASGI plumbing for the multiplexer's hot path. Starlette's Request, middleware stack and
StreamingResponse (an anyio task group per response) cost more CPU than the proxying itself."""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import orjson
from starlette.responses import Response

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]

JSON_TYPE = (b"content-type", b"application/json")
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}

    def payload(self) -> bytes:
        return orjson.dumps({"error": {"message": self.message, "type": self.kind}})

    async def send(self, send: Send) -> None:
        await send_response(send, self.status, self.payload(), self.headers)

    def response(self) -> Response:
        return Response(self.payload(), status_code=self.status, headers=self.headers,
                        media_type="application/json")


class HangupFlag(Protocol):
    disconnected: bool


def server_cycle(send: Send) -> HangupFlag | None:
    """uvicorn's request cycle, whose `disconnected` turns true when the client hangs up (its send()
    is a bound method of it): free to read, where watching receive() costs a task per stream.
    None under a server without it."""
    cycle = getattr(send, "__self__", None)
    return cycle if isinstance(getattr(cycle, "disconnected", None), bool) else None


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"body larger than {limit} bytes", "invalid_request_error")


async def read_body(receive: Receive, declared_length: bytes | str | None, limit: int) -> bytes:
    if declared_length and declared_length.isdigit() and int(declared_length) > limit:
        raise too_large(limit)
    message = await receive()
    if not message.get("more_body") and message["type"] == "http.request":
        whole = message.get("body", b"")
        if len(whole) > limit:
            raise too_large(limit)
        return whole
    body = bytearray()
    while True:
        if message["type"] == "http.disconnect":
            raise ApiError(400, "client went away while sending the body", "invalid_request_error")
        body += message.get("body", b"")
        if len(body) > limit:
            raise too_large(limit)
        if not message.get("more_body"):
            return bytes(body)
        message = await receive()


def json_object(body: bytes) -> dict:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ApiError(400, "body is not valid JSON", "invalid_request_error") from None
    if not isinstance(data, dict):
        raise ApiError(400, "body must be a JSON object", "invalid_request_error")
    return data


def encode_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


async def send_response(send: Send, status: int, body: bytes, headers: dict[str, str] | None = None,
                        content_type: tuple[bytes, bytes] = JSON_TYPE,
                        extra: list[tuple[bytes, bytes]] | None = None) -> None:
    """`extra`: headers already encoded."""
    await send({"type": "http.response.start", "status": status,
                "headers": [content_type, (b"content-length", b"%d" % len(body)),
                            *encode_headers(headers or {}), *(extra or ())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})
