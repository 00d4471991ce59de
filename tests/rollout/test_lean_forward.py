"""The lean training forward (megatron/lean_forward.py) against megatron's GPTModel forward, in the
RL step's own calls: `rl_forward_backward` (loss and every parameter's gradient, read from megatron
DDP's main_grad, where the lean path's gradients must land) and `compute_logprobs`.

Properties proved, per model family (Qwen2 with QKV bias, Qwen3 with q/k-norm, Llama 3 with its RoPE
scaling and tied embeddings), on the fixtures' right-padded micro-batches of unequal lengths (what
the trainer passes: tokens, no position_ids, no mask, so the causal mask):
- float64: log-probs, loss and gradients equal megatron's to FLOAT64_ROUNDINGS float64 roundings of
  the compared values' size (below);
- float32: within tests/float_bounds.py's rule (4× megatron's own float32 rounding, measured against
  the same megatron computation in float64);
- an explicit boolean attention_mask (causal and left padding, so some query rows are fully masked)
  and shifted position_ids mean what they mean to megatron (float64, the same bound);
- one trainer step (rl_forward_backward + the distributed optimizer's step) at DP = 2 updates the
  weights as megatron's forward does, within the float32 rule (reference: the DP = 2 step in float64);
- where it does not apply, the reason is named: TP = 2 and PP = 2 (the two-rank rollout run),
  dropout > 0; `--model-forward lean` then fails with it, "auto" keeps megatron's forward.

FLOAT64_ROUNDINGS: both paths compute the same expression; they differ only in summation order
(SDPA's vs megatron's baddbmm/softmax, the GQA expansion, where the transposes put the reductions).
A reordered sum of n terms moves by at most (n − 1)·ε·Σ|terms|, so relative to the result the bound
grows with cancellation and cannot be fixed a priori; we take the repo's float64 convention
(tests/training/test_loop.py): 2**10 roundings of the compared values' norm (measured: ≤ ~20), which
is still ~1e8 below float32 rounding and ~1e11 below a defect (a wrong mask, position or missed
gradient moves these values by ≥ 1e-3 relative).
"""
from __future__ import annotations

import pytest
import torch

from tests.float_bounds import EPS64, assert_float32_equal, float32_bound
from tests.megatron import rl_step_fixtures as fx

pytestmark = pytest.mark.distributed

FAMILIES = ("qwen2", "qwen3", "llama3-tied")
FLOAT64_ROUNDINGS = 2 ** 10
CHOICES = ("megatron", "lean")


def _loss():
    from megatron_rpg.losses import RPGClip, RPGLoss
    return RPGLoss(divergence="urkl", style="differentiable", beta=0.1, aggregation="token-mean",
                   clip=RPGClip(eps_low=0.2, eps_high=0.28, dual_clip=3.0))


def _model(family, dtype, choice, **setup):
    from megatron_rpg.megatron.compat import rope_frequencies_to
    from megatron_rpg.megatron.lean_forward import select_model_forward
    from megatron_rpg.megatron.models import build_gpt_model
    from megatron_rpg.megatron.optimizer_setup import setup_model_and_optimizer

    gpt = build_gpt_model(fx.hf_config(family), params_dtype=dtype, pipeline_dtype=dtype)
    fx.load_full_weights(gpt, fx.full_megatron_weights(gpt.vocab_size, family))
    if dtype == torch.float64:  # megatron keeps norm weights and RoPE frequencies float32: all float64
        gpt.double()
        rope_frequencies_to(gpt, torch.float64)
    model, optimizer = setup_model_and_optimizer([gpt], lr=1e-2, adam_eps=1e-3, clip_grad=0.0,
                                                 grad_reduce_in_fp32=dtype != torch.float64, **setup)
    assert select_model_forward(model, choice) is None
    return gpt, model, optimizer


def _masked_batches(batches):
    """The micro-batches left-padded (each row shifted right by its own pad), with megatron's boolean
    mask (True = masked: later keys and pad keys; a pad query row sees no key at all) and position ids
    counted from each row's first real token."""
    out = []
    for index, batch in enumerate(batches):
        rows, length = batch["tokens"].shape
        pads = torch.tensor([(index + row) % 3 for row in range(rows)])
        shifted = {key: torch.stack([torch.roll(value[row], int(pads[row])) for row in range(rows)])
                   if value.dim() == 2 else value for key, value in batch.items()}
        columns = torch.arange(length)
        later = columns[None, :] > columns[:, None]
        masked = later[None] | (columns[None, None, :] < pads[:, None, None])
        positions = (columns[None, :] - pads[:, None]).clamp(min=0)
        out.append(dict(shifted, attention_mask=masked[:, None], position_ids=positions))
    return out


