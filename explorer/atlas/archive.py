"""A zip of images sent to the served app, checked against every bound before a byte of it is unpacked.

Checked, in this order, each refusal a plain sentence: the archive's size; its entry count, read from its end
record before the central directory is parsed (a small file can list millions of entries); then every entry:
no path that leaves the folder (absolute, `..`, backslashes, drive letters), no link, no encryption, at most
`max_images` images, each at most `max_member_bytes` unpacked and `max_ratio` times its packed size (zip bombs), all
of them at most `max_unpacked_bytes`; then, while each image is unpacked in memory, its real size again and its
pixels from its header. Only images (by suffix) are unpacked; folders, hidden files and macOS's `__MACOSX` are left.
"""
from __future__ import annotations

import io
import re
import shutil
import stat
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image, UnidentifiedImageError

from ..cli import IMAGE_SUFFIXES
from ..inputs import UserError

MB = 2**20
END_RECORD = b"PK\x05\x06"  # the end of central directory record: its entry count at offset 10
END_SEARCH = 22 + 65_535  # the record and the longest comment it may carry
UNSAFE_COMPONENT = re.compile(r"^[A-Za-z]:|[\\\x00]")  # a drive letter, a backslash or a NUL byte


class ArchiveError(UserError):
    """A zip refused; the message names the bound it passes (and the entry, by its name in the archive)."""


@dataclass(frozen=True)
class ZipCaps:
    """What one uploaded zip may hold (`server.settings` reads each from the environment)."""

    max_images: int = 64
    max_bytes: int = 50 * MB  # the archive itself
    max_member_bytes: int = 20 * MB  # one image, unpacked
    max_unpacked_bytes: int = 256 * MB  # every image, unpacked
    max_member_pixels: int = 4096 * 4096  # one image's pixels, from its header (larger ones are not decoded)
    max_ratio: float = 100.0  # unpacked / packed size of one entry; photos hardly compress
    max_entries: int = 1024  # entries of any kind (folders, other files)


def entry_count(path: Path) -> int:
    """The entry count the zip's end record gives; ArchiveError when the file has none (not a zip)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        handle.seek(max(0, size - END_SEARCH))
        tail = handle.read()
    at = tail.rfind(END_RECORD)
    if at < 0 or len(tail) < at + 22:
        raise ArchiveError("The file is not a zip archive.")
    return struct.unpack_from("<H", tail, at + 10)[0]  # 0xFFFF: a zip64 archive, over any cap here


def image_members(path: Path, caps: ZipCaps) -> list[zipfile.ZipInfo]:
    """The archive's images, each entry checked against `caps` from the central directory alone."""
    if path.stat().st_size > caps.max_bytes:
        raise ArchiveError(f"The zip is {path.stat().st_size / MB:.1f} MB; at most {caps.max_bytes / MB:.3g} MB are "
                           "accepted.")
    entries = entry_count(path)
    if entries > caps.max_entries:
        raise ArchiveError(f"The zip lists {entries:,} entries; at most {caps.max_entries:,} are accepted.")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError):
        raise ArchiveError("The file is not a readable zip archive.") from None
    images = [info for info in infos if checked(info, caps)]
    names = [info.filename for info in images]
    if len(set(names)) < len(names):
        raise ArchiveError("The zip lists an image twice under one name.")
    if not images:
        raise ArchiveError(f"The zip holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    if len(images) > caps.max_images:
        raise ArchiveError(f"The zip holds {len(images)} images; at most {caps.max_images} are analysed at once.")
    total = sum(info.file_size for info in images)
    if total > caps.max_unpacked_bytes:
        raise ArchiveError(f"The zip's images unpack to {total / MB:.1f} MB; at most "
                           f"{caps.max_unpacked_bytes / MB:.3g} MB are accepted.")
    return images


def checked(info: zipfile.ZipInfo, caps: ZipCaps) -> bool:
    """Whether the entry is an image to unpack (False: a folder or another file, left); ArchiveError for an entry
    that is refused."""
    name = shown_name(info.filename)
    parts = PurePosixPath(info.filename).parts
    if (info.filename.startswith("/") or any(part == ".." for part in parts)
            or any(UNSAFE_COMPONENT.search(part) for part in parts)):
        raise ArchiveError(f"{name}: a path that leaves the archive's folder is not accepted.")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise ArchiveError(f"{name}: links are not accepted in a zip.")
    if info.is_dir() or parts[0] == "__MACOSX" or any(part.startswith(".") for part in parts):
        return False
    if PurePosixPath(info.filename).suffix.lower() not in IMAGE_SUFFIXES:
        return False
    if info.flag_bits & 0x1:
        raise ArchiveError(f"{name}: encrypted entries are not accepted.")
    if info.file_size > caps.max_member_bytes:
        raise ArchiveError(f"{name} unpacks to {info.file_size / MB:.1f} MB; at most "
                           f"{caps.max_member_bytes / MB:.3g} MB an image are accepted.")
    if info.file_size > caps.max_ratio * max(info.compress_size, 1):
        raise ArchiveError(f"{name} unpacks to {info.file_size / max(info.compress_size, 1):.0f} times its packed "
                           f"size; at most {caps.max_ratio:g} times are accepted (a zip bomb?).")
    return True


def shown_name(name: str, limit: int = 60) -> str:
    """An entry's name for a message: printable and short."""
    printable = "".join(c if c.isprintable() else "?" for c in name)
    return printable if len(printable) <= limit else printable[:limit - 1] + "…"


def unpack_images(path: Path, folder: Path, caps: ZipCaps) -> list[str]:
    """Writes the zip's images into `folder` (which must not exist yet), each under its path in the archive, after
    checking the whole archive (`image_members`) and, as each is unpacked in memory, its real size and its pixels;
    returns their names. On any refusal nothing is left in `folder`."""
    members = image_members(path, caps)
    folder.mkdir(parents=True)
    try:
        with zipfile.ZipFile(path) as archive:
            for info in members:
                write_member(archive, info, folder, caps)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return [info.filename for info in members]


def write_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, folder: Path, caps: ZipCaps) -> None:
    name = shown_name(info.filename)
    try:
        with archive.open(info) as member:
            data = member.read(caps.max_member_bytes + 1)
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError):
        raise ArchiveError(f"{name} could not be unpacked (the zip is damaged).") from None
    if len(data) > caps.max_member_bytes:
        raise ArchiveError(f"{name} unpacks to more than {caps.max_member_bytes / MB:.3g} MB, the most an image may.")
    width, height = header_size(data, name)
    if width * height > caps.max_member_pixels:
        raise ArchiveError(f"{name} is {width}×{height} px ({width * height / 1e6:.1f} MP); at most "
                           f"{caps.max_member_pixels / 1e6:.1f} MP an image are accepted in a zip.")
    target = folder.joinpath(*PurePosixPath(info.filename).parts)
    if not target.resolve().is_relative_to(folder.resolve()):  # the checks above already refused such a name
        raise ArchiveError(f"{name}: a path that leaves the archive's folder is not accepted.")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def header_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding it; (0, 0) where there is no readable header (the
    atlas then reports the image as unreadable and skips it)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Image.DecompressionBombError:
        raise ArchiveError(f"{name} has far too many pixels to be decoded safely.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return (0, 0)
