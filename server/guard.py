"""HTTP-level protections in front of Gradio's routes, for what no event handler gets to see first.

- Event requests (JSON posted to /gradio_api/...) are refused above MAX_JSON_BYTES, or nested too deeply to parse.
- A file object naming a URL, or a path outside the upload folders, is refused: Gradio would download the URL, or
  answer with an empty error, before any handler could say no. The work is bounded: at most MAX_FILE_OBJECTS file
  objects per request, each path at most `inputs.MAX_PATH_CHARS` characters, checked before it is normalised.
  On /queue/join these refusals are a validation error (422), which gradio_client and the page show as they are.
- An event's data must have as many values as the event has inputs; an example's index must name an example; a
  select event must say what was selected. Gradio would otherwise fail inside and answer with an empty error.
- An upload must say its length and fit in the managed folder (the least recently used files make room first);
  otherwise it is refused before a byte is written.
- A full queue answers with a plain "busy" message instead of Gradio's internal counts.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from explorer.inputs import MAX_PATH_CHARS, plain_path

from .files import FileStore

MAX_JSON_BYTES = 1 << 20
MAX_FILE_OBJECTS = 8  # an event takes one image; each path costs up to ~2 ms of realpath
API_PREFIX = "/gradio_api/"
UPLOAD = "/gradio_api/upload"  # multipart uploads: Gradio applies max_file_size to them, we the folder's room
BUSY = "The server is busy with other analyses: try again in a minute."
REMOTE = "Files must be uploaded: URLs are not fetched by this server."
FOREIGN = "Files must be uploaded to this server (gradio_client: handle_file(...)); other paths are not accepted."
NOT_A_FILE = ("Send the image as an upload (gradio_client: handle_file(...)); paths, URLs and other references are "
              "not accepted.")
BAD_PATH = (f"A file's path must be text of at most {MAX_PATH_CHARS} characters without NUL bytes, as Gradio's "
            "upload gives it (gradio_client: handle_file(...)).")
TOO_MANY_FILES = f"A request may name at most {MAX_FILE_OBJECTS} files."
TOO_DEEP = "The request is nested too deeply to be read."
NO_LENGTH = "An upload must say its length (Content-Length)."
FOLDER_FULL = "The server has no room for uploads right now: try again in a few minutes."
NO_SUCH_EXAMPLE = "There is no such example."
NO_SELECTION = "A select event must say what was selected (its index and value)."


@dataclass(frozen=True)
class EventShape:
    """What an event's request must hold: `values` data items; an example index below `examples` as its first
    value (an examples gallery's click); a selection in its event data (a select event)."""

    values: int
    examples: int | None = None
    select: bool = False

    def refused(self, request: Any) -> str | None:
        data, event_data = request.get("data"), request.get("event_data")
        if not isinstance(data, list) or len(data) != self.values:
            got = len(data) if isinstance(data, list) else "no list"
            return f"This event takes {self.values} value{'s' * (self.values != 1)}; got {got}."
        if self.examples is not None:
            index = data[0]
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.examples:
                return NO_SUCH_EXAMPLE
        if self.select and not (isinstance(event_data, dict) and {"index", "value"} <= set(event_data)):
            return NO_SELECTION
        return None


class RequestGuard:
    """ASGI middleware; add it with FastAPI's `middleware=[Middleware(RequestGuard, roots=[...])]`.

    Args:
        roots: the folders a file object may name (the upload folder, the examples).
        file_inputs: {fn_index: positions of its inputs that take a file}; anything but a file object (or null)
            there is refused, before the component's own validation would answer with an empty error.
        shapes: {fn_index: what its requests must hold}.
        files: the managed folder uploads go to; None: uploads are not admitted here.
    """

    def __init__(self, app, roots: Iterable["str | Path"], file_inputs: dict[int, list[int]] | None = None,
                 shapes: dict[int, EventShape] | None = None, files: FileStore | None = None,
                 max_json_bytes: int = MAX_JSON_BYTES):
        self.app = app
        self.roots = tuple(Path(os.path.realpath(root)) for root in roots)
        self.file_inputs = file_inputs or {}
        self.shapes = shapes or {}
        self.files = files
        self.max_json_bytes = max_json_bytes

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or scope.get("method") != "POST" or not path.startswith(API_PREFIX):
            return await self.app(scope, receive, send)
        if path.startswith(UPLOAD):
            return await self.upload(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_json_bytes:
                return await reply(send, 413, "The request is too large.")
        try:
            request, files = parsed(body)
        except RecursionError:
            return await reply(send, 400, TOO_DEEP)
        refused = refused_file(files, self.roots) or self.misplaced(request) or self.malformed(request)
        if refused:
            return await (refuse_input(send, refused) if path.endswith("/queue/join") else reply(send, 400, refused))
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, busy_message(send) if path.endswith("/queue/join") else send)

    async def upload(self, scope, receive, send) -> None:
        """Admits an upload into the managed folder before Gradio writes it (off the event loop: a sweep walks the
        folder)."""
        if self.files is None:
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if not length.isdigit():
            return await reply(send, 411, NO_LENGTH)
        if not await anyio.to_thread.run_sync(self.files.admit, int(length)):
            return await reply(send, 507, FOLDER_FULL)
        await self.app(scope, receive, send)

    def malformed(self, request: Any) -> str | None:
        """Why an event's request does not have the shape of the event, if it does not."""
        index = request.get("fn_index") if isinstance(request, dict) else None
        if not isinstance(index, int) or index not in self.shapes:
            return None  # not an event request, or one Gradio checks itself
        return self.shapes[index].refused(request)

    def misplaced(self, request: Any) -> str | None:
        """NOT_A_FILE when an event's file input holds something other than a file object."""
        try:
            positions = self.file_inputs.get(request.get("fn_index"), [])
            data = request.get("data") or []
        except (AttributeError, TypeError):
            return None  # not an event request: Gradio answers it itself
        misplaced = [p for p in positions if p < len(data) and data[p] is not None and not isinstance(data[p], dict)]
        return NOT_A_FILE if misplaced else None


def parsed(body: bytes) -> tuple[Any, list[dict]]:
    """The JSON of a body (None if it is not JSON: Gradio refuses it itself) and its objects that have a "path".

    Raises RecursionError when it is nested too deeply to parse."""
    files: list[dict] = []

    def collect(item: dict) -> dict:
        if "path" in item:
            files.append(item)
        return item
    try:
        return json.loads(body or b"null", object_hook=collect), files
    except ValueError:
        return None, []


def refused_file(files: list[dict], roots: tuple[Path, ...]) -> str | None:
    """Why these file objects are refused: too many, a path that is not plain text, a URL, or a path outside
    `roots`."""
    if len(files) > MAX_FILE_OBJECTS:
        return TOO_MANY_FILES
    for item in files:
        target = item["path"]
        if target is None:
            continue
        if not plain_path(target):
            return BAD_PATH
        if target.strip().lower().startswith(("http:", "https:", "//")):
            return REMOTE
        real = Path(os.path.realpath(target))
        if not any(real.is_relative_to(root) for root in roots):
            return FOREIGN
    return None


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


async def refuse_input(send, message: str) -> None:
    """A 422 in the form of Gradio's own validation errors, whose message gradio_client and the page show."""
    await reply(send, 422, [{"__type__": "validate", "is_valid": False, "parameter_name": "image", "message": message}])


async def reply(send, status: int, detail: "str | list") -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
