"""Loaded models shared by every session: the default pinned, a few others kept, least recently used dropped.

A request never changes a shared model: each precision gets its own copy, made once. In public mode (a Space
that anyone can call) only hub ids are loaded, within a parameter and a download cap, never a local path."""
from __future__ import annotations

import copy
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from analysis import DTYPES
from model import LoadedModel, load_model
from model.hub import HUB_ID

from .inputs import UserError

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
TRUE = ("1", "true", "yes", "on")
PUBLIC_REFUSAL = ("Only models from the Hugging Face hub can be loaded here: type an id like org/name "
                  "(local paths are not accepted on a public server).")


@dataclass(frozen=True)
class ModelPolicy:
    """What a visitor may load. public: hub ids only, within `max_params` and `max_download_bytes`."""

    public: bool = False
    max_params: int = 2_000_000_000
    max_download_bytes: int = 10 * 2**30

    @classmethod
    def from_env(cls) -> "ModelPolicy":
        """VIT_INSPECT_PUBLIC (default: on when SPACE_ID is set, as on a Hugging Face Space), VIT_INSPECT_MAX_PARAMS,
        VIT_INSPECT_MAX_DOWNLOAD_MB."""
        flag = os.environ.get("VIT_INSPECT_PUBLIC")
        public = flag.strip().lower() in TRUE if flag is not None else bool(os.environ.get("SPACE_ID"))
        return cls(public, int(os.environ.get("VIT_INSPECT_MAX_PARAMS", cls.max_params)),
                   int(os.environ.get("VIT_INSPECT_MAX_DOWNLOAD_MB", cls.max_download_bytes // 2**20)) * 2**20)


class ModelStore:
    def __init__(self, default: LoadedModel | None = None, max_extra: int = 2, device: str | None = None,
                 policy: ModelPolicy | None = None):
        self.on_unload: Callable[[str], None] = lambda key: None  # told which model was dropped
        self._default = default
        self._extra: OrderedDict[str, LoadedModel] = OrderedDict()
        self._copies: dict[tuple[str, str], LoadedModel] = {}  # (key, dtype) → a converted copy
        self.max_extra = max_extra
        self.device = device
        self.policy = policy or ModelPolicy()
        self._lock = threading.Lock()

    def check(self, key: str) -> str:
        """The key of an allowed model: "default", a hub id, or (outside public mode) a local path."""
        key = (key or DEFAULT).strip()
        if key == DEFAULT or not self.policy.public:
            return key
        if not HUB_ID.match(key):
            raise UserError(PUBLIC_REFUSAL)
        return key

    def get(self, key: str, dtype: str = "float32") -> LoadedModel:
        """The model for `key` in `dtype`, loading (and converting) it on first use; never modified afterwards."""
        key = self.check(key)
        base = self._base(key)
        if dtype == "float32":
            return base
        with self._lock:
            found = self._copies.get((key, dtype))
            if found is None:
                found = LoadedModel(copy.deepcopy(base.model).to(DTYPES[dtype]), base.preprocessing, base.name)
                self._copies[(key, dtype)] = found
            return found

    def _base(self, key: str) -> LoadedModel:
        if key == DEFAULT:
            with self._lock:
                if self._default is None:
                    self._default = load_model(None, device=self.device)
                return self._default
        with self._lock:
            if key in self._extra:
                self._extra.move_to_end(key)
                return self._extra[key]
        policy = self.policy
        caps = dict(max_params=policy.max_params, max_download_bytes=policy.max_download_bytes, allow_local=False)
        loaded = load_model(key, device=self.device, **(caps if policy.public else {}))  # outside the lock
        with self._lock:
            self._extra[key] = loaded
            while len(self._extra) > self.max_extra:
                dropped, _ = self._extra.popitem(last=False)
                self._copies = {k: v for k, v in self._copies.items() if k[0] != dropped}
                logger.info("unloaded %s", dropped)
                self.on_unload(dropped)  # its analyses hold its layers: they go too, or the weights would stay
        return loaded

    @property
    def device_type(self) -> str:
        if self.device:
            return torch.device(self.device).type
        return "cuda" if torch.cuda.is_available() else "cpu"
