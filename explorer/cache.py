"""The one cache of the process: whatever is kept between requests (models, decoded images, analyses, rebuilt
layers), least recently used dropped past a byte budget, one computation for concurrent requests of one key."""
from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from PIL import Image

logger = logging.getLogger(__name__)
Key = tuple  # (kind, ...): the kind ("model", "scene", "analysis", "layer") is the first element


def image_digest(image: Image.Image) -> str:
    """A content hash of the decoded pixels, so the same picture sent twice hits the cache."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


class ByteCache:
    """Thread-safe LRU of items with an `nbytes` size, kept under `max_bytes` in total.

    The item stored last is always kept (even alone over the budget), and pinned items are never dropped (they
    still count). `kind_limits` caps one kind of item on its own ({"layer": bytes}). `get_or_compute` runs one
    computation per key: concurrent callers wait for its result. `on_evict(key)` is told of every item dropped
    for the budget. Dropped items are released outside the lock: their finalizers may call back into the cache.
    """

    def __init__(self, max_bytes: int, kind_limits: dict[str, int] | None = None,
                 on_evict: Callable[[Key], None] | None = None):
        self.max_bytes = max_bytes
        self.kind_limits = dict(kind_limits or {})
        self.on_evict = on_evict
        self._items: OrderedDict[Key, Any] = OrderedDict()
        self._pinned: set[Key] = set()
        self._pending: dict[Key, Future] = {}
        self._lock = threading.Lock()

    def get(self, key: Key) -> Any | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def get_or_compute(self, key: Key, compute: Callable[[], Any], pin: bool = False) -> Any:
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
        self.put(key, result, pin)
        with self._lock:
            del self._pending[key]
        future.set_result(result)
        return result

    def put(self, key: Key, item: Any, pin: bool = False) -> None:
        with self._lock:
            if pin:
                self._pinned.add(key)
            self._items[key] = item
            self._items.move_to_end(key)
            evicted = self._evict(key)
            released = [self._items.pop(old) for old in evicted]
        del released
        for old in evicted:
            logger.info("cache over budget: dropped %s", old[:2])
            if self.on_evict is not None:
                self.on_evict(old)

    def drop(self, which: Callable[[Key], bool]) -> None:
        """Forgets every item whose key `which` accepts (pinned ones too)."""
        with self._lock:
            released = [self._items.pop(key) for key in [key for key in self._items if which(key)]]
            self._pinned -= {key for key in self._pinned if which(key)}
        del released

    def pin(self, key: Key) -> None:
        """Keeps `key` whatever the budget (it still counts towards it)."""
        with self._lock:
            self._pinned.add(key)

    def _evict(self, newest: Key) -> list[Key]:
        """The least recently used keys (never `newest` nor a pinned one) to drop for the budgets to hold."""
        evicted: list[Key] = []
        limit = self.kind_limits.get(newest[0])
        if limit is not None:
            evicted += self._oldest(newest, limit, lambda key: key[0] == newest[0], evicted)
        return evicted + self._oldest(newest, self.max_bytes, lambda key: True, evicted)

    def _oldest(self, newest: Key, limit: int, counted: Callable[[Key], bool], gone: list[Key]) -> list[Key]:
        kept = [(key, item.nbytes) for key, item in self._items.items() if counted(key) and key not in gone]
        total = sum(size for _, size in kept)
        dropped = []
        for key, size in kept:
            if total <= limit:
                break
            if key not in self._pinned and key != newest:
                total -= size
                dropped.append(key)
        return dropped

    def bytes_of(self, kind: str | None = None) -> int:
        """Bytes held, of one kind or in all."""
        with self._lock:
            return sum(item.nbytes for key, item in self._items.items() if kind is None or key[0] == kind)

    def keys(self, kind: str | None = None) -> list[Key]:
        with self._lock:
            return [key for key in self._items if kind is None or key[0] == kind]

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        """Forgets everything but the pinned items."""
        with self._lock:
            released = [self._items.pop(key) for key in [key for key in self._items if key not in self._pinned]]
        del released
