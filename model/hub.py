"""Fetching a checkpoint from the Hugging Face hub: safetensors and JSON files only, cached the usual way.

The hub is asked once, under a hard deadline, before anything is downloaded, so that an offline machine gets
a clear error at once instead of a hang. With caps (`HubLimits`), the sizes of the files to fetch (from the same
first question) and the vision tensors' shapes in their safetensors headers (huggingface_hub's HTTP range read of
each file's start) are checked before any weights file is downloaded. Config and index files count against the
download cap and are refused above `HubLimits.max_json_bytes` before they are fetched. With a cache cap, the cache is
kept under it (see `hub_cache`). Messages name the repo id and file names only."""
from __future__ import annotations

import json
import logging
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import CONFIG_FILES, INDEX_FILE, WEIGHT_FILES, CheckpointError
from .formats import tower_keys
from .hub_cache import Fetching, folder_bytes, forget, repo_folder, touch
from .text_formats import text_keys
from .tokenizer import TOKENIZER_FILES

logger = logging.getLogger(__name__)
TIMEOUT_S = 3.0  # for the first question to the hub; downloads themselves may take as long as they need
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SAFETENSORS_FILES = tuple(f for f in WEIGHT_FILES if f.endswith(".safetensors"))  # the first one present is fetched
TRUE = ("1", "ON", "YES", "TRUE")
TEXT_MODEL_TYPES = ("clip", "siglip")  # config.json of CLIPModel and SiglipModel: tokenizer files are fetched


@dataclass(frozen=True)
class HubLimits:
    """Caps on what a hub id may bring in (None: no cap), for a server anyone can call."""

    max_params: int | None = None  # parameters of the vision tower (its tensors only, not a language model's)
    max_download_bytes: int | None = None  # bytes of every file that would be fetched (configs, index and weights)
    max_cache_bytes: int | None = None  # the whole hub cache; least recently used repos deleted, and a repo at once
    # when its conversion fails (see `hub_cache`); None: the cache is left alone
    max_json_bytes: int = 16 * 2**20  # each config or index file, refused before it is fetched when listed larger


def download(repo_id: str, limits: HubLimits = HubLimits()) -> Path:
    """A local folder holding the repo's config files and (vision) safetensors, fetched on first use."""
    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now: huggingface_hub reads it once, at import
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in TRUE:
        return _cached_or_fail(repo_id, "HF_HUB_OFFLINE is set")
    try:
        sizes = _list_files(repo_id, endpoint)
    except _Unreachable as err:
        return _cached_or_fail(repo_id, str(err))
    configs = [f for f in CONFIG_FILES if f in sizes] + ([INDEX_FILE] if INDEX_FILE in sizes else [])
    _check_json(repo_id, limits, {name: sizes.get(name) for name in configs})
    try:
        weights = _vision_weights(repo_id, sizes, endpoint, limits)  # {file: its tower keys, or None: see header}
        if not weights:
            raise CheckpointError(f"{repo_id} has no safetensors weights ({', '.join(SAFETENSORS_FILES)} or "
                                  f"{INDEX_FILE}); only safetensors are fetched from the hub")
        tokenizer = _tokenizer_files(repo_id, sizes, weights, endpoint, limits)
        _check_json(repo_id, limits, {name: sizes.get(name) for name in configs + tokenizer})
        names = configs + tokenizer + sorted(weights)
        _check_limits(repo_id, limits, {name: sizes.get(name) for name in names}, weights, endpoint)
    except CheckpointError:
        release(repo_id, limits)  # its index, fetched for nothing
        raise
    incoming = max(0, sum(sizes.get(name) or 0 for name in names) - folder_bytes(repo_folder(repo_id)))
    with Fetching(repo_id, incoming, limits.max_cache_bytes):
        folder = Path(_fetch(repo_id, names[-1], endpoint)).parent
        for name in names[:-1]:
            _fetch(repo_id, name, endpoint)
    logger.info("fetched %s: %s", repo_id, ", ".join(names))
    return folder


def release(repo_id: str, limits: HubLimits) -> None:
    """Deletes a repository that could not be used from a managed cache (one with a cap), since it never will be."""
    if limits.max_cache_bytes is not None:
        forget(repo_id)


def describe_count(count: int) -> str:
    """2_300_000_000 → "2.3 billion", 86_000_000 → "86 million"."""
    for value, word in ((1e9, "billion"), (1e6, "million"), (1e3, "thousand")):
        if count >= value:
            return f"{count / value:.3g} {word}"
    return str(count)


