"""The fused output layer + log-probs (megatron/fused_output.py) equals the unfused path — megatron's
matmul `h Wᵀ` followed by `vocab_parallel_logprobs` — in values and in the gradients of the hidden
states and of the output weight: float64 to ≤ 1e-10 relative, with entropy, temperature ≠ 1, padded
vocab and ragged tiles; float32 within tests/float_bounds.py's bound; TP=2 (two gloo ranks, half the
weight rows each) equals TP=1. No op of the fused forward + backward produces a tensor of the
`[tokens, V]` size (checked with a dispatch mode that sees every op's outputs; the same check sees
the unfused path's logits, so it can fail)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_rpg.megatron.fused_output import check_output_layer, fused_output_logprobs
from megatron_rpg.megatron.logprobs import vocab_parallel_logprobs
from tests.distributed.harness import run_on_ranks
from tests.float_bounds import assert_float32_equal, float32_bound

HIDDEN = 8
VOCAB = 64
SHAPE = (3, 5)  # 15 tokens: chunk 4 leaves a ragged tile; the backward tiles are ragged too


def make_inputs(seed, dtype=torch.float64, shape=SHAPE, vocab=VOCAB, hidden=HIDDEN):
    """Hidden states and weight scaled so that the logits spread widely (softmax far from uniform)."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, hidden, generator=gen, dtype=torch.float64)
    weight = 1.5 * torch.randn(vocab, hidden, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, vocab, shape, generator=gen)
    w_logp = torch.randn(shape, generator=gen, dtype=torch.float64)
    w_entropy = torch.randn(shape, generator=gen, dtype=torch.float64)
    return h.to(dtype), weight.to(dtype), targets, w_logp, w_entropy


def unfused(h, weight, targets, **kwargs):
    """Megatron's output layer (logits = h Wᵀ) followed by the chunked log-prob function."""
    return vocab_parallel_logprobs(torch.matmul(h, weight.t()), targets, **kwargs)


def values_and_grads(fn, h, weight, targets, w_logp, w_entropy, with_entropy=True, **kwargs):
    """(logp, entropy, ∂/∂h, ∂/∂W) of Σ w·logp (+ Σ w·H) with h and W leaves of their own dtype."""
    h = h.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    logp, entropy = fn(h, weight, targets, with_entropy=with_entropy, **kwargs)
    objective = (logp.double() * w_logp).sum()
    if with_entropy:
        objective = objective + (entropy.double() * w_entropy).sum()
    objective.backward()
    return logp.detach(), None if entropy is None else entropy.detach(), h.grad, weight.grad


def relative(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 4, 64])
@pytest.mark.parametrize("vocab_size", [None, 45])
def test_float64_values_and_both_gradients_equal_the_unfused_path(temperature, with_entropy,
                                                                  chunk_size, vocab_size):
    inputs = make_inputs(0)
    kwargs = dict(temperature=temperature, chunk_size=chunk_size, with_entropy=with_entropy,
                  vocab_size=vocab_size)
    if vocab_size is not None:
        inputs = (inputs[0], inputs[1], inputs[2] % vocab_size) + inputs[3:]
    got = values_and_grads(fused_output_logprobs, *inputs, **kwargs)
    want = values_and_grads(unfused, *inputs, **kwargs)
    assert got[0].dtype == torch.float64 and got[0].shape == SHAPE
    assert (got[1] is None) == (not with_entropy)
    for index, (a, b) in enumerate(zip(got, want)):
        if b is not None:
            assert relative(a, b) <= 1e-10, index
    if vocab_size is not None:  # padded rows of the weight: exactly no gradient
        assert torch.all(got[3][vocab_size:] == 0)


