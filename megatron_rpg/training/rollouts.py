"""The rollout phases of a step: sample and score prompt groups, turn them into micro-batches with
advantages, attach the old log-probs, and report the rollout's metrics over the global batch.

    groups, drawn, passes = sampler.draw(prompts_per_rank)      # sample + score (+ DAPO redraws)
    micro_batches = to_micro_batches(config, groups)            # advantages, micro-batch split
    mismatch = attach_old_logprobs(model, micro_batches, T)     # Megatron forward-only: π_old
    attach_token_advantages(config, micro_batches)              # --loss reinforce_pp only
    metrics = rollout_metrics(groups, drawn, passes, mismatch, device)
    metrics |= attach_rollout_is_weights(config, step_batches, device)   # the step's (R²VPO: + kept)

Ranks of one model replica (TP, PP) sample the same prompts and tokens (same generators); DP ranks
their own. A group is one prompt's --rollout-samples-per-prompt responses. The task's rewards pass
rewards/guard.py (--on-bad-reward): a masked response has loss mask 0 and advantage 0 and is left
out of its group's baseline and of reward_mean; bad_rewards, clamped_rewards and
reward_over_budget count the responses concerned in every group drawn.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_rpg.losses import compute_advantages, reinforce_pp_token_rewards, token_returns
from megatron_rpg.losses.rollout_is import rollout_is_weights
from megatron_rpg.megatron.forward_backward import compute_logprobs
from megatron_rpg.megatron.global_advantages import global_batch_norm_advantages
from megatron_rpg.rewards.dapo import fill_with_informative_groups
from megatron_rpg.rewards.guard import guard_rewards
from megatron_rpg.rollout.engine import SamplingParams

_ROW_KEYS = ("tokens", "loss_mask", "engine_logp")


class GroupSampler:
    """Draws prompts from the task, samples responses with the engine, scores them; its state (the
    prompt generator, the engine's call counter, the prompt set's position) is checkpointed."""

    def __init__(self, config, task, engine):
        self.config, self.task, self.engine = config, task, engine
        self.seed = config.training.seed * 7919 + parallel_state.get_data_parallel_rank()
        self.prompt_generator = torch.Generator().manual_seed(self.seed)
        self.sampling = SamplingParams(max_new_tokens=config.rollout.max_new_tokens,
                                       temperature=config.rollout.temperature, top_k=config.rollout.top_k,
                                       top_p=config.rollout.top_p,
                                       stop_token_ids=getattr(task, "stop_token_ids", ()))
        self.prompt_sampler = getattr(task, "sampler", None)  # a prompt set's position (math), if any

    def state_dict(self) -> dict:
        return {"prompt_generator": self.prompt_generator.get_state(), "engine_calls": self.engine.calls,
                "sampler": self.prompt_sampler.state_dict() if self.prompt_sampler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.prompt_generator.set_state(state["prompt_generator"])
        self.engine.calls = int(state["engine_calls"])
        if self.prompt_sampler is not None and state.get("sampler") is not None:
            self.prompt_sampler.load_state_dict(state["sampler"])

    def restart_at(self, step: int) -> None:
        """Fresh generators for a resume at another layout: seeded from (seed, DP rank, step)."""
        self.prompt_generator.manual_seed(self.seed * 1_000_003 + step)
        self.engine.calls = 1_000_000 + step * 1_000
        if self.prompt_sampler is not None:
            self.prompt_sampler.restart_at(step)

    def draw(self, num_prompts: int) -> tuple[list[dict], list[dict], int]:
        """(groups to train on, every group drawn, sampling passes); with --rollout-dynamic-sampling
        DAPO's redraw of groups whose rewards are all equal."""
        if self.config.rollout.dynamic_sampling:
            drawn = self._dynamic_sampling(num_prompts)
        else:
            groups = self._draw_groups(num_prompts)
            drawn = groups, groups, 1
        self.engine.end_of_rollouts()  # replicas draw different numbers of times (the SGLang engine's recovery)
        return drawn

    def _draw_groups(self, num_prompts: int) -> list[dict]:
        n = self.config.rollout.samples_per_prompt
        batch = self.task.sample(num_prompts, self.prompt_generator)
        prompts = [prompt for prompt in batch.prompts for _ in range(n)]
        targets = [target for target in batch.targets for _ in range(n)]
        rollout = self.engine.generate(prompts, self.sampling)
        reward_range = getattr(self.task, "reward_range", None)
        guarded = guard_rewards(self.task.reward(rollout.responses(), targets),
                                minimum=None if reward_range is None else reward_range[0],
                                on_bad_reward=self.config.rollout.on_bad_reward)
        over_budget = getattr(self.task, "last_over_budget", None)  # the math reward's time budget
        if over_budget is None or len(over_budget) != len(prompts):
            over_budget = torch.zeros(len(prompts), dtype=torch.bool)
        loss_mask = rollout.loss_mask * guarded.keep[:, None].to(rollout.loss_mask.dtype)  # mask: zero weight
        return [dict(tokens=rollout.tokens[i:i + n], loss_mask=loss_mask[i:i + n],
                     engine_logp=rollout.engine_logp[i:i + n], rewards=guarded.rewards[i:i + n],
                     reward_keep=guarded.keep[i:i + n], bad_rewards=guarded.bad[i:i + n],
                     clamped_rewards=guarded.clamped[i:i + n], reward_over_budget=over_budget[i:i + n],
                     response_lengths=rollout.response_lengths[i:i + n],
                     prompt_lengths=rollout.prompt_lengths[i:i + n]) for i in range(0, len(prompts), n)]

    def _dynamic_sampling(self, num_prompts: int) -> tuple[list[dict], list[dict], int]:
        """Keep groups whose rewards are not all equal, drawing again (at most
        --rollout-max-sampling-passes passes) until num_prompts are kept. Slots still empty after the
        last pass take uninformative groups (marked "filler"; advantage 0: no policy gradient, only
        KL) so every step has the same shape."""
        drawn = []

        def draw(count):
            groups = self._draw_groups(count)
            drawn.extend(groups)
            return [(group["rewards"], group) for group in groups]

        result = fill_with_informative_groups(draw, num_prompts, max_passes=self.config.rollout.max_sampling_passes,
                                              allow_partial=True)
        kept = [group for _, group in result.groups]
        kept_ids = {id(group) for group in kept}
        fillers = [dict(group, filler=True) for group in drawn if id(group) not in kept_ids]
        return kept + fillers[:num_prompts - len(kept)], drawn, result.passes


