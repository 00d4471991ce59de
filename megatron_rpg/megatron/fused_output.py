"""The output layer fused into the vocab-parallel log-prob loop: per-token log-probs (and entropy)
straight from the final hidden states, never materialising the `[tokens, V/TP]` logits or their
gradient.

Each TP rank holds its output-weight shard `W` `[V/TP, H]` (megatron's ColumnParallelLinear
partition: rows [rank·V/TP, (rank+1)·V/TP) of the vocab). With hidden states `h` `[N, H]` the
logits are `h Wᵀ`; the statistics are those of `logprobs.py` (max, Σ exp, target logit, entropy,
all-reduced over the TP group), computed on `[chunk_size, V/TP]` tiles of logits that are made by
one matmul each and dropped after use.

Backward, with G = ∂L/∂logits (logprobs.py's formula, from the saved per-token logZ and H):

    ∂L/∂h = G W      (partial per rank: all-reduced over TP, as ColumnParallelLinear's input grad)
    ∂L/∂W = Gᵀ h

It runs over vocab tiles `[N, V_c]` holding as many cells as a forward chunk (V_c = chunk·V/TP / N):
each tile's logits are recomputed (one extra matmul over the whole pass: 4 matmuls instead of the
unfused 3), G's tile is formed, `∂L/∂W` of those rows is one matmul over all tokens (as in the
unfused backward) and `∂L/∂h` accumulates over tiles in the compute dtype (float32 for bf16 input;
`[N, H]`, small). In a low-precision model the logits tile and G's tile are rounded to the model
dtype before their matmuls, as the unfused path rounds the logits and their gradient.

Temperature divides the logits as in logprobs.py; padded vocab ids (`vocab_size`) get probability 0
and gradient 0. Memory besides the outputs: two compute-dtype tiles of chunk·V/TP cells (plus one
model-dtype tile for bf16/fp16), the per-token vectors and the `[N, H]` accumulator — not the
`[N, V/TP]` logits (naive: the logits, their float32 log-softmax and the logits' gradient).

`token_logprobs` is the seam between the model's output and any loss: given the last stage's output
(hidden states with the output weight, or logits) it returns the per-token log-probs aligned with
the tokens. Sequence parallelism and multi-token prediction are not supported by the fused path
(`check_fused_output_supported`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from megatron_rpg.losses.validation import check_choice, check_range
from megatron_rpg.megatron.logprobs import (_all_reduce, chunk_logits_grad, chunk_statistics,
                                            output_coefficients, scale_in_place, vocab_parallel_logprobs,
                                            vocab_slice)

OUTPUT_LAYER_CHOICES = ("fused", "unfused")


def fused_output_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          tp_group=None, vocab_start_index: int | None = None,
                          temperature: float = 1.0, chunk_size: int = 256, with_entropy: bool = False,
                          vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) and (optionally) the entropy of softmax(h Wᵀ / T), shape of `targets`, float32
    (float64 for a float64 weight), differentiable w.r.t. `hidden` and `weight`.

    hidden: `[..., H]` final hidden states (cast to the weight's dtype for the matmuls).
    weight: `[V/TP, H]` this rank's output-weight shard (the embedding weight when tied).
    targets, tp_group, vocab_start_index, temperature, with_entropy, vocab_size: as in
      `vocab_parallel_logprobs`. chunk_size: tokens per forward tile (`[chunk_size, V/TP]` cells
      per tile in both passes).
    """
    if hidden.dim() < 1 or hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden has shape {tuple(hidden.shape)} and targets {tuple(targets.shape)}; "
                         f"hidden must be targets' shape plus one hidden dimension [..., H]")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; pass this rank's output-weight "
                         f"shard [V/TP, H] with H = {hidden.shape[-1]} (the hidden states' last dim)")
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must be floating point")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets has dtype {targets.dtype}; pass integer token ids")
    check_range("chunk_size", chunk_size, 0, low_inclusive=False)
    check_range("temperature", temperature, 0.0, low_inclusive=False)
    group, vocab_start_index, local_valid = vocab_slice(tp_group, weight.shape[0], vocab_start_index,
                                                        vocab_size, targets, "the weight's rows")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype)  # differentiable cast
    outputs = _FusedOutputLogprobs.apply(flat_hidden, weight, targets.reshape(-1).long(), group,
                                         int(vocab_start_index), float(temperature), int(chunk_size),
                                         bool(with_entropy), local_valid)
    if with_entropy:
        return outputs[0].view(targets.shape), outputs[1].view(targets.shape)
    return outputs.view(targets.shape), None


def _tile(buffer, rows, cols):
    """A contiguous `[rows, cols]` view at the start of a flat buffer (matmul's out= needs one)."""
    return buffer[:rows * cols].view(rows, cols)


