"""Per-token log-probs and softmax entropy from vocab-parallel logits, chunked over tokens.

Each tensor-parallel (TP) rank holds logits `[..., V/TP]` for a contiguous vocab slice starting at
`vocab_start_index`. With `x = logits / T` (T the temperature) and, per token,

    m      = max_v x_v                                   (all-reduce MAX, no gradient needed)
    S      = Σ_v exp(x_v − m)                            (all-reduce SUM)
    logZ   = m + log S
    logp   = x_target − logZ                             (x_target − m summed over ranks: only the
                                                          rank owning the target contributes it)
    H      = logZ − Σ_v p_v x_v = log S − Σ_v exp(x_v − m)(x_v − m) / S      (all-reduce SUM)

Gradients w.r.t. this rank's logits need no communication once logZ and H are known:

    ∂logp/∂x_v = 1[v = target] − p_v,      ∂H/∂x_v = −p_v (log p_v + H),      ∂x/∂logits = 1/T.

Memory: tokens are processed `chunk_size` at a time in float32 (float64 for float64 input), in two
preallocated `[chunk_size, V/TP]` buffers reused by every chunk, instead of a full `[tokens, V/TP]`
float32 softmax. The backward recomputes each chunk's softmax from the saved input logits and the
per-token logZ and H (the only tensors saved besides a reference to the logits), in two such buffers
again, writing the gradient (logits' dtype, the one full-size output) chunk by chunk. The caller's
logits are never written to. Communication: two all-reduces per chunk in the forward (MAX of
`[chunk]`, SUM of `[2 or 3, chunk]`), none in the backward.

Padded vocab (`vocab_size`): megatron pads the vocab to a multiple of 128 × TP; the padded ids' logits
(0 for zero-initialised rows) would leak probability mass into S. Their columns are set to −1e30 in
the chunk buffer (finite, so e·(x − m) = 0·finite = 0 in H; exp underflows to exactly 0), so they get
probability exactly 0, and their gradient is set to exactly 0 — per chunk, with no full-size copy.

Exactness: the same arithmetic as a float64 `log_softmax` up to rounding (measured ≤ 1e-12 in
float64, ≤ 1e-5 from float32/bf16 input); TP=N equals TP=1 up to the order of the cross-rank sums.
Logits must be finite where the entropy is asked for: a −inf logit gives 0·(−inf) = NaN in H and its
gradient (log-probs alone handle −inf).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from megatron_rpg.losses.validation import check_range


def vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, tp_group=None,
                            vocab_start_index: int | None = None, temperature: float = 1.0,
                            chunk_size: int = 4096, with_entropy: bool = False,
                            vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) and (optionally) the full-softmax entropy, shape of `targets`, float32
    (float64 for float64 logits), differentiable w.r.t. `logits`.

    logits: `[..., V/TP]` this rank's contiguous vocab slice (bf16/fp16/fp32/fp64).
    targets: `[...]` global vocab ids in `[0, V)`.
    tp_group: the TP process group; None → megatron `parallel_state`'s TP group when model parallel
      is initialised, else no reduction (TP=1).
    vocab_start_index: first global id of this slice; None → rank in `tp_group` × `V/TP`.
    vocab_size: the unpadded vocab (HF `vocab_size`); ids ≥ vocab_size are megatron's padding and
      get probability 0 and gradient 0 (targets must be < vocab_size). None → no padding.
    """
    local_vocab = _validate(logits, targets, temperature, chunk_size)
    group, vocab_start_index, local_valid = vocab_slice(tp_group, local_vocab, vocab_start_index,
                                                        vocab_size, targets, "the logits' vocab")
    outputs = _VocabParallelLogprobs.apply(logits, targets, group, int(vocab_start_index),
                                           float(temperature), int(chunk_size), bool(with_entropy),
                                           local_valid)
    if with_entropy:
        return outputs[0], outputs[1]
    return outputs, None


