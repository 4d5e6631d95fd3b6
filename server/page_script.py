"""A script the page runs before any of Gradio's own, inserted into the page's HTML as it is served.

Gradio 6.31's status trackers time a pending event with a `requestAnimationFrame` loop that only stops when the
tracker sees the event end. The page's loading screen has such a tracker and is removed while its status is still
pending, so its loop never stops: every Gradio page asks for an animation frame 60 times a second for as long as it is
open, idle or not, and each frame wakes the browser's main, compositor and display threads. The trackers capture
`requestAnimationFrame` when their module loads, so only a script that runs before Gradio's modules can reach them;
Gradio's own `head` is added by its page script, too late. `TRACKER_TIMERS` runs the trackers' timer callbacks on a
100 ms timer instead (the timer shows tenths of a second, so what it shows is unchanged): a timer callback that
changes nothing draws no frame. Every other caller keeps the browser's own animation frames.
"""
from __future__ import annotations

TRACKER_TIMER_MS = 100
TRACKER_TIMERS = f"""<script>(() => {{
  const request = window.requestAnimationFrame.bind(window), cancel = window.cancelAnimationFrame.bind(window);
  const timers = new Set();
  window.requestAnimationFrame = (callback) => {{
    const caller = (new Error().stack || "").split("\\n")[2] || "";
    if (!/statustracker[^/]*\\.js/.test(caller)) return request(callback);
    const id = setTimeout(() => {{ timers.delete(id); callback(performance.now()); }}, {TRACKER_TIMER_MS});
    timers.add(id);
    return id;
  }};
  window.cancelAnimationFrame = (id) => timers.delete(id) ? clearTimeout(id) : cancel(id);
}})();</script>"""


class PageScript:
    """ASGI middleware: inserts `script` at the top of the <head> of the page's HTML (GET /), before Gradio's own
    scripts; every other response passes as it is."""

    def __init__(self, app, script: str = TRACKER_TIMERS):
        self.app = app
        self.script = script.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "GET" or scope.get("path") != "/":
            return await self.app(scope, receive, send)
        start, body = None, []

        async def inserting(message):
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body" or start is None:
                return await send(message)
            body.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            headers, page = list(start.get("headers", [])), b"".join(body)
            named = {key.lower(): value for key, value in headers}
            if named.get(b"content-type", b"").startswith(b"text/html") and b"content-encoding" not in named:
                page = page.replace(b"<head>", b"<head>" + self.script, 1)
                headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(page)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": page})

        await self.app(scope, receive, inserting)