def describe_bytes(count: int) -> str:
    """7_900_000_000 → "7.9 GB"."""
    for value, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if count >= value:
            return f"{count / value:.3g} {unit}"
    return f"{count} bytes"


def _tokenizer_files(repo_id: str, sizes: dict[str, int | None], weights: dict[str, list | None],
                     endpoint: str | None, limits: HubLimits) -> list[str]:
    """The tokenizer files of an image-text model (its text tower's keys are in the index, or it is an open_clip
    repo, or its config.json names CLIP or SigLIP); none for any other model, a VLM's language model included."""
    listed = [name for name in TOKENIZER_FILES if name in sizes]
    if not listed:
        return []
    if any(keys is not None for keys in weights.values()):  # from the index: the keys are known
        has_text = bool(text_keys([k for keys in weights.values() for k in keys or ()]))
    elif "open_clip_config.json" in sizes:
        has_text = True
    else:
        has_text = _model_type(repo_id, sizes, endpoint, limits) in TEXT_MODEL_TYPES
    return listed if has_text else []


def _model_type(repo_id: str, sizes: dict[str, int | None], endpoint: str | None, limits: HubLimits) -> str | None:
    """config.json's model_type (fetched now: it would be anyway)."""
    if "config.json" not in sizes:
        return None
    with Fetching(repo_id, sizes["config.json"] or 0, limits.max_cache_bytes):
        try:
            config = json.loads(Path(_fetch(repo_id, "config.json", endpoint)).read_text())
        except (json.JSONDecodeError, RecursionError) as err:
            raise CheckpointError(f"{repo_id}: config.json is not valid JSON ({err})") from err
    return config.get("model_type") if isinstance(config, dict) else None


def _vision_weights(repo_id: str, sizes: dict[str, int | None], endpoint: str | None,
                    limits: HubLimits) -> dict[str, list | None]:
    """The safetensors files to fetch: the shards holding the towers' keys (from the index; an image-text model's
    text tower is one), or the one weights file."""
    if INDEX_FILE not in sizes:
        return {name: None for name in [f for f in SAFETENSORS_FILES if f in sizes][:1]}
    try:
        with Fetching(repo_id, sizes[INDEX_FILE] or 0, limits.max_cache_bytes):
            weight_map = json.loads(Path(_fetch(repo_id, INDEX_FILE, endpoint)).read_text())["weight_map"]
    except (json.JSONDecodeError, RecursionError, KeyError, TypeError) as err:
        raise CheckpointError(f"{repo_id}: {INDEX_FILE} is not a valid safetensors index ({err})") from err
    shards: dict[str, list | None] = {}
    for key in tower_keys(weight_map):
        shards.setdefault(weight_map[key], []).append(key)
    return shards


def _check_json(repo_id: str, limits: HubLimits, sizes: dict[str, int | None]) -> None:
    """Refuses, before any is fetched, config and index files listed above `max_json_bytes` (or, with a download
    cap, of unknown size or above it together)."""
    large = [name for name, size in sizes.items() if size is not None and size > limits.max_json_bytes]
    if large:
        raise CheckpointError(f"{repo_id}: {', '.join(large)} is larger than the "
                              f"{describe_bytes(limits.max_json_bytes)} this server accepts for a JSON file.")
    if limits.max_download_bytes is not None:
        _check_bytes(repo_id, limits, sizes, "its configuration files")


def _check_bytes(repo_id: str, limits: HubLimits, sizes: dict[str, int | None], what: str) -> None:
    unknown = [name for name, size in sizes.items() if size is None]
    if unknown:
        raise CheckpointError(f"{repo_id}: the hub did not say how large {', '.join(unknown)} is, so it is not "
                              "fetched on this server, which caps downloads.")
    total = sum(sizes.values())
    if total > limits.max_download_bytes:
        raise CheckpointError(f"{repo_id}: {what} mean downloading {describe_bytes(total)} "
                              f"({', '.join(sorted(sizes))}), more than the "
                              f"{describe_bytes(limits.max_download_bytes)} this server accepts.")


