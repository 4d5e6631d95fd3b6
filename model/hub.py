"""Fetching a checkpoint from the Hugging Face hub: safetensors and JSON files only, cached the usual way."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .loading import CheckpointError

logger = logging.getLogger(__name__)
TIMEOUT_S = 10.0
WANTED = ("config.json", "preprocessor_config.json", "model.safetensors", "open_clip_model.safetensors")
INDEX = "model.safetensors.index.json"
VISION_PREFIXES = ("model.vision_model.", "vision_model.", "visual.")


def _unreachable(repo_id: str, why: str) -> CheckpointError:
    return CheckpointError(f"The model hub is unreachable ({why}), so {repo_id} cannot be fetched. Download it "
                           "elsewhere (its config.json and *.safetensors files) and give the local folder instead.")


def download(repo_id: str) -> Path:
    """A local folder holding the repo's config files and (vision) safetensors, fetched on first use."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        cached = _cached(repo_id)
        if cached is not None:
            return cached
        raise _unreachable(repo_id, "HF_HUB_OFFLINE is set and the model is not in the local cache")
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
    try:
        files = {s.rfilename for s in HfApi().model_info(repo_id, timeout=TIMEOUT_S).siblings or []}
    except RepositoryNotFoundError as err:
        raise CheckpointError(f"{repo_id} does not exist on the hub (or is private)") from err
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise _unreachable(repo_id, type(err).__name__) from err
    except Exception as err:  # connection errors of whichever HTTP client huggingface_hub uses
        raise _unreachable(repo_id, f"{type(err).__name__}: {err}") from err
    wanted = [f for f in WANTED if f in files]
    if INDEX in files:
        index_path = Path(hf_hub_download(repo_id, INDEX))
        weight_map = json.loads(index_path.read_text())["weight_map"]
        wanted += [INDEX, *sorted({s for k, s in weight_map.items() if k.startswith(VISION_PREFIXES)})]
    if not any(f.endswith(".safetensors") for f in wanted):
        raise CheckpointError(f"{repo_id} has no safetensors weights; only safetensors are fetched from the hub")
    paths = [Path(hf_hub_download(repo_id, name)) for name in wanted]
    logger.info("fetched %s: %s", repo_id, ", ".join(wanted))
    return paths[0].parent


def _cached(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))
    except Exception:  # not in the cache
        return None
