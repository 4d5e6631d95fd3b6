"""Recently rebuilt layers' queries and keys, shared by every analysis of the process under one byte budget."""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .record import LayerAttention

REBUILD_CACHE_BYTES = int(os.environ.get("VIT_INSPECT_REBUILD_CACHE_MB", "96")) * 2**20


class LayerCache:
    """Thread-safe LRU keyed by (record serial, layer), at most `max_bytes` in all (or the newest entry alone
    when a single layer is larger), so cached analyses cannot each pin rebuilt layers."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[int, int], LayerAttention] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int]) -> LayerAttention | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key: tuple[int, int], value: LayerAttention) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > 1 and self._total() > self.max_bytes:
                self._items.popitem(last=False)

    def drop_owner(self, owner: int) -> None:
        """Forgets every layer of a record that no longer exists."""
        with self._lock:
            for key in [key for key in self._items if key[0] == owner]:
                del self._items[key]

    def _total(self) -> int:
        return sum(item.nbytes for item in self._items.values())

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return self._total()

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


REBUILT = LayerCache(REBUILD_CACHE_BYTES)
