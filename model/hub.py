"""Fetching a checkpoint from the Hugging Face hub: safetensors and JSON files only, cached the usual way.

The hub is asked once, under a hard deadline, before anything is downloaded, so that an offline machine gets
a clear error at once instead of a hang."""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

from .formats import vision_entries
from .loading import CheckpointError

logger = logging.getLogger(__name__)
TIMEOUT_S = 3.0  # for the first question to the hub; downloads themselves may take as long as they need
CONFIG_FILES = ("config.json", "preprocessor_config.json", "open_clip_config.json")
WEIGHT_FILES = ("model.safetensors", "open_clip_model.safetensors")  # the first one present is fetched
INDEX_FILE = "model.safetensors.index.json"
TRUE = ("1", "ON", "YES", "TRUE")


def download(repo_id: str) -> Path:
    """A local folder holding the repo's config files and (vision) safetensors, fetched on first use."""
    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now: huggingface_hub reads it once, at import
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in TRUE:
        return _cached_or_fail(repo_id, "HF_HUB_OFFLINE is set")
    try:
        files = _list_files(repo_id, endpoint)
    except _Unreachable as err:
        return _cached_or_fail(repo_id, str(err))
    names = [f for f in CONFIG_FILES if f in files]
    if INDEX_FILE in files:
        index = Path(_fetch(repo_id, INDEX_FILE, endpoint))
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        names += sorted(set(vision_entries(weight_map).values()))
    else:
        names += [f for f in WEIGHT_FILES if f in files][:1]
    if not any(name.endswith(".safetensors") for name in names):
        raise CheckpointError(f"{repo_id} has no safetensors weights ({', '.join(WEIGHT_FILES)} or an index); "
                              "only safetensors are fetched from the hub")
    folder = Path(_fetch(repo_id, names[-1], endpoint)).parent
    for name in names[:-1]:
        _fetch(repo_id, name, endpoint)
    logger.info("fetched %s: %s", repo_id, ", ".join(names))
    return folder


class _Unreachable(Exception):
    """No answer from the hub (its message says why)."""


def _unreachable(repo_id: str, why: str) -> CheckpointError:
    return CheckpointError(f"The model hub is unreachable ({why}), so {repo_id} cannot be fetched, and there is no "
                           f"local folder {repo_id!r} either. Download it elsewhere (config.json and *.safetensors) "
                           "and give the path of the local folder instead.")


def _list_files(repo_id: str, endpoint: str | None) -> set[str]:
    """The repo's file names; asks the hub with a hard deadline, whatever the HTTP client does with DNS."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(HfApi(endpoint=endpoint).model_info, repo_id, timeout=TIMEOUT_S)
    pool.shutdown(wait=False)
    try:
        info = future.result(timeout=TIMEOUT_S + 1)
    except FutureTimeout:
        raise _Unreachable(f"no answer within {TIMEOUT_S:.0f} s") from None
    except RepositoryNotFoundError as err:
        raise CheckpointError(f"{repo_id} is not on the hub, or is private or gated (log in first)") from err
    except HfHubHTTPError as err:
        raise CheckpointError(f"the hub refused {repo_id}: {err}") from err
    except Exception as err:  # connection errors of whichever HTTP client huggingface_hub uses; offline mode
        raise _Unreachable(f"{type(err).__name__}: {err}") from err
    return {sibling.rfilename for sibling in info.siblings or []}


def _fetch(repo_id: str, name: str, endpoint: str | None) -> str:
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(repo_id, name, endpoint=endpoint, etag_timeout=TIMEOUT_S)
    except Exception as err:  # network, disk or hub errors: all end the same way for the user
        raise CheckpointError(f"fetching {name} of {repo_id} failed ({type(err).__name__}: {err})") from err


def _cached_or_fail(repo_id: str, why: str) -> Path:
    """The cached snapshot of a repo fetched before, or the error that says the hub is unreachable."""
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id, local_files_only=True,
                                      allow_patterns=["*.json", "*.safetensors"]))
    except Exception as err:  # not in the local cache
        raise _unreachable(repo_id, why) from err
