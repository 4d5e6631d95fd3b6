"""Every setting of the served app, read once from the environment at start-up and passed down from there."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from analysis.budget import CPU_LIMITS, GPU_LIMITS, ComputeLimits
from explorer.atlas.archive import ZipCaps

MB = 2**20
TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    """The app's bounds and switches; `from_env` names the environment variable of each (Space variables)."""

    public: bool = False  # hub ids only, within the caps below; never a local path
    max_params: int = 2_000_000_000  # parameters of a vision tower a visitor may load
    max_download_bytes: int = 10 * 2**30  # bytes one hub model may download
    hub_cache_bytes: int = 20 * 2**30  # the hub cache as a whole, in public mode: least recently used repos deleted
    cache_bytes: int = 4096 * MB  # models, analyses, decoded images and rebuilt layers kept in memory
    rebuild_cache_bytes: int = 96 * MB  # of which rebuilt layers (a clicked layer's queries and keys)
    disk_bytes: int = 2048 * MB  # uploads and every file the app writes
    file_age_s: int = 3600
    max_file_size: str = "50mb"  # per upload
    concurrency: int | None = None  # analyses at once; None: 1 on CPU, 2 on CUDA
    queue_size: int = 32
    max_tokens: int | None = None  # per analysis; None: the device's default (analysis.budget)
    max_work: float | None = None  # layers × tokens² × width per analysis; None: the device's default
    max_seconds: float | None = None  # wall-clock time per analysis; None: the device's default
    temp_dir: Path = Path(tempfile.gettempdir()) / "vit-inspect"  # the managed folder (Gradio's uploads too)
    zip_caps: ZipCaps = ZipCaps()  # what a zip of images sent to the Dataset view may hold

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Settings":
        """VIT_INSPECT_PUBLIC (default: on when SPACE_ID is set, as on a Hugging Face Space), VIT_INSPECT_MAX_PARAMS,
        VIT_INSPECT_MAX_DOWNLOAD_MB, VIT_INSPECT_HUB_CACHE_MB, VIT_INSPECT_CACHE_MB, VIT_INSPECT_REBUILD_CACHE_MB,
        VIT_INSPECT_DISK_MB, VIT_INSPECT_FILE_AGE_S, VIT_INSPECT_MAX_FILE_SIZE, VIT_INSPECT_CONCURRENCY,
        VIT_INSPECT_QUEUE_SIZE, VIT_INSPECT_MAX_TOKENS, VIT_INSPECT_MAX_WORK, VIT_INSPECT_MAX_SECONDS,
        GRADIO_TEMP_DIR; a zip's caps: VIT_INSPECT_ZIP_MAX_IMAGES, VIT_INSPECT_ZIP_MAX_MB, VIT_INSPECT_ZIP_MEMBER_MB,
        VIT_INSPECT_ZIP_UNPACKED_MB, VIT_INSPECT_ZIP_MEMBER_MP (megapixels of one image)."""
        flag = env.get("VIT_INSPECT_PUBLIC")
        public = flag.strip().lower() in TRUE if flag is not None else bool(env.get("SPACE_ID"))
        d = cls()

        def whole(name: str, default: int, unit: int = 1) -> int:
            return int(env.get(name, default // unit)) * unit

        def optional(name: str) -> float | None:
            return float(env[name]) if env.get(name) else None

        return cls(public=public, max_params=whole("VIT_INSPECT_MAX_PARAMS", d.max_params),
                   max_download_bytes=whole("VIT_INSPECT_MAX_DOWNLOAD_MB", d.max_download_bytes, MB),
                   hub_cache_bytes=whole("VIT_INSPECT_HUB_CACHE_MB", d.hub_cache_bytes, MB),
                   cache_bytes=whole("VIT_INSPECT_CACHE_MB", d.cache_bytes, MB),
                   rebuild_cache_bytes=whole("VIT_INSPECT_REBUILD_CACHE_MB", d.rebuild_cache_bytes, MB),
                   disk_bytes=whole("VIT_INSPECT_DISK_MB", d.disk_bytes, MB),
                   file_age_s=whole("VIT_INSPECT_FILE_AGE_S", d.file_age_s),
                   max_file_size=env.get("VIT_INSPECT_MAX_FILE_SIZE", d.max_file_size),
                   concurrency=int(env.get("VIT_INSPECT_CONCURRENCY", "0")) or None,
                   queue_size=whole("VIT_INSPECT_QUEUE_SIZE", d.queue_size),
                   max_tokens=int(optional("VIT_INSPECT_MAX_TOKENS") or 0) or None,
                   max_work=optional("VIT_INSPECT_MAX_WORK"), max_seconds=optional("VIT_INSPECT_MAX_SECONDS"),
                   temp_dir=Path(env.get("GRADIO_TEMP_DIR") or d.temp_dir), zip_caps=zip_caps(env))

    def compute_limits(self, device_type: str) -> ComputeLimits:
        """The caps on one analysis: the device's defaults, where no setting overrides them."""
        base = GPU_LIMITS if device_type == "cuda" else CPU_LIMITS
        return ComputeLimits(self.max_tokens or base.max_tokens, self.max_work or base.max_work,
                             self.max_seconds or base.max_seconds)


def zip_caps(env: Mapping[str, str]) -> ZipCaps:
    """The caps on one zip sent to the Dataset view, from the environment (Settings.from_env names them)."""
    d = ZipCaps()
    return ZipCaps(max_images=int(env.get("VIT_INSPECT_ZIP_MAX_IMAGES", d.max_images)),
                   max_bytes=int(float(env.get("VIT_INSPECT_ZIP_MAX_MB", d.max_bytes / MB)) * MB),
                   max_member_bytes=int(float(env.get("VIT_INSPECT_ZIP_MEMBER_MB", d.max_member_bytes / MB)) * MB),
                   max_unpacked_bytes=int(float(env.get("VIT_INSPECT_ZIP_UNPACKED_MB",
                                                        d.max_unpacked_bytes / MB)) * MB),
                   max_member_pixels=int(float(env.get("VIT_INSPECT_ZIP_MEMBER_MP", d.max_member_pixels / 1e6)) * 1e6),
                   max_ratio=d.max_ratio, max_entries=d.max_entries)
