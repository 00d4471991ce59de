"""R²VPO's stale-data reuse: the last --r2vpo-reuse-steps rollout batches, kept with their behaviour
log-probs and trained on again in the following steps (docs/algorithms.md, 3a. R²VPO).

    stale = StaleBatches(config.loss.r2vpo.reuse_steps)          # 0: keeps nothing, changes nothing
    step_batches = stale.with_fresh(micro_batches, num_mini_batches)   # this step's + the kept ones
    stale.push(micro_batches)                                     # after the update: oldest leaves

A kept batch is stored as it was trained on: tokens, loss_mask, advantages, engine_logp and old_logp,
the log-probs of the policy that sampled it (its behaviour policy), so the loss weights a reused row
by π_θ/π_behaviour (losses/r2vpo.py). Every row of a step gets `staleness`: 0 for this step's
rollout, k for the batch sampled k steps ago. Mixing: each mini-batch (--num-mini-batches splits
the list evenly) holds its share of this step's micro-batches, then its share of each kept batch,
newest first, so every optimizer step sees fresh and reused rows alike; every micro-batch is
right-padded to the widest (one shape for the pipeline schedule; under causal attention padding
never reaches the real tokens, and its mask is 0).

The kept batches are this DP rank's own rows: they go into the checkpoint with the rank's sampling
state, so a resume in the same layout continues bit-exactly; in another layout they are dropped and
the reuse restarts empty (as the sampling generators restart).
"""
from __future__ import annotations

import torch


class StaleBatches:
    """The last `steps` rollout batches (lists of micro-batch dicts, oldest first), kept on the CPU."""

    def __init__(self, steps: int):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"--r2vpo-reuse-steps={steps!r} must be an integer >= 0")
        self.steps = steps
        self.batches: list[list[dict]] = []

    def with_fresh(self, fresh: list[dict], num_mini_batches: int) -> list[dict]:
        """This step's micro-batches followed, within each mini-batch, by its share of every kept batch."""
        if not self.batches:
            return fresh
        # newest first: age 1 is the batch sampled at the previous step
        ages = [0] + list(range(1, len(self.batches) + 1))
        batches = [fresh] + self.batches[::-1]
        for age, batch in zip(ages, batches):
            if len(batch) % num_mini_batches:
                raise ValueError(f"a batch of {len(batch)} micro-batches (sampled {age} steps ago) does not split "
                                 f"into --num-mini-batches {num_mini_batches}; resume with the settings it was "
                                 f"sampled with")
        width = max(mb["tokens"].shape[1] for batch in batches for mb in batch)
        mixed = []
        for part in range(num_mini_batches):
            for age, batch in zip(ages, batches):
                share = len(batch) // num_mini_batches
                mixed.extend(_marked(mb, age, width) for mb in batch[part * share:(part + 1) * share])
        return mixed

    def push(self, fresh: list[dict]) -> None:
        """Keep this step's micro-batches (CPU copies) and drop what falls out of the window."""
        if self.steps == 0:
            return
        self.batches.append([{key: value.detach().cpu().clone() for key, value in mb.items()} for mb in fresh])
        del self.batches[:-self.steps]

    def state_dict(self) -> dict:
        return {"steps": self.steps, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        """The saved window, cut to this run's --r2vpo-reuse-steps (newest kept)."""
        self.batches = list(state["batches"])[-self.steps:] if self.steps else []


def _marked(micro_batch: dict, age: int, width: int) -> dict:
    """The micro-batch with `staleness` = age per row, [b, s] tensors right-padded with 0 to `width`."""
    rows = micro_batch["tokens"].shape[0]
    out = {key: torch.nn.functional.pad(value, (0, width - value.shape[1])) if value.dim() == 2 else value
           for key, value in micro_batch.items()}
    out["staleness"] = torch.full((rows,), age, dtype=torch.long)
    return out
