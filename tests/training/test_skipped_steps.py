"""The trainer's non-finite guard end to end (tiny CPU config): megatron/step_guard.py skips a step
whose loss, gradient norm or optimizer state is not finite, training/skipped_steps.py counts it and
ends the run after --max-skipped-steps in a row.

Properties proved:
- `--rpg-beta 1e30` (on main: grad_norm inf at every step, no warning): the second mini-batch's step
  (θ ≠ θ_old, the KL gradient times 1e30 overflows) is skipped and counted at every step;
- a fault at every optimizer step ends the run after --max-skipped-steps with an error naming the
  flag, before that step's checkpoint; the checkpoint written holds the initial weights bit for bit;
- a transient fault (an inf gradient entry at one optimizer step) skips that step only: counted
  in `skipped_steps`, a warning, the run goes on; the SVRPG path skips the same way (its inner
  step does not advance);
- SkippedSteps: K in a row end the run, a good step resets the count, fp16's loss-scale search
  (overflows while the scale can still drop) never does, an exactly-zero gradient with
  non-zero advantages K times in a row ends it too; a deterministic policy without gradient K times
  in a row is warned once;
- `--lr 1` collapses the tiny model within 2 steps (gradient exactly 0, every token at probability
  1): the run warns that it cannot learn any more.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

from megatron_rpg.megatron.step_guard import StepOutcome
from megatron_rpg.training.skipped_steps import SkippedSteps, SkippedStepsError, SkippedStepsWarning
from tests.distributed.harness import run_on_ranks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = ["--config", os.path.join(REPO, "examples", "tiny_cpu.yaml"), "--no-progress", "--seed", "0",
         "--rollout-batch-size", "4", "--micro-batch-size", "8"]
SVRPG = ["--svrpg", "--svrpg-inner-steps", "3", "--svrpg-anchor-batch-size", "32", "--num-mini-batches", "1",
         "--rpg-aggregation", "seq-mean-token-sum"]


def _weights(model) -> dict:
    from megatron_rpg.megatron.optimizer_setup import bare_model
    return {name: p.detach().clone() for name, p in bare_model(model[0]).named_parameters()}


def _poison_optimizer_step(module, at: set):
    """Wraps `module.rl_forward_backward` so that the gradient of the calls numbered in `at` (1-based,
    every call counts) gets one inf entry: a fault inside one optimizer step."""
    real = module.rl_forward_backward
    calls = []

    def poisoned(model, *args, **kwargs):
        result = real(model, *args, **kwargs)
        calls.append(1)
        if len(calls) in at:
            with torch.no_grad():
                next(model[0].parameters()).main_grad.view(-1)[0] = float("inf")
        return result

    module.rl_forward_backward = poisoned


def body(rank, world_size, workdir):
    from megatron_rpg.optim import svrpg_passes
    from megatron_rpg.training import loop, update
    from megatron_rpg.training.config import parse_train_config

    torch.set_num_threads(1)
    out = {}
    saved, initial = [], []
    real_save, real_build = loop.save_checkpoint, loop.build_run

    def recording_save(model, *args, step, **kwargs):
        saved.append((step, _weights(model)))
        return real_save(model, *args, step=step, **kwargs)

    def recording_build(config, dp, *rest):
        run = real_build(config, dp, *rest)
        initial.append(_weights(run.model))
        return run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedStepsWarning)
        out["beta"] = loop.train(parse_train_config(QUICK + ["--rpg-beta", "1e30", "--train-iters", "3"]))
        real_forward_backward = update.rl_forward_backward
        _poison_optimizer_step(update, at=set(range(1, 100)))
        loop.save_checkpoint, loop.build_run = recording_save, recording_build
        try:
            loop.train(parse_train_config(QUICK + ["--max-skipped-steps", "3", "--train-iters", "4",
                                                   "--save", os.path.join(workdir, "faulty"), "--save-interval", "1"]))
        except SkippedStepsError as error:
            out["faulty_error"] = str(error)
    out["faulty_saved"], out["faulty_initial"] = saved, initial[0]
    loop.save_checkpoint, loop.build_run, update.rl_forward_backward = real_save, real_build, real_forward_backward

    _poison_optimizer_step(update, at={2})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["transient"] = loop.train(parse_train_config(QUICK + ["--train-iters", "2"]))
    out["transient_warnings"] = [str(w.message) for w in caught if issubclass(w.category, SkippedStepsWarning)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["lr_1"] = loop.train(parse_train_config(QUICK + ["--lr", "1", "--max-skipped-steps", "3", "--train-iters", "6"]))
    out["lr_1_warnings"] = [str(w.message) for w in caught if issubclass(w.category, SkippedStepsWarning)]
    _poison_optimizer_step(svrpg_passes, at={5})  # step 2's "current" pass (anchor, current, snapshot, ...)
    out["svrpg"] = loop.train(parse_train_config(QUICK + SVRPG + ["--train-iters", "3"]))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_on_ranks(body, world_size=1, args=(str(tmp_path_factory.mktemp("skips")),))[0]


@pytest.mark.distributed
def test_rpg_beta_1e30_skips_the_overflowing_step_of_every_batch(runs):
    assert [entry["skipped_steps"] for entry in runs["beta"]] == [1.0, 1.0, 1.0]
    assert all(entry["grad_norm_max"] == float("inf") for entry in runs["beta"])


@pytest.mark.distributed
def test_a_fault_at_every_step_ends_the_run_before_its_checkpoint_with_the_weights_untouched(runs):
    assert "3 optimizer steps in a row skipped (--max-skipped-steps 3)" in runs["faulty_error"]
    assert "non-finite gradient norm inf" in runs["faulty_error"]
    # 2 optimizer steps per training step: step 1 skipped both and saved, step 2's first skip was the third
    assert [step for step, _ in runs["faulty_saved"]] == [1]
    weights = runs["faulty_saved"][0][1]
    assert weights.keys() == runs["faulty_initial"].keys()
    assert all(torch.equal(weights[name], runs["faulty_initial"][name]) for name in weights)


@pytest.mark.distributed
def test_a_transient_fault_skips_one_optimizer_step_and_training_goes_on(runs):
    history = runs["transient"]
    assert [entry["skipped_steps"] for entry in history] == [1.0, 0.0]  # the 2nd optimizer step of step 1
    assert history[0]["grad_norm_max"] == float("inf") and torch.isfinite(torch.tensor(history[1]["grad_norm"]))
    assert len(runs["transient_warnings"]) == 2  # the skip, and the run's summary
    assert "optimizer step 2 skipped: non-finite gradient norm inf" in runs["transient_warnings"][0]
    assert "1 of 4 optimizer steps skipped" in runs["transient_warnings"][1]


@pytest.mark.distributed
def test_a_policy_collapsed_by_lr_1_is_reported_as_unable_to_learn(runs):
    assert [entry["grad_norm"] for entry in runs["lr_1"]][-2:] == [0.0, 0.0]
    assert any("deterministic" in message and "smaller --lr" in message for message in runs["lr_1_warnings"])


@pytest.mark.distributed
def test_svrpg_skips_a_non_finite_inner_step_without_advancing_it(runs):
    history = runs["svrpg"]
    assert [entry["skipped_steps"] for entry in history] == [0.0, 1.0, 0.0]
    assert [entry["svrpg/inner_step"] for entry in history] == [1.0, 1.0, 2.0]


def _outcome(skipped=None, grad_norm=1.0):
    return StepOutcome(updated=skipped is None, grad_norm=grad_norm, skipped=skipped)


def test_k_skips_in_a_row_end_the_run_and_a_good_step_resets_the_count():
    skips = SkippedSteps(max_consecutive=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedStepsWarning)
        for outcome in (_outcome("x"), _outcome("x"), _outcome(), _outcome("x"), _outcome("x")):
            skips.record(outcome)
        with pytest.raises(SkippedStepsError, match=r"3 optimizer steps in a row skipped \(--max-skipped-steps 3\)"):
            skips.record(_outcome("non-finite loss nan"))
    assert skips.skipped == 5 and skips.summary().startswith("5 of 6 optimizer steps skipped")


def test_fp16_loss_scale_search_overflows_are_counted_but_do_not_end_the_run():
    skips = SkippedSteps(max_consecutive=2)
    for _ in range(20):
        skips.record(StepOutcome(False, None, skipped="fp16 loss-scale overflow", cause="overflow"))
    assert skips.skipped == 20 and skips.skipped_in_a_row == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedStepsWarning)
        skips.record(StepOutcome(False, None, skipped="at the minimum", cause="overflow_at_min_scale"))
        with pytest.raises(SkippedStepsError, match="2 optimizer steps in a row"):
            skips.record(StepOutcome(False, None, skipped="at the minimum", cause="overflow_at_min_scale"))


def test_an_exactly_zero_gradient_with_advantages_k_times_in_a_row_ends_the_run():
    skips = SkippedSteps(max_consecutive=2)
    skips.record(_outcome(grad_norm=0.0), signal=False)  # nothing to learn from: no fault
    skips.record(_outcome(grad_norm=0.0), signal=False)
    skips.record(_outcome(grad_norm=0.0))
    skips.record(_outcome(grad_norm=0.5))  # a step with a gradient resets the count
    skips.record(_outcome(grad_norm=0.0))
    with pytest.raises(SkippedStepsError, match="exactly 0 for 2 optimizer steps in a row although the advantages"):
        skips.record(_outcome(grad_norm=0.0))


def test_a_deterministic_policy_without_gradient_k_times_in_a_row_is_warned_once():
    skips = SkippedSteps(max_consecutive=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(6):
            skips.record(_outcome(grad_norm=0.0), signal=False, deterministic=True)
    messages = [str(w.message) for w in caught if issubclass(w.category, SkippedStepsWarning)]
    assert len(messages) == 1 and "deterministic" in messages[0] and "smaller --lr" in messages[0]


def test_capo_all_rejected_steps_are_counted_not_faults_and_a_masked_out_stretch_is_warned_once():
    from megatron_rpg.megatron.step_guard import nothing_kept_outcome

    skips = SkippedSteps(max_consecutive=2, masked_out_hint="raise --capo-tau-h")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):  # never "in a row" towards the error, never "vanished"
            skips.record(nothing_kept_outcome(), signal=False, masked_out=True)
        skips.record(_outcome(grad_norm=0.0), signal=False, masked_out=True)  # kept zero-advantage tokens only
        skips.record(_outcome(grad_norm=0.5))  # a step with a gradient ends the stretch
        skips.record(nothing_kept_outcome(), signal=False, masked_out=True)
        skips.record(nothing_kept_outcome(), signal=False, masked_out=True)  # a second stretch: warned again
    messages = [str(w.message) for w in caught if issubclass(w.category, SkippedStepsWarning)]
    assert len(messages) == 2 and all("raise --capo-tau-h" in message for message in messages)
    assert skips.nothing_kept == 6 and skips.skipped == 0 and skips.vanished == 0
    assert "6 of 8 optimizer steps not taken" in skips.summary()
