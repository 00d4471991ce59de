"""The reference policy π_ref of the KL term (`--ref-policy`), as fp32 weights with exactly the
optimizer's main-shard ranges (distributed optimizer: this rank's 1/DP of every parameter, so
4·P/DP bytes per rank; no second model is built):

    old      π_ref = π_old: nothing kept; the loss gets no ref_logp (the default)
    initial  the weights the run started from (resumed runs: the first run's, from the checkpoint)
    every-k  the initial weights, then π_ref ← π_θ after every `interval`-th step
    kl       the initial weights, then π_ref ← π_θ after a step whose measured KL(π_old ‖ π_ref)
             (the k3 estimate on the step's own samples, global mean) exceeded `kl_threshold`

    reference = ReferencePolicy(optimizer, ReferenceConfig(mode="every-k", interval=10))
    refs, metrics = reference.logprobs(model, micro_batches, temperature=T)   # one forward, ref swapped in
    ... optimizer steps ...
    metrics.update(reference.after_step(step, metrics))                       # refresh when due

The reference pass swaps the reference weights into the optimizer's fp32 main shards, publishes them
(cast and DP all-gather, as the optimizer's own parameter sync), runs the forward-only log-prob pass
and swaps θ back: θ's shards are restored bit-exactly (optim/svrpg_shards.weights_swapped_in, as
SVRPG's θ̃). The weights live in checkpoints in the distributed optimizer's reshardable layout
(optim/shard_checkpoint.py), so a resume continues with the same π_ref bit for bit.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_rpg.losses.kl import k3
from megatron_rpg.megatron.compat import sub_optimizers
from megatron_rpg.megatron.forward_backward import compute_logprobs
from megatron_rpg.optim.shard_checkpoint import load_shard_tensors, shard_tensors_state
from megatron_rpg.optim.svrpg_shards import optimizer_slots, weights_swapped_in

REF_POLICY_MODES = ("old", "initial", "every-k", "kl")


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    mode: str = "old"
    interval: int | None = None       # every-k: steps between refreshes
    kl_threshold: float | None = None  # kl: refresh when the step's KL exceeds it

    def __post_init__(self):
        if self.mode not in REF_POLICY_MODES:
            raise ValueError(f"--ref-policy {self.mode!r} must be one of {list(REF_POLICY_MODES)}")
        if (self.mode == "every-k") != (self.interval is not None):
            raise ValueError("--ref-update-interval N is what --ref-policy every-k needs, and only it")
        if (self.mode == "kl") != (self.kl_threshold is not None):
            raise ValueError("--ref-update-kl X is what --ref-policy kl needs, and only it")
        if self.interval is not None and self.interval < 1:
            raise ValueError(f"--ref-update-interval {self.interval} must be >= 1")
        if self.kl_threshold is not None and not self.kl_threshold > 0:
            raise ValueError(f"--ref-update-kl {self.kl_threshold} must be > 0")

    @property
    def keeps_weights(self) -> bool:
        return self.mode != "old"


class ReferencePolicy:
    """π_ref's weights as main-shard-shaped fp32 tensors; see the module docstring."""

    def __init__(self, optimizer, config: ReferenceConfig):
        if not config.keeps_weights:
            raise ValueError("--ref-policy old keeps no weights (π_ref = π_old): build no ReferencePolicy")
        self.optimizer, self.config = optimizer, config
        self.slots = [slot for opt in sub_optimizers(optimizer) for slot in optimizer_slots(opt)]
        self.weights = [slot.main.detach().clone().float() for slot in self.slots]
        self.refreshes = 0
        self.last_kl = 0.0
        self.device = self.slots[0].main.device if self.slots else torch.device("cpu")

    def extra_memory_bytes(self) -> int:
        return sum(weight.numel() * weight.element_size() for weight in self.weights)

    def logprobs(self, model, micro_batches: list[dict], *, temperature: float = 1.0) -> tuple[list, dict]:
        """(π_ref's per-token log-probs on each micro-batch, {"ref/kl": KL(π_old ‖ π_ref)}), the KL
        the k3 estimate over the response tokens of the global batch (needs the batches' old_logp)."""
        with weights_swapped_in(self.optimizer, self.slots, self.weights):
            refs = compute_logprobs(model, micro_batches, temperature=temperature)
        self.last_kl = self._measured_kl(micro_batches, refs)
        return refs, {"ref/kl": self.last_kl}

    def _measured_kl(self, micro_batches, refs) -> float:
        totals = torch.zeros(2, dtype=torch.float64)
        for micro_batch, ref in zip(micro_batches, refs):
            mask = micro_batch["loss_mask"].bool()
            log_ratio = (ref.double().cpu() - micro_batch["old_logp"].double().cpu())[mask]
            totals += torch.stack([k3(log_ratio).sum(), torch.tensor(float(mask.sum()), dtype=torch.float64)])
        group = parallel_state.get_data_parallel_group()
        if dist.get_world_size(group) > 1:
            totals = totals.to(self.device)  # NCCL reduces device tensors
            dist.all_reduce(totals, group=group)
        return float(totals[0] / totals[1].clamp(min=1))

    @torch.no_grad()
    def after_step(self, step: int, metrics: dict) -> dict:
        """After RL step `step` (1-based): π_ref ← π_θ when the mode says so; the refresh count."""
        due = (self.config.mode == "every-k" and step % self.config.interval == 0) or \
              (self.config.mode == "kl" and self.last_kl > self.config.kl_threshold)
        if due:
            for weight, slot in zip(self.weights, self.slots):
                weight.copy_(slot.main)
            self.refreshes += 1
        return {"ref/refreshes": float(self.refreshes)}

    def sharded_state_dict(self) -> dict:
        state = shard_tensors_state(self.optimizer, self.slots, {"weights": self.weights}, "ref_policy")
        counters = {"mode": self.config.mode, "refreshes": self.refreshes, "last_kl": self.last_kl}
        state["counters"] = ShardedObject("ref_policy.counters", counters, (1,), (0,), replica_id=dist.get_rank())
        return state

    def load_state_dict(self, loaded: dict) -> None:
        counters = loaded["counters"]
        if counters["mode"] != self.config.mode:
            raise ValueError(f"the checkpoint's reference policy is --ref-policy {counters['mode']}, this run "
                             f"has {self.config.mode}; resume with the same, or --finetune for the weights only")
        load_shard_tensors(self.optimizer, self.slots, {"weights": self.weights}, loaded, what="reference policy")
        self.refreshes, self.last_kl = int(counters["refreshes"]), float(counters["last_kl"])
