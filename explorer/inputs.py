"""Checks on every field a request sends. Page events and API endpoints both arrive as raw JSON that anyone can
forge, so each value is checked here, once, and refused with a message that names the field and what it allows."""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

FILE_META = {"_type": "gradio.FileData"}
SHOWN_CHARS = 40  # a refused value is quoted in the message up to this length
MAX_PATH_CHARS = 1024  # longer paths are refused before any normalisation (realpath's work grows with the length)


class UserError(ValueError):
    """A request the app refuses; the message is meant for the person who sent it."""


def shown(value: Any) -> str:
    """A short, safe rendering of a refused value for a message."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 1] + "…"


def plain_path(path: Any) -> bool:
    """Whether `path` is text a file system takes, short enough to normalise at once: at most MAX_PATH_CHARS
    characters, no NUL byte, no lone surrogate."""
    if not isinstance(path, str) or not 0 < len(path) <= MAX_PATH_CHARS or "\0" in path:
        return False
    try:
        path.encode()
    except UnicodeEncodeError:
        return False
    return True


def uploaded_file(value: Any, name: str, roots: Iterable[Path]) -> Path:
    """The path of a file that arrived through Gradio's upload handling (or one of our own examples).

    Accepts only Gradio's file object ({"path": ..., "meta": {"_type": "gradio.FileData"}}) whose real path lies
    under one of `roots`. The refusal is the same whether or not the path exists, so it tells nothing about the
    server's files.
    """
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    path = value.get("path") if isinstance(value, dict) else None
    if not isinstance(value, dict) or value.get("meta") != FILE_META or not plain_path(path):
        raise UserError(f"{name}: send an image file as an upload (gradio_client: handle_file(...)); paths, URLs "
                        "and other references are not accepted.")
    real = Path(os.path.realpath(path))
    if not any(real.is_relative_to(root) for root in roots) or not real.is_file():
        raise UserError(f"{name}: this file was not uploaded to this server (or has expired): upload it again.")
    return real


def number(value: Any, name: str, low: float, high: float, *, whole: bool = False) -> float:
    """A finite number in [low, high] (an int when `whole`); numeric strings are accepted."""
    kind = "a whole number" if whole else "a number"
    refused = UserError(f"{name} must be {kind} from {low:g} to {high:g}, got {shown(value)}.")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise refused from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise refused
    if whole and value != int(value) or not low <= value <= high:
        raise refused
    return int(value) if whole else float(value)


def whole(value: Any, name: str, low: int, high: int) -> int:
    return int(number(value, name, low, high, whole=True))


def choice(value: Any, name: str, options: Sequence[str]) -> str:
    """One of `options`, exactly."""
    if not isinstance(value, str) or value not in options:
        raise UserError(f"{name} must be one of {', '.join(options)}; got {shown(value)}.")
    return value


def flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{name} must be true or false, got {shown(value)}.")
    return value


def text(value: Any, name: str, max_chars: int = 200) -> str:
    """A short string, stripped; None counts as empty."""
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > max_chars:
        raise UserError(f"{name} must be text of at most {max_chars} characters, got {shown(value)}.")
    return value.strip()


def layer_index(value: Any, num_layers: int) -> int:
    """A layer index; negative values count from the end (-1 is the last layer)."""
    layer = whole(value, "layer", -num_layers, num_layers - 1)
    return layer + num_layers if layer < 0 else layer


def head_choice(value: Any, num_heads: int, fusions: Sequence[str]) -> "int | str":
    """A head index (an int or its digits) or the name of a fusion of heads."""
    if isinstance(value, str) and value.strip().lower() in fusions:
        return value.strip().lower()
    allowed = f"one of {', '.join(fusions)} or a head index from 0 to {num_heads - 1}"
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_heads:
        raise UserError(f"head must be {allowed}, got {shown(value)}.")
    return value
