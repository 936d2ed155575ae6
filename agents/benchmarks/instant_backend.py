"""A minimal OpenAI-compatible backend that answers at once, for measuring what the multiplexer
itself costs. It can also wait a fixed service time first, or pace its tokens the way a decoding
model streams them. A benchmark fixture, not a model server."""
from __future__ import annotations

import argparse
import asyncio
import json

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

REPLY = ["Ack", "nowledged", "."]


def reply_pieces(tokens: int) -> list[str]:
    return REPLY if tokens <= len(REPLY) else [*REPLY[:-1], *([" ok"] * (tokens - len(REPLY))), "."]


def make_app(service_s: float = 0.0, tokens: int = len(REPLY), token_interval_s: float = 0.0) -> Starlette:
    pieces = reply_pieces(tokens)

    async def chat(request: Request) -> Response:
        body = await request.json()
        if service_s:
            await asyncio.sleep(service_s)
        # Usage as a real server would count it, about four characters a token, so that the
        # multiplexer's estimates meet realistic corrections.
        prompt = max(1, sum(len(m.get("content") or "") for m in body.get("messages", [])) // 4)
        usage = {"prompt_tokens": prompt, "completion_tokens": len(pieces),
                 "total_tokens": prompt + len(pieces)}
        if not body.get("stream"):
            return JSONResponse({"id": "x", "object": "chat.completion", "model": "instant",
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": "".join(pieces)}}],
                                 "usage": usage})

        async def events():
            for i, piece in enumerate(pieces):
                if i and token_interval_s:
                    await asyncio.sleep(token_interval_s)
                choice = {"index": 0, "delta": {"content": piece},
                          "finish_reason": "stop" if i == len(pieces) - 1 else None}
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
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="port to listen on")
    parser.add_argument("--service-ms", type=float, default=0.0, help="fixed time before the reply")
    parser.add_argument("--tokens", type=int, default=len(REPLY), help="tokens in each reply")
    parser.add_argument("--token-interval-ms", type=float, default=0.0,
                        help="time between streamed tokens (0: all at once)")
    args = parser.parse_args()
    app = make_app(args.service_ms / 1000, args.tokens, args.token_interval_ms / 1000)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
