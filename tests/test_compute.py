"""The model's threads of the served app (server.compute): their intra-op threads, every other thread's, and events
run on them as Gradio calls them."""
import asyncio
import contextvars
import inspect
import subprocess
import sys
import threading
from pathlib import Path

import gradio as gr
import pytest

from server.compute import ModelThreads

ROOT = Path(__file__).resolve().parents[1]
# In a fresh process, as app.py starts: the model's threads first, then every other thread confined to one.
CHILD = """
import threading, torch
from server.compute import ModelThreads, confine_torch
threads = ModelThreads(1, cpus=2)
confine_torch()
seen = {}
def other():
    torch.ones(512, 512) @ torch.ones(512, 512)
    seen["other"] = torch.get_num_threads()
t = threading.Thread(target=other); t.start(); t.join()
print(threads.run(torch.get_num_threads), torch.get_num_threads(), seen["other"])
"""


@pytest.mark.slow
def test_model_thread_computes_on_every_cpu_and_no_other_thread_does():
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "1", "1"]  # model thread, main thread, a thread started later (Gradio's)


def test_slots_share_the_cpus():
    assert ModelThreads(2, cpus=2).threads_each == 1
    assert ModelThreads(2, cpus=8).threads_each == 4
    assert ModelThreads(3, cpus=2).threads_each == 1


LABEL = contextvars.ContextVar("label", default=None)


def test_event_runs_on_a_model_thread_with_its_context_and_signature():
    threads = ModelThreads(1)

    def handler(view: str, progress: gr.Progress = gr.Progress()) -> tuple:
        if view == "bad":
            raise gr.Error("refused")
        return threading.current_thread().name, LABEL.get(), view

    event = threads.event(handler)
    assert inspect.iscoroutinefunction(event)  # Gradio awaits it on its loop: no worker thread of its own
    assert list(inspect.signature(event).parameters) == ["view", "progress"]  # what Gradio injects, as before
    assert event.__name__ == "handler"  # private events are named after it (the tests' fn_index)

    async def call(view: str):
        LABEL.set("the event's")  # as Gradio sets its event's context (progress bars, warnings)
        return await event(view)

    name, label, view = asyncio.run(call("v"))
    assert name.startswith("model") and label == "the event's" and view == "v"
    with pytest.raises(gr.Error, match="refused"):
        asyncio.run(call("bad"))