def _reward_keep(group: dict) -> torch.Tensor:
    """The responses of a group that enter the advantages (--on-bad-reward mask leaves some out)."""
    return group.get("reward_keep", torch.ones(len(group["rewards"]), dtype=torch.bool))


def group_advantages(config, groups: list[dict]) -> torch.Tensor:
    """float64 [n]. Per group for the group estimators (masked responses left out of their group,
    advantage 0); batch_norm over the global batch (every DP rank), dynamic sampling's filler groups
    and masked responses left out of it with advantage 0."""
    rewards = torch.cat([group["rewards"] for group in groups]).double()
    keep = torch.cat([_reward_keep(group) for group in groups])
    estimator = config.rollout.advantage_estimator
    if estimator != "batch_norm":
        size = config.rollout.samples_per_prompt
        if bool(keep.all()):
            return compute_advantages(estimator, rewards, group_size=size)
        group_ids = torch.arange(len(rewards)) // size
        advantages = torch.zeros_like(rewards)
        advantages[keep] = compute_advantages(estimator, rewards[keep], group_ids[keep])
        return advantages
    not_filler = torch.cat([torch.full_like(group["rewards"], not group.get("filler", False), dtype=torch.bool)
                            for group in groups])
    return global_batch_norm_advantages(rewards, keep & not_filler)


def to_micro_batches(config, groups: list[dict]) -> list[dict]:
    """The groups as --micro-batch-size micro-batches (megatron/forward_backward.py's convention),
    right-padded to one width, each row with its advantage and the engine's log-probs (--loss
    reinforce_pp: no advantages yet, its scores; attach_token_advantages adds the per-token ones)."""
    width = max(group["tokens"].shape[1] for group in groups)  # groups of several passes differ
    rows = {key: torch.cat([torch.nn.functional.pad(group[key], (0, width - group[key].shape[1]))
                            for group in groups]) for key in _ROW_KEYS}
    if config.loss.name != "reinforce_pp":
        rows["advantages"] = group_advantages(config, groups).float()
    else:  # its token advantages are built after the old log-probs (attach_token_advantages)
        rows["scores"] = torch.cat([group["rewards"] for group in groups]).double()
        rows["counted"] = torch.cat([torch.full(group["rewards"].shape, not group.get("filler", False))
                                     for group in groups])
    size = config.training.micro_batch_size
    return [{key: value[i:i + size] for key, value in rows.items()} for i in range(0, len(rows["tokens"]), size)]


