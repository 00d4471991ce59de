"""--capo on --loss grpo through the real trainer (tiny preset, CPU, one process; docs/algorithms.md, CAPO).

Properties proved:
- it trains with masks: every step logs per-level and total rejection rates in [0, 1] (history and
  JSONL), total = the sum of the levels, some tokens rejected and some kept over the run, and the
  optimizer steps stay finite and non-zero;
- thresholds no token can exceed (τ_F = τ_H = 1e9) train bit for bit as plain --loss grpo: the masks
  and the hidden-state seam change nothing else (same rewards, losses, gradient norms, weights);
- flags: a --capo-* flag without --capo, and --capo with --svrpg, are refused naming the flag;
- a --capo run resumed in a new process from its own step-2 checkpoint continues bit-exactly (every
  metric, the rejection rates included, and every checkpointed tensor: weights, Adam moments and the
  Adam model's moment table), so the table is restored from the checkpoint (megatron/capo_checkpoint.py);
- the same at TP=2 (2 steps, saved after 1): the table is split over TP by vocabulary rows, its
  checkpoint key shaped like the output layer's [V_padded, H];
- the recipe's thresholds on the tiny model reject every token: such optimizer steps are not taken
  (resumed from step 1 of a plain run, whose Adam moments and weight decay would move the weights on
  a zero gradient, the weights stay bit-identical), every metric is finite, the logged rejection rate is
  1.0, `capo_all_rejected_steps` counts them, the run does not stop, and a warning names the
  threshold flags; a checkpoint without a moment table (this plain run's) resumes with a warning.
"""
from __future__ import annotations

import json
import math
import os
import warnings

import pytest
import torch

from tests.distributed.harness import run_on_ranks

pytestmark = pytest.mark.distributed
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GRPO = ["--config", os.path.join(REPO, "examples", "tiny_cpu.yaml"), "--no-progress", "--no-eval", "--seed", "0",
        "--loss", "grpo", "--advantage-estimator", "grpo", "--train-iters", 3]
CAPO = ["--capo", "--capo-levels", "token", "sequence", "--capo-hessian-symmetric", "--capo-top-k", 8]
LEVELS = ("token", "sequence")


def _args(*extra):
    from megatron_rpg.training.config import parse_train_config
    return parse_train_config([str(x) for x in GRPO + list(extra)])