def _check_limits(repo_id: str, limits: HubLimits, sizes: dict[str, int | None], weights: dict[str, list | None],
                  endpoint: str | None) -> None:
    """Refuses, before any weight byte is fetched, a download or a vision tower above the caps."""
    if limits.max_download_bytes is not None:
        _check_bytes(repo_id, limits, sizes, "its vision weights and configuration files")
    if limits.max_cache_bytes is not None and sum(size or 0 for size in sizes.values()) > limits.max_cache_bytes:
        raise CheckpointError(f"{repo_id}: its vision weights are larger than the "
                              f"{describe_bytes(limits.max_cache_bytes)} this server keeps of the hub.")
    if limits.max_params is not None:
        counts = [_header_params(repo_id, name, keys, endpoint) for name, keys in weights.items()]
        params = sum(count for count, _ in counts)
        if params > limits.max_params:
            read = [key for _, keys in counts for key in keys]
            towers = "vision and text towers have" if text_keys(read) else "vision tower has"
            raise CheckpointError(f"{repo_id}: its {towers} {describe_count(params)} parameters, more than "
                                  f"the {describe_count(limits.max_params)} this server accepts.")


def _header_params(repo_id: str, name: str, keys: list | None, endpoint: str | None) -> tuple[int, list[str]]:
    """Parameters of the towers' tensors of one safetensors file, read from its header alone (HTTP range reads),
    and those tensors' names."""
    from huggingface_hub import HfApi
    try:
        tensors = HfApi(endpoint=endpoint).parse_safetensors_file_metadata(repo_id, name, timeout=TIMEOUT_S).tensors
    except Exception as err:  # network, hub or parsing errors: without the count, the cap cannot be checked
        logger.warning("reading the safetensors header of %s of %s failed: %r", name, repo_id, err)
        raise CheckpointError(f"{repo_id}: the header of {name} could not be read ({_reason(err)}), so its size "
                              "cannot be checked against this server's caps.") from err
    keys = keys if keys is not None else tower_keys(list(tensors))
    return sum(math.prod(tensors[k].shape) for k in keys), keys


class _Unreachable(Exception):
    """No answer from the hub (its message says why)."""


def _unreachable(repo_id: str, why: str) -> CheckpointError:
    return CheckpointError(f"The model hub is unreachable ({why}), so {repo_id} cannot be fetched, and there is no "
                           f"local folder {repo_id!r} either. Download it elsewhere (config.json and *.safetensors) "
                           "and give the path of the local folder instead.")


def _list_files(repo_id: str, endpoint: str | None) -> dict[str, int | None]:
    """The repo's file names and sizes; asks the hub with a hard deadline, whatever the HTTP client does with DNS."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(HfApi(endpoint=endpoint).model_info, repo_id, timeout=TIMEOUT_S, files_metadata=True)
    pool.shutdown(wait=False)
    try:
        info = future.result(timeout=TIMEOUT_S + 1)
    except FutureTimeout:
        raise _Unreachable(f"no answer within {TIMEOUT_S:.0f} s") from None
    except RepositoryNotFoundError as err:
        raise CheckpointError(f"{repo_id} is not on the hub, or is private or gated (log in first)") from err
    except HfHubHTTPError as err:
        raise CheckpointError(f"the hub refused {repo_id} ({_reason(err)})") from err
    except Exception as err:  # connection errors of whichever HTTP client huggingface_hub uses; offline mode
        raise _Unreachable(f"{type(err).__name__}: {err}") from err
    return {sibling.rfilename: sibling.size for sibling in info.siblings or []}


def _fetch(repo_id: str, name: str, endpoint: str | None) -> str:
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(repo_id, name, endpoint=endpoint, etag_timeout=TIMEOUT_S)
    except Exception as err:  # network, disk or hub errors: all end the same way for the user
        logger.warning("fetching %s of %s failed: %r", name, repo_id, err)
        raise CheckpointError(f"fetching {name} of {repo_id} failed ({_reason(err)})") from err


def _reason(err: Exception) -> str:
    """What went wrong, without the local paths (cache, temp files) that error texts may carry."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status is not None:
        return f"HTTP {status}"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return type(err).__name__


def _cached_or_fail(repo_id: str, why: str) -> Path:
    """The cached snapshot of a repo fetched before, or the error that says the hub is unreachable."""
    from huggingface_hub import snapshot_download
    try:
        patterns = ["*.json", "*.safetensors", "spiece.model"]
        folder = Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns))
    except Exception as err:  # not in the local cache
        raise _unreachable(repo_id, why) from err
    touch(repo_id)
    return folder
