"""Advantage estimators: per-prompt group baselines, batch normalisation, REINFORCE++ token returns.

Inputs are one scalar reward per sampled response, `rewards` [n], and the prompt group of each
response, either `group_ids` [n] (any integer labels, in any order) or `group_size` (responses
i·k … i·k+k−1 share a prompt). With mean_g, std_g the mean and (Bessel-corrected) standard
deviation of the rewards of response i's group g, n_g its size:

    RPG group mean (= Dr.GRPO)  A_i = R_i − mean_g                  (no std division)
    GRPO                        A_i = (R_i − mean_g) / (std_g + eps)
    RLOO                        A_i = R_i − (Σ_{j∈g, j≠i} R_j)/(n_g − 1) = n_g/(n_g − 1)·(R_i − mean_g)
    batch normalisation         A_i = (R_i − mean) / (std + eps)      over the whole batch

Every estimator computes in float64 and returns the rewards' dtype: float32 rewards near its
largest value (3.4e38) would overflow a float32 group sum; in float64 the advantages are finite
whenever they are representable in float32.

A group of one carries no information about its prompt's baseline: its baseline is 0 (A_i = R_i)
and GRPO divides by std = 1. A group whose rewards are all equal has std 0: GRPO's eps keeps the
advantage finite, and it is 0 exactly.

Exactness (for n_g i.i.d. responses of one prompt, proved by enumeration in the tests): the RLOO
baseline of response i depends only on the other responses, so E[A_i·∇log π(x_i)] = ∇E[R] exactly;
the group mean contains R_i itself, which scales that expectation by (n_g − 1)/n_g (same direction);
GRPO's std division is a data-dependent scale, i.e. an adaptive step, not an unbiased gradient.

REINFORCE++ (Hu 2025) folds a k1 KL penalty into per-token rewards and normalises token returns over
the batch; see `reinforce_pp_token_rewards` and `reinforce_pp_advantages`.
"""
from __future__ import annotations

import torch

from megatron_rpg.losses.kl import k1
from megatron_rpg.losses.validation import check_choice, check_finite, check_range, check_same_shape