def attach_old_logprobs(model, micro_batches: list[dict], temperature: float,
                        rows_per_pass: int | None = None) -> float:
    """Adds `old_logp` (π_old = the current model, forward-only) to each micro-batch; returns the
    largest |old_logp − engine_logp| over response tokens (the train/inference mismatch). With
    `rows_per_pass` (--logprob-micro-batch-size) consecutive micro-batches of one width are joined
    into forwards of that many rows (each row's log-probs are its own: causal attention, no padding
    inside a row), and the results split back."""
    mismatch = 0.0
    for micro_batch, old_logp in zip(micro_batches, _joined_logprobs(model, micro_batches, temperature, rows_per_pass)):
        micro_batch["old_logp"] = old_logp
        difference = (old_logp.cpu() - micro_batch["engine_logp"]) * micro_batch["loss_mask"]  # the batch is on the CPU
        mismatch = max(mismatch, float(difference.abs().max()))
    return mismatch


def _joined_logprobs(model, micro_batches: list[dict], temperature: float, rows_per_pass: int | None) -> list:
    sizes = [len(micro_batch["tokens"]) for micro_batch in micro_batches]
    widths = {micro_batch["tokens"].shape[1] for micro_batch in micro_batches}
    if rows_per_pass is None or rows_per_pass <= max(sizes) or len(widths) != 1:
        return compute_logprobs(model, micro_batches, temperature=temperature)
    passes = [[]]  # the sizes of the whole micro-batches joined in each pass, at most rows_per_pass rows
    for size in sizes:
        if passes[-1] and sum(passes[-1]) + size > rows_per_pass:
            passes.append([])
        passes[-1].append(size)
    tokens = torch.cat([micro_batch["tokens"] for micro_batch in micro_batches]).split([sum(p) for p in passes])
    logps = compute_logprobs(model, [{"tokens": t} for t in tokens], temperature=temperature)
    return [part for logp, pass_sizes in zip(logps, passes) for part in logp.split(pass_sizes)]


def attach_token_advantages(config, micro_batches: list[dict]) -> None:
    """REINFORCE++ (--loss reinforce_pp): replaces each micro-batch's advantages with per-token ones,
    r_t = −β·(log π_old − log π_ref)_t + [t last]·score, G_t = Σ_{s ≥ t} r_s, normalised over every
    response token of the global batch (all DP ranks; dynamic sampling's filler groups get 0 and stay
    out of the statistics). π_ref = π_old unless the micro-batches carry ref_logp."""
    returns = []
    for micro_batch in micro_batches:
        old = micro_batch["old_logp"].cpu().double()
        ref = micro_batch["ref_logp"].cpu().double() if "ref_logp" in micro_batch else old
        rewards = reinforce_pp_token_rewards(micro_batch["scores"], old, ref, micro_batch["loss_mask"],
                                             beta=config.loss.beta)
        returns.append(token_returns(rewards, micro_batch["loss_mask"]))
    keep = torch.cat([(mb["loss_mask"].bool() & mb["counted"][:, None]).flatten() for mb in micro_batches])
    flat = global_batch_norm_advantages(torch.cat([r.flatten() for r in returns]), keep)
    for micro_batch, chunk in zip(micro_batches, flat.split([r.numel() for r in returns])):
        micro_batch["advantages"] = chunk.reshape(micro_batch["loss_mask"].shape).float()


