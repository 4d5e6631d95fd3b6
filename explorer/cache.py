"""Analyses kept between requests: least recently used dropped past a memory budget."""
from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

from PIL import Image

from analysis import Analysis

logger = logging.getLogger(__name__)


def image_digest(image: Image.Image) -> str:
    """A content hash of the decoded pixels, so the same picture sent twice hits the cache."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


class AnalysisCache:
    """Thread-safe LRU of analyses whose total size stays under `max_bytes` (the newest one is always kept)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, Analysis] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Analysis | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def get_or_compute(self, key: Hashable, compute: Callable[[], Analysis]) -> Analysis:
        found = self.get(key)
        if found is not None:
            return found
        result = compute()
        with self._lock:
            self._items[key] = result
            self._items.move_to_end(key)
            while len(self._items) > 1 and self.total_bytes > self.max_bytes:
                dropped, _ = self._items.popitem(last=False)
                logger.info("analysis cache over budget: dropped %s", dropped)
        return result

    @property
    def total_bytes(self) -> int:
        return sum(item.nbytes for item in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
