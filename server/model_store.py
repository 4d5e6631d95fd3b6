"""Loaded models shared by every visitor, kept in the workspace's one cache: the default pinned, others dropped
least recently used when the budget needs room (their parameter bytes count like everything else kept).

A request never changes a shared model: each precision gets its own copy, made once. In public mode (a Space
that anyone can call) only hub ids are loaded, within a parameter and a download cap, never a local path."""
from __future__ import annotations

import copy
import dataclasses
import logging

import torch

from analysis import DTYPES
from explorer.cache import ByteCache
from explorer.inputs import UserError
from model import LoadedModel, load_model
from model.hub import HUB_ID

from .settings import Settings

logger = logging.getLogger(__name__)
DEFAULT = "default"
WELL_KNOWN = (  # offered in the page; any other hub id (or, on one's own machine, a local folder) can be typed in
    "HuggingFaceM4/idefics-9b",
    "HuggingFaceM4/idefics2-8b",
    "HuggingFaceM4/Idefics3-8B-Llama3",
    "HuggingFaceTB/SmolVLM-256M-Instruct",
    "google/siglip-base-patch16-224",
    "google/siglip-so400m-patch14-384",
    "google/vit-base-patch16-224",
    "facebook/deit-base-distilled-patch16-224",
    "openai/clip-vit-base-patch32",
    "openai/clip-vit-base-patch16",
    "openai/clip-vit-large-patch14",
    "openai/clip-vit-large-patch14-336",
    "facebook/dinov2-small",
    "facebook/dinov2-base",
    "facebook/dinov2-with-registers-small",
)
PUBLIC_REFUSAL = ("Only models from the Hugging Face hub can be loaded here: type an id like org/name "
                  "(local paths are not accepted on a public server).")


class ModelStore:
    """Models by key ("default", a hub id, or outside public mode a local path) and precision, loaded once.

    Args:
        default: the default model already loaded (tests pass a tiny one); None: the embedded one, on first use.
    """

    def __init__(self, cache: ByteCache, settings: Settings, default: LoadedModel | None = None,
                 device: str | None = None):
        self.cache = cache
        self.settings = settings
        self.device = device
        if default is not None:
            cache.put(("model", DEFAULT, "float32"), default, pin=True)

    def check(self, key: str) -> str:
        """The key of an allowed model: "default", a hub id, or (outside public mode) a local path."""
        key = (key or DEFAULT).strip()
        if key == DEFAULT or not self.settings.public:
            return key
        if not HUB_ID.match(key):
            raise UserError(PUBLIC_REFUSAL)
        return key

    def get(self, key: str, dtype: str = "float32") -> LoadedModel:
        """The model for `key` in `dtype`, loading (and converting) it once, however many ask at the same time."""
        key = self.check(key)
        if dtype != "float32":
            base = self.get(key)
            return self.cache.get_or_compute(("model", key, dtype), lambda: dataclasses.replace(
                base, model=copy.deepcopy(base.model).to(DTYPES[dtype]),
                head=None if base.head is None else copy.deepcopy(base.head).to(DTYPES[dtype])))
        return self.cache.get_or_compute(("model", key, dtype), lambda: self._load(key), pin=key == DEFAULT)

    def _load(self, key: str) -> LoadedModel:
        if key == DEFAULT:
            return load_model(None, device=self.device)
        s = self.settings
        caps = dict(max_params=s.max_params, max_download_bytes=s.max_download_bytes,
                    max_cache_bytes=s.hub_cache_bytes, allow_local=False)
        return load_model(key, device=self.device, **(caps if s.public else {}))

    @property
    def device_type(self) -> str:
        if self.device:
            return torch.device(self.device).type
        return "cuda" if torch.cuda.is_available() else "cpu"
