"""CAPO's token masks on megatron's layout (losses/capo.py holds the math; docs/algorithms.md, CAPO).

With tensor parallelism the LM head W [V, H] is split over the vocabulary: TP rank r holds the rows
[r·V/TP, (r+1)·V/TP) and the final hidden states h are replicated over the TP group. The top-K of
z = W·h is found in two steps: each rank's local top-K (ids made global), an all-gather over TP, and
the top-K of the TP·K candidates (the global top-K is among them). Every TP rank then holds the same
top-K logits, ids and π; the per-row work (G_eff, the moment table, the batch level's row sums) is
done by each rank on its own rows and the partial u = D[ids]·h summed over TP. The batch level sums
its row table over the data-parallel group, whose members hold the same vocabulary shard.

Pipeline parallelism: only the last stage holds h and the output layer, so only it calls this (the
loss lives there too). The Adam model is our own moment table (losses/capo.CAPOAdamMoments) over this
rank's vocabulary shard, not megatron's optimizer state: megatron's exp_avg/exp_avg_sq are moments of
the whole loss's gradient after loss scaling and clipping, sharded over DP in flat buffers by the
distributed optimizer; the model's moments are those of the last-layer gradient G it predicts with,
and its table costs 2·V/TP·H floats on the last stage, no communication per step.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_rpg.losses.capo import CAPOAdamMoments, CAPOConfig, CAPOMasks, CAPOTokens, SGDModel, capo_masks


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group=group)


def _summed(group):
    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        if _group_size(group) > 1:
            tensor = tensor.clone()
            dist.all_reduce(tensor, group=group)
        return tensor
    return reduce


def vocab_parallel_topk(hidden: torch.Tensor, weight_shard: torch.Tensor, k: int, *, tp_group=None,
                        vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-K logits [N, K], their global ids [N, K]) of z = weight·h over the whole vocabulary, from
    hidden [N, H] (replicated over TP) and this rank's rows weight_shard [V/TP, H]; ids ≥ vocab_size
    (megatron's padding) are never chosen."""
    tp_size, local_vocab = _group_size(tp_group), weight_shard.shape[0]
    vocab_start = (0 if tp_group is None else dist.get_rank(group=tp_group)) * local_vocab
    vocab_size = local_vocab * tp_size if vocab_size is None else vocab_size
    if not 2 <= k <= vocab_size:
        raise ValueError(f"--capo-top-k={k} must lie in [2, vocab size {vocab_size}]")
    logits = hidden.detach() @ weight_shard.detach().to(hidden.dtype).T
    padding = torch.arange(vocab_start, vocab_start + local_vocab) >= vocab_size
    logits = logits.masked_fill(padding, float("-inf"))
    local_logits, local_ids = logits.topk(min(k, local_vocab), dim=-1)
    local_ids = local_ids + vocab_start
    if tp_size > 1:
        gathered_logits = [torch.empty_like(local_logits) for _ in range(tp_size)]
        gathered_ids = [torch.empty_like(local_ids) for _ in range(tp_size)]
        dist.all_gather(gathered_logits, local_logits.contiguous(), group=tp_group)
        dist.all_gather(gathered_ids, local_ids.contiguous(), group=tp_group)
        local_logits, local_ids = torch.cat(gathered_logits, -1), torch.cat(gathered_ids, -1)
    top_logits, at = local_logits.topk(k, dim=-1)
    return top_logits, local_ids.gather(-1, at)


def capo_token_masks(hidden: torch.Tensor, weight_shard: torch.Tensor, targets: torch.Tensor,
                     advantages: torch.Tensor, mask: torch.Tensor, config: CAPOConfig, model, lr: float, *,
                     tp_group=None, dp_group=None, vocab_size: int | None = None) -> tuple[torch.Tensor, CAPOMasks]:
    """(keep [b, s] bool, False off the mask; the CAPOMasks, over the response tokens in row order) for one
    rank's batch: hidden [b, s, H] the final hidden states
    (the output layer's input), targets [b, s] the sampled token each position predicts, advantages
    [b] or [b, s], mask [b, s] the response tokens; model an SGDModel or this rank's CAPOAdamMoments
    (updated in place from the kept tokens); lr the current learning rate."""
    batch, seq, width = hidden.shape
    if targets.shape != (batch, seq) or mask.shape != (batch, seq):
        raise ValueError(f"targets {tuple(targets.shape)} and mask {tuple(mask.shape)} must be hidden's "
                         f"[batch, seq] = {(batch, seq)}")
    per_token = advantages[:, None].expand(batch, seq) if advantages.dim() == 1 else advantages
    valid = mask.reshape(-1).bool()  # only the response tokens are judged (and cost memory)
    flat = hidden.detach().reshape(batch * seq, width)[valid]
    topk_logits, topk_ids = vocab_parallel_topk(flat, weight_shard, config.top_k, tp_group=tp_group,
                                                vocab_size=vocab_size)
    tokens = CAPOTokens(flat, topk_logits, topk_ids, targets.reshape(-1)[valid],
                        per_token.reshape(-1)[valid].to(flat.dtype), torch.ones_like(valid[valid]),
                        torch.arange(batch).repeat_interleave(seq)[valid])
    local_vocab = weight_shard.shape[0]
    vocab_start = (0 if tp_group is None else dist.get_rank(group=tp_group)) * local_vocab
    masks = capo_masks(tokens, config, model, lr, num_sequences=batch, vocab_start=vocab_start,
                       local_vocab=local_vocab, tp_sum=_summed(tp_group), dp_sum=_summed(dp_group))
    keep = torch.zeros(batch * seq, dtype=torch.bool)
    keep[valid] = masks.keep
    return keep.reshape(batch, seq), masks


def optimizer_model(config: CAPOConfig, weight_shard: torch.Tensor, *, beta1: float, beta2: float, eps: float):
    """The configured last-layer optimizer model for this rank's vocabulary shard (float32 moments)."""
    if config.optimizer_model == "sgd":
        return SGDModel()
    return CAPOAdamMoments.zeros(weight_shard.shape[0], weight_shard.shape[1], beta1=beta1, beta2=beta2, eps=eps)


def rejection_rates(masks: CAPOMasks, group=None) -> dict[str, float]:
    """Per level and in total, the fraction of the valid tokens (summed over `group`) it rejected."""
    levels = list(masks.rejected)
    counts = torch.tensor([masks.rejected[level] for level in levels] + [masks.valid], dtype=torch.float64)
    counts = _summed(group)(counts)
    valid = max(float(counts[-1]), 1.0)
    rates = {f"capo_rejected_{level}": float(counts[i]) / valid for i, level in enumerate(levels)}
    rates["capo_rejected_total"] = float(counts[:-1].sum()) / valid
    return rates
