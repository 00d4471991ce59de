"""--capo on --loss grpo through the real trainer (tiny preset, CPU, one process; docs/algorithms.md, CAPO).

Properties proved:
- it trains with masks: every step logs per-level and total rejection rates in [0, 1] (history and
  JSONL), total = the sum of the levels, some tokens rejected and some kept over the run, and the
  optimizer steps stay finite and non-zero;
- thresholds no token can exceed (τ_F = τ_H = 1e9) train bit for bit as plain --loss grpo: the masks
  and the hidden-state seam change nothing else (same rewards, losses, gradient norms, weights);
- flags: a --capo-* flag without --capo, and --capo with --svrpg, are refused naming the flag;
- a --capo run saved after step 2 and resumed in a new process continues bit-exactly (every metric,
  the rejection rates included, and the final weights), so the Adam model's moment table is restored
  from the checkpoint (megatron/capo_checkpoint.py);
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


def _weights(directory):
    from megatron_rpg.megatron.optimizer_setup import bare_model
    from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_rpg.training.build import build_model_and_optimizer

    initialize_parallel(1, 1, seed=9)
    model, _, _ = build_model_and_optimizer(_args("--load", directory, "--finetune"))
    weights = {name: p.detach().clone() for name, p in bare_model(model[0]).named_parameters()}
    destroy_parallel()
    return weights


def body(rank, world_size, workdir):
    from megatron_rpg.training.loop import train

    torch.set_num_threads(1)
    path = {name: os.path.join(workdir, name) for name in ("full", "half", "resumed", "plain", "rejected")}
    path["after_one"] = os.path.join(path["plain"], "iter_0000001")  # Adam moments not zero there
    log = os.path.join(workdir, "capo.jsonl")
    masks = [*CAPO, "--capo-tau-f", 0.02, "--capo-tau-h", 0.2]
    out = {"capo": train(_args(*masks, "--log-jsonl", log, "--save", path["full"])),
           "plain": train(_args("--weight-decay", 0.1, "--save", path["plain"], "--save-interval", 1)),
           "open": train(_args(*CAPO, "--capo-tau-f", 1e9, "--capo-tau-h", 1e9, "--weight-decay", 0.1))}
    with open(log, encoding="utf-8") as f:
        out["log"] = [json.loads(line) for line in f]
    train(_args(*masks, "--train-iters", 2, "--save", path["half"]))
    out["resumed"] = train(_args(*masks, "--load", path["half"], "--save", path["resumed"]))
    with warnings.catch_warnings(record=True) as caught:  # the recipe's thresholds, from the plain run
        warnings.simplefilter("always")
        out["rejected"] = train(_args("--capo", "--capo-top-k", 8, "--weight-decay", 0.1, "--max-skipped-steps", 2,
                                      "--train-iters", 2, "--load", path["after_one"], "--save", path["rejected"]))
    out["warnings"] = [str(warning.message) for warning in caught]
    out["weights"] = {name: _weights(path[name]) for name in ("full", "resumed", "after_one", "rejected")}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_on_ranks(body, world_size=1, args=(str(tmp_path_factory.mktemp("capo")),))[0]


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
    assert weights[a].keys() == weights[b].keys()
    for name, tensor in weights[a].items():
        assert torch.equal(weights[b][name], tensor), name


def test_a_resumed_capo_run_continues_bit_exactly(runs):
    full, resumed = runs["capo"], runs["resumed"]
    assert [step["step"] for step in resumed] == [3]
    for ours, reference in zip(resumed, full[2:]):
        assert ours.keys() == reference.keys()
        for name in ours:
            if name != "elapsed_s":
                assert ours[name] == reference[name], name
    _assert_same_weights(runs["weights"], "full", "resumed")


def test_an_all_rejected_step_is_not_taken_and_warns_with_the_thresholds(runs):
    _assert_same_weights(runs["weights"], "after_one", "rejected")  # no Adam momentum, no weight decay
    (step,) = runs["rejected"]
    assert step["capo_rejected_token"] == step["capo_rejected_total"] == 1.0
    assert step["capo_all_rejected_steps"] == 2.0 and step["skipped_steps"] == 0.0  # both mini-batches
    assert step["grad_norm"] == 0.0 and step["normalizer"] == 0.0
    assert all(math.isfinite(value) for value in step.values() if isinstance(value, float)), step
    messages = runs["warnings"]
    assert any("holds no CAPO moment table" in message and "restart at zero" in message for message in messages)
    hint = [message for message in messages if "rejected every token with a non-zero advantage" in message]
    assert len(hint) == 1 and "--capo-tau-f" in hint[0] and "--capo-tau-h" in hint[0] and "tau_H = 0.01" in hint[0]
