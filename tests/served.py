"""Launching the app on 127.0.0.1 for the client and browser tests."""
from __future__ import annotations

import socket
from contextlib import contextmanager

from model import LoadedModel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served_app(loaded: LoadedModel | None = None):
    """Yields the URL of the app (the embedded default model unless `loaded` is given)."""
    import app
    demo = app.build_demo(loaded, device="cpu")
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **app.launch_options())
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()
