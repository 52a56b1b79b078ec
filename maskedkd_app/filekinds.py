"""What a file is, read from its first bytes rather than its name: a torch checkpoint, safetensors, or something else.

``sniff(path)`` returns a ``FileKind``: ``name`` (a ``KINDS`` key) and ``description`` (words for an error
message). Only ``torch-zip``, ``torch-legacy`` and ``safetensors`` are checkpoints; for every other kind the
description says what the file is instead (a log, a Git LFS pointer, an HTML page from a failed download, a numpy
array, ...). Each detector looks at a few bytes (zip members: the central directory only), never the whole file.
"""
from __future__ import annotations

import json
import os
import struct
import zipfile
from typing import Callable, Dict, NamedTuple, Optional

HEAD_BYTES = 4096
# torch.save's legacy (non-zip) format starts with a pickled magic number (protocol 2: PROTO 2, LONG1 of 10 bytes).
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_TORCH_LEGACY_HEAD = b"\x80\x02\x8a\x0a" + _TORCH_LEGACY_MAGIC.to_bytes(10, "little")
CHECKPOINT_KINDS = ("torch-zip", "torch-legacy", "safetensors")


class FileKind(NamedTuple):
    name: str
    description: str

    @property
    def is_checkpoint(self) -> bool:
        return self.name in CHECKPOINT_KINDS


def _zip_kind(path: str, head: bytes, size: int) -> Optional[FileKind]:
    if not head.startswith(b"PK\x03\x04"):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return FileKind("zip-broken", "a zip archive that cannot be opened (truncated or corrupt)")
    if any(m == "data.pkl" or m.endswith("/data.pkl") for m in members):
        return FileKind("torch-zip", "a torch.save checkpoint")
    if members and all(m.endswith(".npy") for m in members):
        return FileKind("numpy-npz", f"a numpy .npz archive ({len(members)} arrays), not a torch checkpoint")
    shown = ", ".join(members[:3]) + (", ..." if len(members) > 3 else "")
    return FileKind("zip", f"a zip archive ({shown or 'empty'}) that torch.save did not write")


def _safetensors_kind(path: str, head: bytes, size: int) -> Optional[FileKind]:
    # 8-byte little-endian header length, then that many bytes of JSON (starting with '{').
    if len(head) < 9:
        return None
    (length,) = struct.unpack("<Q", head[:8])
    if not (2 <= length <= size - 8 and head[8:9] == b"{"):
        return None
    try:
        with open(path, "rb") as handle:
            handle.seek(8)
            header = json.loads(handle.read(length).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, OSError):
        return None
    return FileKind("safetensors", f"a safetensors file ({len([k for k in header if k != '__metadata__'])} "
                                   "tensors)") if isinstance(header, dict) else None


def _torch_legacy_kind(path: str, head: bytes, size: int) -> Optional[FileKind]:
    return FileKind("torch-legacy", "a torch.save checkpoint (legacy format)") if head.startswith(
        _TORCH_LEGACY_HEAD) else None


def _pickle_kind(path: str, head: bytes, size: int) -> Optional[FileKind]:
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return FileKind("pickle", "a plain Python pickle (pickle.dump), not a torch.save checkpoint: torch.load "
                                  "cannot read it safely")
    return None


# Magic bytes of formats people pass by mistake, with what to say about them.
_MAGIC: Dict[bytes, FileKind] = {
    b"\x93NUMPY": FileKind("numpy", "a numpy .npy array (np.save), not a torch checkpoint"),
    b"\x89HDF\r\n\x1a\n": FileKind("hdf5", "an HDF5 file (Keras/TensorFlow weights?), not a PyTorch checkpoint"),
    b"\x1f\x8b": FileKind("gzip", "a gzip-compressed file: decompress it first"),
    b"\x89PNG": FileKind("image", "a PNG image, not a checkpoint"),
    b"\xff\xd8\xff": FileKind("image", "a JPEG image, not a checkpoint"),
}


def _magic_kind(path: str, head: bytes, size: int) -> Optional[FileKind]:
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            return kind
    if head[257:262] == b"ustar":
        return FileKind("tar", "a tar archive: extract the checkpoint from it first")
    return None


def _text_kind(path: str, head: bytes, size: int) -> Optional[FileKind]:
    if b"\x00" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 4:  # not merely a multi-byte character cut off at the end of the window
            return None
        text = head[:error.start].decode("utf-8")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if first.startswith("version https://git-lfs"):
        return FileKind("git-lfs", "a Git LFS pointer, not the file it stands for: run `git lfs pull`")
    if first.lower().startswith(("<!doctype html", "<html")):
        return FileKind("html", "an HTML page (a failed or redirected download?), not a checkpoint")
    shown = first[:60] + ("..." if len(first) > 60 else "")
    return FileKind("text", f"a text file (it starts {shown!r}), not a checkpoint")


# Tried in order, first match wins: the checkpoint formats first, text last (a binary file may start with ASCII).
KINDS: Dict[str, Callable[[str, bytes, int], Optional[FileKind]]] = {
    "zip": _zip_kind,
    "safetensors": _safetensors_kind,
    "torch-legacy": _torch_legacy_kind,
    "pickle": _pickle_kind,
    "magic": _magic_kind,
    "text": _text_kind,
}


def sniff(path: str) -> FileKind:
    """What the local file ``path`` is, from its content (OSError if it cannot be read)."""
    size = os.path.getsize(path)
    if size == 0:
        return FileKind("empty", "an empty file (0 bytes): an interrupted copy or download?")
    with open(path, "rb") as handle:
        head = handle.read(HEAD_BYTES)
    for detect in KINDS.values():
        kind = detect(path, head, size)
        if kind is not None:
            return kind
    return FileKind("unknown", f"a {size}-byte binary file of no checkpoint format this reads (it starts "
                               f"{head[:8].hex(' ')})")
