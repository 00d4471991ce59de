"""Evaluation statistics from per-prompt counts: accuracy Mean@K and the unbiased pass@k.

With n responses to a prompt, c of them correct:

    Mean@n = c / n                         (the expected accuracy of one sample, averaged over prompts)
    pass@k = 1 − C(n − c, k) / C(n, k)     (the chance that k of the n responses, drawn without
                                            replacement, hold a correct one: unbiased for the
                                            pass@k of k fresh samples; Chen et al. 2021)

pass@k is computed as −expm1(Σ_{i=n−c+1}^{n} log1p(−k/i)), the same ratio written as a product
of c factors (1 − k/i), summed in log space: no binomial coefficient is formed (they overflow a
float64 beyond n ≈ 1,000), and a small pass@k keeps its relative precision.
"""
from __future__ import annotations

import math

import torch

# columns of the per-prompt table evaluation.py reduces over DP ranks
CORRECT, REWARD_SUM, LENGTH_SUM, TRUNCATED = range(4)
COLUMNS = 4


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one prompt with c correct among n responses (1 ≤ k ≤ n, 0 ≤ c ≤ n)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct response
        return 1.0
    return -math.expm1(math.fsum(math.log1p(-k / i) for i in range(n - c + 1, n + 1)))


def pass_at_k_values(samples: int) -> list[int]:
    """The k reported for `samples` responses per prompt: 2, 4, 8, ... up to samples, and samples
    itself (pass@1 is Mean@samples)."""
    ks = {k for k in (2 ** e for e in range(1, samples.bit_length())) if k <= samples}
    return sorted(ks | ({samples} if samples > 1 else set()))


def eval_summary(per_prompt: torch.Tensor, samples: int) -> dict:
    """The eval/* metrics of a table [prompts, COLUMNS] of counts and sums over each prompt's
    `samples` responses: accuracy (Mean@samples), pass@k, reward and response-length means, the
    fraction of responses cut at the length cap (truncation_rate)."""
    if per_prompt.dim() != 2 or per_prompt.shape[1] != COLUMNS or per_prompt.shape[0] == 0:
        raise ValueError(f"per_prompt must be [prompts >= 1, {COLUMNS}]; got {tuple(per_prompt.shape)}")
    table = per_prompt.double()
    correct = [int(round(c)) for c in table[:, CORRECT].tolist()]
    prompts, responses = len(correct), len(correct) * samples
    metrics = {"eval/accuracy": sum(c / samples for c in correct) / prompts}
    for k in pass_at_k_values(samples):
        metrics[f"eval/pass@{k}"] = sum(pass_at_k(samples, c, k) for c in correct) / prompts
    metrics.update({"eval/reward_mean": float(table[:, REWARD_SUM].sum()) / responses,
                    "eval/response_length_mean": float(table[:, LENGTH_SUM].sum()) / responses,
                    "eval/truncation_rate": float(table[:, TRUNCATED].sum()) / responses,
                    "eval/prompts": prompts, "eval/samples_per_prompt": samples})
    return metrics
