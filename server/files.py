"""Every file the app writes, in one managed folder with a size and an age limit.

The folder is Gradio's own upload and cache folder, so files we return are served without a second copy, and
its uploads fall under the same limits. Our files are named by their content: the same request twice reuses
the same file instead of writing a new one."""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)
OUR_FOLDER = "vit-inspect"  # under the managed root
SWEEP_EVERY_S = 30.0  # at most one sweep this often, triggered by writes


class FileStore:
    """Content-addressed files under `root` / OUR_FOLDER; the whole of `root` kept under `max_bytes` and `max_age_s`."""

    def __init__(self, root: "str | Path", max_bytes: int, max_age_s: float):
        self.root = Path(root).resolve()
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._last_sweep = 0.0
        self._known_bytes = 0  # under root at the last sweep, plus what we wrote or admitted since
        self.sweep(force=True)  # what an earlier run left counts too

    def put(self, data: bytes, name: str) -> Path:
        """`data` saved as `name` in a folder named by its hash; an existing identical file is reused."""
        folder = self.root / OUR_FOLDER / hashlib.blake2b(data, digest_size=16).hexdigest()
        path = folder / name
        if path.is_file() and path.stat().st_size == len(data):
            os.utime(path)  # recently used: the last to go
        else:
            folder.mkdir(parents=True, exist_ok=True)
            partial = folder / f".{name}.{threading.get_ident()}.part"
            partial.write_bytes(data)
            os.replace(partial, path)
            self._known_bytes += len(data)
        self.sweep(keep=path)
        return path

    def folder(self, name: str) -> Path:
        """A folder of ours for files written by other code (an atlas and its images), named by the caller from the
        content it holds; its files fall under the same limits once written (see `admit`)."""
        return self.root / OUR_FOLDER / name

    def admit(self, nbytes: int) -> bool:
        """Whether an upload of `nbytes` fits, the least recently used files deleted to make room; counted at once,
        so that uploads arriving together see each other."""
        with self._lock:
            self._known_bytes += nbytes
            over = self._known_bytes > self.max_bytes
        if over:
            self.sweep(force=True, reserve=nbytes)
        with self._lock:
            if self._known_bytes <= self.max_bytes:
                return True
            self._known_bytes -= nbytes
            return False

    def sweep(self, keep: Path | None = None, force: bool = False, reserve: int = 0) -> None:
        """Deletes files past the age limit, then the least recently used until the folder, with `reserve` bytes
        about to arrive, fits the size limit.

        Runs at most every SWEEP_EVERY_S unless forced or our own writes alone may have passed the size limit."""
        now = time.time()
        with self._lock:
            due = now - self._last_sweep >= SWEEP_EVERY_S or self._known_bytes > self.max_bytes
            if not (force or due):
                return
            self._last_sweep = now
            files = sorted(self._files(), key=lambda f: f[1])  # oldest first
            total = sum(size for _, _, size in files) + reserve
            for path, mtime, size in files:
                if path == keep:
                    continue
                if now - mtime > self.max_age_s or total > self.max_bytes:
                    self._remove(path)
                    total -= size
            self._known_bytes = total
            self._remove_empty_folders()

    def _files(self) -> list[tuple[Path, float, int]]:
        found = []
        for folder, _, names in os.walk(self.root):
            for name in names:
                path = Path(folder) / name
                try:
                    stat = path.stat()
                except OSError:  # removed meanwhile
                    continue
                found.append((path, stat.st_mtime, stat.st_size))
        return found

    @staticmethod
    def _remove(path: Path) -> None:
        try:
            path.unlink()
        except OSError as err:
            logger.warning("could not remove %s (%s)", path, err)

    def _remove_empty_folders(self) -> None:
        for folder, dirs, names in os.walk(self.root, topdown=False):
            if not dirs and not names and Path(folder) != self.root:
                try:
                    Path(folder).rmdir()
                except OSError:
                    pass
