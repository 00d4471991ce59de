"""One RL training step is the same at every parallel layout (real megatron-core on CPU over gloo).

The step: compute_logprobs, rl_forward_backward (RPG loss, URKL with RPG-Style Clip, token-mean),
megatron Adam step with gradient clipping. Reference: TP=1/PP=1/DP=1 in one process. Compared
layouts, on 2 gloo ranks in ONE spawn (the parallel state is rebuilt between layouts):
TP=2; PP=2 (4 micro-batches through the 1F1B schedule); DP=2 with the distributed optimizer (each
rank gets 2 of the 4 micro-batches). The micro-batches hold unequal token counts (2, 9, 15, 15), so a
per-micro-batch or per-rank mean would give a different loss and gradient (asserted).

Properties (float32 model): same loss, metrics, gradient norm, updated parameters gathered to the
full TP=1 layout, per-token log-probs from compute_logprobs (TP=2 and PP=2 vs TP=1), identical
results on both ranks. "Same" is within tests/float_bounds.py's bound: 4× the single-process step's
own float32 rounding, measured against that step in float64 (see float32_bounds); exactness itself is
proven in float64 (test_tp2_step_equals_single_process_to_float64_rounding).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.distributed.harness import run_on_ranks
from tests.float_bounds import EPS32, assert_float32_equal, float32_bound, norm
from tests.megatron import rl_step_fixtures as fx

pytestmark = pytest.mark.distributed

LAYOUTS = {"tp2": (2, 1, False), "pp2": (1, 2, False), "dp2_distributed_optimizer": (1, 1, True)}
# In float64 the only float32 differences left (TP's split matmul and all-reduce summation order) drop
# to ~1e-16: shows the float32 residuals (up to ~6e-7 for TP=2) are rounding, not a defect. Megatron's
# grad clipping asserts float32 grads, so this variant runs without clipping.
FLOAT64_LAYOUT = (2, 1, False)
LR = 1e-2
# Adam's first step is lr·g/(|g| + eps); a large eps keeps it a smooth function of g, so float
# summation-order noise in near-zero gradient entries cannot flip an update's sign (with eps=1e-8 the
# first step is lr·sign(g), and a 1e-9 gradient entry is then noise-dominated).
ADAM_EPS = 1e-3
CLIP_GRAD = 1.0


def _loss():
    from megatron_rpg.losses import RPGClip, RPGLoss
    return RPGLoss(divergence="urkl", style="differentiable", beta=0.1, aggregation="token-mean",
                   clip=RPGClip(eps_low=0.2, eps_high=0.28, dual_clip=3.0))


def one_rl_step(tensor_parallel: int, pipeline_parallel: int, distributed_optimizer: bool,
                float64: bool = False, family: str = fx.FAMILY, clip_grad: float = CLIP_GRAD) -> dict:
    """Build, load the shared weights, run one step; returns this rank's view of the results."""
    from megatron.core import parallel_state
    from megatron_rpg.megatron.forward_backward import compute_logprobs, rl_forward_backward
    from megatron_rpg.megatron.models import build_gpt_model
    from megatron_rpg.megatron.optimizer_setup import setup_model_and_optimizer
    from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel

    torch.set_num_threads(1)  # the same float summation order on any machine (and no oversubscription)
    initialize_parallel(tensor_parallel, pipeline_parallel, seed=7)
    try:
        dtype = torch.float64 if float64 else torch.float32
        gpt = build_gpt_model(fx.hf_config(family), params_dtype=dtype, pipeline_dtype=dtype)
        vocab_size = fx.hf_config(family).vocab_size
        full = fx.full_megatron_weights(gpt.vocab_size, family)
        fx.load_full_weights(gpt, {name: tensor.to(dtype) for name, tensor in full.items()})
        before = fx.gather_full_weights(gpt)
        model, optimizer = setup_model_and_optimizer(
            [gpt], lr=LR, adam_eps=ADAM_EPS, clip_grad=0.0 if float64 else clip_grad,
            use_distributed_optimizer=distributed_optimizer, grad_reduce_in_fp32=not float64)
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        batches = fx.global_micro_batches(vocab_size, family=family)
        per_rank = len(batches) // dp_size
        batches = batches[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        batches = fx.as_float64(batches) if float64 else batches

        logps = compute_logprobs(model, batches, vocab_size=vocab_size)
        loss, metrics = rl_forward_backward(model, batches, _loss(),
                                            vocab_size=vocab_size)
        succeeded, grad_norm, _ = optimizer.step()
        after = fx.gather_full_weights(gpt)
        tied_copy_err = None
        if gpt.share_embeddings_and_output_weights and gpt.post_process and not gpt.pre_process:
            # the last stage's copy of the tied embedding must stay equal to the embedding
            tied_copy_err = float((gpt.output_layer.weight.detach() - after[fx.EMBEDDING]).abs().max())
        return dict(tied_copy_err=tied_copy_err,loss=float(loss), metrics=metrics, succeeded=succeeded,
                    grad_norm=float(grad_norm), dp_rank=dp_rank,
                    logp=torch.cat(logps).numpy(),
                    update={name: (after[name] - before[name]).numpy() for name in after},
                    after={name: tensor.numpy() for name, tensor in after.items()})
    finally:
        destroy_parallel()


def _reference_step(family: str) -> dict:
    """The single-process step, with the same step in float64 and unclipped in float32 (megatron
    clips float32 grads only, so the update's float32 rounding is measured without clipping)."""
    result = one_rl_step(1, 1, False, family=family)
    result["float64"] = one_rl_step(1, 1, False, float64=True, family=family)
    result["unclipped"] = one_rl_step(1, 1, False, family=family, clip_grad=0.0)
    return result


def reference_body(rank, world_size):
    from megatron_rpg.megatron.forward_backward import rl_forward_backward
    result = _reference_step(fx.FAMILY)
    result["tied"] = _reference_step("qwen2-tied")
    # The public code's per-micro-batch mean, on the same data (forward only, same initial weights).
    from megatron_rpg.megatron.models import build_gpt_model
    from megatron_rpg.megatron.optimizer_setup import setup_model_and_optimizer
    from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel
    initialize_parallel(1, 1, seed=7)
    gpt = build_gpt_model(fx.hf_config())
    fx.load_full_weights(gpt, fx.full_megatron_weights(gpt.vocab_size))
    model, _ = setup_model_and_optimizer([gpt], lr=LR)
    vocab_size = fx.hf_config().vocab_size
    batches = fx.global_micro_batches(vocab_size)

    def forward_loss(micro_batches):
        return float(rl_forward_backward(model, micro_batches, _loss(),
                                         forward_only=True, vocab_size=vocab_size)[0])

    micro_batch_means = [forward_loss([mb]) for mb in batches]
    # DP=2 with a per-rank token mean averaged over ranks (megatron's default 3-tuple behaviour)
    rank_means = [forward_loss(batches[:2]), forward_loss(batches[2:])]
    destroy_parallel()
    result["mean_of_micro_batch_means"] = sum(micro_batch_means) / len(micro_batch_means)
    result["mean_of_rank_means"] = sum(rank_means) / len(rank_means)
    return result


def parallel_body(rank, world_size):
    results = {name: one_rl_step(*layout) for name, layout in LAYOUTS.items()}
    results["tp2_float64"] = one_rl_step(*FLOAT64_LAYOUT, float64=True)
    results["pp2_tied"] = one_rl_step(1, 2, False, family="qwen2-tied")
    return results


@pytest.fixture(scope="module")
def reference():
    return run_on_ranks(reference_body, world_size=1)[0]


@pytest.fixture(scope="module")
def parallel():
    return run_on_ranks(parallel_body, world_size=2)


def _relative(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def test_test_data_tells_the_global_token_mean_from_per_micro_batch_means(reference):
    loss = reference["loss"]  # measured: -0.543; micro-batch means -0.500, rank means -0.545
    # differences ≥ 1e-3 relative: ≥ 100× the float32 bounds of the equality checks below (asserted)
    assert abs(reference["mean_of_micro_batch_means"] - loss) > 1e-3 * abs(loss)
    assert abs(reference["mean_of_rank_means"] - loss) > 1e-3 * abs(loss)


def test_reference_step_moves_the_parameters_well_beyond_the_tolerance(reference):
    assert reference["succeeded"]
    assert reference["grad_norm"] > CLIP_GRAD  # clipping is active, so it is compared too
    for name, update in reference["update"].items():
        if "word_embeddings" in name or "output_layer" in name:
            continue  # rows of unused/padded ids do not move
        assert _relative(reference["after"][name] - update, reference["after"][name]) > 1e-3, name


COUNTS = ("num_tokens", "num_sequences", "normalizer")  # integers: equal exactly


def float32_bounds(reference) -> dict:
    """tests/float_bounds.py's bound for each float32 result of a step claimed equal to `reference`.
    Loss and metrics are means (ratio_max a max) of per-token terms computed from log-probs through
    the ratio w = exp(ℓ − ℓ_old): one term's float32 rounding is ~EPS32·max|ℓ|·max(1, w_max), the
    floor's scale. An update is after − before in float32: its floor's scale is ‖after‖; its measured
    rounding comes from the unclipped float32 step (the parameters equal before + update, so the same
    bound holds for them)."""
    float64, unclipped = reference["float64"], reference["unclipped"]
    token_scale = float(np.abs(reference["logp"]).max()) * max(1.0, reference["metrics"]["ratio_max"])
    return dict(
        loss=float32_bound(reference["loss"], float64["loss"], token_scale),
        grad_norm=float32_bound(reference["grad_norm"], float64["grad_norm"]),
        logp=float32_bound(reference["logp"], float64["logp"]),
        metrics={name: float32_bound(value, float64["metrics"][name], token_scale)
                 for name, value in reference["metrics"].items() if name not in COUNTS},
        update={name: float32_bound(unclipped["update"][name], float64["update"][name],
                                    scale=norm(reference["after"][name])) for name in reference["after"]})


def _assert_same_step(rank_result, reference):
    bounds = float32_bounds(reference)
    assert rank_result["succeeded"]
    assert_float32_equal(rank_result["loss"], reference["loss"], bounds["loss"], "loss")
    assert_float32_equal(rank_result["grad_norm"], reference["grad_norm"], bounds["grad_norm"], "grad_norm")
    assert set(rank_result["metrics"]) == set(reference["metrics"])
    for name, metric in reference["metrics"].items():
        if name in COUNTS:
            assert rank_result["metrics"][name] == metric, name
        else:
            assert_float32_equal(rank_result["metrics"][name], metric, bounds["metrics"][name], name)
    assert set(rank_result["after"]) == set(reference["after"])
    for name, expected in reference["after"].items():
        assert_float32_equal(rank_result["after"][name], expected, bounds["update"][name], name)
        # the update itself (≈ lr per entry), not only the parameters, agrees closely
        assert_float32_equal(rank_result["update"][name], reference["update"][name],
                             bounds["update"][name], name + " update")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_one_rl_step_equals_the_single_process_step(reference, parallel, layout):
    for rank_result in (parallel[0][layout], parallel[1][layout]):
        _assert_same_step(rank_result, reference)


def test_float32_bounds_are_far_below_what_a_wrong_mean_or_update_changes(reference):
    # the bounds widen only to float32 rounding: a per-rank or per-micro-batch mean (≥ 2e-3 here)
    # and a parameter update (≈ lr per entry) are each ≥ 100× their bound
    bounds = float32_bounds(reference)
    for wrong in (reference["mean_of_rank_means"], reference["mean_of_micro_batch_means"]):
        assert 100 * bounds["loss"] < abs(wrong - reference["loss"])
    for name, update in reference["update"].items():
        if "word_embeddings" in name or "output_layer" in name:
            continue  # rows of unused/padded ids do not move
        assert 100 * bounds["update"][name] < norm(update), name


def test_pp2_step_with_tied_embeddings_equals_the_single_process_step(reference, parallel):
    """Tied input/output embeddings live on both pipeline stages; finalize_model_grads must sum
    their two gradient contributions, and the last stage's copy must move with the embedding."""
    for rank_result in (parallel[0]["pp2_tied"], parallel[1]["pp2_tied"]):
        _assert_same_step(rank_result, reference["tied"])
    assert parallel[1]["pp2_tied"]["tied_copy_err"] == 0.0


def test_tp2_step_equals_single_process_to_float64_rounding(reference, parallel):
    expected = reference["float64"]
    for rank_result in (parallel[0]["tp2_float64"], parallel[1]["tp2_float64"]):
        assert rank_result["loss"] == pytest.approx(expected["loss"], rel=1e-12)
        # megatron computes the norm in float32 even of float64 grads (get_grad_norm_fp32: a float32
        # tensor squared, all-reduced, square-rooted), so it matches to a few float32 roundings only
        assert rank_result["grad_norm"] == pytest.approx(expected["grad_norm"], rel=4 * EPS32, abs=0)
        for name, after in expected["after"].items():
            assert _relative(rank_result["after"][name], after) <= 1e-12, name
            assert _relative(rank_result["update"][name], expected["update"][name]) <= 1e-10, name


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_compute_logprobs_equals_tp1_on_every_rank(reference, parallel, layout):
    bound = float32_bounds(reference)["logp"]
    for rank_result in (parallel[0][layout], parallel[1][layout]):
        assert_float32_equal(rank_result["logp"], reference["logp"], bound, "logp")


def test_dp2_ranks_computed_log_probs_of_their_own_micro_batches(reference, parallel):
    halves = [parallel[rank]["dp2_distributed_optimizer"] for rank in (0, 1)]
    assert [half["dp_rank"] for half in halves] == [0, 1]
    joined = torch.cat([torch.as_tensor(half["logp"]) for half in halves])
    assert_float32_equal(joined, reference["logp"], float32_bounds(reference)["logp"], "logp")
