"""The --log-jsonl file: one JSON line of metrics per step, appended by rank 0, strict JSON (RFC
8259: a non-finite float, inf or NaN, is written as null; Python's json would write `Infinity`).

A run resumed from the checkpoint of step s continues at step s + 1, so the lines a previous run
wrote after step s (it went on past its last checkpoint, then stopped) would be logged twice:
`drop_lines_after_step` removes them first, rewriting the file atomically (a temporary file renamed
over it), so the lines up to step s stay byte for byte whatever happens.
"""
from __future__ import annotations

import json
import math
import os
import tempfile


def strict_json_value(value):
    """A value as strict JSON can hold it: non-finite floats become None (null), containers recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json_value(item) for item in value]
    return value


def append_line(path: str, metrics: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(strict_json_value(metrics), allow_nan=False) + "\n")


def _step_of(line: str):
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record.get("step") if isinstance(record, dict) else None


def drop_lines_after_step(path: str, step: int) -> int:
    """Keep the lines before the first one whose "step" is > step (and drop a last line cut off
    without its newline); returns how many lines were dropped. A missing file is left missing."""
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    keep = len(lines)
    for index, line in enumerate(lines):
        logged = _step_of(line)
        if not line.endswith("\n") or (isinstance(logged, (int, float)) and logged > step):
            keep = index
            break
    if keep == len(lines):
        return 0
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".log_", suffix=".jsonl")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.writelines(lines[:keep])
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return len(lines) - keep
