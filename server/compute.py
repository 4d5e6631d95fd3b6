"""The threads the model runs on in the served app: one per device slot, each with its share of the CPU's intra-op
threads, while every other thread of the app computes on one.

PyTorch's OpenMP runtime on Linux (libgomp) gives each Python thread that starts a parallel operation a team of its
own, and once the process holds more OpenMP threads than CPUs, a waiting thread sleeps after about 100 spins instead
of spinning for about 3 ms, so that each of the forward's parallel regions then waits for a futex wake-up. Gradio
runs events on whichever of its worker threads is free: after a few events, every analysis of the served app ran that
way (about 1,800 sleeps per analysis at 518 px, against about 10 in a process with one team; README, *The first
map*). Here the model's work (the analyses, the model group's events, the API) stays on threads made once, at
start-up, and `confine_torch` leaves every other thread one intra-op thread, so that no other team is ever made.
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

T = TypeVar("T")


class ModelThreads:
    """`slots` threads started at once, each computing on `cpus // slots` intra-op threads (at least one)."""

    def __init__(self, slots: int, cpus: int | None = None):
        self.threads_each = max(1, (cpus or len(os.sched_getaffinity(0))) // slots)
        self._pool = ThreadPoolExecutor(slots, thread_name_prefix="model")
        started = threading.Barrier(slots)  # every slot's thread exists before this returns: none is made later
        for done in [self._pool.submit(self._start, started) for _ in range(slots)]:
            done.result()

    def _start(self, started: threading.Barrier) -> None:
        torch.get_num_threads()  # PyTorch's lazy per-thread set-up first, so it cannot undo the next line later
        torch.set_num_threads(self.threads_each)
        started.wait()

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on a model thread, waited for (start-up work: loading, the arrival example)."""
        return self._pool.submit(fn, *args, **kwargs).result()

    def event(self, fn: Callable) -> Callable:
        """`fn` as a Gradio event that runs on a model thread; Gradio reads `fn`'s signature (progress, request and
        event data are passed as before) and its context (progress bars, warnings) goes along."""
        @functools.wraps(fn)
        async def on_model_thread(*args: Any, **kwargs: Any) -> Any:
            context = contextvars.copy_context()
            return await asyncio.wrap_future(self._pool.submit(context.run, fn, *args, **kwargs))
        return on_model_thread


def confine_torch() -> None:
    """This thread, and every thread started after it without a setting of its own (Gradio's workers), computes on
    one intra-op thread. Call it at start-up, before this thread runs any parallel operation, after `ModelThreads`."""
    torch.set_num_threads(1)
