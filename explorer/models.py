"""Loaded models shared by every session: the default pinned, a few others kept, least recently used dropped."""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict

from model import LoadedModel, load_model

logger = logging.getLogger(__name__)
DEFAULT = "default"
WELL_KNOWN = (  # offered in the page; any other hub id or local path can be typed in
    "HuggingFaceM4/idefics-9b",
    "openai/clip-vit-base-patch32",
    "openai/clip-vit-base-patch16",
    "openai/clip-vit-large-patch14",
    "openai/clip-vit-large-patch14-336",
    "facebook/dinov2-small",
    "facebook/dinov2-base",
    "facebook/dinov2-with-registers-small",
)


class ModelStore:
    def __init__(self, default: LoadedModel | None = None, max_extra: int = 2, device: str | None = None):
        self._default = default
        self._extra: OrderedDict[str, LoadedModel] = OrderedDict()
        self.max_extra = max_extra
        self.device = device
        self._lock = threading.Lock()

    def get(self, key: str) -> LoadedModel:
        """The model for `key` ("default", a hub id or a local path), loading it on first use."""
        key = (key or DEFAULT).strip()
        if key == DEFAULT:
            with self._lock:
                if self._default is None:
                    self._default = load_model(None, device=self.device)
                return self._default
        with self._lock:
            if key in self._extra:
                self._extra.move_to_end(key)
                return self._extra[key]
        loaded = load_model(key, device=self.device)  # outside the lock: other sessions keep working meanwhile
        with self._lock:
            self._extra[key] = loaded
            while len(self._extra) > self.max_extra:
                dropped, _ = self._extra.popitem(last=False)
                logger.info("unloaded %s", dropped)
        return loaded
