"""The grad_fn side of SVRPG: what one pass must compute, the trainer's grad_fn, ρ statistics.

`SVRPGPass` is handed to the trainer's `grad_fn(batch, svrpg_pass)` (see optim/svrpg.py); its
`ratio()` computes ρ̄ for the snapshot pass (losses/svrpg.SnapshotLoss calls it) and records the
statistics that `ratio_metrics` combines over micro-batches and DP ranks. `rl_grad_fn` is the
grad_fn for the trainer's RL step (`rl_forward_backward` with the trainer's PolicyLoss), reporting
the global sequence count the anchor phase checks against `--svrpg-anchor-batch-size` and the
normaliser that weights μ over several anchor calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_rpg.losses.policy_loss import PolicyLoss
from megatron_rpg.losses.svrpg import RatioClip, SnapshotLoss, snapshot_ratio
from megatron_rpg.megatron.forward_backward import rl_forward_backward

PASS_KINDS = ("anchor", "current", "snapshot")


@dataclass
class SVRPGPass:
    """What one grad_fn call must compute; collects the ρ statistics of the snapshot pass."""

    kind: str  # "anchor" | "current" | "snapshot"
    clip: RatioClip = field(default_factory=RatioClip)
    ratio_stats: list = field(default_factory=list)

    def __post_init__(self):
        if self.kind not in PASS_KINDS:
            raise ValueError(f"SVRPGPass kind={self.kind!r}; use one of {PASS_KINDS}")

    def ratio(self, snapshot_token_logp, current_token_logp, mask=None) -> torch.Tensor:
        """ρ̄ = clip(π_θ̃(τ)/π_θt(τ)) per sequence, detached (see losses/svrpg.snapshot_ratio)."""
        rho, stats = snapshot_ratio(snapshot_token_logp, current_token_logp, mask, self.clip)
        # statistics over the rows with ≥ 1 response token: a padding row's ρ = 1 is no sample
        self.ratio_stats.append((stats["num_sequences"], stats))
        return rho


def rl_grad_fn(model, loss: PolicyLoss, *, on_metrics=None, **rl_kwargs):
    """grad_fn for SVRPGOptimizer around `rl_forward_backward(model, batch, loss, **rl_kwargs)` (each
    call: one global batch as a list of micro-batches, normalised by its own global count); the
    snapshot pass runs `SnapshotLoss(loss, svrpg_pass)` (ρ̄-weighted on-policy loss at θ̃). Returns,
    for every pass, {"num_sequences": global sequences with ≥ 1 response token (rows without any are
    padding and do not count towards --svrpg-anchor-batch-size), "num_units": the call's normaliser}.

    ValueError, before any pass, for a loss other than RPGLoss, an aggregation under which SVRPG is
    biased (token-mean: losses/svrpg.check_svrpg_aggregation), and `num_global_tokens`: each SVRPG
    pass is one whole batch normalised by its own count, and μ weights the anchor calls by their
    normalisers, so a shared normaliser N over k anchor calls would make μ k times too small.

    on_metrics(kind, metrics), if given, receives each pass's kind and rl_forward_backward metrics
    (the trainer reports the "current" pass's: the loss at θ_t)."""
    if "num_global_tokens" in rl_kwargs:
        raise ValueError(f"rl_grad_fn(num_global_tokens={rl_kwargs['num_global_tokens']!r}): SVRPG "
                         f"normalises each pass by its own global count and weights the anchor "
                         f"calls itself; drop num_global_tokens (pass each anchor batch as its own "
                         f"list of micro-batches)")
    SnapshotLoss(loss, SVRPGPass("snapshot"))  # refuses a non-RPG loss or a biased aggregation now

    def grad_fn(micro_batches, svrpg_pass):
        pass_loss = SnapshotLoss(loss, svrpg_pass) if svrpg_pass.kind == "snapshot" else loss
        _, metrics = rl_forward_backward(model, micro_batches, pass_loss, **rl_kwargs)
        if on_metrics is not None:
            on_metrics(svrpg_pass.kind, metrics)
        return {"num_sequences": metrics["num_sequences"], "num_units": metrics["normalizer"]}

    return grad_fn


def ratio_metrics(ratio_stats, device) -> dict:
    """ρ statistics of the snapshot pass over the whole global batch (micro-batches, DP ranks),
    counting only sequences with ≥ 1 response token."""
    local = torch.zeros(5, dtype=torch.float64, device=device)  # n, Σρ, Σclipped, min log ρ, max log ρ
    local[3], local[4] = float("inf"), -float("inf")
    for count, s in ratio_stats:
        if count == 0:  # a micro-batch of padding rows only: no ρ to report (its stats are NaN)
            continue
        local[0] += count
        local[1] += count * s["rho_mean"]
        local[2] += count * s["rho_clip_fraction"]
        local[3] = min(local[3], s["log_rho_min"])
        local[4] = max(local[4], s["log_rho_max"])
    if dist.is_initialized():  # one collective: gather the 5 numbers, combine locally
        group = parallel_state.get_data_parallel_group()
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local, group=group)
        stacked = torch.stack(parts)
        local = torch.cat([stacked[:, :3].sum(0), stacked[:, 3].min().view(1),
                           stacked[:, 4].max().view(1)])
    n = float(local[0])
    if n == 0:
        return {}
    return {"svrpg/rho_mean": float(local[1]) / n, "svrpg/rho_clip_fraction": float(local[2]) / n,
            "svrpg/log_rho_min": float(local[3]), "svrpg/log_rho_max": float(local[4])}