def _stored_tensors(directory) -> dict:
    """Every tensor of a torch_dist checkpoint (model, Adam moments, CAPO's table), whole, read in one process."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_rpg.checkpoint.dist_ckpt import checkpoint_shapes, single_process_group
    from megatron_rpg.checkpoint.layout import latest_checkpoint

    directory = latest_checkpoint(directory)
    buffers = {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in checkpoint_shapes(directory).items()}
    with single_process_group():
        dist_checkpointing.load({key: ShardedTensor.from_rank_offsets(key, buffer, replica_id=0)
                                 for key, buffer in buffers.items()}, directory, validate_access_integrity=False)
    return buffers


def body(rank, world_size, workdir):
    from megatron_rpg.training.loop import train

    torch.set_num_threads(1)
    path = {name: os.path.join(workdir, name) for name in ("full", "resumed", "plain", "rejected")}
    path["after_one"] = os.path.join(path["plain"], "iter_0000001")  # Adam moments not zero there
    log = os.path.join(workdir, "capo.jsonl")
    masks = [*CAPO, "--capo-tau-f", 0.02, "--capo-tau-h", 0.2]
    out = {"capo": train(_args(*masks, "--log-jsonl", log, "--save", path["full"], "--save-interval", 1)),
           "plain": train(_args("--weight-decay", 0.1, "--save", path["plain"], "--save-interval", 1)),
           "open": train(_args(*CAPO, "--capo-tau-f", 1e9, "--capo-tau-h", 1e9, "--weight-decay", 0.1))}
    with open(log, encoding="utf-8") as f:
        out["log"] = [json.loads(line) for line in f]
    out["resumed"] = train(_args(*masks, "--load", os.path.join(path["full"], "iter_0000002"), "--save", path["resumed"]))
    with warnings.catch_warnings(record=True) as caught:  # the recipe's thresholds, from the plain run
        warnings.simplefilter("always")
        out["rejected"] = train(_args("--capo", "--capo-top-k", 8, "--weight-decay", 0.1, "--max-skipped-steps", 2,
                                      "--train-iters", 2, "--load", path["after_one"], "--save", path["rejected"]))
    out["warnings"] = [str(warning.message) for warning in caught]
    return out


def tp2_body(rank, world_size, workdir):
    from megatron_rpg.training.loop import train

    torch.set_num_threads(1)
    path = {name: os.path.join(workdir, name) for name in ("full", "resumed")}
    masks = [*CAPO, "--capo-tau-f", 0.02, "--capo-tau-h", 0.2, "--tensor-model-parallel-size", 2, "--train-iters", 2]
    out = {"full": train(_args(*masks, "--save", path["full"], "--save-interval", 1))}
    out["resumed"] = train(_args(*masks, "--load", os.path.join(path["full"], "iter_0000001"), "--save", path["resumed"]))
    return out


@pytest.fixture(scope="module")
def tp2_runs(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("capo_tp2"))
    out = run_on_ranks(tp2_body, world_size=2, args=(workdir,))[0]
    out["weights"] = {name: _stored_tensors(os.path.join(workdir, name)) for name in ("full", "resumed")}
    return workdir, out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("capo"))
    out = run_on_ranks(body, world_size=1, args=(workdir,))[0]
    places = dict(full="full", resumed="resumed", after_one=os.path.join("plain", "iter_0000001"), rejected="rejected")
    out["weights"] = {name: _stored_tensors(os.path.join(workdir, place)) for name, place in places.items()}
    return out


def test_capo_rejects_some_tokens_and_logs_the_rates(runs):
    steps = runs["capo"]
    for step, line in zip(steps, runs["log"]):
        rates = [step[f"capo_rejected_{level}"] for level in LEVELS]
        assert all(0 <= rate <= 1 for rate in rates)
        assert step["capo_rejected_total"] == pytest.approx(sum(rates), abs=1e-12)
        assert line["capo_rejected_total"] == step["capo_rejected_total"]
        assert math.isfinite(step["grad_norm"]) and step["grad_norm"] > 0
    totals = [step["capo_rejected_total"] for step in steps]
    print("capo rejection rates per step:", [{level: round(step[f"capo_rejected_{level}"], 4) for level in LEVELS}
                                              for step in steps])
    assert max(totals) > 0 and min(totals) < 1


def test_thresholds_nothing_exceeds_train_exactly_as_plain_grpo(runs):
    for open_step, plain_step in zip(runs["open"], runs["plain"]):
        assert open_step["capo_rejected_total"] == 0
        for key, value in plain_step.items():
            if key not in ("step_time", "time", "elapsed_s") and not key.endswith("_s"):
                assert open_step[key] == value, key


def test_capo_flags_are_checked():
    with pytest.raises(SystemExit):
        _args("--capo-tau-h", 0.1)
    with pytest.raises(SystemExit):
        _args("--capo", "--svrpg")


def _assert_same_weights(weights, a, b):
    """Every tensor of checkpoint a (model weights, Adam moments, CAPO's table) is in b, bit for bit."""
    assert len(weights[a]) > 10 and set(weights[a]) <= set(weights[b])
    for name, tensor in weights[a].items():
        assert torch.equal(weights[b][name], tensor), name


def _assert_resumed_exactly(full, resumed, weights, steps):
    assert [step["step"] for step in resumed] == steps
    for ours, reference in zip(resumed, full[steps[0] - 1:]):
        assert ours.keys() == reference.keys()
        for name in ours:
            if name != "elapsed_s":
                assert ours[name] == reference[name], name
    _assert_same_weights(weights, "full", "resumed")
    _assert_same_weights(weights, "resumed", "full")
    assert weights["full"]["capo.adam_moments.v"].any()  # the table moved, and was restored


def test_a_resumed_capo_run_continues_bit_exactly(runs):
    _assert_resumed_exactly(runs["capo"], runs["resumed"], runs["weights"], [3])


def test_a_resumed_capo_run_at_tp2_continues_bit_exactly_from_the_row_sharded_table(tp2_runs):
    from megatron_rpg.checkpoint.dist_ckpt import checkpoint_shapes
    from megatron_rpg.megatron.models import padded_vocab_size

    workdir, out = tp2_runs
    _assert_resumed_exactly(out["full"], out["resumed"], out["weights"], [2])
    shapes = checkpoint_shapes(os.path.join(workdir, "full", "iter_0000001"))
    output_layer = shapes.get("output_layer.weight", shapes["embedding.word_embeddings.weight"])[0]  # tied
    assert output_layer[0] == padded_vocab_size(16, 2)
    for name in ("m", "v"):
        assert shapes[f"capo.adam_moments.{name}"] == (output_layer, torch.float32)


def test_an_all_rejected_step_is_not_taken_and_warns_with_the_thresholds(runs):
    _assert_same_weights(runs["weights"], "after_one", "rejected")  # no Adam momentum, no weight decay
    table = {key: tensor for key, tensor in runs["weights"]["rejected"].items() if key not in runs["weights"]["after_one"]}
    assert sorted(table) == ["capo.adam_moments.m", "capo.adam_moments.v"]  # started at 0, never moved
    assert all(not tensor.any() for tensor in table.values())
    (step,) = runs["rejected"]
    assert step["capo_rejected_token"] == step["capo_rejected_total"] == 1.0
    assert step["capo_all_rejected_steps"] == 2.0 and step["skipped_steps"] == 0.0  # both mini-batches
    assert step["grad_norm"] == 0.0 and step["normalizer"] == 0.0
    assert all(math.isfinite(value) for value in step.values() if isinstance(value, float)), step
    messages = runs["warnings"]
    assert any("holds no CAPO moment table" in message and "restart at zero" in message for message in messages)
    hint = [message for message in messages if "rejected every token with a non-zero advantage" in message]
    assert len(hint) == 1 and "--capo-tau-f" in hint[0] and "--capo-tau-h" in hint[0] and "tau_H = 0.01" in hint[0]


def test_the_progress_bar_shows_the_rejected_share_and_the_summary_each_levels_mean():
    from megatron_rpg.train import capo_line
    from megatron_rpg.training.loop import History, _report
    from megatron_rpg.training.skipped_steps import SkippedSteps

    class Bar:
        def set_postfix(self, **shown):
            self.shown = shown

    history, bar = History(), Bar()
    for token, sequence, empty in ((0.5, 0.25, 1.0), (0.25, 0.0, 0.0)):
        history.append({"step": len(history) + 1, "reward_mean": 0.0, "capo_rejected_token": token,
                        "capo_rejected_sequence": sequence, "capo_rejected_total": token + sequence,
                        "capo_all_rejected_steps": empty})
        _report(bar, history, [], SkippedSteps(10))
    assert bar.shown["capo_rejected"] == "0.250"
    assert capo_line(history) == ("capo rejected (mean over the steps): token 0.375, sequence 0.125, total 0.500; "
                                  "1 optimizer steps all rejected")
