"""A minimal OpenAI-compatible backend that answers at once (or after a fixed service time),
for measuring what the multiplexer itself costs. A benchmark fixture, not a model server."""
from __future__ import annotations

import argparse
import asyncio
import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

REPLY = ["Ack", "nowledged", "."]


def make_app(service_s: float = 0.0) -> Starlette:
    async def chat(request: Request) -> Response:
        body = await request.json()
        if service_s:
            await asyncio.sleep(service_s)
        usage = {"prompt_tokens": 8, "completion_tokens": len(REPLY), "total_tokens": 8 + len(REPLY)}
        if not body.get("stream"):
            return JSONResponse({"id": "x", "object": "chat.completion", "model": "instant",
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": "".join(REPLY)}}],
                                 "usage": usage})

        async def events():
            for i, piece in enumerate(REPLY):
                choice = {"index": 0, "delta": {"content": piece},
                          "finish_reason": "stop" if i == len(REPLY) - 1 else None}
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "instant", "object": "model"}]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                             Route("/v1/models", models), Route("/health", health)])


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="port to listen on")
    parser.add_argument("--service-ms", type=float, default=0.0, help="fixed time per request")
    args = parser.parse_args()
    uvicorn.run(make_app(args.service_ms / 1000), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
