"""Image manifests (which images, in which order, with which dataset tag) and robust decoding.

A manifest is built from a directory (recursive, sorted, image extensions) or from a list file
with one ``path`` or ``path<TAB>tag`` per line. Its canonical text -- one ``id`` or ``id<TAB>tag``
line per image, ``\\n``-terminated, UTF-8 -- is stored in every cache and hashed for provenance.

Ids are file names, and a file name may hold any byte but ``/`` and NUL: in the canonical text each id
and tag is escaped (:data:`MANIFEST_ESCAPING`, docs/cache-format.md) so that every name survives the
line-based text and comes back as the same str (non-UTF-8 bytes surrogate-escaped, as ``os``/``pathlib``
give them). A name that needs no escaping is written as is, so ordinary image lists keep their hash.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterable, Iterator, Mapping

from ..errors import ManifestError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                              ".pbm"})

MANIFEST_ESCAPING = "backslash-v1"  # how ids and tags are escaped in the canonical text (docs/cache-format.md)
ESCAPING_ATTRIBUTE = "escaping"     # attribute of a cache's ``manifest`` array naming it; absent: raw text
NAMED_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
OTHER_LINE_BREAKS = "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # where str.splitlines() also ends a line
NON_UTF8_BYTES = "\udc80-\udcff"  # a byte that is not UTF-8, as os/pathlib give it (surrogateescape)
_ESCAPED_CHARACTER = re.compile(f"[{re.escape(''.join(NAMED_ESCAPES) + OTHER_LINE_BREAKS)}{NON_UTF8_BYTES}]")
_ESCAPE_SEQUENCE = re.compile(rb"\\(x[0-9a-fA-F]{2}|[\\ntr#])?")
_UNESCAPED = {b"\\": b"\\", b"n": b"\n", b"t": b"\t", b"r": b"\r", b"#": b"#"}
_LIST_LINE_BREAK = re.compile(f"[\r{OTHER_LINE_BREAKS}]")
MAX_LISTED_LINES = 10


def escape_field(value: str) -> str:
    r"""An id or tag as written in escaped manifest text (:data:`MANIFEST_ESCAPING`): backslash, TAB, LF and CR
    become ``\\`` ``\t`` ``\n`` ``\r``; the other line breaks of ``str.splitlines`` and the bytes that are not
    UTF-8 become ``\xHH``, one per byte of their UTF-8 (surrogateescape) encoding; all else is unchanged."""
    return _ESCAPED_CHARACTER.sub(_escape_character, value)


def _escape_character(match: re.Match) -> str:
    char = match[0]
    return NAMED_ESCAPES.get(char) or "".join(f"\\x{byte:02x}" for byte in char.encode("utf-8", "surrogateescape"))


def unescape_field(value: str) -> str:
    r"""Inverse of :func:`escape_field` (``\#`` included): the escapes become the bytes they stand for, and the
    bytes are decoded as UTF-8 with surrogateescape, so ``os.fsencode`` gives back the file name's bytes."""
    return _ESCAPE_SEQUENCE.sub(_unescape_sequence, value.encode("utf-8", "surrogateescape")).decode(
        "utf-8", "surrogateescape")


def _unescape_sequence(match: re.Match) -> bytes:
    code = match[1]
    if code is None:
        raise ManifestError(f"manifest field {match.string!r}: a backslash that starts no escape "
                            "(\\\\ \\n \\t \\r \\# \\xHH); the stored manifest is corrupt")
    return _UNESCAPED.get(code) or bytes.fromhex(code[1:].decode("ascii"))


def check_escaping(escaping: str | None) -> None:
    """A :class:`ManifestError` unless ``escaping`` is :data:`MANIFEST_ESCAPING` or ``None`` (raw text)."""
    if escaping not in (None, MANIFEST_ESCAPING):
        raise ManifestError(f"manifest escaping {escaping!r} is unknown to this dune_cache (it reads "
                            f"{MANIFEST_ESCAPING!r}): the cache was written by a newer version; upgrade dune_cache")


def split_records(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """``(id, tag)`` of each ``id`` or ``id<TAB>tag`` line; blank lines and lines starting with ``#`` skipped."""
    for line in lines:
        if line.strip() and not line.startswith("#"):
            image_id, _, tag = line.partition("\t")
            yield image_id, tag.strip()


@dataclass(frozen=True)
class ImageManifest:
    """Ordered images: ``ids[i]`` is image ``i`` of every array in a cache."""

    ids: tuple[str, ...]
    tags: tuple[str, ...]
    base: Path | None  # relative ids resolve against this folder
    escaping: str | None = MANIFEST_ESCAPING  # of the canonical text; None: raw, as caches made before escaping

    def path(self, index: int) -> Path:
        p = Path(self.ids[index])
        return p if p.is_absolute() or self.base is None else self.base / p

    def __len__(self) -> int:
        return len(self.ids)

    def to_text(self) -> str:
        """Canonical text: one ``id`` or ``id<TAB>tag`` line per image, escaped per :attr:`escaping`."""
        return "".join(self._line(image_id, tag) + "\n" for image_id, tag in zip(self.ids, self.tags))

    def _line(self, image_id: str, tag: str) -> str:
        if self.escaping is None:
            return f"{image_id}\t{tag}" if tag else image_id
        line = escape_field(image_id) + (f"\t{escape_field(tag)}" if tag else "")
        return "\\" + line if line.startswith("#") else line

    @property
    def sha256(self) -> str:
        """SHA-256 of the UTF-8 canonical text (provenance ``images.manifest_sha256``)."""
        return hashlib.sha256(self.to_text().encode("utf-8")).hexdigest()

    def text_attributes(self) -> dict[str, str]:
        """Attributes to store with the canonical text (on a cache's ``manifest`` array): its escaping."""
        return {ESCAPING_ATTRIBUTE: self.escaping} if self.escaping else {}

    @classmethod
    def from_text(cls, text: str, base: Path | None = None,
                  escaping: str | None = MANIFEST_ESCAPING) -> "ImageManifest":
        """Parse canonical text escaped per ``escaping``; ``None``: raw text (caches written before escaping),
        where a backslash is part of the name."""
        check_escaping(escaping)
        field = unescape_field if escaping else str
        return cls.from_records([(field(image_id), field(tag)) for image_id, tag in split_records(text.splitlines())],
                                base, escaping)

    @classmethod
    def from_records(cls, records: list[tuple[str, str]], base: Path | None,
                     escaping: str | None = MANIFEST_ESCAPING) -> "ImageManifest":
        """The manifest of ``(id, tag)`` pairs, in order."""
        return cls(ids=tuple(r[0] for r in records), tags=tuple(r[1] for r in records), base=base,
                   escaping=escaping)

    @classmethod
    def from_stored_text(cls, text: str, attributes: Mapping[str, object]) -> "ImageManifest":
        """The manifest stored as ``text`` with ``attributes`` (:meth:`text_attributes`; none in caches
        written before escaping, whose text is raw)."""
        return cls.from_text(text, escaping=attributes.get(ESCAPING_ATTRIBUTE))


def confined_path(base: Path, image_id: str) -> Path | None:
    """The file ``image_id`` names under ``base``, or ``None`` when the id would leave it: absolute, with a ``..``
    part, empty or holding a NUL. Ids read from a cache's stored manifest come from whoever made the cache: they are
    resolved only this way (docs/security.md). A list file of the user's own may name any path (its ids are used
    through :meth:`ImageManifest.path` of the manifest loaded from it)."""
    pure = PurePosixPath(image_id)
    if not image_id or "\0" in image_id or pure.is_absolute() or ".." in pure.parts or PureWindowsPath(image_id).drive:
        return None
    return Path(base) / pure


def image_files(folder: Path) -> list[str]:
    """Ids of the images below ``folder``: POSIX paths relative to it, sorted, of the files with an image
    extension, dangling symlinks included (extraction records them failed, ``missing``); directories and
    links to directories are not images, and links to directories are not followed. One ``os.scandir`` per
    folder, a ``stat`` only for symlinks: 4.3x less CPU than ``pathlib.rglob`` on 1.28M files (docs/scale.md)."""
    ids: list[str] = []
    folders = [""]  # relative paths ("" or ending in "/") still to list
    while folders:
        relative = folders.pop()
        try:
            with os.scandir(os.path.join(folder, relative)) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(f"{relative}{entry.name}/")
                    elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and is_image_entry(entry):
                        ids.append(relative + entry.name)
        except OSError as exc:
            raise ManifestError(f"--images {folder}: cannot list {os.path.join(folder, relative)}: {exc}") from exc
    return sorted(ids)


def is_image_entry(entry: os.DirEntry) -> bool:
    """A file, or a dangling symlink (a symlink whose target does not exist, or a loop); not a link to a folder."""
    return entry.is_file() or (entry.is_symlink() and not os.path.exists(entry.path))


def read_list_file(path: Path) -> ImageManifest:
    r"""Manifest of a list file: ``path`` or ``path<TAB>tag`` lines ending in ``\n`` or ``\r\n``, blank lines and
    lines starting with ``#`` skipped. Paths are raw, exactly as written: no escapes (a backslash is part of
    the name), bytes that are not UTF-8 name those very bytes, a name starting with ``#`` is listed as
    ``./#name``. A name holding a TAB, CR, LF or another line break cannot be listed (list its folder
    instead); ambiguous lines are refused, each of them named, before any image is read."""
    lines = [line.removesuffix("\r") for line in path.read_bytes().decode("utf-8", "surrogateescape").split("\n")]
    problems = [f"line {number}: {line!r}: {problem}" for number, line in enumerate(lines, 1)
                if (problem := list_line_problem(line))]
    if problems:
        more = f"\n  ... and {len(problems) - MAX_LISTED_LINES} more" if len(problems) > MAX_LISTED_LINES else ""
        raise ManifestError(f"--images {path}: {len(problems)} ambiguous lines (a name with a TAB or a line break "
                            "cannot be listed; pass the folder holding such files as --images, or rename them):\n  "
                            + "\n  ".join(problems[:MAX_LISTED_LINES]) + more)
    return ImageManifest.from_records(list(split_records(lines)), base=path.resolve().parent)


def list_line_problem(line: str) -> str | None:
    """Why a line of a list file is ambiguous, or ``None``."""
    if _LIST_LINE_BREAK.search(line):
        return "a line break (CR, VT, FF, FS, GS, RS, NEL, LS or PS) inside the line"
    if not line.startswith("#") and line.count("\t") > 1:
        return "more than one TAB (the first TAB ends the path, the rest is the tag)"
    return None


def load_manifest(images: str | Path) -> ImageManifest:
    """Manifest from a directory (recursive, see :func:`image_files`) or a list file (:func:`read_list_file`)."""
    src = Path(images)
    if src.is_dir():
        ids = image_files(src)
        manifest = ImageManifest(ids=tuple(ids), tags=("",) * len(ids), base=src.resolve())
    elif src.is_file():
        manifest = read_list_file(src)
    else:
        raise ManifestError(f"--images {src}: no such directory or list file")
    if not manifest.ids:
        raise ManifestError(f"--images {src}: no images found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    duplicates = len(manifest.ids) - len(set(manifest.ids))
    if duplicates:
        raise ManifestError(f"--images {src}: {duplicates} duplicate image ids")
    return manifest
