"""The hub's download cache (huggingface_hub's, HF_HUB_CACHE) held under a byte budget: least recently used
repositories are deleted to make room, and a repository that could not be used is deleted at once.

A repository is "used" when it is fetched or read from the cache: its folder's time is set then. Repositories
being fetched are never deleted meanwhile. Give a server a cache of its own: every model repository in it counts."""
from __future__ import annotations

import logging
import os
import shutil
import threading
from collections import Counter
from pathlib import Path

logger = logging.getLogger(__name__)
_LOCK = threading.Lock()
_ACTIVE: Counter[str] = Counter()  # repo id → fetches in progress


def cache_dir() -> Path:
    import huggingface_hub.constants
    return Path(huggingface_hub.constants.HF_HUB_CACHE)  # read now, as huggingface_hub itself does at each call


def repo_folder(repo_id: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name
    return cache_dir() / repo_folder_name(repo_id=repo_id, repo_type="model")


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (snapshots are links to blobs: counted once)."""
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                total += os.lstat(path).st_size
    return total


class Fetching:
    """While a repository is fetched: room made for `incoming` bytes first (least recently used repositories
    deleted), the repository kept from deletion meanwhile, the cache brought under `max_bytes` afterwards."""

    def __init__(self, repo_id: str, incoming: int, max_bytes: int | None):
        self.repo_id, self.incoming, self.max_bytes = repo_id, incoming, max_bytes

    def __enter__(self) -> "Fetching":
        with _LOCK:
            _ACTIVE[self.repo_id] += 1
            if self.max_bytes is not None:
                _evict(self.max_bytes - self.incoming)
        return self

    def __exit__(self, *exc) -> None:
        with _LOCK:
            _ACTIVE[self.repo_id] -= 1
            if not _ACTIVE[self.repo_id]:
                del _ACTIVE[self.repo_id]
            touch(self.repo_id)
            if self.max_bytes is not None:
                _evict(self.max_bytes)


def touch(repo_id: str) -> None:
    """Marks a repository as just used."""
    folder = repo_folder(repo_id)
    if folder.is_dir():
        os.utime(folder)


def forget(repo_id: str) -> None:
    """Deletes a repository from the cache (unless it is being fetched meanwhile)."""
    with _LOCK:
        if repo_id not in _ACTIVE:
            _delete(repo_folder(repo_id))


def _evict(budget: int) -> None:
    """Deletes the least recently used repositories not being fetched until the cache holds at most `budget`."""
    root = cache_dir()
    if not root.is_dir():
        return
    active = {repo_folder(repo_id) for repo_id in _ACTIVE}
    repos = sorted((folder.stat().st_mtime, folder_bytes(folder), folder)
                   for folder in root.glob("models--*") if folder.is_dir())
    used = sum(size for _, size, _ in repos)
    for _, size, folder in repos:
        if used <= budget:
            break
        if folder not in active:
            _delete(folder)
            used -= size


def _delete(folder: Path) -> None:
    if folder.is_dir():
        logger.info("deleting %s from the hub cache", folder.name)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(folder.parent / ".locks" / folder.name, ignore_errors=True)