def test_float64_gradcheck_of_both_inputs_with_entropy_temperature_and_padding():
    h, weight, targets, _, _ = make_inputs(1, shape=(5,), vocab=7, hidden=3)
    targets = targets % 6

    def both(h, weight):
        return fused_output_logprobs(h, weight, targets, temperature=1.3, chunk_size=2,
                                     with_entropy=True, vocab_size=6)

    assert torch.autograd.gradcheck(both, (h.requires_grad_(), weight.requires_grad_()))


def test_float32_equals_the_unfused_path_within_its_measured_rounding():
    inputs64 = make_inputs(2)
    inputs32 = tuple(x.float() if x.is_floating_point() and i < 2 else x for i, x in enumerate(inputs64))
    kwargs = dict(temperature=0.7, chunk_size=4)
    got = values_and_grads(fused_output_logprobs, *inputs32, **kwargs)
    want = values_and_grads(unfused, *inputs32, **kwargs)
    want64 = values_and_grads(unfused, *inputs64, **kwargs)
    assert got[2].dtype == got[3].dtype == torch.float32
    for name, a, b, b64 in zip(("logp", "entropy", "grad_hidden", "grad_weight"), got, want, want64):
        assert_float32_equal(a, b, float32_bound(b, b64), name)


@pytest.mark.parametrize("seed", [3, 4])
def test_bf16_rounds_the_logits_and_their_gradient_as_the_unfused_path(seed):
    """bf16 model: the same bf16 logits and float32 statistics give the same log-probs and entropy;
    the weight gradient is one bf16 matmul of the same bf16 logits gradient (equal); the hidden
    gradient is accumulated over vocab tiles in float32 instead of one bf16 matmul, so it is not
    bit-equal: its error against the float64 computation on the same bf16 inputs is that of the
    unfused path (both dominated by the bf16 rounding of the logits), within 25%."""
    h, weight, targets, w_logp, w_entropy = make_inputs(seed, torch.bfloat16)
    got = values_and_grads(fused_output_logprobs, h, weight, targets, w_logp, w_entropy, chunk_size=4)
    want = values_and_grads(unfused, h, weight, targets, w_logp, w_entropy, chunk_size=4)
    ref = values_and_grads(unfused, h.double(), weight.double(), targets, w_logp, w_entropy,
                           chunk_size=4)
    assert got[2].dtype == got[3].dtype == torch.bfloat16
    for index in (0, 1, 3):
        assert relative(got[index], want[index]) <= 1e-6, index
    assert relative(got[2], ref[2]) <= 1.25 * relative(want[2], ref[2])
    assert relative(want[2], ref[2]) > 1e-3  # the comparison is at bf16 rounding, not float32's


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any op returns (every allocation of a result goes through here)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


@pytest.mark.parametrize("with_entropy", [False, True])
def test_no_tokens_by_vocab_tensor_is_ever_made_in_forward_or_backward(with_entropy):
    tokens, vocab, hidden, chunk = 64, 96, 8, 4
    inputs = make_inputs(4, torch.float32, shape=(tokens,), vocab=vocab, hidden=hidden)
    seen = {}
    for name, fn in (("fused", fused_output_logprobs), ("unfused", unfused)):
        with _LargestOutput() as mode:
            values_and_grads(fn, *inputs, with_entropy=with_entropy, chunk_size=chunk)
        seen[name] = mode.largest
    assert seen["unfused"] >= tokens * vocab  # the check sees the logits of the unfused path
    # largest: the weight (and its gradient) or one tile of chunk × vocab cells
    assert seen["fused"] <= max(vocab * hidden, chunk * vocab, tokens * hidden) < tokens * vocab


def test_zero_tokens_give_empty_outputs_and_zero_weight_gradient():
    h, weight = torch.zeros(0, HIDDEN, requires_grad=True), torch.randn(VOCAB, HIDDEN, requires_grad=True)
    logp, entropy = fused_output_logprobs(h, weight, torch.zeros(0, dtype=torch.long), with_entropy=True)
    assert logp.shape == entropy.shape == (0,)
    (logp.sum() + entropy.sum()).backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and h.grad.shape == (0, HIDDEN)