def _step(family, dtype, choice, masked=False):
    from megatron_rpg.megatron.forward_backward import compute_logprobs, rl_forward_backward

    gpt, model, _ = _model(family, dtype, choice)
    vocab = fx.hf_config(family).vocab_size
    batches = fx.global_micro_batches(vocab, family=family)
    batches = _masked_batches(batches) if masked else batches
    batches = fx.as_float64(batches) if dtype == torch.float64 else batches
    logp = torch.cat(compute_logprobs(model, batches, vocab_size=vocab))
    loss, _ = rl_forward_backward(model, batches, _loss(), vocab_size=vocab)
    return dict(logp=logp, loss=float(loss), grads={n: p.main_grad.detach().clone() for n, p in gpt.named_parameters()})


def single_process_results(model) -> dict:
    """The one-rank results (run in the rollout tests' single-process body; `model` unused)."""
    from megatron_rpg.megatron.lean_forward import lean_forward_unsupported, select_model_forward
    from megatron_rpg.megatron.models import build_gpt_model

    out = {(family, str(dtype), choice): _step(family, dtype, choice) for family in FAMILIES
           for dtype in (torch.float64, torch.float32) for choice in CHOICES}
    out.update({("masked", choice): _step("qwen2", torch.float64, choice, masked=True) for choice in CHOICES})
    dropout = build_gpt_model(fx.hf_config(), hidden_dropout=0.1)
    out["dropout_reason"] = lean_forward_unsupported(dropout)
    out["dropout_auto"] = select_model_forward(dropout, "auto")
    try:
        select_model_forward(dropout, "lean")
    except ValueError as error:
        out["dropout_lean_error"] = str(error)
    return out


def layout_results(model, layout: str) -> dict:
    """TP=2 / PP=2: the reason megatron's forward runs; DP=2: one step, megatron's and lean forward."""
    from megatron_rpg.megatron.forward_backward import rl_forward_backward
    from megatron_rpg.megatron.lean_forward import lean_forward_unsupported
    from megatron.core import parallel_state

    if layout != "dp2":
        return {f"{layout}_lean_forward_reason": lean_forward_unsupported(model)}
    vocab = fx.hf_config().vocab_size
    rank = parallel_state.get_data_parallel_rank()
    batches = fx.global_micro_batches(vocab)[2 * rank:2 * rank + 2]  # each DP rank its own half
    out = {}
    for dtype, choice, distributed in ((torch.float32, "megatron", True), (torch.float32, "lean", True),
                                       (torch.float64, "megatron", False)):  # float64: plain optimizer only
        gpt, model, optimizer = _model("qwen2", dtype, choice, use_distributed_optimizer=distributed)
        before = {name: p.detach().clone() for name, p in gpt.named_parameters()}
        step_batches = fx.as_float64(batches) if dtype == torch.float64 else batches
        loss, _ = rl_forward_backward(model, step_batches, _loss(), vocab_size=vocab)
        optimizer.step()
        out["dp2", str(dtype), choice] = dict(loss=float(loss), update={
            name: p.detach() - before[name] for name, p in gpt.named_parameters()})
    return out


def _assert_float64_equal(got, want, name):
    assert float((got - want).norm()) <= FLOAT64_ROUNDINGS * EPS64 * float(want.norm()), name


@pytest.mark.parametrize("family", FAMILIES)
def test_float64_lean_forward_gives_megatrons_log_probs_loss_and_gradients(single, family):
    got, want = single[family, "torch.float64", "lean"], single[family, "torch.float64", "megatron"]
    assert float(want["logp"][:, 1:].std()) > 0.1  # a model that is not uniform
    _assert_float64_equal(got["logp"], want["logp"], "logp")
    assert abs(got["loss"] - want["loss"]) <= FLOAT64_ROUNDINGS * EPS64 * abs(want["loss"])
    assert set(got["grads"]) == set(want["grads"])
    for name, grad in want["grads"].items():
        assert float(grad.norm()) > 0, name  # every parameter gets a gradient, the tied one once
        _assert_float64_equal(got["grads"][name], grad, name)


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_lean_forward_is_within_megatrons_float32_rounding(single, family):
    got, want = single[family, "torch.float32", "lean"], single[family, "torch.float32", "megatron"]
    want64 = single[family, "torch.float64", "megatron"]
    assert_float32_equal(got["logp"], want["logp"], float32_bound(want["logp"], want64["logp"]), "logp")
    assert_float32_equal(got["loss"], want["loss"], float32_bound(want["loss"], want64["loss"]), "loss")
    for name, grad in want["grads"].items():
        assert_float32_equal(got["grads"][name], grad, float32_bound(grad, want64["grads"][name]), name)


