"""A local HTTP server that answers the hub calls model/hub.py makes through the real huggingface_hub client:
model info with file sizes, HEAD and GET (byte ranges too) of `<repo>/resolve/main/<file>`. It records every
request, so tests can say exactly which bytes of which file left the "hub"."""
from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Request:
    method: str
    repo: str
    file: str | None  # None for the model-info call
    byte_range: str | None  # the Range header, when the client sent one


@dataclass
class FakeHub:
    repos: dict[str, Path]  # repo id → the folder whose files it serves
    sizes: bool = True  # whether model info tells file sizes (the hub does when asked, a mirror may not)
    listed: dict[str, int] = field(default_factory=dict)  # sizes model info tells instead of the files' own
    requests: list[Request] = field(default_factory=list)

    def __enter__(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                hub._answer(self, body=True)

            def do_HEAD(self):
                hub._answer(self, body=False)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def fetched(self, suffix: str = "") -> list[str]:
        """The files downloaded whole (GET without a range), in request order."""
        return [r.file for r in self.requests if r.method == "GET" and r.file and r.file.endswith(suffix)
                and r.byte_range is None]

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = handler.path.split("?")[0]
        info = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/main)?", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/main/(.+)", path)
        repo = (info or resolve).group(1) if (info or resolve) else None
        byte_range = handler.headers.get("Range")
        self.requests.append(Request(handler.command, repo, resolve.group(2) if resolve else None, byte_range))
        if repo not in self.repos:
            return self._send(handler, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
        folder = self.repos[repo]
        if info:
            siblings = [{"rfilename": p.name, **({"size": self.listed.get(p.name, p.stat().st_size)} if self.sizes
                                                 else {})} for p in sorted(folder.iterdir())]
            data = json.dumps({"id": repo, "sha": COMMIT, "siblings": siblings}).encode()
            return self._send(handler, 200, data if body else b"", {"Content-Type": "application/json"})
        file = folder / resolve.group(2)
        if not file.is_file():
            return self._send(handler, 404, b"", {"X-Error-Code": "EntryNotFound"})
        data = file.read_bytes()
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hash(data) & 0xFFFFFFFF:08x}"', "Accept-Ranges": "bytes"}
        status = 200
        if byte_range:
            start, end = (int(v) if v else None for v in re.fullmatch(r"bytes=(\d*)-(\d*)", byte_range).groups())
            end = min(end if end is not None else len(data) - 1, len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        self._send(handler, status, data if body else b"", {**headers, "Content-Length": str(len(data))})

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict) -> None:
        handler.send_response(status)
        headers.setdefault("Content-Length", str(len(data)))
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(data)
