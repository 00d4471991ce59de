"""Chunked vocab-parallel log-probs and entropy: values and gradients equal a float64 log_softmax
reference, TP=2 (two gloo ranks, half the vocab each) equals TP=1, the caller's logits are
never written to, and padded vocab ids (`vocab_size`) get probability 0 and gradient exactly 0.
float64 inputs are compared at float64 rounding; float32 and bf16 inputs (computed in float32)
within tests/float_bounds.py's bound: 4× the float32 log_softmax reference's rounding, measured
against the float64 one; a bf16 gradient (returned in bf16) within one bf16 rounding."""
import pytest
import torch
import torch.distributed as dist

from megatron_rpg.megatron.logprobs import full_vocab_logprobs, vocab_parallel_logprobs
from tests.distributed.harness import run_on_ranks
from tests.float_bounds import assert_float32_equal, float32_bound

VOCAB = 64
SHAPE = (3, 5)  # 15 tokens: chunk 4 does not divide it, chunk 5 does, chunk 64 is one chunk
# (dtype, temperature, chunk_size) for the two-rank comparison
TP_CASES = [(torch.float64, 1.0, 4), (torch.float64, 0.7, 5), (torch.float64, 1.3, 64),
            (torch.float32, 1.0, 4), (torch.float32, 0.6, 5), (torch.bfloat16, 1.0, 4)]
# float64: an exact computation in float64 (log-sum-exp over 64 ids, ~1e-16 relative per value)
FLOAT64_TOLERANCE = 1e-12
# unpadded vocab sizes of the padded cases: at TP=2 (32 ids per rank) rank 1 is part / all padding
PADDED_VOCABS = (50, 30)


def make_inputs(seed, dtype, shape=SHAPE, vocab=VOCAB):
    """Logits with a wide spread (×4) so the softmax is far from uniform; targets span the vocab;
    weights give each output an independent gradient."""
    gen = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(*shape, vocab, generator=gen, dtype=torch.float64)).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=gen)
    w_logp = torch.randn(shape, generator=gen, dtype=torch.float64)
    w_entropy = torch.randn(shape, generator=gen, dtype=torch.float64)
    return logits, targets, w_logp, w_entropy


def values_and_grad(fn, logits, targets, w_logp, w_entropy, **kwargs):
    """(logp, entropy, d(Σ w·logp + Σ w·H)/d logits) with `logits` a leaf of its own dtype."""
    leaf = logits.detach().clone().requires_grad_()
    logp, entropy = fn(leaf, targets, with_entropy=True, **kwargs)
    ((logp.double() * w_logp).sum() + (entropy.double() * w_entropy).sum()).backward()
    return logp.detach(), entropy.detach(), leaf.grad


def reference(logits, targets, w_logp, w_entropy, temperature):
    """float64 log_softmax on the exact (upcast) input values."""
    return values_and_grad(full_vocab_logprobs, logits.double(), targets, w_logp, w_entropy,
                           temperature=temperature)


def float32_reference(logits, targets, w_logp, w_entropy, temperature):
    """The same log_softmax in float32 (bf16 logits upcast first, as vocab_parallel_logprobs does)."""
    return values_and_grad(full_vocab_logprobs, logits.float(), targets, w_logp, w_entropy,
                           temperature=temperature)


