"""Freed heap memory handed back to the operating system (glibc's malloc_trim).

A forward's layers, and the sweeps over them (statistics, rollout, relevance), free their short-lived buffers as they
go. Handed back after every layer, the next layer faults the same pages in again (and the trim itself walks the
heap); left resident, the next layer reuses them, but the process then holds more at its peak. Each hands its
working memory back after every layer only where a layer's is large (`trims_between_layers`); the analysis's forward
otherwise once, at the end.
"""
from __future__ import annotations

import ctypes
import ctypes.util


def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)  # glibc only: musl and macOS have none


_MALLOC_TRIM = _malloc_trim()
# Above this many bytes of one layer's MLP activations (tokens × MLP width), a sweep trims after every layer: the
# default model at 1022 px (32 MB) does, at 518 px (8 MB) it does not. At 518 px that took the analysis with its
# statistics from 1.21 to 1.12 s and one more relevance sweep from 4.16 to 2.82 s, their peaks from 92 to 89 MB and
# from 94 to 102 MB (benchmarks/bench_analysis.py and bench_relevance.py, the code before and after, one after the
# other). At 1022 px a version that never trimmed peaked at 308 MB with rollout (bench_analysis.py's (c)), 28.4×
# below eager attention, short of the README's 30× target.
TRIM_LAYERS_ABOVE_BYTES = 16 << 20


def release_free_memory() -> None:
    """Returns the free pages of every malloc arena to the system, where glibc allows it; otherwise nothing."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def trims_between_layers(tokens: int, mlp_width: int, element_size: int) -> bool:
    """Whether a forward over `tokens` hands its freed memory back after every layer (see TRIM_LAYERS_ABOVE_BYTES)."""
    return tokens * mlp_width * element_size > TRIM_LAYERS_ABOVE_BYTES
