"""The page script's middleware (server.page_script): the script lands at the top of the page's <head>, with the length
the body now has; every other response passes byte for byte."""
import asyncio

import pytest

from server.page_script import TRACKER_TIMERS, PageScript

PAGE = b'<!doctype html><html><head><script type="module" src="./assets/index.js"></script></head><body></body></html>'


def app_sending(body: bytes, content_type: bytes, chunks: int = 1, extra: list | None = None):
    """An ASGI app that answers every request with `body` in `chunks` parts."""
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                                *(extra or [])]})
        size = -(-len(body) // chunks)
        for i in range(chunks):
            await send({"type": "http.response.body", "body": body[i * size:(i + 1) * size],
                        "more_body": i < chunks - 1})
    return app


def served(app, path: str = "/", method: str = "GET") -> tuple[dict, bytes]:
    """(headers, body) of `app` wrapped in PageScript for one request."""
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    asyncio.run(PageScript(app)({"type": "http", "method": method, "path": path, "headers": []}, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return dict(start["headers"]), b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.mark.parametrize("chunks", [1, 3])
def test_the_script_comes_first_in_the_head_of_the_page(chunks):
    headers, body = served(app_sending(PAGE, b"text/html; charset=utf-8", chunks))
    assert body == PAGE.replace(b"<head>", b"<head>" + TRACKER_TIMERS.encode(), 1)
    assert body.index(b"statustracker") < body.index(b'type="module"')  # before Gradio's modules load
    assert headers[b"content-length"] == str(len(body)).encode()


@pytest.mark.parametrize("path, method, content_type, extra", [
    ("/config", "GET", b"application/json", None),  # another route
    ("/", "HEAD", b"text/html", None),  # no body to insert into
    ("/", "GET", b"application/json", None),  # not a page
    ("/", "GET", b"text/html", [(b"content-encoding", b"gzip")]),  # compressed: left as it is
])
def test_every_other_response_passes_unchanged(path, method, content_type, extra):
    headers, body = served(app_sending(PAGE, content_type, extra=extra), path, method)
    assert body == PAGE and headers[b"content-length"] == str(len(PAGE)).encode()