def assert_equal_to_reference(got, ref64, dtype, ref32=None, inputs=None, temperature=1.0, what=""):
    """(logp, entropy, grad) `got` vs the float64 reference: at float64 rounding for float64 inputs,
    else within float32_bound of the float32 reference `ref32` (default: float32_reference(inputs)),
    which `got` is compared with; a bf16 gradient within one bf16 rounding of the float64 one."""
    assert got[2].dtype == dtype
    if dtype == torch.float64:
        for value, want in zip(got, ref64):
            assert (value - want).abs().max() <= FLOAT64_TOLERANCE, what
        return
    ref32 = float32_reference(*inputs, temperature) if ref32 is None else ref32
    for name, value, want, want64 in zip(("logp", "entropy", "grad"), got, ref32, ref64):
        if name == "grad" and dtype == torch.bfloat16:  # returned in bf16: one rounding of the fp32 value
            torch.testing.assert_close(value.double(), want64, rtol=2 ** -7, atol=1e-6)
        else:
            assert_float32_equal(value, want, float32_bound(want, want64), f"{what} {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_single_rank_values_and_gradients_equal_float64_log_softmax(dtype, chunk_size, temperature):
    inputs = make_inputs(0, dtype)
    logp, entropy, grad = values_and_grad(vocab_parallel_logprobs, *inputs, temperature=temperature,
                                          chunk_size=chunk_size)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert logp.dtype == entropy.dtype == expected_dtype and logp.shape == SHAPE
    # bf16 logits must be upcast: a bf16 softmax would be off by ~1e-2, far beyond the float32 bound
    assert_equal_to_reference((logp, entropy, grad), reference(*inputs, temperature), dtype,
                              inputs=inputs, temperature=temperature, what=f"{dtype} chunk {chunk_size}")


def test_gradcheck_float64_both_outputs_with_temperature_and_ragged_chunks():
    logits, targets, _, _ = make_inputs(1, torch.float64, shape=(5,), vocab=7)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: vocab_parallel_logprobs(x, targets, chunk_size=2, temperature=1.3, with_entropy=True),
        (logits,))
    assert torch.autograd.gradcheck(
        lambda x: vocab_parallel_logprobs(x, targets, chunk_size=3)[0], (logits,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_logits_are_not_modified_in_place(dtype):
    # fp32 at T=1 is the case where megatron's vocab_parallel_cross_entropy overwrites its input
    logits, targets, w_logp, w_entropy = make_inputs(2, dtype)
    leaf = logits.clone().requires_grad_()
    logp, entropy = vocab_parallel_logprobs(leaf, targets, chunk_size=4, with_entropy=True)
    ((logp * w_logp).sum() + (entropy * w_entropy).sum()).backward()
    assert torch.equal(leaf.detach(), logits)


def test_backward_saves_only_the_input_logits_and_per_token_vectors():
    logits, targets, _, _ = make_inputs(3, torch.bfloat16)
    leaf = logits.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        vocab_parallel_logprobs(leaf, targets, chunk_size=4, with_entropy=True)
    full_size = [t for t in saved if t.numel() >= leaf.numel()]
    assert len(full_size) == 1 and full_size[0].data_ptr() == leaf.data_ptr()
    assert all(t.numel() <= targets.numel() for t in saved if t is not full_size[0])


def test_without_entropy_returns_none_and_the_same_logp_and_gradient():
    logits, targets, w_logp, _ = make_inputs(4, torch.float64)
    grads = []
    for with_entropy in (False, True):
        leaf = logits.clone().requires_grad_()
        logp, entropy = vocab_parallel_logprobs(leaf, targets, chunk_size=4, with_entropy=with_entropy)
        assert (entropy is None) == (not with_entropy)
        (logp * w_logp).sum().backward()
        grads.append((logp.detach(), leaf.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def padded_inputs(seed, dtype, vocab_size):
    """make_inputs with targets below vocab_size and padded columns holding large logits (+8), which
    would take most of the probability mass if they leaked into the softmax."""
    logits, targets, w_logp, w_entropy = make_inputs(seed, dtype)
    logits[..., vocab_size:] = 8.0
    return logits, targets % vocab_size, w_logp, w_entropy


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size, temperature", [(4, 1.0), (64, 0.7)])
def test_padded_vocab_gets_zero_gradient_and_logprobs_equal_the_unpadded_reference(
        dtype, chunk_size, temperature):
    vocab_size = PADDED_VOCABS[0]
    logits, targets, w_logp, w_entropy = padded_inputs(5, dtype, vocab_size)
    logp, entropy, grad = values_and_grad(vocab_parallel_logprobs, logits, targets, w_logp, w_entropy,
                                          temperature=temperature, chunk_size=chunk_size,
                                          vocab_size=vocab_size)
    unpadded = (logits[..., :vocab_size], targets, w_logp, w_entropy)
    ref_logp = reference(*unpadded, temperature)[0]
    assert torch.all(grad[..., vocab_size:] == 0)
    assert_equal_to_reference((logp, entropy, grad[..., :vocab_size]), reference(*unpadded, temperature),
                              dtype, inputs=unpadded, temperature=temperature, what=f"{dtype} padded")
    leaked = vocab_parallel_logprobs(logits, targets, temperature=temperature)[0]
    assert (leaked.double() - ref_logp).abs().max() > 1.0  # the test data shows a leak


def test_padded_vocab_exclusion_equals_masking_the_logits_bit_for_bit():
    # the previous implementation: a full-size masked_fill copy of the logits before the call
    logits, targets, w_logp, w_entropy = padded_inputs(6, torch.float32, PADDED_VOCABS[0])
    masked = logits.clone()
    masked[..., PADDED_VOCABS[0]:] = -1e30
    chunked = values_and_grad(vocab_parallel_logprobs, logits, targets, w_logp, w_entropy,
                              chunk_size=4, vocab_size=PADDED_VOCABS[0])
    copied = values_and_grad(vocab_parallel_logprobs, masked, targets, w_logp, w_entropy, chunk_size=4)
    assert all(torch.equal(a, b) for a, b in zip(chunked, copied))


def test_padded_vocab_exclusion_makes_no_full_size_copy_of_the_logits():
    logits, targets, _, _ = padded_inputs(7, torch.bfloat16, PADDED_VOCABS[0])
    leaf = logits.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        vocab_parallel_logprobs(leaf, targets, chunk_size=4, with_entropy=True, vocab_size=PADDED_VOCABS[0])
    full_size = [t for t in saved if t.numel() >= leaf.numel()]
    assert len(full_size) == 1 and full_size[0].data_ptr() == leaf.data_ptr()


def test_zero_tokens_give_empty_outputs():
    logp, entropy = vocab_parallel_logprobs(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long),
                                            with_entropy=True)
    assert logp.shape == entropy.shape == (0,)


@pytest.mark.parametrize("kwargs, message", [
    (dict(logits=torch.zeros(3, 4, 8), targets=torch.zeros(3, 5, dtype=torch.long)), r"shape \(3, 4, 8\)"),
    (dict(chunk_size=0), r"chunk_size=0"),
    (dict(chunk_size=-4), r"chunk_size=-4"),
    (dict(temperature=0.0), r"temperature=0.0"),
    (dict(temperature=-1.0), r"temperature=-1.0"),
    (dict(targets=torch.tensor([[0, 8, 1, 2]] * 3)), r"token id 8, outside the vocab \[0, 8\)"),
    (dict(targets=torch.tensor([[0, -100, 1, 2]] * 3)), r"token id -100"),
    (dict(targets=torch.zeros(3, 4)), r"targets has dtype torch.float32"),
    (dict(vocab_start_index=-8), r"vocab_start_index=-8"),
    (dict(vocab_size=0), r"vocab_size=0; pass the unpadded vocab size, an integer in \[1, 8\]"),
    (dict(vocab_size=9), r"vocab_size=9"),
    (dict(vocab_size=6, targets=torch.tensor([[0, 7, 1, 2]] * 3)), r"token id 7, outside the vocab \[0, 6\)"),
])
def test_bad_inputs_raise_value_error_naming_the_value(kwargs, message):
    call = dict(logits=torch.zeros(3, 4, 8), targets=torch.zeros(3, 4, dtype=torch.long)) | kwargs
    with pytest.raises(ValueError, match=message):
        vocab_parallel_logprobs(call.pop("logits"), call.pop("targets"), **call)


def _tp2_body(rank, world_size):
    """Each rank holds vocab slice `rank`; returns per-case (logp, entropy, grad of its slice) for
    the default layout, plus checks of an explicit swapped layout and of the parallel_state default."""
    half = VOCAB // world_size
    results = []
    for seed, (dtype, temperature, chunk_size) in enumerate(TP_CASES):
        logits, targets, w_logp, w_entropy = make_inputs(10 + seed, dtype)
        local = logits[..., rank * half:(rank + 1) * half].clone()
        out = values_and_grad(vocab_parallel_logprobs, local, targets, w_logp, w_entropy,
                              tp_group=dist.group.WORLD, temperature=temperature, chunk_size=chunk_size)
        results.append(out)
        # swapped layout: rank 0 holds the upper half, named by vocab_start_index
        swapped_start = (world_size - 1 - rank) * half
        swapped = values_and_grad(vocab_parallel_logprobs, logits[..., swapped_start:swapped_start + half],
                                  targets, w_logp, w_entropy, tp_group=dist.group.WORLD,
                                  vocab_start_index=swapped_start, temperature=temperature,
                                  chunk_size=chunk_size)
        assert torch.equal(swapped[0], out[0]) and torch.equal(swapped[1], out[1]), "swapped layout"
        assert torch.equal(local, logits[..., rank * half:(rank + 1) * half]), "logits modified"

    padded = []
    for vocab_size in PADDED_VOCABS:
        logits, targets, w_logp, w_entropy = padded_inputs(20 + vocab_size, torch.float64, vocab_size)
        padded.append(values_and_grad(vocab_parallel_logprobs, logits[..., rank * half:(rank + 1) * half],
                                      targets, w_logp, w_entropy, tp_group=dist.group.WORLD,
                                      chunk_size=4, vocab_size=vocab_size))

    from megatron.core import parallel_state
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    try:
        logits, targets, w_logp, w_entropy = make_inputs(10, TP_CASES[0][0])
        local = logits[..., rank * half:(rank + 1) * half]
        default = values_and_grad(vocab_parallel_logprobs, local, targets, w_logp, w_entropy,
                                  chunk_size=TP_CASES[0][2])
        assert all(torch.equal(a, b) for a, b in zip(default, results[0])), "parallel_state TP group"
    finally:
        parallel_state.destroy_model_parallel()
    return dict(cases=results, padded=padded)


@pytest.fixture(scope="module")
def tp2_results():
    return run_on_ranks(_tp2_body, world_size=2)


@pytest.mark.distributed
def test_two_rank_vocab_parallel_equals_single_rank_and_float64_reference(tp2_results):
    per_rank = tp2_results
    for case_index, (dtype, temperature, chunk_size) in enumerate(TP_CASES):
        inputs = make_inputs(10 + case_index, dtype)
        single = values_and_grad(vocab_parallel_logprobs, *inputs, temperature=temperature,
                                 chunk_size=chunk_size)
        ref64 = reference(*inputs, temperature)
        what = f"{dtype} T={temperature} chunk {chunk_size}"
        grad = torch.cat([r["cases"][case_index][2] for r in per_rank], dim=-1)  # rank 0's slice first
        for logp, entropy, _ in (r["cases"][case_index] for r in per_rank):
            # TP=2 vs the single rank (the float32 reference here) and vs the float64 log_softmax
            assert_equal_to_reference((logp, entropy, grad), ref64, dtype,
                                      ref32=None if dtype == torch.float64 else single, what=what)
            assert_equal_to_reference((logp, entropy, grad), ref64, dtype, inputs=inputs,
                                      temperature=temperature, what=what)
        if dtype == torch.bfloat16:  # both roundings of nearly equal fp32 values: within one bf16 step
            torch.testing.assert_close(grad.double(), single[2].double(), rtol=2 ** -7, atol=1e-6)


@pytest.mark.distributed
def test_two_rank_padded_vocab_equals_the_unpadded_reference_even_with_an_all_padding_rank(tp2_results):
    per_rank = tp2_results
    for index, vocab_size in enumerate(PADDED_VOCABS):
        logits, targets, w_logp, w_entropy = padded_inputs(20 + vocab_size, torch.float64, vocab_size)
        ref_logp, ref_entropy, ref_grad = reference(logits[..., :vocab_size], targets, w_logp,
                                                    w_entropy, 1.0)
        for logp, entropy, _ in (r["padded"][index] for r in per_rank):
            assert (logp - ref_logp).abs().max() <= FLOAT64_TOLERANCE
            assert (entropy - ref_entropy).abs().max() <= FLOAT64_TOLERANCE
        grad = torch.cat([r["padded"][index][2] for r in per_rank], dim=-1)
        assert torch.all(grad[..., vocab_size:] == 0)
        assert (grad[..., :vocab_size] - ref_grad).abs().max() <= FLOAT64_TOLERANCE