@pytest.mark.parametrize("kwargs, message", [
    (dict(weight=torch.zeros(VOCAB, HIDDEN + 1)), "weight has shape"),
    (dict(targets=torch.zeros(4, dtype=torch.long)), "hidden has shape"),
    (dict(targets=torch.full(SHAPE, VOCAB)), f"token id {VOCAB}"),
    (dict(temperature=0.0), "temperature"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(vocab_size=VOCAB + 1), "vocab_size"),
])
def test_bad_inputs_raise_value_error_naming_the_value(kwargs, message):
    h, weight, targets, _, _ = make_inputs(5)
    args = dict(hidden=h, weight=weight, targets=targets)
    args.update((k, kwargs.pop(k)) for k in list(kwargs) if k in args)
    with pytest.raises(ValueError, match=message):
        fused_output_logprobs(args["hidden"], args["weight"], args["targets"], **kwargs)


def test_output_layer_choice_refuses_unknown_names_and_unsupported_model_settings():
    class Model:
        def __init__(self, **fields):
            self.config = type("Config", (), {"sequence_parallel": False, "mtp_num_layers": None,
                                              **fields})

    assert check_output_layer("fused", Model()) is True
    assert check_output_layer("unfused", Model(sequence_parallel=True)) is False
    with pytest.raises(ValueError, match="sequence_parallel"):
        check_output_layer("fused", Model(sequence_parallel=True))
    with pytest.raises(ValueError, match="mtp_num_layers"):
        check_output_layer("fused", Model(mtp_num_layers=1))
    with pytest.raises(ValueError, match="output_layer"):
        check_output_layer("fast", Model())


# (temperature, with_entropy, chunk_size, vocab_size) for the two-rank comparison; vocab 30 leaves
# rank 1's half all padding
TP_CASES = [(1.0, True, 4, None), (0.7, True, 5, None), (1.3, False, 64, None), (1.0, True, 4, 50),
            (0.8, True, 3, 30)]


def _tp2_body(rank, world_size):
    half = VOCAB // world_size
    results = []
    for seed, (temperature, with_entropy, chunk_size, vocab_size) in enumerate(TP_CASES):
        h, weight, targets, w_logp, w_entropy = make_inputs(10 + seed)
        if vocab_size is not None:
            targets = targets % vocab_size
        results.append(values_and_grads(
            fused_output_logprobs, h, weight[rank * half:(rank + 1) * half], targets, w_logp,
            w_entropy, with_entropy=with_entropy, tp_group=dist.group.WORLD, temperature=temperature,
            chunk_size=chunk_size, vocab_size=vocab_size))
    return results


@pytest.fixture(scope="module")
def tp2_results():
    return run_on_ranks(_tp2_body, world_size=2)


@pytest.mark.distributed
def test_two_rank_vocab_parallel_equals_single_rank_in_values_and_both_gradients(tp2_results):
    for index, (temperature, with_entropy, chunk_size, vocab_size) in enumerate(TP_CASES):
        h, weight, targets, w_logp, w_entropy = make_inputs(10 + index)
        if vocab_size is not None:
            targets = targets % vocab_size
        single = values_and_grads(fused_output_logprobs, h, weight, targets, w_logp, w_entropy,
                                  with_entropy=with_entropy, temperature=temperature,
                                  chunk_size=chunk_size, vocab_size=vocab_size)
        for rank_result in (per_rank[index] for per_rank in tp2_results):
            for a, b in zip(rank_result[:3], single[:3]):  # logp, entropy, the all-reduced ∂h
                if b is not None:
                    assert relative(a, b) <= 1e-12, (index, temperature, chunk_size)
        # each rank's weight gradient is its rows of the single-rank one
        grad_weight = torch.cat([per_rank[index][3] for per_rank in tp2_results])
        assert relative(grad_weight, single[3]) <= 1e-12, index