def group_index(rewards: torch.Tensor, group_ids: torch.Tensor | None = None, *,
                group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Map responses to groups: (inverse [n] in 0..G−1, counts [G]); validates all inputs.

    Exactly one of `group_ids` ([n] integer labels, unsorted allowed) and `group_size` must be given.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [n] (one scalar per response), got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating-point tensor, got dtype {rewards.dtype}")
    check_finite("rewards", rewards)
    n = rewards.shape[0]
    if (group_ids is None) == (group_size is None):
        raise ValueError("pass exactly one of group_ids=[n] integer prompt labels or group_size=k "
                         f"(got group_ids={'None' if group_ids is None else 'a tensor'}, "
                         f"group_size={group_size!r})")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise ValueError(f"group_size={group_size!r} must be a positive int")
        check_range("group_size", group_size, 1)
        if n % group_size != 0:
            raise ValueError(f"group_size={group_size} does not divide the number of rewards n={n}; "
                             f"pass group_ids for groups of unequal size")
        inverse = torch.arange(n, device=rewards.device) // group_size
        counts = torch.full((n // group_size,), group_size, dtype=torch.long, device=rewards.device)
        return inverse, counts
    if group_ids.dim() != 1 or group_ids.shape[0] != n:
        raise ValueError(f"group_ids has shape {tuple(group_ids.shape)} but rewards has shape {(n,)}; "
                         f"pass one integer prompt label per response")
    if group_ids.is_floating_point() or group_ids.is_complex() or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor of prompt labels, got dtype {group_ids.dtype}")
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    return inverse.to(rewards.device), counts.to(rewards.device)


def _group_sums(values: torch.Tensor, inverse: torch.Tensor, num_groups: int) -> torch.Tensor:
    return torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, inverse, values)


def _group_mean_std(rewards, inverse, counts):
    """Per-response (mean_g, std_g); a group of one gets mean 0 and std 1 (no baseline to estimate)."""
    count = counts.to(rewards.dtype)
    mean = _group_sums(rewards, inverse, len(counts)) / count
    centred_sq = (rewards - mean[inverse]).square()
    # Bessel-corrected, as torch.std; the clamp only guards the singleton groups replaced below
    var = _group_sums(centred_sq, inverse, len(counts)) / (count - 1).clamp(min=1)
    singleton = counts == 1
    mean = torch.where(singleton, torch.zeros_like(mean), mean)
    std = torch.where(singleton, torch.ones_like(var), var.sqrt())
    return mean[inverse], std[inverse]


def group_mean_advantages(rewards: torch.Tensor, group_ids: torch.Tensor | None = None, *,
                          group_size: int | None = None) -> torch.Tensor:
    """RPG / Dr.GRPO advantage A_i = R_i − mean of its prompt group (group of one: A_i = R_i)."""
    inverse, counts = group_index(rewards, group_ids, group_size=group_size)
    values = rewards.double()
    mean, _ = _group_mean_std(values, inverse, counts)
    return (values - mean).to(rewards.dtype)


# Dr.GRPO drops GRPO's std division (and its length normalisation, which is an aggregation choice:
# use seq-mean-token-sum or a constant normaliser); its advantage is the RPG group-mean one.
dr_grpo_advantages = group_mean_advantages


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor | None = None, *,
                    group_size: int | None = None, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantage A_i = (R_i − mean_g)/(std_g + eps), std Bessel-corrected; all-equal group → 0."""
    check_range("eps", eps, 0.0, low_inclusive=False)
    inverse, counts = group_index(rewards, group_ids, group_size=group_size)
    values = rewards.double()
    mean, std = _group_mean_std(values, inverse, counts)
    return ((values - mean) / (std + eps)).to(rewards.dtype)


def rloo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor | None = None, *,
                    group_size: int | None = None) -> torch.Tensor:
    """RLOO advantage A_i = R_i − mean of the *other* responses of its group (group of one: A_i = R_i)."""
    inverse, counts = group_index(rewards, group_ids, group_size=group_size)
    values = rewards.double()
    sums = _group_sums(values, inverse, len(counts))[inverse]
    others = (counts[inverse] - 1).to(values.dtype)
    baseline = torch.where(others > 0, (sums - values) / others.clamp(min=1), torch.zeros_like(values))
    return (values - baseline).to(rewards.dtype)


def batch_normalized_advantages(values: torch.Tensor, mask: torch.Tensor | None = None, *,
                                eps: float = 1e-6) -> torch.Tensor:
    """A = (v − mean)/(std + eps) over all (masked) entries of the batch; std Bessel-corrected.

    Works on rewards [n] or token returns [batch, seq]; positions outside the mask are returned as 0.
    """
    check_range("eps", eps, 0.0, low_inclusive=False)
    if not values.is_floating_point():
        raise ValueError(f"values must be a floating-point tensor, got dtype {values.dtype}")
    keep = torch.ones_like(values, dtype=torch.bool) if mask is None else mask.bool()
    if mask is not None:
        check_same_shape("mask", mask, "values", values)
    check_finite("values", values, keep)
    count = int(keep.sum())
    if count < 2:
        raise ValueError(f"batch normalisation needs at least 2 (unmasked) values to estimate a std, "
                         f"got {count}; use group_mean_advantages for a single response")
    wide = values.double()
    kept = wide[keep]
    return standardize(wide, kept.mean(), kept.std(), keep, eps=eps).to(values.dtype)


def standardize(values: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, keep: torch.Tensor, *,
                eps: float = 1e-6) -> torch.Tensor:
    """A = (v − mean)/(std + eps) where keep, 0 elsewhere: batch normalisation with statistics given
    (e.g. those of a global batch spread over several processes)."""
    check_range("eps", eps, 0.0, low_inclusive=False)
    return torch.where(keep, (values - mean) / (std + eps), torch.zeros_like(values))


ADVANTAGE_ESTIMATORS = ("rpg", "grpo", "rloo", "dr_grpo", "batch_norm")


def compute_advantages(estimator: str, rewards: torch.Tensor, group_ids: torch.Tensor | None = None, *,
                       group_size: int | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Dispatch by name (one of ADVANTAGE_ESTIMATORS); batch_norm ignores the groups."""
    check_choice("estimator", estimator, ADVANTAGE_ESTIMATORS)
    if estimator == "batch_norm":
        group_index(rewards, group_ids, group_size=group_size)  # same validation as the others
        return batch_normalized_advantages(rewards, eps=eps)
    if estimator == "grpo":
        return grpo_advantages(rewards, group_ids, group_size=group_size, eps=eps)
    function = {"rpg": group_mean_advantages, "dr_grpo": dr_grpo_advantages, "rloo": rloo_advantages}
    return function[estimator](rewards, group_ids, group_size=group_size)


def reinforce_pp_token_rewards(scores: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
                               mask: torch.Tensor, *, beta: float) -> torch.Tensor:
    """REINFORCE++ per-token reward r_t = −β·k1_t + [t is the last response token]·score.

    k1_t = log π_old(x_t|x_<t) − log π_ref(x_t|x_<t) (the k1 estimate of KL(π_old‖π_ref) on the
    rollout's own samples). Inputs [batch, seq], scores [batch]; padding positions get 0.
    """
    check_range("beta", beta, 0.0)
    check_same_shape("ref_logp", ref_logp, "old_logp", old_logp)
    check_same_shape("mask", mask, "old_logp", old_logp)
    if old_logp.dim() != 2 or scores.shape != old_logp.shape[:1]:
        raise ValueError(f"scores must be [batch] and log-probs [batch, seq], got {tuple(scores.shape)} "
                         f"and {tuple(old_logp.shape)}")
    keep = mask.bool()
    check_finite("scores", scores)
    check_finite("old_logp", old_logp, keep)
    check_finite("ref_logp", ref_logp, keep)
    lengths = keep.sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError(f"mask has {int((lengths == 0).sum())} row(s) with no response token; every "
                         f"response needs at least one token to carry its score")
    # last response token per row = highest masked position (masks may have left padding)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(keep)
    last = torch.where(keep, positions, torch.full_like(positions, -1)).max(dim=1).values
    kl_penalty = -beta * k1(ref_logp.detach() - old_logp.detach())
    rewards = torch.where(keep, kl_penalty, torch.zeros_like(kl_penalty))
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] = rewards[rows, last] + scores.to(rewards.dtype)
    return rewards


def token_returns(token_rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0) -> torch.Tensor:
    """G_t = Σ_{s ≥ t, s in mask} γ^(#masked tokens strictly between t and s) · r_s; 0 off the mask."""
    check_range("gamma", gamma, 0.0, 1.0)
    check_same_shape("mask", mask, "token_rewards", token_rewards)
    keep = mask.bool()
    rewards = torch.where(keep, token_rewards, torch.zeros_like(token_rewards))
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):  # reverse scan; padding leaves the running sum as is
        running = torch.where(keep[:, t], rewards[:, t] + gamma * running, running)
        returns[:, t] = torch.where(keep[:, t], running, torch.zeros_like(running))
    return returns


def reinforce_pp_advantages(scores: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
                            mask: torch.Tensor, *, beta: float, gamma: float = 1.0,
                            eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE++ advantages [batch, seq]: batch-normalised token returns of the k1-shaped rewards."""
    rewards = reinforce_pp_token_rewards(scores, old_logp, ref_logp, mask, beta=beta)
    return batch_normalized_advantages(token_returns(rewards, mask, gamma=gamma), mask, eps=eps)
