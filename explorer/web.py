"""HTTP-level protections in front of Gradio's routes, for what no event handler gets to see first.

- Event requests (JSON posted to /gradio_api/...) are refused above MAX_JSON_BYTES.
- A file object naming a URL is refused: Gradio would download it before any handler could say no.
- A full queue answers with a plain "busy" message instead of Gradio's internal counts.
"""
from __future__ import annotations

import json
from typing import Any

MAX_JSON_BYTES = 1 << 20
API_PREFIX = "/gradio_api/"
UNCHECKED = ("/gradio_api/upload",)  # multipart uploads: Gradio applies max_file_size to them
BUSY = "The server is busy with other analyses: try again in a minute."
REMOTE = "Files must be uploaded: URLs are not fetched by this server."


class RequestGuard:
    """ASGI middleware; add it with FastAPI's `middleware=[Middleware(RequestGuard)]`."""

    def __init__(self, app, max_json_bytes: int = MAX_JSON_BYTES):
        self.app = app
        self.max_json_bytes = max_json_bytes

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or scope.get("method") != "POST" or not path.startswith(API_PREFIX) \
                or path.startswith(UNCHECKED):
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_json_bytes:
                return await reply(send, 413, "The request is too large.")
        if names_remote_file(body):
            return await reply(send, 400, REMOTE)
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, busy_message(send) if path.endswith("/queue/join") else send)


def names_remote_file(body: bytes) -> bool:
    """Whether a JSON body holds, anywhere, an object whose "path" is an http(s) URL."""
    try:
        data = json.loads(body or b"null")
    except ValueError:
        return False  # not JSON: Gradio refuses it itself
    stack: list[Any] = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            target = item.get("path")
            if isinstance(target, str) and target.strip().lower().startswith(("http://", "https://", "//")):
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def busy_message(send):
    """A `send` that replaces the body of a 503 (Gradio's "queue is full") with BUSY."""
    state = {"busy": False}

    async def wrapped(message):
        if message["type"] == "http.response.start" and message["status"] == 503:
            state["busy"] = True
            body = json.dumps({"detail": BUSY}).encode()
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"content-length"]
            await send({**message, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        if state["busy"]:
            return  # the original body is dropped
        await send(message)
    return wrapped


async def reply(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
