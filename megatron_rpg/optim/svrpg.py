"""SVRPG around a megatron optimizer: sharded snapshot θ̃ and anchor gradient μ, one model.

    svrpg = SVRPGOptimizer(optimizer, SVRPGConfig(enabled=True, ...))   # svrpg_config.py
    grad_fn = rl_grad_fn(model, loss, temperature=t)          # or the trainer's own (svrpg_passes.py)
    if svrpg.needs_anchor:                                    # every config.inner_steps steps
        svrpg.anchor(grad_fn, anchor_batches)                 # θ̃ ← θ, μ = mean g(τ; θ̃), τ ∼ π_θ̃
    if svrpg.config.update_ref:                               # π_ref ← π_θ̃
        for mb, ref in zip(batch, svrpg.reference_logprobs(model, batch)): mb["ref_logp"] = ref
    ok, grad_norm, num_zeros, metrics = svrpg.step(grad_fn, batch)   # batch drawn from π_θt

`grad_fn(batch, svrpg_pass) -> dict | None` runs forward-backward of the trainer's loss into the DDP
grad buffers (including `finalize_model_grads`: the DP reduce). `svrpg_pass.kind` says which:
- "anchor":   on-policy loss at θ̃ on the anchor batch (old log-probs = θ̃'s);
- "current":  the ordinary loss at θ_t on the inner batch (old log-probs = θ_t's, the sampler);
- "snapshot": the model holds θ̃; on-policy loss at θ̃ (old log-probs := detached θ̃ log-probs) on
  the *same* inner batch, each sample weighted by ρ̄ = `svrpg_pass.ratio(snapshot_token_logp,
  batch_old_token_logp, mask)` via `weight_token_loss` — same normalisation as "current"
  (losses/svrpg.SnapshotLoss is that loss); a snapshot pass that never calls `ratio` is a
  RuntimeError (ρ̄ ≡ 1 would bias v).
The normaliser of every pass must be a constant (seq-mean-token-sum or seq-mean-token-mean; token-mean
is biased and refused by rl_grad_fn and SnapshotLoss: losses/svrpg.py).
For anchor passes it must return {"num_sequences": n} (the global number of sequences in the batch,
same on every rank): the anchor phase checks that they add up to `config.anchor_batch_size`
(--svrpg-anchor-batch-size), the |D_L| the trainer draws from π_θ̃. Optional "num_units" (default
n) weights μ over several anchor calls (the call's global normaliser: sequences or tokens).
`rl_grad_fn` (svrpg_passes.py) is this callback around the trainer's `rl_forward_backward`.
If grad_fn raises in the snapshot pass, or the wrapped optimizer's step() raises, the model params
are θ_t's again (republished from the main shards) before the exception propagates.

update_ref (π_ref ← π_θ̃ at every refresh): `reference_logprobs(model, batch)` returns θ̃'s log-probs
(`compute_logprobs` with θ̃ swapped in, θ_t restored bit-exactly) to be the batch's `ref_logp`; on
the anchor batch θ̃ is the current model, so its old log-probs are already π_ref's.

Direction assembled shard-wise in the grad buffer, then handed to the wrapped optimizer's `step()`
(clipping, loss scaling, BF16/FP8 unchanged):  v = g(θ_t) − ρ̄·g(θ̃) + μ  (losses/svrpg.py).
θ̃ is loaded by swapping it into the optimizer's fp32 main shards, publishing them (cast + DP
all-gather, as the optimizer's own param sync) and swapping back after the pass: θ_t is restored
bit-exactly from its fp32 main shards. Memory: θ̃, μ: 8·P/DP bytes; one transient fp32 grad shard.
Gradients in μ are stored unscaled (divided by the loss scale at anchor time) so an fp16 loss-scale
change between anchor and inner step changes nothing. An anchor pass with non-finite gradients
(fp16 overflow) backs the dynamic loss scale off and is recomputed, as megatron skips such a step;
without a dynamic scaler it is an error (a non-finite μ would poison all m inner steps).
v is written back in the grad buffer's dtype:
keep `grad_reduce_in_fp32=True` (optimizer_setup's default) so it is not rounded to bf16.
Context parallelism is refused: ρ is a whole-sequence sum and each CP rank sees only a chunk.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_rpg.losses.svrpg import combine_control_variate
from megatron_rpg.megatron.compat import (back_off_loss_scale, dynamic_grad_scalers, optimizer_model_chunks,
                                          restore_adam_steps, sub_optimizers)
from megatron_rpg.megatron.forward_backward import compute_logprobs
from megatron_rpg.megatron.step_guard import guarded_step
from megatron_rpg.optim.svrpg_checkpoint import load_svrpg_state, svrpg_sharded_state
from megatron_rpg.optim.svrpg_config import SVRPGConfig
from megatron_rpg.optim.svrpg_passes import SVRPGPass, ratio_metrics, rl_grad_fn
from megatron_rpg.optim.svrpg_shards import optimizer_slots, publish_main_params, weights_swapped_in

__all__ = ["SVRPGOptimizer", "SVRPGPass", "rl_grad_fn"]
MAX_ANCHOR_RETRIES = 64  # fp16: loss-scale back-offs per anchor batch (2^32 → 1 takes ~34)


def _state_dtype(main: torch.Tensor) -> torch.dtype:
    return torch.promote_types(main.dtype, torch.float32)


class SVRPGOptimizer:
    """Wraps a megatron optimizer (distributed or not, chained or not); see the module docstring."""

    def __init__(self, optimizer, config: SVRPGConfig):
        if not isinstance(config, SVRPGConfig):
            raise ValueError(f"config must be an SVRPGConfig (optim/svrpg_config.py), got "
                             f"{type(config).__name__}")
        if not config.enabled:
            raise ValueError("SVRPGConfig(enabled=False) (no --svrpg): train with the plain optimizer; "
                             "the trainer builds no wrapper in that case")
        if parallel_state.model_parallel_is_initialized() and \
                parallel_state.get_context_parallel_world_size() > 1:
            raise ValueError("SVRPG with context parallelism is not supported (the sequence-level "
                             "ratio ρ would need a CP all-reduce); use context_parallel_size=1")
        self.optimizer = optimizer
        self.config = config
        self.slots = [s for opt in sub_optimizers(optimizer) for s in optimizer_slots(opt)]
        # fp32 for every production dtype (main shards are fp32); a float64 model keeps float64
        # state, so the tests' float64 reference of an SVRPG run has no float32 step in it
        self.snapshot = [torch.zeros_like(s.main, dtype=_state_dtype(s.main)) for s in self.slots]
        self.anchor_mean = [torch.zeros_like(s.main, dtype=_state_dtype(s.main)) for s in self.slots]
        self.inner_step = 0
        self.has_snapshot = False
        self.last_step = None  # the StepOutcome of the last inner step's guarded optimizer step
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
            for chunk in optimizer_model_chunks(opt):
                chunk.zero_grad_buffer()
        if not any(optimizer_model_chunks(o) for o in sub_optimizers(self.optimizer)):
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
        bit-exactly on exit, and the model params and DP all-gather with them — on a normal exit
        only if publish_on_exit (step() leaves that to the optimizer step), always on an exception.

        `reference_logprobs` uses it for update_ref (π_ref ← π_θ̃)."""
        if not self.has_snapshot:
            raise RuntimeError("no snapshot yet: call anchor() first")
        with weights_swapped_in(self.optimizer, self.slots, self.snapshot, publish_on_exit=publish_on_exit):
            yield

    def reference_logprobs(self, model, micro_batches, **compute_logprobs_kwargs) -> list:
        """update_ref (π_ref ← π_θ̃): per-token log-probs of θ̃ on `micro_batches`, from
        `compute_logprobs(model, ...)` with θ̃ swapped in; θ_t is restored bit-exactly (fp32 main
        shards, model params and their DP all-gather). Use them as the batch's `ref_logp`.
        Costs a forward pass and two param all-gathers (θ̃ in, θ_t back)."""
        if not self.config.update_ref:
            raise ValueError("reference_logprobs() is the π_ref ← π_θ̃ of --svrpg-update-ref, which "
                             "is off (SVRPGConfig.update_ref=False): take ref_logp from the fixed "
                             "reference model, or enable --svrpg-update-ref")
        params = {id(p) for chunk in (model if isinstance(model, (list, tuple)) else [model])
                  for p in chunk.parameters()}
        foreign = sum(id(slot.model_param) not in params for slot in self.slots)
        if foreign:
            raise ValueError(f"{foreign} of the optimizer's {len(self.slots)} parameters are not in "
                             f"`model`; pass the model chunks the wrapped optimizer was built for")
        with self.snapshot_loaded():
            return compute_logprobs(model, micro_batches, **compute_logprobs_kwargs)

    def _grads_finite(self) -> bool:
        """No inf/NaN in any rank's grad shards (all-reduced like the norms)."""
        bad = torch.zeros(1, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for slot in self.slots:
                bad += (~torch.isfinite(slot.grad)).sum()
        if dist.is_initialized():
            dist.all_reduce(bad, group=self.optimizer.get_grad_stats_parallel_group())
        return float(bad) == 0

    def _back_off_loss_scale(self) -> bool:
        """The dynamic scalers' update(found_inf=True); False when that cannot change anything."""
        progress = False
        for scaler in dynamic_grad_scalers(self.optimizer):
            progress |= back_off_loss_scale(scaler)
        return progress

    def _anchor_pass(self, grad_fn, batch, index) -> dict:
        """One anchor batch's gradient into the grad buffer; fp16 overflow: back off and redo."""
        for _ in range(MAX_ANCHOR_RETRIES):
            self._zero_grads()
            info = grad_fn(batch, SVRPGPass("anchor", self.config.ratio_clip)) or {}
            if self._grads_finite():
                return info
            scale = self._loss_scale()
            if not self._back_off_loss_scale():
                break
        raise FloatingPointError(
            f"anchor batch {index}: non-finite gradient (inf/NaN) at loss scale {scale:g} that no "
            f"loss-scale back-off removes; a non-finite μ would poison every inner step. Check the "
            f"batch's log-probs/advantages, or lower the (fp16) initial loss scale")

    def anchor(self, grad_fn, anchor_batches) -> dict:
        """θ̃ ← θ_t (fp32 main shards); μ = weighted mean of g(τ; θ̃) over the anchor batches,
        whose grad_fn-reported global sequence counts must add up to config.anchor_batch_size.
        On an error the snapshot is dropped (needs_anchor is True again)."""
        self.has_snapshot = False
        with torch.no_grad():
            for slot, snap, mu in zip(self.slots, self.snapshot, self.anchor_mean):
                snap.copy_(slot.main)
                mu.zero_()
        total_units, total_sequences = 0.0, 0
        for index, batch in enumerate(anchor_batches):
            info = self._anchor_pass(grad_fn, batch, index)
            if "num_sequences" not in info:
                raise ValueError(f"grad_fn returned {info!r} for anchor batch {index}; an anchor pass "
                                 f"must return {{'num_sequences': n}} (global sequences in the batch) "
                                 f"so the anchor size can be checked (rl_grad_fn does)")
            total_sequences += int(info["num_sequences"])
            units = float(info.get("num_units", info["num_sequences"]))
            with torch.no_grad():
                for slot, mu in zip(self.slots, self.anchor_mean):
                    mu.add_(slot.grad.to(mu.dtype), alpha=units / self._loss_scale())
            total_units += units
        if total_sequences != self.config.anchor_batch_size:
            self._zero_grads()
            raise ValueError(f"the anchor batches hold {total_sequences} sequences (global), but "
                             f"--svrpg-anchor-batch-size is {self.config.anchor_batch_size}; draw "
                             f"exactly anchor_batch_size sequences from the snapshot policy")
        if total_units <= 0:
            raise ValueError(f"anchor() got num_units summing to {total_units}; each anchor batch "
                             f"needs a positive weight (its global normaliser)")
        local_squares = torch.zeros(1, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for slot, mu in zip(self.slots, self.anchor_mean):
                mu.div_(total_units)
                if slot.counts_in_norm:
                    local_squares[0] += torch.dot(mu, mu)
        self._zero_grads()
        self.has_snapshot, self.inner_step = True, 0
        (anchor_norm,) = self._global_norms(local_squares)
        # update_ref: θ̃ is now π_ref; reference_logprobs() returns its log-probs until the next one
        return {"svrpg/anchor_grad_norm": anchor_norm, "svrpg/anchor_sequences": float(total_sequences),
                "svrpg/reference_moved": float(self.config.update_ref)}

    def step(self, grad_fn, batch):
        """One inner step: v = g(θ_t) − ρ̄·g(θ̃) + μ into the grad buffer, then the wrapped step().

        Returns (update_successful, grad_norm, num_zeros) of the wrapped optimizer's guarded step
        (megatron/step_guard.py; `last_step` keeps its StepOutcome, with why it was skipped) and metrics."""
        if self.needs_anchor:
            raise RuntimeError(f"SVRPG needs a fresh anchor (inner step {self.inner_step} of "
                               f"{self.config.inner_steps}): call anchor() when needs_anchor is True")
        self._zero_grads()
        grad_fn(batch, SVRPGPass("current", self.config.ratio_clip))
        scale = self._loss_scale()
        with torch.no_grad():  # the one transient fp32 shard: g(θ_t), unscaled
            current = [slot.grad.to(mu.dtype) / scale for slot, mu in zip(self.slots, self.anchor_mean)]
        snapshot_pass = SVRPGPass("snapshot", self.config.ratio_clip)
        # No re-publish of θ_t on exit: the optimizer step below copies its updated main shards
        # into the model and all-gathers them anyway (one param all-gather saved per step).
        with self.snapshot_loaded(publish_on_exit=False):
            self._zero_grads()
            grad_fn(batch, snapshot_pass)
            # raised inside the block, so θ_t is published back (an exception skips the step)
            _check_snapshot_pass_weighted(snapshot_pass)
        scale = self._loss_scale()
        # Σ‖g(θ_t)‖², Σ‖ρ̄·g(θ̃) − μ‖², Σ‖v‖² on this rank's shards; v overwrites the grad buffer.
        local_squares = torch.zeros(3, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for slot, g, mu in zip(self.slots, current, self.anchor_mean):
                weighted_snapshot = slot.grad.to(mu.dtype) / scale  # one parameter at a time
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
        metrics.update(ratio_metrics(snapshot_pass.ratio_stats, self.device))
        try:  # skipped on a non-finite gradient or state, as a plain step (megatron/step_guard.py)
            self.last_step = guarded_step(self.optimizer)
        except BaseException:  # the model params would keep θ̃ while the main shards hold θ_t
            publish_main_params(self.optimizer)
            raise
        if self.last_step.updated:
            self.inner_step += 1
        else:  # skipped: the model still holds θ̃ in places; put θ_t back
            publish_main_params(self.optimizer)
        metrics["svrpg/inner_step"] = float(self.inner_step)
        return self.last_step.updated, self.last_step.grad_norm, self.last_step.num_zeros, metrics

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
            restore_adam_steps(self.optimizer, state_dict["optimizer"])
        load_svrpg_state(self, state_dict["svrpg"])


def _check_snapshot_pass_weighted(snapshot_pass: SVRPGPass) -> None:
    """The loss runs on the last pipeline stage: there, a snapshot pass must have asked for ρ̄."""
    on_loss_stage = (not parallel_state.model_parallel_is_initialized()
                     or parallel_state.is_pipeline_last_stage(ignore_virtual=True))
    if on_loss_stage and not snapshot_pass.ratio_stats:
        raise RuntimeError("grad_fn's snapshot pass never called svrpg_pass.ratio(...): its loss was "
                           "not weighted by ρ̄ = π_θ̃/π_θt, so v = g(θ_t) − g(θ̃) + μ would be biased. "
                           "For svrpg_pass.kind == 'snapshot', weight the token loss by "
                           "weight_token_loss(token_loss, svrpg_pass.ratio(snapshot_logp, old_logp, "
                           "mask)), as losses.svrpg.SnapshotLoss(loss, svrpg_pass) does")


def _squared_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    diff = a - b
    return torch.dot(diff, diff)