class _FusedOutputLogprobs(torch.autograd.Function):

    @staticmethod
    def forward(ctx, hidden, weight, targets, group, vocab_start, temperature, chunk_size,
                with_entropy, local_valid):
        n_tokens, local_vocab = hidden.shape[0], weight.shape[0]
        compute_dtype = torch.promote_types(weight.dtype, torch.float32)
        log_z = torch.empty(n_tokens, dtype=compute_dtype, device=hidden.device)
        logp = torch.empty_like(log_z)
        entropy = torch.empty_like(log_z) if with_entropy else None
        rows = max(min(chunk_size, n_tokens), 1)
        shifted_buf, exp_buf = torch.empty(2, rows, local_vocab, dtype=compute_dtype,
                                           device=hidden.device)
        model_buf = (None if weight.dtype == compute_dtype else
                     torch.empty(rows, local_vocab, dtype=weight.dtype, device=hidden.device))

        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            if model_buf is None:
                shifted = torch.matmul(hidden[start:end], weight.t(), out=shifted_buf[:end - start])
            else:  # the logits in the model dtype, as the output layer gives them, then upcast
                shifted = shifted_buf[:end - start].copy_(
                    torch.matmul(hidden[start:end], weight.t(), out=model_buf[:end - start]))
            scale_in_place(shifted, temperature, local_valid)
            log_z[start:end], logp[start:end], chunk_entropy = chunk_statistics(
                shifted, exp_buf, targets[start:end], group, vocab_start, with_entropy)
            if with_entropy:
                entropy[start:end] = chunk_entropy

        ctx.save_for_backward(hidden, weight, targets, log_z, *([entropy] if with_entropy else []))
        ctx.config = (group, vocab_start, temperature, chunk_size, with_entropy, local_valid)
        return (logp, entropy) if with_entropy else logp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, targets, log_z, *maybe_entropy = ctx.saved_tensors
        group, vocab_start, temperature, chunk_size, with_entropy, local_valid = ctx.config
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        n_tokens, local_vocab = hidden.shape[0], weight.shape[0]
        compute_dtype = log_z.dtype
        coefficients = output_coefficients(grad_logp, grad_entropy if with_entropy else None,
                                           maybe_entropy[0] if with_entropy else None, temperature,
                                           compute_dtype)
        # a vocab tile over all tokens with a forward chunk's cells: ∂W of its rows in one matmul
        cols = max(1, min(local_vocab, chunk_size * local_vocab // max(n_tokens, 1)))
        log_p_buf, probs_buf = torch.empty(2, n_tokens * cols, dtype=compute_dtype,
                                           device=hidden.device)
        low_precision = weight.dtype != compute_dtype
        model_buf = torch.empty(n_tokens * cols, dtype=weight.dtype, device=hidden.device) \
            if low_precision else None
        grad_hidden = torch.zeros(n_tokens, hidden.shape[1], dtype=compute_dtype,
                                  device=hidden.device) if need_hidden else None
        partial_hidden = torch.empty_like(hidden) if need_hidden and low_precision else None
        grad_weight = torch.empty_like(weight) if need_weight else None

        for first in range(0, local_vocab, cols):
            last = min(first + cols, local_vocab)
            rows_of_weight = weight[first:last]
            log_p = _tile(log_p_buf, n_tokens, last - first)
            if low_precision:
                log_p.copy_(torch.matmul(hidden, rows_of_weight.t(),
                                         out=_tile(model_buf, n_tokens, last - first)))
            else:
                torch.matmul(hidden, rows_of_weight.t(), out=log_p)
            scale_in_place(log_p, temperature, local_valid - first)
            grad_x = chunk_logits_grad(log_p, _tile(probs_buf, n_tokens, last - first), log_z,
                                       targets, coefficients, vocab_start + first,
                                       local_valid - first)
            if low_precision:  # G rounded to the model dtype, as the unfused logits' gradient is
                grad_x = _tile(model_buf, n_tokens, last - first).copy_(grad_x)
            if need_weight:
                torch.matmul(grad_x.t(), hidden, out=grad_weight[first:last])
            if need_hidden:
                if low_precision:
                    grad_hidden.add_(torch.matmul(grad_x, rows_of_weight, out=partial_hidden))
                else:
                    grad_hidden.addmm_(grad_x, rows_of_weight)
        if need_hidden:
            _all_reduce(grad_hidden, dist.ReduceOp.SUM, group)  # each rank saw its vocab slice
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def token_logprobs(output, tokens, temperature, with_entropy, vocab_size, output_weight=None):
    """`[b, s]` log-probs (and entropies) aligned with `tokens` from the last stage's output: the
    final hidden states `[b, s, H]` with `output_weight` (the fused path), or the logits
    `[b, s, V/TP]` when `output_weight` is None.

    The target of position t is tokens[t + 1]; rather than slicing off the last position (a copy of
    the largest tensor) every position is evaluated with a rolled target and the last one dropped.
    Ids ≥ vocab_size (megatron's vocab padding) are excluded from the softmax inside the chunk loop.
    """
    targets = torch.roll(tokens, shifts=-1, dims=1)
    if output_weight is None:
        logp, entropy = vocab_parallel_logprobs(output, targets, temperature=temperature,
                                                with_entropy=with_entropy, vocab_size=vocab_size)
    else:
        logp, entropy = fused_output_logprobs(output, output_weight, targets, temperature=temperature,
                                              with_entropy=with_entropy, vocab_size=vocab_size)
    return _shift_right(logp), (None if entropy is None else _shift_right(entropy))


def _shift_right(per_position):
    """Value computed at position t − 1 moves to t; position 0 gets 0 (it has no prediction)."""
    return torch.cat([torch.zeros_like(per_position[:, :1]), per_position[:, :-1]], dim=1)


def check_output_layer(output_layer: str, gpt_model) -> bool:
    """True for the fused path. "fused" needs sequence parallelism and multi-token prediction off
    (the output layer's input would be sequence-sharded / carry the MTP heads): ValueError
    otherwise, before any work."""
    check_choice("output_layer", output_layer, OUTPUT_LAYER_CHOICES)
    if output_layer == "unfused":
        return False
    config = gpt_model.config
    for field in ("sequence_parallel", "mtp_num_layers"):
        if getattr(config, field, None):
            raise ValueError(f"output_layer='fused' does not support {field}={getattr(config, field)!r} "
                             f"in the model config; pass output_layer='unfused'")
    return True