def full_vocab_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                        with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The naive reference on full-vocab logits `[..., V]`: `log_softmax(logits.float() / T)` gathered
    at `targets`, entropy `−Σ p log p`. Materialises the whole `[tokens, V]` float32 (float64 for
    float64 input) log-softmax, which is what the chunked version avoids; used as the test reference
    and the benchmark baseline."""
    _validate(logits, targets, temperature, chunk_size=1)
    _check_targets_in_vocab(targets, logits.shape[-1])
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    scaled = logits.to(compute_dtype)
    if temperature != 1.0:  # skipped at T=1 so the baseline holds no extra [tokens, V] copy
        scaled = scaled / temperature
    log_probs = torch.log_softmax(scaled, dim=-1)
    del scaled
    logp = log_probs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1) if with_entropy else None
    return logp, entropy


def vocab_slice(tp_group, local_vocab, vocab_start_index, vocab_size, targets, what):
    """(TP group or None, first global id of this rank's slice, its count of unpadded ids): the
    arguments of `vocab_parallel_logprobs` resolved and checked (`what` names the V/TP dimension)."""
    group = _resolve_tp_group(tp_group)
    tp_size = 1 if group is None else dist.get_world_size(group=group)
    if vocab_start_index is None:
        vocab_start_index = 0 if group is None else dist.get_rank(group=group) * local_vocab
    check_range("vocab_start_index", vocab_start_index, 0)
    # The global vocab is local × TP (megatron pads the vocab to a multiple of TP).
    padded_vocab = local_vocab * tp_size
    if vocab_size is None:
        vocab_size = padded_vocab
    elif isinstance(vocab_size, bool) or not isinstance(vocab_size, int) \
            or not 1 <= vocab_size <= padded_vocab:
        raise ValueError(f"vocab_size={vocab_size!r}; pass the unpadded vocab size, an integer in "
                         f"[1, {padded_vocab}] ({what} V/TP × TP = {padded_vocab})")
    _check_targets_in_vocab(targets, vocab_size)
    # columns [local_valid, V/TP) of this slice are padding
    local_valid = min(max(vocab_size - int(vocab_start_index), 0), local_vocab)
    return group, int(vocab_start_index), local_valid


def _resolve_tp_group(tp_group):
    if tp_group is not None:
        return tp_group
    from megatron.core import parallel_state  # only needed when the caller did not pass a group
    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None


def _validate(logits, targets, temperature, chunk_size) -> int:
    if logits.dim() < 1 or logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits has shape {tuple(logits.shape)} and targets {tuple(targets.shape)}; "
                         f"logits must be targets' shape plus one vocab dimension [..., V/TP]")
    if not logits.is_floating_point():
        raise ValueError(f"logits has dtype {logits.dtype}; pass floating-point logits")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets has dtype {targets.dtype}; pass integer token ids")
    if logits.shape[-1] == 0:
        raise ValueError("logits has an empty vocab dimension (V/TP = 0)")
    check_range("chunk_size", chunk_size, 0, low_inclusive=False)
    check_range("temperature", temperature, 0.0, low_inclusive=False)
    return logits.shape[-1]


def _check_targets_in_vocab(targets, vocab_size: int) -> None:
    if targets.numel() == 0:
        return
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"targets contains token id {bad}, outside the vocab [0, {vocab_size}); "
                         f"replace padding/ignore ids (e.g. -100) by a valid id and mask those tokens")


def _all_reduce(tensor, op, group):
    if group is not None and dist.get_world_size(group=group) > 1:
        dist.all_reduce(tensor, op=op, group=group)


# Logit of a padded vocab column: exp(−1e30 − m) is exactly 0, and 0·(−1e30 − m) stays 0 (finite).
_PADDED_LOGIT = -1e30


def _load_scaled(workspace, logits_chunk, temperature, local_valid):
    """workspace[:n] ← logits_chunk / T, upcast (exactly) into the preallocated compute-dtype buffer,
    padded columns (≥ local_valid) set to −1e30. Reusing one buffer for every chunk avoids fresh
    page-faulted allocations (on CPU, exp into a fresh 150 MB block took 87 ms, into a reused one
    25 ms) and never writes to the caller's logits."""
    x = workspace[:logits_chunk.shape[0], :logits_chunk.shape[1]].copy_(logits_chunk)
    return scale_in_place(x, temperature, local_valid)


def scale_in_place(x, temperature, local_valid):
    """x ← x / T with columns ≥ local_valid (padded vocab) set to −1e30; returns x."""
    if temperature != 1.0:
        x.div_(temperature)
    if local_valid < x.shape[-1]:
        x[:, max(local_valid, 0):] = _PADDED_LOGIT
    return x


def _local_target_index(targets_chunk, vocab_start, local_vocab):
    """Column of each target in this rank's slice (0 where another rank owns it) and the ownership mask."""
    local = targets_chunk - vocab_start
    owned = (local >= 0) & (local < local_vocab)
    return torch.where(owned, local, torch.zeros_like(local)), owned


def chunk_statistics(shifted, exp_buf, targets_chunk, group, vocab_start, with_entropy):
    """(logZ, logp, H or None) of one token chunk from its scaled logits `shifted` `[n, V/TP]`
    (overwritten with x − m; `exp_buf` `[≥ n, V/TP]` receives exp(x − m)): the module docstring's
    formulas, with one MAX and one SUM all-reduce over `group`."""
    row_max = shifted.amax(dim=-1)
    _all_reduce(row_max, dist.ReduceOp.MAX, group)
    shifted.sub_(row_max[:, None])
    index, owned = _local_target_index(targets_chunk, vocab_start, shifted.shape[-1])
    target_term = shifted.gather(-1, index[:, None]).squeeze(-1)
    # where, not a product: a masked −inf logit at column 0 of a non-owning rank must give 0
    target_term = torch.where(owned, target_term, torch.zeros_like(target_term))
    exp_shifted = torch.exp(shifted, out=exp_buf[:shifted.shape[0]])
    sums = [exp_shifted.sum(-1), target_term]
    if with_entropy:
        sums.append(exp_shifted.mul_(shifted).sum(-1))  # Σ e·(x − m)
    stacked = torch.stack(sums)  # one SUM all-reduce for S, x_t − m and Σ e·(x − m)
    _all_reduce(stacked, dist.ReduceOp.SUM, group)
    log_sum = stacked[0].log()
    entropy = log_sum - stacked[2] / stacked[0] if with_entropy else None
    return row_max + log_sum, stacked[1] - log_sum, entropy


def output_coefficients(grad_logp, grad_entropy, entropy, temperature, dtype):
    """Per-token coefficients of ∂(g_logp·logp + g_H·H)/∂logits: (g_logp/T, g_H/T or None,
    offset or None), offset = (g_H·H + g_logp)/T. Every one carries ∂x/∂logits = 1/T."""
    scaled_grad_logp = grad_logp.reshape(-1).to(dtype) / temperature
    if grad_entropy is None:
        return scaled_grad_logp, None, None
    scaled_grad_entropy = grad_entropy.reshape(-1).to(dtype) / temperature
    return scaled_grad_logp, scaled_grad_entropy, scaled_grad_entropy * entropy + scaled_grad_logp


def chunk_logits_grad(log_p, probs_buf, log_z_chunk, targets_chunk, coefficients, vocab_start,
                      local_valid):
    """The gradient w.r.t. one tile of (unscaled) logits, in the compute dtype, written into
    `log_p`: the tile's scaled logits `[n, w]` (columns [vocab_start, vocab_start + w) of the global
    vocab; columns ≥ local_valid are padding, gradient 0). `probs_buf` `[≥ n, ≥ w]` is workspace;
    `coefficients` the tile's rows of `output_coefficients`."""
    scaled_grad_logp, scaled_grad_entropy, per_token_offset = coefficients
    log_p.sub_(log_z_chunk[:, None])
    probs = torch.exp(log_p, out=probs_buf[:log_p.shape[0], :log_p.shape[1]])
    if scaled_grad_entropy is not None:
        # off the target, ∂(g_logp·logp + g_H·H)/∂x = −p·(g_H·log p + g_H·H + g_logp)
        grad_x = torch.addcmul(-per_token_offset[:, None], log_p, -scaled_grad_entropy[:, None],
                               out=log_p).mul_(probs)
    else:
        grad_x = torch.mul(probs, -scaled_grad_logp[:, None], out=log_p)
    # + g_logp at the target column, on the rank (tile) that owns the target
    index, owned = _local_target_index(targets_chunk, vocab_start, log_p.shape[-1])
    target_grad = torch.where(owned, scaled_grad_logp, torch.zeros_like(scaled_grad_logp))
    grad_x.scatter_add_(-1, index[:, None], target_grad[:, None])
    if local_valid < grad_x.shape[-1]:
        grad_x[:, max(local_valid, 0):] = 0  # padded logits do not enter the softmax
    return grad_x


class _VocabParallelLogprobs(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits, targets, group, vocab_start, temperature, chunk_size, with_entropy,
                local_valid):
        local_vocab = logits.shape[-1]
        flat_logits = logits.reshape(-1, local_vocab)
        flat_targets = targets.reshape(-1).long()
        compute_dtype = torch.promote_types(logits.dtype, torch.float32)
        n_tokens = flat_logits.shape[0]
        log_z = torch.empty(n_tokens, dtype=compute_dtype, device=logits.device)
        logp = torch.empty_like(log_z)
        entropy = torch.empty_like(log_z) if with_entropy else None
        # the two [chunk, V/TP] buffers that bound the extra memory: shifted logits, exp of them
        shifted_buf, exp_buf = torch.empty(2, min(chunk_size, n_tokens), local_vocab,
                                           dtype=compute_dtype, device=logits.device)

        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            shifted = _load_scaled(shifted_buf, flat_logits[start:end], temperature, local_valid)
            log_z[start:end], logp[start:end], chunk_entropy = chunk_statistics(
                shifted, exp_buf, flat_targets[start:end], group, vocab_start, with_entropy)
            if with_entropy:
                entropy[start:end] = chunk_entropy

        ctx.save_for_backward(logits, flat_targets, log_z, *([entropy] if with_entropy else []))
        ctx.config = (vocab_start, temperature, chunk_size, with_entropy, local_valid)
        if with_entropy:
            return logp.view(targets.shape), entropy.view(targets.shape)
        return logp.view(targets.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy=None):
        logits, flat_targets, log_z, *maybe_entropy = ctx.saved_tensors
        vocab_start, temperature, chunk_size, with_entropy, local_valid = ctx.config
        local_vocab = logits.shape[-1]
        flat_logits = logits.reshape(-1, local_vocab)
        n_tokens = flat_logits.shape[0]
        coefficients = output_coefficients(grad_logp, grad_entropy if with_entropy else None,
                                           maybe_entropy[0] if with_entropy else None, temperature,
                                           log_z.dtype)
        grad_logits = torch.empty_like(flat_logits)
        log_p_buf, probs_buf = torch.empty(2, min(chunk_size, n_tokens), local_vocab,
                                           dtype=log_z.dtype, device=logits.device)

        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            log_p = _load_scaled(log_p_buf, flat_logits[start:end], temperature, local_valid)
            grad_x = chunk_logits_grad(log_p, probs_buf, log_z[start:end], flat_targets[start:end],
                                       _rows(coefficients, start, end), vocab_start, local_valid)
            # copy_ casts in place; an out= op of another dtype would allocate a [chunk, V/TP] temporary
            grad_logits[start:end].copy_(grad_x)
        return grad_logits.view(logits.shape), None, None, None, None, None, None, None


def _rows(coefficients, start, end):
    return tuple(None if c is None else c[start:end] for c in coefficients)
