"""Launching the app on 127.0.0.1 for the client and browser tests, and a raw HTTP client that speaks Gradio's
protocol by hand, as anyone on the internet can: any event by its fn_index, any JSON."""
from __future__ import annotations

import json
import socket
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from model import LoadedModel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served_app(loaded: LoadedModel | None = None, **build):
    """Yields the URL of the app (the embedded default model unless `loaded` is given)."""
    import app
    workspace = build.pop("workspace", None) or app.workspace_for(loaded, "cpu")
    demo = app.build_demo(workspace=workspace, **build)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **app.launch_options(demo, workspace))
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def refusal(detail: "str | list") -> str:
    """The message of a refused join: a plain detail, or the messages of Gradio's validation errors (422)."""
    return detail if isinstance(detail, str) else " ".join(item["message"] for item in detail)


@dataclass
class Result:
    status: int  # of the join request
    success: bool = False
    data: list | None = None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    progress: list[dict] = field(default_factory=list)  # the progress messages, as sent


class RawClient:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.http = httpx.Client(timeout=120)
        self.config = self.http.get(f"{self.url}/config").json()

    def fn_index(self, api_name: str) -> int:
        """The index of the event Gradio named `api_name` (private events are named after their function)."""
        return next(d["id"] for d in self.config["dependencies"] if d.get("api_name") == api_name)

    def upload(self, path: "str | Path", name: str | None = None) -> dict:
        """The file object that Gradio's own upload gives a client (with its meta)."""
        with open(path, "rb") as handle:
            answer = self.http.post(f"{self.url}/gradio_api/upload", files={"files": (name or Path(path).name, handle)})
        answer.raise_for_status()
        return {"path": answer.json()[0], "orig_name": name or Path(path).name,
                "meta": {"_type": "gradio.FileData"}}

    def call(self, event: "str | int", data: list, event_data: Any = None, body: bytes | None = None,
             session: str | None = None) -> Result:
        """Joins the queue for `event` (an api_name or fn_index) and reads the stream to the end; calls in one
        `session` share the page's state, as a visitor's events do."""
        session = session or uuid.uuid4().hex
        fn_index = event if isinstance(event, int) else self.fn_index(event)
        payload = body or json.dumps({"data": data, "fn_index": fn_index, "session_hash": session,
                                      "event_data": event_data, "trigger_id": None}).encode()
        joined = self.http.post(f"{self.url}/gradio_api/queue/join", content=payload,
                                headers={"content-type": "application/json"})
        if joined.status_code != 200:
            return Result(joined.status_code, error=refusal(joined.json().get("detail")))
        if body is not None:
            session = json.loads(body)["session_hash"]
        result = Result(200)
        with self.http.stream("GET", f"{self.url}/gradio_api/queue/data", params={"session_hash": session}) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[5:])
                if message.get("msg") == "progress":
                    result.progress.append(message)
                if message.get("msg") == "log" and message.get("level") == "warning":
                    result.warnings.append(message.get("log", ""))
                if message.get("msg") == "process_completed":
                    output = message.get("output") or {}
                    result.success, result.data = bool(message.get("success")), output.get("data")
                    result.error = output.get("error")
                    return result
        return result