def test_attention_mask_and_position_ids_mean_what_they_mean_to_megatron(single):
    got, want = single["masked", "lean"], single["masked", "megatron"]
    plain = single["qwen2", "torch.float64", "megatron"]
    assert float((want["logp"] - plain["logp"]).abs().max()) > 1e-3  # the mask changed the inputs
    _assert_float64_equal(got["logp"], want["logp"], "logp")  # pad rows (fully masked) included
    assert abs(got["loss"] - want["loss"]) <= FLOAT64_ROUNDINGS * EPS64 * abs(want["loss"])
    for name, grad in want["grads"].items():
        _assert_float64_equal(got["grads"][name], grad, name)


def test_dp2_step_with_the_distributed_optimizer_equals_megatrons(two_ranks):
    for rank in (0, 1):
        runs = two_ranks[rank]
        got, want = runs["dp2", "torch.float32", "lean"], runs["dp2", "torch.float32", "megatron"]
        want64 = runs["dp2", "torch.float64", "megatron"]
        assert got["loss"] == two_ranks[0]["dp2", "torch.float32", "lean"]["loss"]  # all-reduced: one value
        assert_float32_equal(got["loss"], want["loss"], float32_bound(want["loss"], want64["loss"]), "loss")
        # each tensor's bound is 4x its own measured float32 rounding; the scale that float32_bound's
        # sanity ceiling compares that rounding with is the whole step's size, since a small tensor's
        # update (a norm weight's: a sum over every token with cancellation) can carry 3e-5 of its
        # own norm in float32 rounding on another CPU's kernels (ATEN_CPU_CAPABILITY=default)
        step_size = float(torch.cat([u.flatten() for u in want64["update"].values()]).norm())
        for name, update in want["update"].items():
            assert float(update.norm()) > 0, name
            bound = float32_bound(update, want64["update"][name], scale=step_size)
            assert_float32_equal(got["update"][name], update, bound, name)


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_model_parallel_layouts_name_why_megatrons_forward_runs(two_ranks, layout):
    for rank in (0, 1):
        assert "tensor/pipeline parallel sizes" in two_ranks[rank][f"{layout}_lean_forward_reason"]


def test_dropout_is_not_covered_and_lean_says_why(single):
    assert "hidden_dropout=0.1" in single["dropout_reason"]
    assert single["dropout_auto"] == single["dropout_reason"]
    assert "--model-forward lean does not cover this model: hidden_dropout=0.1" in single["dropout_lean_error"]


def test_model_forward_flag_defaults_to_auto_and_takes_the_three_choices():
    from megatron_rpg.training.config import parse_train_config

    tiny = ["--model-preset", "tiny"]
    assert parse_train_config(tiny).training.model_forward == "auto"
    assert parse_train_config(tiny + ["--model-forward", "megatron"]).training.model_forward == "megatron"
    with pytest.raises(SystemExit):
        parse_train_config(tiny + ["--model-forward", "fast"])


@pytest.mark.parametrize("flags, named", [
    (["--tensor-model-parallel-size", "2"], "--tensor-model-parallel-size 2"),
    (["--pipeline-model-parallel-size", "2"], "--pipeline-model-parallel-size 2"),
    (["--bf16"], "bfloat16"),
])
def test_model_forward_lean_is_refused_at_parse_time_where_the_flags_show_it_cannot_apply(flags, named, capsys):
    from megatron_rpg.training.config import parse_train_config

    with pytest.raises(SystemExit) as exit_info:  # argparse's error: exit status 2, the message on stderr
        parse_train_config(["--model-preset", "tiny", "--model-forward", "lean", *flags])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "--model-forward lean does not cover" in message and named in message, message
    parse_train_config(["--model-preset", "tiny", "--model-forward", "auto", *flags])  # auto falls back
