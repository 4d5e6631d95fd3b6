"""What is kept between requests: analyses and decoded images, least recently used dropped past a byte budget.
Concurrent requests for the same key wait for one computation instead of repeating it."""
from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any

from PIL import Image

logger = logging.getLogger(__name__)


def image_digest(image: Image.Image) -> str:
    """A content hash of the decoded pixels, so the same picture sent twice hits the cache."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


class AnalysisCache:
    """Thread-safe LRU of items with an `nbytes` size, kept under `max_bytes` in total.

    The item added last is always kept (even alone over the budget), and pinned items are never dropped (they
    still count). `get_or_compute` runs one computation per key: concurrent callers wait for its result.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._pinned: set[Hashable] = set()
        self._pending: dict[Hashable, Future] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            future = self._pending.get(key)
            owner = future is None
            if owner:
                future = self._pending[key] = Future()
        if not owner:
            return future.result()  # the owner's result, or its exception
        try:
            result = compute()
        except BaseException as err:
            with self._lock:
                del self._pending[key]
            future.set_exception(err)
            raise
        with self._lock:
            self._store(key, result)
            del self._pending[key]
        future.set_result(result)
        return result

    def put(self, key: Hashable, item: Any, pin: bool = False) -> None:
        with self._lock:
            if pin:
                self._pinned.add(key)
            self._store(key, item)

    def drop(self, which: Callable[[Hashable], bool]) -> None:
        """Forgets every item whose key `which` accepts (pinned ones too)."""
        with self._lock:
            for key in [key for key in self._items if which(key)]:
                del self._items[key]
                self._pinned.discard(key)

    def pin(self, key: Hashable) -> None:
        """Keeps `key` whatever the budget (it still counts towards it)."""
        with self._lock:
            self._pinned.add(key)

    def _store(self, key: Hashable, item: Any) -> None:
        self._items[key] = item
        self._items.move_to_end(key)
        for old in [k for k in self._items if k not in self._pinned and k != key]:
            if self.total_bytes <= self.max_bytes:
                break
            del self._items[old]
            logger.info("cache over budget: dropped %s", old)

    @property
    def total_bytes(self) -> int:
        return sum(item.nbytes for item in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._pinned.clear()
