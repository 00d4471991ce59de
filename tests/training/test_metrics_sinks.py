"""The metrics sinks (training/metrics_sinks.py), read back with each format's own reader.

Properties proved:
- JSONL: a sink opened to resume at step s drops the lines a previous run wrote after s; a missing
  folder of the file is created;
- TensorBoard: the scalars and the samples text read back by TensorBoard's EventAccumulator are
  the values written, at their steps; resumed at step s, the earlier run's events after s are purged
  (each step holds the resumed run's value only);
- W&B (offline, no network): the history records in the run file hold the values at their steps,
  non-finite values as null, the samples as a table; the run config records resumed_from_step;
- a --wandb-project / --tensorboard-dir whose package is not installed is a usage error saying
  `pip install ...`, before anything is built.
"""
from __future__ import annotations

import glob
import importlib.util
import json

import pytest

from megatron_rpg.training.config import LoggingConfig
from megatron_rpg.training.metrics_sinks import JsonlSink, open_sinks

SAMPLES = [{"prompt": "3", "response": "3 3 | 1", "reward": 0.5}]


def test_jsonl_sink_resumed_at_a_step_drops_the_later_lines(tmp_path):
    path = str(tmp_path / "new_folder" / "run.jsonl")  # a missing folder is created
    first = JsonlSink(path, start=0)
    for step in range(5):
        first.write(step, {"reward_mean": step / 10})
    resumed = JsonlSink(path, start=2)
    resumed.write(3, {"reward_mean": 0.99})
    with open(path, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    assert [(r["step"], r["reward_mean"]) for r in lines] == [(0, 0.0), (1, 0.1), (2, 0.2), (3, 0.99)]


def _tensorboard_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(folder, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    texts = {e.step: e.tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]
             if tag.startswith("samples") for e in events.Tensors(tag)}
    return scalars, texts


def test_tensorboard_scalars_read_back_and_a_resume_purges_the_later_steps(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is pinned in requirements-cpu.txt")
    folder = str(tmp_path / "tb")
    (sink,) = open_sinks(LoggingConfig(tensorboard_dir=folder), start=0)
    for step in range(1, 5):
        sink.write(step, {"reward_mean": step / 8, "eval/accuracy": step / 16, "step": step, "note": "text",
                          **({"samples": SAMPLES} if step == 1 else {})})
    sink.close()
    scalars, texts = _tensorboard_scalars(folder)
    assert scalars["reward_mean"] == [(s, s / 8) for s in range(1, 5)]  # eighths: exact in float32
    assert scalars["eval/accuracy"] == [(s, s / 16) for s in range(1, 5)]
    assert "step" not in scalars and "note" not in scalars
    assert "3 3 \\| 1" in texts[1] and "0.500" in texts[1]
    (resumed,) = open_sinks(LoggingConfig(tensorboard_dir=folder), start=2)
    resumed.write(3, {"reward_mean": 0.75})
    resumed.close()
    scalars, _ = _tensorboard_scalars(folder)
    assert scalars["reward_mean"] == [(1, 0.125), (2, 0.25), (3, 0.75)]  # step 4 of the first run purged


def _wandb_history(folder):
    """The history rows of the offline run file(s) under `folder` (W&B's record log: a 7-byte header,
    then 32 KiB blocks of records, each crc32 (4) length (2, little-endian) type (1) data)."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted(glob.glob(f"{folder}/wandb/offline-run-*/run-*.wandb")):
        data = open(path, "rb").read()
        assert data[:4] == b":W&B"
        position, block, pieces, chunks = 7, 32768, b"", []
        while position + 7 <= len(data):
            if block - position % block < 7:  # a block's tail too short for a header is padding
                position += block - position % block
                continue
            length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
            chunk = data[position + 7:position + 7 + length]
            position += 7 + length
            if kind == 1:
                chunks.append(chunk)
            elif kind in (2, 3):
                pieces = chunk if kind == 2 else pieces + chunk
            elif kind == 4:
                chunks.append(pieces + chunk)
        for chunk in chunks:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            if record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                rows.append({key: value for key, value in items.items() if not key.startswith("_") or key == "_step"})
    return rows


def test_wandb_offline_run_holds_the_values_with_non_finite_as_null(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is pinned in requirements-cpu.txt")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    folder = str(tmp_path / "wb")
    logging = LoggingConfig(wandb_project="megatron-rpg-test", wandb_exp_name="sink", wandb_save_dir=folder)
    (sink,) = open_sinks(logging, start=0, run_config={"training/seed": 3})
    sink.write(1, {"reward_mean": 0.25, "grad_norm": float("inf"), "step": 1})
    sink.write(2, {"reward_mean": 0.5, "grad_norm": 1.5, "samples": SAMPLES})
    sink.close()
    import wandb
    wandb.teardown()  # waits for W&B's service process to finish writing the run file
    rows = _wandb_history(folder)
    assert rows[0] == {"_step": 1, "reward_mean": 0.25, "grad_norm": None}
    assert {key: rows[1][key] for key in ("_step", "reward_mean", "grad_norm")} == {"_step": 2, "reward_mean": 0.5,
                                                                                    "grad_norm": 1.5}
    assert rows[1]["samples/_type"] == "table-file" and rows[1]["samples/nrows"] == 1
    (run_file,) = glob.glob(f"{folder}/wandb/offline-run-*/run-*.wandb")
    assert b"resumed_from_step" in open(run_file, "rb").read() and b"training/seed" in open(run_file, "rb").read()


@pytest.mark.parametrize("flag, package", [("--wandb-project", "wandb"), ("--tensorboard-dir", "tensorboard")])
def test_a_logging_flag_whose_package_is_missing_says_pip_install(flag, package, monkeypatch, capsys):
    from megatron_rpg.training import config_checks
    from megatron_rpg.training.config import parse_train_config

    real = importlib.util.find_spec
    monkeypatch.setattr(config_checks.importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        parse_train_config(["--model-preset", "tiny", flag, "x"])
    assert exit_info.value.code == 2
    assert f"{flag} x needs the {package} package, which is not installed: pip install {package}" in capsys.readouterr().err
