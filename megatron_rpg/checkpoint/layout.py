"""Megatron-LM's checkpoint folder layout, with staging folders that a killed save leaves harmless.

    DIR/iter_0000010/...                      one complete checkpoint per saved step
    DIR/latest_checkpointed_iteration.txt     "10": the one --load DIR resumes from
    DIR/.staging-XXXX/.megatron_rpg_staging   a save in progress (ours: it holds the marker file)
    DIR/.staging-XXXX/checkpoint/...          the checkpoint being written, renamed to iter_N when complete

A save writes the whole checkpoint into a staging folder inside DIR, renames it to iter_N, then
replaces the latest file atomically (temporary file, fsync, os.replace, fsync of DIR). At every
instant the latest file names a complete iter_ folder (or a kill left a newer complete one that
the next save replaces). Staging folders are recognised by their marker and nothing else: files
in DIR that are not ours are never touched.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile

LATEST_FILE = "latest_checkpointed_iteration.txt"
STAGING_MARKER = ".megatron_rpg_staging"
STAGING_PREFIX = ".staging-"
STAGING_PAYLOAD = "checkpoint"
_ITER = re.compile(r"^iter_(\d{7,})$")
SINGLE_FOLDER_FILE = "metadata.json"  # megatron's marker of a torch_dist checkpoint folder


def iteration_name(step: int) -> str:
    return f"iter_{step:07d}"


def is_checkpoint_folder(directory: str) -> bool:
    """A single torch_dist checkpoint (an iter_ folder, a converted or an old-style checkpoint)."""
    return os.path.isfile(os.path.join(directory, SINGLE_FOLDER_FILE))


def iterations(directory: str) -> list[int]:
    """The steps of the iter_ folders in `directory`, ascending."""
    if not os.path.isdir(directory):
        return []
    steps = [int(match.group(1)) for name in os.listdir(directory) if (match := _ITER.match(name))
             and os.path.isdir(os.path.join(directory, name))]
    return sorted(steps)


def read_latest(directory: str) -> int | None:
    """The step the latest file names; None without one; ValueError when it is not a step."""
    path = os.path.join(directory, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    if not text.isdigit():
        raise ValueError(f"{path} holds {text[:40]!r}, not an iteration number")
    return int(text)


def is_layout(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, LATEST_FILE)) or bool(iterations(directory))


def candidates(load: str) -> list[str]:
    """The checkpoint folders `--load load` may use, best first: load itself when it is one; for a
    layout folder the latest iteration, then the others newest first (the fallbacks when one is
    damaged). Empty when there is nothing to load (a missing or empty folder)."""
    if is_checkpoint_folder(load) or not os.path.isdir(load):
        return [load] if is_checkpoint_folder(load) else []
    steps = iterations(load)
    try:
        latest = read_latest(load)
    except (OSError, ValueError):
        latest = None  # an unreadable latest file: every iteration is a fallback
    order = ([latest] if latest in steps else []) + [step for step in reversed(steps) if step != latest]
    return [os.path.join(load, iteration_name(step)) for step in order]


def latest_checkpoint(load: str) -> str:
    """The checkpoint folder `--load load` names without verifying it: load itself, or its latest
    iteration (the newest one when the latest file is missing); load when it holds none."""
    found = candidates(load)
    return found[0] if found else load


def has_checkpoint_files(directory: str) -> bool:
    """Whether `directory` holds anything besides our own staging folders (so a first run with
    --load = --save would not start fresh)."""
    if not os.path.isdir(directory):
        return False
    return any(not is_staging_folder(os.path.join(directory, name)) for name in os.listdir(directory))


def foreign_entries(directory: str) -> list[str]:
    """Entries of a --save folder that are not ours (iter_ folders, the latest file, staging)."""
    foreign = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if _ITER.match(name) and os.path.isdir(path) or name == LATEST_FILE or is_staging_folder(path):
            continue
        if name.startswith(LATEST_FILE + ".") and name.endswith(".tmp"):
            continue  # a latest file being replaced when a kill came
        foreign.append(name)
    return foreign


def write_latest(directory: str, step: int) -> None:
    """Replaces the latest file atomically and durably (the new iter_ folder's rename first)."""
    handle, temporary = tempfile.mkstemp(prefix=LATEST_FILE + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, os.path.join(directory, LATEST_FILE))
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    fsync_dir(directory)


def fsync_dir(directory: str) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def new_staging_folder(directory: str) -> str:
    """A staging folder inside `directory` (mode 0755) holding our marker file; the checkpoint goes
    into its `staging_payload` folder."""
    os.makedirs(directory, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory)
    os.chmod(staging, 0o755)
    with open(os.path.join(staging, STAGING_MARKER), "w", encoding="utf-8") as f:
        f.write("a megatron_rpg checkpoint being written; deleted by the next save or start-up\n")
    return staging


def staging_payload(staging: str) -> str:
    """The (empty) folder inside a staging folder that becomes iter_N."""
    payload = os.path.join(staging, STAGING_PAYLOAD)
    os.makedirs(payload, mode=0o755, exist_ok=True)
    return payload


def is_staging_folder(path: str) -> bool:
    return (os.path.basename(path).startswith(STAGING_PREFIX) and os.path.isdir(path)
            and os.path.isfile(os.path.join(path, STAGING_MARKER)))


def remove_stale_staging(directory: str, keep: str | None = None) -> list[str]:
    """Deletes our staging folders in `directory` (those holding the marker), but `keep`; returns them."""
    if not os.path.isdir(directory):
        return []
    removed = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if is_staging_folder(path) and (keep is None or os.path.abspath(path) != os.path.abspath(keep)):
            delete_staging(path)
            removed.append(path)
    return removed


def delete_staging(path: str) -> None:
    """Everything but the marker first, the marker last: a kill halfway leaves a folder still ours."""
    for name in os.listdir(path):
        if name != STAGING_MARKER:
            entry = os.path.join(path, name)
            shutil.rmtree(entry) if os.path.isdir(entry) and not os.path.islink(entry) else os.remove(entry)
    os.remove(os.path.join(path, STAGING_MARKER))
    os.rmdir(path)


def publish(directory: str, staging: str, step: int) -> str:
    """Renames a staging folder's complete payload to iter_<step> and points the latest file at it. An iter_
    folder of that step already there (left by a killed run, or a --finetune run restarting its
    steps) is first moved into a staging folder of ours, so a kill at any point leaves only folders
    that the next start-up or save recognises."""
    target = os.path.join(directory, iteration_name(step))
    if os.path.exists(target):
        aside = new_staging_folder(directory)
        os.rename(target, os.path.join(aside, "replaced"))
    os.rename(os.path.join(staging, STAGING_PAYLOAD), target)
    fsync_dir(directory)
    write_latest(directory, step)
    remove_stale_staging(directory)
    return target


def prune(directory: str, keep_last: int) -> list[str]:
    """Deletes all but the newest `keep_last` iter_ folders, never the one the latest file names."""
    latest = read_latest(directory)
    steps = iterations(directory)
    removed = []
    for step in steps[:-keep_last] if keep_last < len(steps) else []:
        if step == latest:
            continue
        path = os.path.join(directory, iteration_name(step))
        aside = new_staging_folder(directory)  # renamed away first: no half-deleted iter_ folder remains
        os.rename(path, os.path.join(aside, "pruned"))
        remove_stale_staging(directory)
        removed.append(path)
    return removed
