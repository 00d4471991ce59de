"""Loss aggregation over a [batch, seq] per-token loss ℓ_it with response mask m_it (n_i = Σ_t m_it).

    token-mean          L = Σ_i Σ_t m_it·ℓ_it / N_tok        N_tok = Σ_i n_i over the GLOBAL batch
    seq-mean-token-mean L = Σ_i (Σ_t m_it·ℓ_it / n_i) / N_seq
    seq-mean-token-sum  L = Σ_i Σ_t m_it·ℓ_it / N_seq         N_seq = sequences with n_i > 0

Every mode is a sum of per-micro-batch terms divided by one global count, so it splits exactly over
micro-batches, pipeline stages and data-parallel ranks: `aggregate_sum` returns (loss_sum, count)
for Megatron's per-token-loss contract (the schedule sums the counts and finalize_model_grads
divides the summed gradients by them), and `aggregate` divides by a global count when one is given
(num_global_tokens for token-mean, num_global_sequences for the seq-mean modes) or by the local
count otherwise. Sequences with no response token are not counted (they are padding rows).
"""
from __future__ import annotations

import torch

from megatron_rpg.losses.validation import check_choice, check_range, response_mask

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def aggregate_sum(per_token_loss: torch.Tensor, mask: torch.Tensor | None, aggregation: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum, count): the numerator of the chosen mode and its integer normaliser (int64 tensor:
    response tokens for token-mean, non-empty sequences for the seq-mean modes)."""
    check_choice("aggregation", aggregation, AGGREGATIONS)
    if per_token_loss.dim() != 2:
        raise ValueError(f"per_token_loss must be [batch, seq], got shape {tuple(per_token_loss.shape)}")
    mask = response_mask(mask, per_token_loss, "per_token_loss")
    # where(), not a product: padding may hold NaN/inf and NaN·0 would still be NaN
    masked = torch.where(mask, per_token_loss, torch.zeros_like(per_token_loss))
    tokens_per_sequence = mask.sum(dim=1)
    if aggregation == "token-mean":
        return masked.sum(), tokens_per_sequence.sum()
    sequence_sum = masked.sum(dim=1)
    if aggregation == "seq-mean-token-mean":
        sequence_sum = sequence_sum / tokens_per_sequence.clamp(min=1).to(sequence_sum.dtype)
    return sequence_sum.sum(), (tokens_per_sequence > 0).sum()


def aggregate(per_token_loss: torch.Tensor, mask: torch.Tensor | None, aggregation: str, *,
              num_global_tokens: int | torch.Tensor | None = None,
              num_global_sequences: int | torch.Tensor | None = None) -> torch.Tensor:
    """loss_sum / count, with the count taken over the global batch when it is given."""
    check_choice("aggregation", aggregation, AGGREGATIONS)
    if aggregation == "token-mean" and num_global_sequences is not None:
        raise ValueError("num_global_sequences is for the seq-mean aggregations; token-mean takes "
                         "num_global_tokens")
    if aggregation != "token-mean" and num_global_tokens is not None:
        raise ValueError(f"num_global_tokens is for aggregation='token-mean'; {aggregation!r} takes "
                         "num_global_sequences")
    loss_sum, count = aggregate_sum(per_token_loss, mask, aggregation)
    global_count = num_global_tokens if aggregation == "token-mean" else num_global_sequences
    if global_count is not None:
        name = "num_global_tokens" if aggregation == "token-mean" else "num_global_sequences"
        check_range(name, float(global_count), 0.0, low_inclusive=False)
        count = global_count
    count = torch.as_tensor(count, dtype=loss_sum.dtype, device=loss_sum.device)
    # an all-padding micro-batch contributes 0, not NaN
    return loss_sum / count.clamp(min=1)
