"""--rollout-is-correction takes effect in the trainer, and as the formula says (losses/rollout_is.py),
on tiny single-process runs (real megatron-core, CPU, 2 steps of 2 optimizer steps each, β = 0).

A hook after the old log-probs sets the engine's log-probs to the trainer's (engine = trainer), and
then moves row 0 of every micro-batch by 5 nats a token for the perturbed runs. Proved, bit for bit
over every metric of both steps (rewards, ratios, clip fractions, gradient norms: the second step
samples from the updated model, so the updates are equal too):
- w ≡ 1: tis equals the uncorrected run (and reports weight_mean 1, truncated_fraction 0);
- tis, sequence level, C = 2: row 0 (w = e^{5·T}) has weight exactly 2, so the run equals the
  uncorrected one with row 0's advantage doubled (the loss is linear in the advantage at β = 0);
  weight_mean and truncated_fraction are the token-weighted ones of that batch;
- mis, sequence level: row 0 is masked (weight 0): the run equals the uncorrected one with row 0's
  advantage 0 (all but the clip fractions, which count row 0's tokens by its advantage's sign);
- the flags: a threshold without a correction, -threshold-low with tis, C < 1 are refused naming the flag.
"""
from __future__ import annotations

import os

import pytest

from tests.distributed.harness import run_on_ranks

pytestmark = pytest.mark.distributed
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = ["--config", os.path.join(REPO, "examples", "tiny_cpu.yaml"), "--no-progress", "--no-eval", "--seed", "0",
         "--train-iters", "2", "--rollout-batch-size", "2", "--micro-batch-size", "8", "--rpg-beta", "0"]
SHIFT = 5.0  # nats per token taken off row 0's engine log-probs in the perturbed runs
RUNS = {  # name: (extra flags, engine shift on row 0, factor on row 0's advantage)
    "plain": ([], 0.0, 1.0),
    "tis_agreeing": (["--rollout-is-correction", "tis"], 0.0, 1.0),
    "tis_sequence": (["--rollout-is-correction", "tis", "--rollout-is-level", "sequence",
                      "--rollout-is-threshold", "2"], SHIFT, 1.0),
    "doubled": ([], 0.0, 2.0),
    "mis_sequence": (["--rollout-is-correction", "mis", "--rollout-is-level", "sequence"], SHIFT, 1.0),
    "dropped": ([], 0.0, 0.0),
}


def body(rank, world_size):
    import torch

    from megatron_rpg.training import loop
    from megatron_rpg.training.config import parse_train_config

    torch.set_num_threads(1)
    attach = loop.attach_old_logprobs
    out, row0_tokens = {}, []
    for name, (flags, shift, factor) in RUNS.items():
        row0_tokens.clear()

        def hooked(model, micro_batches, temperature, shift=shift, factor=factor, **options):
            mismatch = attach(model, micro_batches, temperature, **options)
            for micro_batch in micro_batches:
                engine = micro_batch["old_logp"].cpu().clone()
                engine[0] -= SHIFT * micro_batch["loss_mask"][0] if shift else 0.0
                micro_batch["engine_logp"] = engine
                micro_batch["advantages"][0] *= factor
                row0_tokens.append(float(micro_batch["loss_mask"][0].sum()))
            return mismatch

        loop.attach_old_logprobs = hooked
        try:
            history = loop.train(parse_train_config(QUICK + flags))
        finally:
            loop.attach_old_logprobs = attach
        out[name] = {"history": [dict(step) for step in history], "row0_tokens": list(row0_tokens)}
    return out


@pytest.fixture(scope="module")
def runs():
    return run_on_ranks(body, world_size=1, timeout_s=600)[0]


def _same_steps(a: list[dict], b: list[dict], ignore: tuple[str, ...] = ()) -> None:
    assert len(a) == len(b) == 2
    for step_a, step_b in zip(a, b):
        keys = (set(step_a) | set(step_b)) - {"elapsed_s", *ignore}
        differ = {key: (step_a.get(key), step_b.get(key)) for key in keys
                  if not key.startswith("rollout_is/") and step_a.get(key) != step_b.get(key)}
        assert not differ, differ


def test_agreeing_engine_gives_weight_one_and_the_uncorrected_steps(runs):
    _same_steps(runs["tis_agreeing"]["history"], runs["plain"]["history"])
    for step in runs["tis_agreeing"]["history"]:
        assert step["rollout_is/weight_mean"] == 1.0 and step["rollout_is/truncated_fraction"] == 0.0
    assert "rollout_is/weight_mean" not in runs["plain"]["history"][0]


CLIP_FRACTIONS = ("clip_frac_low", "clip_frac_high", "clip_frac_dual")


@pytest.mark.parametrize("corrected, reference, weight", [("tis_sequence", "doubled", 2.0),
                                                           ("mis_sequence", "dropped", 0.0)])
def test_bounded_weight_of_the_perturbed_row_acts_as_the_formula_says(runs, corrected, reference, weight):
    # the loss's clip fractions count tokens by their advantage's sign, and the masked row keeps its
    # advantage while the reference's is 0: those differ; the gradients (grad_norm) and updates do not
    _same_steps(runs[corrected]["history"], runs[reference]["history"], ignore=CLIP_FRACTIONS if not weight else ())
    row0 = runs[corrected]["row0_tokens"]  # per micro-batch, 2 per step (16 sequences, 8 a micro-batch)
    for index, step in enumerate(runs[corrected]["history"]):
        tokens, moved = step["num_tokens"], sum(row0[2 * index:2 * index + 2])
        outside = "truncated_fraction" if weight else "masked_fraction"
        assert step[f"rollout_is/{outside}"] == moved / tokens
        assert step["rollout_is/weight_mean"] == pytest.approx((tokens - moved + weight * moved) / tokens, rel=1e-12)
        assert step["rollout_is/log_weight_abs_max"] == pytest.approx(SHIFT * max(row0[2 * index:2 * index + 2]),
                                                                       rel=1e-6)


@pytest.mark.parametrize("flags, message", [
    (["--rollout-is-threshold", "3"], "--rollout-is-threshold has no effect without --rollout-is-correction"),
    (["--rollout-is-level", "sequence"], "--rollout-is-level has no effect without"),
    (["--rollout-is-correction", "tis", "--rollout-is-threshold-low", "0.5"],
     "--rollout-is-threshold-low has no effect with --rollout-is-correction tis"),
    (["--rollout-is-correction", "mis", "--rollout-is-threshold", "0.9"], "--rollout-is-threshold=0.9 must be"),
])
def test_flags_without_effect_or_out_of_range_are_refused(flags, message, capsys):
    from megatron_rpg.training.config import parse_train_config

    with pytest.raises(SystemExit):
        parse_train_config(QUICK + flags)
    assert message in capsys.readouterr().err


def test_top_k_on_the_embedded_engine_warns_that_the_weight_includes_the_truncation():
    from megatron_rpg.training.config import parse_train_config

    with pytest.warns(UserWarning, match="kept set's probability mass"):
        parse_train_config(QUICK + ["--rollout-is-correction", "tis", "--rollout-top-k", "4"])
