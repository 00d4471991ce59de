"""What one trainer step reports and draws, on tiny single-process runs (real megatron-core, CPU).

Properties proved:
- a step's loss metrics cover the whole step (every mini-batch): num_tokens is the step's, and the
  gradient norm is reported per optimizer step as a mean and a maximum;
- under --svrpg the loss metrics are reported too; with --svrpg-update-ref at --rollout-temperature
  0.5, the anchor step (θ_t = θ̃ = π_ref) has KL 0: reference and old log-probs share the temperature;
- an anchor step draws no inner batch (its update is v = μ: the control variate vanishes), so a run
  draws one batch per step;
- a run resumed from the checkpoint of step 2 drops the log lines written after it (a crashed run's)
  and keeps those before it byte for byte: each step is in the JSONL log once.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.distributed.harness import run_on_ranks

pytestmark = pytest.mark.distributed
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = ["--config", os.path.join(REPO, "examples", "tiny_cpu.yaml"), "--no-progress", "--seed", "0",
         "--no-eval"]  # evaluation: tests/training/test_evaluation.py
SVRPG_T05 = ["--svrpg", "--svrpg-inner-steps", 2, "--svrpg-anchor-batch-size", 64, "--num-mini-batches", 1,
             "--svrpg-update-ref", "--rollout-temperature", 0.5, "--rpg-aggregation", "seq-mean-token-sum"]


def _args(*extra):
    from megatron_rpg.training.config import parse_train_config
    return parse_train_config(QUICK + [str(x) for x in extra])


def body(rank, world_size, workdir):
    from megatron_rpg.rollout.embedded import EmbeddedEngine
    from megatron_rpg.training.loop import train

    torch.set_num_threads(1)
    calls = []
    generate = EmbeddedEngine.generate

    def counted(self, prompts, sampling):
        calls.append(len(prompts))
        return generate(self, prompts, sampling)

    EmbeddedEngine.generate = counted
    out = {"plain": train(_args("--train-iters", 1))}
    calls.clear()
    out["svrpg"] = train(_args("--train-iters", 3, *SVRPG_T05))
    out["svrpg_generate_calls"] = list(calls)
    log, checkpoint = os.path.join(workdir, "log.jsonl"), os.path.join(workdir, "checkpoint")
    train(_args("--train-iters", 2, "--save", checkpoint, "--log-jsonl", log))
    with open(log, "a", encoding="utf-8") as f:  # a run that crashed after its step-3 line
        f.write(json.dumps({"step": 3, "written_by": "the crashed run"}) + "\n")
    with open(log, encoding="utf-8") as f:
        out["log_before"] = f.read()
    out["resumed"] = train(_args("--train-iters", 3, "--load", checkpoint, "--log-jsonl", log))
    with open(log, encoding="utf-8") as f:
        out["log_after"] = f.read()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_on_ranks(body, world_size=1, args=(str(tmp_path_factory.mktemp("step_runs")),))[0]


def test_loss_metrics_and_grad_norm_cover_the_whole_step(runs):
    (step,) = runs["plain"]
    assert step["num_tokens"] == 8 * 8 * 8  # 8 prompts x 8 samples x 8 tokens, both mini-batches
    assert step["num_sequences"] == 64
    assert 0 < step["grad_norm"] <= step["grad_norm_max"]
    assert step["grad_norm"] < step["grad_norm_max"]  # two optimizer steps, two different norms


def test_svrpg_steps_report_loss_metrics(runs):
    for step in runs["svrpg"]:
        for name in ("kl_k3", "ratio_mean", "num_tokens", "grad_norm", "grad_norm_max"):
            assert name in step, name


def test_update_ref_reference_at_the_sampling_temperature_has_zero_kl_at_the_anchor(runs):
    anchor = runs["svrpg"][0]
    assert "svrpg/anchor_sequences" in anchor
    # θ_t = θ̃ = π_ref: the same forward pass gives both log-probs (0.135 with the reference at T = 1)
    assert anchor["kl_k3"] == 0.0


def test_an_anchor_step_draws_no_inner_batch_and_steps_along_mu(runs):
    # steps 1 and 3 anchor (m = 2): one draw of 64 sequences per step, none thrown away
    assert runs["svrpg_generate_calls"] == [64, 64, 64]
    for step in (runs["svrpg"][0], runs["svrpg"][2]):
        assert step["svrpg/rho_mean"] == 1.0
        # v = g(θ_t) − ρ̄·g(θ̃) + μ with θ_t = θ̃ on the same batch: g − g = 0 exactly
        assert step["svrpg/control_variate_norm"] == 0.0
        assert step["svrpg/direction_norm"] == pytest.approx(step["svrpg/anchor_grad_norm"], rel=1e-12)


def test_a_resumed_run_logs_each_step_once_and_keeps_the_lines_before_its_checkpoint(runs):
    before, after = runs["log_before"].splitlines(), runs["log_after"].splitlines()
    assert [json.loads(line)["step"] for line in after] == [1, 2, 3]
    assert after[:2] == before[:2]  # byte for byte
    assert "written_by" not in after[2]
    assert json.loads(after[2])["reward_mean"] == runs["resumed"][0]["reward_mean"]