def attach_rollout_is_weights(config, micro_batches: list[dict], device) -> dict:
    """--rollout-is-correction tis/mis: adds `rollout_is_weight` ŵ (losses/rollout_is.py, from each
    micro-batch's old_logp and engine_logp) to the micro-batches the step trains on; returns the
    step's rollout_is/* metrics as token-weighted means over all their response tokens, every DP
    rank (the same on each): weight_mean (of ŵ), truncated_fraction (tis: w > C) or masked_fraction
    (mis: w outside [low, C]), and log_weight_abs_max (the largest |log w|, the raw weight before the
    bound). Nothing (and no metrics) with --rollout-is-correction none."""
    settings = config.rollout_is
    if not settings.enabled:
        return {}
    totals = torch.zeros(3, dtype=torch.float64)  # Σ ŵ, Σ outside, response tokens
    largest = torch.zeros(1, dtype=torch.float64)
    for micro_batch in micro_batches:
        if "engine_logp" not in micro_batch:
            raise ValueError("--rollout-is-correction needs the rollout engine's log-probs (engine_logp) in every "
                             "micro-batch; this one has none")
        mask = micro_batch["loss_mask"].cpu()
        weight, outside, log_w = rollout_is_weights(micro_batch["old_logp"].cpu(), micro_batch["engine_logp"].cpu(),
                                                    mask, settings)
        micro_batch["rollout_is_weight"] = weight
        totals += torch.stack([(weight * mask).sum(), outside.sum().double(), mask.double().sum()])
        largest = torch.maximum(largest, log_w.abs().max().reshape(1))
    totals, largest = totals.to(device), largest.to(device)
    group = parallel_state.get_data_parallel_group()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(totals, group=group)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=group)
    tokens = max(float(totals[2]), 1.0)
    outside_name = "truncated_fraction" if settings.correction == "tis" else "masked_fraction"
    return {"rollout_is/weight_mean": float(totals[0]) / tokens, f"rollout_is/{outside_name}": float(totals[1]) / tokens,
            "rollout_is/log_weight_abs_max": float(largest[0])}


def decoded_samples(groups: list[dict], task, count: int) -> list[dict]:
    """The first `count` responses of the step (this DP rank's groups) as {"prompt", "response",
    "reward"}, decoded with the task's `decode` (the math tokenizer; token ids for the synthetic task)."""
    samples = []
    for group in groups:
        for tokens, prompt_length, response_length, reward in zip(group["tokens"], group["prompt_lengths"].tolist(),
                                                                 group["response_lengths"].tolist(), group["rewards"].tolist()):
            if len(samples) == count:
                return samples
            ids = tokens.tolist()
            samples.append({"prompt": task.decode(ids[:prompt_length]),
                            "response": task.decode(ids[prompt_length:prompt_length + response_length]),
                            "reward": float(reward)})
    return samples


def rollout_metrics(groups: list[dict], drawn: list[dict], passes: int, mismatch: float, device) -> dict:
    """Rewards (of the responses not masked out) and lengths over every response drawn (the policy's
    own performance) and the reward faults, summed over DP ranks (the max for the mismatch); every
    rank returns the same numbers. `device`: where the collectives run (NCCL reduces CUDA tensors)."""
    informative = sum(float(group["rewards"].max() - group["rewards"].min()) > 0 for group in groups)
    all_rewards = torch.cat([group["rewards"] for group in drawn])
    all_lengths = torch.cat([group["response_lengths"] for group in drawn])
    kept = torch.cat([_reward_keep(group) for group in drawn])
    sums = {"reward_sum": float(all_rewards[kept].sum()), "kept_responses": float(kept.sum()),
            "responses": float(all_rewards.numel()),
            "response_length_sum": float(all_lengths.sum()), "informative_groups": float(informative),
            "groups": float(len(groups)), "drawn_groups": float(len(drawn)), "passes": float(passes)}
    for fault in ("bad_rewards", "clamped_rewards", "reward_over_budget"):
        sums[fault] = float(sum(int(group[fault].sum()) for group in drawn if fault in group))
    names = sorted(sums)
    totals = torch.tensor([sums[name] for name in names], dtype=torch.float64, device=device)
    worst = torch.tensor([mismatch], dtype=torch.float64, device=device)
    group = parallel_state.get_data_parallel_group()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(totals, group=group)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    total = dict(zip(names, totals.tolist()))
    metrics = {"reward_mean": total["reward_sum"] / max(total["kept_responses"], 1.0),
               "response_length_mean": total["response_length_sum"] / total["responses"],
               "engine_logp_max_abs_diff": float(worst[0]),
               "informative_group_fraction": total["informative_groups"] / total["groups"],
               "bad_rewards": total["bad_rewards"], "clamped_rewards": total["clamped_rewards"],
               "reward_over_budget": total["reward_over_budget"]}
    if total["drawn_groups"] > total["groups"]:  # dynamic sampling drew more than it used
        metrics.update({"dynamic_sampling/drawn_groups": total["drawn_groups"],
                        "dynamic_sampling/passes_mean": total["passes"] / dist.get_world_size(group)})
    return metrics
