"""SVRPG around a megatron optimizer: sharded snapshot θ̃ and anchor gradient μ, one model.

    svrpg = SVRPGOptimizer(optimizer, config)                 # optimizer from get_megatron_optimizer
    if svrpg.needs_anchor:                                    # every config.inner_steps steps
        svrpg.anchor(grad_fn, anchor_batches)                 # θ̃ ← θ, μ = mean g(τ; θ̃), τ ∼ π_θ̃
    ok, grad_norm, num_zeros, metrics = svrpg.step(grad_fn, batch)   # batch drawn from π_θt

`grad_fn(batch, svrpg_pass) -> dict | None` runs forward-backward of the trainer's loss into the DDP
grad buffers (including `finalize_model_grads`: the DP reduce). `svrpg_pass.kind` says which:
- "anchor":   on-policy loss at θ̃ on the anchor batch (old log-probs = θ̃'s);
- "current":  the ordinary loss at θ_t on the inner batch (old log-probs = θ_t's, the sampler);
- "snapshot": the model holds θ̃; on-policy loss at θ̃ (old log-probs := detached θ̃ log-probs) on
  the *same* inner batch, each sample weighted by ρ̄ = `svrpg_pass.ratio(snapshot_token_logp,
  batch_old_token_logp, mask)` via `weight_token_loss` — same normalisation as "current".
It may return {"num_units": n} (a global sequence/token count, same on every rank): anchor batches
given in several calls are then weighted by n, so μ is the mean over the whole anchor batch.
With the trainer's RL step the whole callback is
    grad_fn = lambda mbs, p: rl_forward_backward(model, mbs, loss_config=cfg, svrpg_pass=p)
(megatron/forward_backward.py implements the snapshot pass). The trainer draws
`config.anchor_batch_size` sequences from π_θ̃ when `needs_anchor`, and for `config.update_ref`
reads π_θ̃ log-probs inside `with svrpg.snapshot_loaded():` (π_ref ← π_θ̃).

Direction assembled shard-wise in the grad buffer, then handed to the wrapped optimizer's `step()`
(clipping, loss scaling, BF16/FP8 unchanged):  v = g(θ_t) − ρ̄·g(θ̃) + μ  (losses/svrpg.py).
θ̃ is loaded by swapping it into the optimizer's fp32 main shards, publishing them (cast + DP
all-gather, as the optimizer's own param sync) and swapping back after the pass: θ_t is restored
bit-exactly from its fp32 main shards. Memory: θ̃, μ: 8·P/DP bytes; one transient fp32 grad shard.
Gradients in μ are stored unscaled (divided by the loss scale at anchor time) so an fp16 loss-scale
change between anchor and inner step changes nothing. v is written back in the grad buffer's dtype:
keep `grad_reduce_in_fp32=True` (optimizer_setup's default) so it is not rounded to bf16.
Context parallelism is refused: ρ is a whole-sequence sum and each CP rank sees only a chunk.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_rpg.losses.svrpg import RatioClip, combine_control_variate, snapshot_ratio
from megatron_rpg.optim.svrpg_checkpoint import load_svrpg_state, svrpg_sharded_state
from megatron_rpg.optim.svrpg_config import SVRPGConfig
from megatron_rpg.optim.svrpg_shards import (optimizer_slots, publish_main_params, sub_optimizers,
                                             swap_)


@dataclass
class SVRPGPass:
    """What one grad_fn call must compute; collects the ρ statistics of the snapshot pass."""

    kind: str  # "anchor" | "current" | "snapshot"
    clip: RatioClip = field(default_factory=RatioClip)
    ratio_stats: list = field(default_factory=list)

    def ratio(self, snapshot_token_logp, current_token_logp, mask=None) -> torch.Tensor:
        """ρ̄ = clip(π_θ̃(τ)/π_θt(τ)) per sequence, detached (see losses/svrpg.snapshot_ratio)."""
        rho, stats = snapshot_ratio(snapshot_token_logp, current_token_logp, mask, self.clip)
        self.ratio_stats.append((rho.shape[0], stats))
        return rho


class SVRPGOptimizer:
    """Wraps a megatron optimizer (distributed or not, chained or not); see the module docstring."""

    def __init__(self, optimizer, config: SVRPGConfig):
        if parallel_state.model_parallel_is_initialized() and \
                parallel_state.get_context_parallel_world_size() > 1:
            raise ValueError("SVRPG with context parallelism is not supported (the sequence-level "
                             "ratio ρ would need a CP all-reduce); use context_parallel_size=1")
        self.optimizer = optimizer
        self.config = config
        self.slots = [s for opt in sub_optimizers(optimizer) for s in optimizer_slots(opt)]
        self.snapshot = [torch.zeros_like(s.main, dtype=torch.float32) for s in self.slots]
        self.anchor_mean = [torch.zeros_like(s.main, dtype=torch.float32) for s in self.slots]
        self.inner_step = 0
        self.has_snapshot = False
        # Where the statistics' collectives run (NCCL needs device tensors).
        self.device = self.slots[0].main.device if self.slots else torch.device("cpu")

    @property
    def needs_anchor(self) -> bool:
        return not self.has_snapshot or self.inner_step >= self.config.inner_steps

    def extra_memory_bytes(self) -> int:
        """Persistent bytes held by SVRPG on this rank (θ̃ and μ): 8·(elements of the main shards)."""
        return sum(t.numel() * t.element_size() for t in self.snapshot + self.anchor_mean)

    def _zero_grads(self) -> None:
        self.optimizer.zero_grad()
        for opt in sub_optimizers(self.optimizer):
            for chunk in getattr(opt, "model_chunks", []):
                chunk.zero_grad_buffer()
        if not any(getattr(o, "model_chunks", None) for o in sub_optimizers(self.optimizer)):
            for s in self.slots:
                s.grad.zero_()

    def _loss_scale(self) -> float:
        return float(self.optimizer.get_loss_scale())

    @torch.no_grad()
    def _global_norms(self, local_squares: torch.Tensor) -> list[float]:
        """√ of Σ‖·‖² over the whole model: this rank's shard sums, all-reduced over the
        optimizer's grad-stats group (DP shards and model-parallel parts; duplicates excluded)."""
        if dist.is_initialized():
            dist.all_reduce(local_squares, group=self.optimizer.get_grad_stats_parallel_group())
        return local_squares.sqrt().tolist()

    @contextmanager
    def snapshot_loaded(self, publish_on_exit: bool = True):
        """The model computes with θ̃ inside the block; θ_t's fp32 main shards are restored
        bit-exactly on exit, and (publish_on_exit) the model params and DP all-gather with them.

        Also how a trainer gets π_θ̃ log-probs for `update_ref` (π_ref ← π_θ̃)."""
        if not self.has_snapshot:
            raise RuntimeError("no snapshot yet: call anchor() first")
        for slot, snap in zip(self.slots, self.snapshot):
            swap_(slot.main, snap)
        publish_main_params(self.optimizer)
        try:
            yield
        finally:
            for slot, snap in zip(self.slots, self.snapshot):
                swap_(slot.main, snap)
            if publish_on_exit:
                publish_main_params(self.optimizer)

    def anchor(self, grad_fn, anchor_batches) -> dict:
        """θ̃ ← θ_t (fp32 main shards); μ = weighted mean of g(τ; θ̃) over the anchor batches."""
        with torch.no_grad():
            for slot, snap, mu in zip(self.slots, self.snapshot, self.anchor_mean):
                snap.copy_(slot.main)
                mu.zero_()
        total_units = 0.0
        for batch in anchor_batches:
            self._zero_grads()
            info = grad_fn(batch, SVRPGPass("anchor", self.config.ratio_clip)) or {}
            units = float(info.get("num_units", 1.0))
            with torch.no_grad():
                for slot, mu in zip(self.slots, self.anchor_mean):
                    mu.add_(slot.grad.float(), alpha=units / self._loss_scale())
            total_units += units
        if total_units <= 0:
            raise ValueError("anchor() got no anchor batches (or num_units summing to 0); pass at "
                             "least one batch drawn from the snapshot policy")
        local_squares = torch.zeros(1, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for slot, mu in zip(self.slots, self.anchor_mean):
                mu.div_(total_units)
                if slot.counts_in_norm:
                    local_squares[0] += torch.dot(mu, mu)
        self._zero_grads()
        self.has_snapshot, self.inner_step = True, 0
        (anchor_norm,) = self._global_norms(local_squares)
        return {"svrpg/anchor_grad_norm": anchor_norm,
                "svrpg/update_ref": float(self.config.update_ref)}

    def step(self, grad_fn, batch):
        """One inner step: v = g(θ_t) − ρ̄·g(θ̃) + μ into the grad buffer, then the wrapped step().

        Returns the wrapped optimizer's (update_successful, grad_norm, num_zeros) and metrics."""
        if self.needs_anchor:
            raise RuntimeError(f"SVRPG needs a fresh anchor (inner step {self.inner_step} of "
                               f"{self.config.inner_steps}): call anchor() when needs_anchor is True")
        self._zero_grads()
        grad_fn(batch, SVRPGPass("current", self.config.ratio_clip))
        scale = self._loss_scale()
        with torch.no_grad():  # the one transient fp32 shard: g(θ_t), unscaled
            current = [slot.grad.float() / scale for slot in self.slots]
        snapshot_pass = SVRPGPass("snapshot", self.config.ratio_clip)
        # No re-publish of θ_t on exit: the optimizer step below copies its updated main shards
        # into the model and all-gathers them anyway (one param all-gather saved per step).
        with self.snapshot_loaded(publish_on_exit=False):
            self._zero_grads()
            grad_fn(batch, snapshot_pass)
        scale = self._loss_scale()
        # Σ‖g(θ_t)‖², Σ‖ρ̄·g(θ̃) − μ‖², Σ‖v‖² on this rank's shards; v overwrites the grad buffer.
        local_squares = torch.zeros(3, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for slot, g, mu in zip(self.slots, current, self.anchor_mean):
                weighted_snapshot = slot.grad.float() / scale  # one parameter at a time
                if slot.counts_in_norm:
                    local_squares[0] += torch.dot(g, g)
                    local_squares[1] += _squared_distance(weighted_snapshot, mu)
                combine_control_variate(g, weighted_snapshot, mu, out=g)
                if slot.counts_in_norm:
                    local_squares[2] += torch.dot(g, g)
                slot.grad.copy_(g.mul_(scale) if scale != 1.0 else g)
        del current
        norms = self._global_norms(local_squares)
        metrics = dict(zip(("svrpg/current_grad_norm", "svrpg/control_variate_norm",
                            "svrpg/direction_norm"), norms))
        metrics.update(_ratio_metrics(snapshot_pass.ratio_stats, self.device))
        result = self.optimizer.step()
        if result[0]:
            self.inner_step += 1
        else:  # skipped (inf/nan grads): the model still holds θ̃ in places; put θ_t back
            publish_main_params(self.optimizer)
        metrics["svrpg/inner_step"] = float(self.inner_step)
        return (*result, metrics)

    # ---- checkpointing: the optimizer's sharded state plus θ̃, μ and the counters ----
    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, metadata=None):
        return {"optimizer": self.optimizer.sharded_state_dict(model_sharded_state_dict, is_loading,
                                                               metadata=metadata),
                "svrpg": svrpg_sharded_state(self)}

    def load_state_dict(self, state_dict) -> None:
        # no_grad: megatron copies into fp32 main shards that are views of leaf params
        # (distrib_optimizer._set_main_param_and_optimizer_states), which autograd refuses otherwise.
        with torch.no_grad():
            self.optimizer.load_state_dict(state_dict["optimizer"])
            _restore_adam_steps(self.optimizer, state_dict["optimizer"])
        load_svrpg_state(self, state_dict["svrpg"])


def _restore_adam_steps(optimizer, loaded) -> None:
    """Work around megatron-core 0.16.1 with torch Adam: `DistributedOptimizer.load_state_dict`
    gives every parameter the SAME "step" tensor (torch Adam then increments it once per parameter
    per step), and `dp_reshardable` writes the pre-load per-parameter step back over it (a
    LocalNonpersistentObject). Each parameter gets its own tensor holding the saved step
    (param_groups carry it), so a resumed run's bias correction equals the uninterrupted run's."""
    subs = sub_optimizers(optimizer)
    states = [loaded] if len(subs) == 1 else [loaded[i] for i in range(len(subs))]
    for opt, state in zip(subs, states):
        groups = state.get("optimizer", {}).get("param_groups", []) if isinstance(state, dict) else []
        steps = {g["step"] for g in groups if g.get("step") is not None}
        if len(steps) != 1:
            continue
        (step,) = steps
        for param_state in opt.optimizer.state.values():
            old = param_state.get("step")
            if isinstance(old, torch.Tensor):
                param_state["step"] = torch.full_like(old, float(step))


def _squared_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    diff = a - b
    return torch.dot(diff, diff)


def _ratio_metrics(ratio_stats, device) -> dict:
    """ρ statistics of the snapshot pass over the whole global batch (micro-batches, DP ranks)."""
    local = torch.zeros(5, dtype=torch.float64, device=device)  # n, Σρ, Σclipped, min log ρ, max log ρ
    local[3], local[4] = float("inf"), -float("inf")
    for count, s in ratio_stats:
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
