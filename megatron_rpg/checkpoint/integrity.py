"""Checksums of a checkpoint's files: a manifest written last, verified before anything is loaded.

    entries = file_entries(directory, names)          # {name: {"size": ..., "sha256": ...}}
    write_manifest(directory, entries)                # megatron_rpg_manifest.json (atomic)
    verify_checkpoint(directory)                      # DamagedCheckpoint naming the bad file

The manifest lists every file of the checkpoint (relative path, size, sha256) except itself. A
checkpoint without one (written before manifests existed, or by another tool) gets the structural
checks only: the torch_dist files megatron needs exist and are as long as `.metadata` says.
Verification can be split over ranks (`share=(rank, world)`): each hashes every world-th file.
"""
from __future__ import annotations

import hashlib
import json
import os

MANIFEST_FILE = "megatron_rpg_manifest.json"
MANIFEST_VERSION = 1
CHUNK_BYTES = 8 * 2**20  # hashlib releases the GIL on large buffers; 8 MiB keeps memory flat


class DamagedCheckpoint(ValueError):
    """A checkpoint file is missing, truncated, or does not match its recorded checksum."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


def file_digest(path: str) -> dict:
    """{"size": bytes, "sha256": hex} of one file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def checkpoint_files(directory: str) -> list[str]:
    """Every file below `directory` (relative, '/'-separated, sorted), the manifest excluded."""
    names = []
    for root, _, files in os.walk(directory):
        for name in files:
            relative = os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/")
            if relative != MANIFEST_FILE:
                names.append(relative)
    return sorted(names)


def my_share(names: list[str], share: tuple[int, int]) -> list[str]:
    """The files rank `share[0]` of `share[1]` hashes (round robin over the sorted names)."""
    rank, world = share
    return names[rank::world]


def file_entries(directory: str, names: list[str]) -> dict:
    return {name: file_digest(os.path.join(directory, name)) for name in names}


def write_manifest(directory: str, entries: dict) -> None:
    """Writes the manifest through a temporary file, fsync and rename: never a half-written one."""
    path = os.path.join(directory, MANIFEST_FILE)
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump({"version": MANIFEST_VERSION, "algorithm": "sha256",
                   "files": dict(sorted(entries.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def read_manifest(directory: str) -> dict | None:
    """The manifest's {name: entry}, None when the checkpoint has none."""
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            files = json.load(f)["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
        return files
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DamagedCheckpoint(f"checkpoint {directory}: its manifest {path} is unreadable "
                                f"({type(error).__name__}: {error})", path) from error


def verify_checkpoint(directory: str, share: tuple[int, int] = (0, 1)) -> None:
    """DamagedCheckpoint naming the first file (of this rank's share) that is missing, truncated,
    of another size or another sha256 than the manifest records. Without a manifest: the
    structural checks of `check_structure`."""
    entries = read_manifest(directory)
    if entries is None:
        if share[0] == 0:
            check_structure(directory)
        return
    for name in my_share(sorted(entries), share):
        path = os.path.join(directory, name)
        expected = entries[name]
        if not os.path.isfile(path):
            raise DamagedCheckpoint(f"checkpoint {directory}: file {name} is missing", path)
        size = os.path.getsize(path)
        if size != expected["size"]:
            what = "truncated" if size < expected["size"] else "longer than recorded"
            raise DamagedCheckpoint(f"checkpoint {directory}: file {name} is {what} ({size} bytes, the "
                                    f"manifest records {expected['size']})", path)
        if file_digest(path)["sha256"] != expected["sha256"]:
            raise DamagedCheckpoint(f"checkpoint {directory}: file {name} is damaged (its sha256 differs "
                                    f"from the one recorded in {MANIFEST_FILE})", path)


def check_structure(directory: str) -> None:
    """For a checkpoint without a manifest: megatron's `metadata.json` and `common.pt` and torch's
    `.metadata` exist, and every `.distcp` byte range `.metadata` points at is there."""
    for name in ("metadata.json", ".metadata", "common.pt"):
        if not os.path.isfile(os.path.join(directory, name)):
            raise DamagedCheckpoint(f"checkpoint {directory}: file {name} is missing",
                                    os.path.join(directory, name))
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(directory).read_metadata()
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise DamagedCheckpoint(f"checkpoint {directory}: file .metadata is unreadable "
                                f"({type(error).__name__}: {error})", os.path.join(directory, ".metadata")) from error
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise DamagedCheckpoint(f"checkpoint {directory}: file {name} is missing", path)
        if os.path.getsize(path) < size:
            raise DamagedCheckpoint(f"checkpoint {directory}: file {name} is truncated ({os.path.getsize(path)} "
                                    f"bytes, .metadata needs {size})", path)
