"""Resuming at step s removes the log lines after step s and keeps the others byte for byte."""
import json
import os

from megatron_rpg.training.metrics_log import append_line, drop_lines_after_step


def _write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def test_lines_after_the_resumed_step_are_dropped_and_the_rest_kept_byte_for_byte(tmp_path):
    path = str(tmp_path / "log.jsonl")
    kept = "".join(json.dumps({"step": step, "reward_mean": step / 3}) + "\n" for step in (1, 2))
    _write(path, kept + '{"step": 3}\n{"step": 4}\n{"step": 5, "cut')  # the last line torn by a crash
    assert drop_lines_after_step(path, 2) == 3
    with open(path, encoding="utf-8") as f:
        assert f.read() == kept
    append_line(path, {"step": 3})
    assert drop_lines_after_step(path, 3) == 0
    assert os.listdir(tmp_path) == ["log.jsonl"]  # no temporary file left


def test_a_log_ending_at_the_resumed_step_or_missing_is_left_alone(tmp_path):
    path = str(tmp_path / "log.jsonl")
    assert drop_lines_after_step(path, 2) == 0 and not os.path.exists(path)
    _write(path, '{"step": 1}\nnot json, kept\n{"step": 2}\n')
    before = os.stat(path).st_mtime_ns
    assert drop_lines_after_step(path, 2) == 0
    assert os.stat(path).st_mtime_ns == before  # not rewritten


def _strict_loads(line: str):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    return json.loads(line, parse_constant=refuse)


def test_non_finite_values_are_written_as_null_strict_json(tmp_path):
    path = str(tmp_path / "log.jsonl")
    append_line(path, {"step": 1, "grad_norm": float("inf"), "kl": float("nan"), "loss": -float("inf"),
                       "reward_mean": 0.5, "samples": [{"reward": float("nan")}]})
    with open(path, encoding="utf-8") as f:
        record = _strict_loads(f.readline())
    assert record == {"step": 1, "grad_norm": None, "kl": None, "loss": None, "reward_mean": 0.5,
                      "samples": [{"reward": None}]}
