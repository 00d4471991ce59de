"""The RL training loop, one step as it reads in the paper:

    prompts ─► rollout engine ─► responses + engine log-probs ─► rewards ─► advantages
            (with --rollout-dynamic-sampling: DAPO's redraw of groups whose rewards are all equal)
            ─► Megatron forward-only: old log-probs (π_ref = π_old, the iterative reference)
            ─► per mini-batch: rl_forward_backward (RPG loss, exact global token mean) ─► Adam step
               (with --svrpg: v = g(θ_t) − ρ·g(θ̃) + μ, the anchor drawn from π_θ̃ every m steps)
            ─► metrics (progress bar, JSONL) ─► --save every --save-interval steps and at the end
               (model + optimizer + sampling state; --load resumes exactly, or --finetune)

    history = train(parse_train_args([...]))        # launched by megatron_rpg/train.py

Runs as one process (gloo, CPU) or under torchrun (TP × PP × DP ranks; NCCL on GPUs). Every rank
runs the same code; ranks of one model replica see the same prompts, DP ranks their own.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from tqdm import tqdm

from megatron_rpg.losses import compute_advantages
from megatron_rpg.megatron.forward_backward import compute_logprobs, rl_forward_backward
from megatron_rpg.megatron.global_advantages import global_batch_norm_advantages
from megatron_rpg.megatron.model_args import check_model_machine
from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel
from megatron_rpg.optim.svrpg import SVRPGOptimizer, rl_grad_fn
from megatron_rpg.rewards.dapo import fill_with_informative_groups
from megatron_rpg.rollout.embedded import EmbeddedEngine
from megatron_rpg.rollout.engine import SamplingParams
from megatron_rpg.training.checkpointing import build_model_and_optimizer, resume_checkpoint, resumes, save_checkpoint
from megatron_rpg.training.config import loss_config_from_args
from megatron_rpg.training.metrics_log import append_line, drop_lines_after_step
from megatron_rpg.training.step_metrics import combine_call_metrics, grad_norm_metrics, units_key
from megatron_rpg.training.tasks import build_task


@contextlib.contextmanager
def distributed_run():
    """The default process group: torchrun's (env://) when launched by it, else a one-process gloo
    group through a file rendezvous (no port). Destroyed on exit only if created here."""
    if dist.is_initialized():
        yield
        return
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
        rendezvous = None
    else:
        rendezvous = tempfile.TemporaryDirectory(prefix="megatron_rpg_train_")
        dist.init_process_group("gloo", store=dist.FileStore(os.path.join(rendezvous.name, "store"), 1),
                                rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        if rendezvous is not None:
            rendezvous.cleanup()


def check_layout(args, world_size: int) -> int:
    """The data-parallel size; ValueError naming the flags when the batch does not split evenly."""
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    if world_size % model_parallel:
        raise ValueError(f"{world_size} processes cannot hold --tensor-model-parallel-size "
                         f"{args.tensor_model_parallel_size} x --pipeline-model-parallel-size "
                         f"{args.pipeline_model_parallel_size}; launch a multiple of {model_parallel}")
    dp = world_size // model_parallel
    if args.rollout_batch_size % dp:
        raise ValueError(f"--rollout-batch-size={args.rollout_batch_size} prompts must split evenly over "
                         f"{dp} data-parallel ranks")
    sequences = args.rollout_batch_size // dp * args.rollout_samples_per_prompt
    per_step = args.micro_batch_size * args.num_mini_batches
    if sequences % per_step:
        raise ValueError(f"each DP rank gets {sequences} sequences per step (--rollout-batch-size / DP x "
                         f"--rollout-samples-per-prompt), which must be a multiple of --micro-batch-size "
                         f"{args.micro_batch_size} x --num-mini-batches {args.num_mini_batches}")
    anchor_unit = dp * math.lcm(args.rollout_samples_per_prompt, args.micro_batch_size)
    if args.svrpg and args.svrpg_anchor_batch_size % anchor_unit:
        raise ValueError(f"--svrpg-anchor-batch-size={args.svrpg_anchor_batch_size} sequences must split "
                         f"into whole prompt groups (--rollout-samples-per-prompt "
                         f"{args.rollout_samples_per_prompt}) and micro-batches (--micro-batch-size "
                         f"{args.micro_batch_size}) on each of {dp} DP ranks: use a multiple of {anchor_unit}")
    return dp


class RolloutStep:
    """Draws prompts, samples responses, scores them: the micro-batches of one global batch."""

    def __init__(self, args, model, vocab_size: int, dp: int):
        self.args, self.model, self.dp = args, model, dp
        dp_rank = parallel_state.get_data_parallel_rank()
        self.task = build_task(args, vocab_size, dp_rank=dp_rank, dp_size=dp)
        self.prompt_generator = torch.Generator().manual_seed(args.seed * 7919 + dp_rank)
        self.engine = EmbeddedEngine(model, vocab_size=vocab_size, seed=args.seed)
        self.sampling = SamplingParams(max_new_tokens=args.rollout_max_new_tokens,
                                       temperature=args.rollout_temperature,
                                       stop_token_ids=getattr(self.task, "stop_token_ids", ()))
        self.sampler = getattr(self.task, "sampler", None)  # a prompt set's position (math), if any

    def state_dict(self) -> dict:
        """What makes the next samples: the prompt generator, the engine's call counter, the prompt set's
        sampler position."""
        return {"prompt_generator": self.prompt_generator.get_state(), "engine_calls": self.engine.calls,
                "sampler": self.sampler.state_dict() if self.sampler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.prompt_generator.set_state(state["prompt_generator"])
        self.engine.calls = int(state["engine_calls"])
        if self.sampler is not None and state.get("sampler") is not None:
            self.sampler.load_state_dict(state["sampler"])

    def restart_at(self, step: int) -> None:
        """Fresh generators for a resume at another layout: seeded from (seed, DP rank, step)."""
        dp_rank = parallel_state.get_data_parallel_rank()
        self.prompt_generator.manual_seed((self.args.seed * 7919 + dp_rank) * 1_000_003 + step)
        self.engine.calls = 1_000_000 + step * 1_000

    def _draw_groups(self, num_prompts: int) -> list[dict]:
        """num_prompts prompt groups of --rollout-samples-per-prompt responses each, scored."""
        n = self.args.rollout_samples_per_prompt
        batch = self.task.sample(num_prompts, self.prompt_generator)
        prompts = [prompt for prompt in batch.prompts for _ in range(n)]
        targets = [target for target in batch.targets for _ in range(n)]
        rollout = self.engine.generate(prompts, self.sampling)
        rewards = self.task.reward(rollout.responses(), targets)
        return [dict(tokens=rollout.tokens[i:i + n], loss_mask=rollout.loss_mask[i:i + n],
                     engine_logp=rollout.engine_logp[i:i + n], rewards=rewards[i:i + n],
                     response_lengths=rollout.response_lengths[i:i + n]) for i in range(0, len(prompts), n)]

    def _dynamic_sampling(self, num_prompts: int) -> tuple[list[dict], list[dict], int]:
        """DAPO: keep groups whose rewards are not all equal, drawing again (at most
        --rollout-max-sampling-passes passes) until num_prompts are kept. Slots still empty after the
        last pass take uninformative groups (marked "filler"; advantage 0: no policy gradient, only
        KL) so every step has the same shape. Returns (groups used, every group drawn, passes)."""
        drawn = []

        def draw(count):
            groups = self._draw_groups(count)
            drawn.extend(groups)
            return [(group["rewards"], group) for group in groups]

        result = fill_with_informative_groups(draw, num_prompts, max_passes=self.args.rollout_max_sampling_passes,
                                              allow_partial=True)
        kept = [group for _, group in result.groups]
        kept_ids = {id(group) for group in kept}
        fillers = [dict(group, filler=True) for group in drawn if id(group) not in kept_ids]
        return kept + fillers[:num_prompts - len(kept)], drawn, result.passes

    def _advantages(self, groups: list[dict]) -> torch.Tensor:
        """Per group for the group estimators; batch_norm over the global batch (every DP rank),
        dynamic sampling's filler groups left out of it with advantage 0."""
        rewards = torch.cat([group["rewards"] for group in groups])
        if self.args.advantage_estimator != "batch_norm":
            return compute_advantages(self.args.advantage_estimator, rewards,
                                      group_size=self.args.rollout_samples_per_prompt)
        keep = torch.cat([torch.full_like(group["rewards"], not group.get("filler", False), dtype=torch.bool)
                          for group in groups])
        return global_batch_norm_advantages(rewards, keep)

    def __call__(self, num_prompts_per_rank: int):
        """(micro-batches of this DP rank's share of the global batch, its statistics to reduce)."""
        if self.args.rollout_dynamic_sampling:
            groups, drawn, passes = self._dynamic_sampling(num_prompts_per_rank)
        else:
            groups = drawn = self._draw_groups(num_prompts_per_rank)
            passes = 1
        width = max(group["tokens"].shape[1] for group in groups)  # groups of several passes differ
        rows = {key: torch.cat([torch.nn.functional.pad(group[key], (0, width - group[key].shape[1]))
                                for group in groups]) for key in ("tokens", "loss_mask", "engine_logp")}
        advantages = self._advantages(groups).float()
        size = self.args.micro_batch_size
        micro_batches = [dict(tokens=rows["tokens"][i:i + size], loss_mask=rows["loss_mask"][i:i + size],
                              advantages=advantages[i:i + size]) for i in range(0, len(advantages), size)]
        old_logps = compute_logprobs(self.model, micro_batches, temperature=self.args.rollout_temperature)
        mismatch = 0.0
        for index, (micro_batch, old_logp) in enumerate(zip(micro_batches, old_logps)):
            micro_batch["old_logp"] = old_logp
            engine = rows["engine_logp"][index * size:(index + 1) * size]  # on the CPU, like the batch
            mismatch = max(mismatch, float(((old_logp.cpu() - engine) * micro_batch["loss_mask"]).abs().max()))
        informative = sum(float(group["rewards"].max() - group["rewards"].min()) > 0 for group in groups)
        # rewards and lengths over every response drawn: the policy's own performance
        all_rewards = torch.cat([group["rewards"] for group in drawn])
        all_lengths = torch.cat([group["response_lengths"] for group in drawn])
        sums = {"reward_sum": float(all_rewards.sum()), "responses": float(all_rewards.numel()),
                "response_length_sum": float(all_lengths.sum()), "informative_groups": float(informative),
                "groups": float(len(groups)), "drawn_groups": float(len(drawn)), "passes": float(passes)}
        return micro_batches, (sums, mismatch)


def _global_rollout_metrics(stats) -> dict:
    """Sums over DP ranks (the max for the mismatch); every rank returns the same numbers."""
    sums, mismatch = stats
    names = sorted(sums)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"  # NCCL reduces CUDA tensors
    totals = torch.tensor([sums[name] for name in names], dtype=torch.float64, device=device)
    worst = torch.tensor([mismatch], dtype=torch.float64, device=device)
    group = parallel_state.get_data_parallel_group()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(totals, group=group)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    total = dict(zip(names, totals.tolist()))
    metrics = {"reward_mean": total["reward_sum"] / total["responses"],
               "response_length_mean": total["response_length_sum"] / total["responses"],
               "engine_logp_max_abs_diff": float(worst[0]),
               "informative_group_fraction": total["informative_groups"] / total["groups"]}
    if total["drawn_groups"] > total["groups"]:  # dynamic sampling drew more than it used
        metrics.update({"dynamic_sampling/drawn_groups": total["drawn_groups"],
                        "dynamic_sampling/passes_mean": total["passes"] / dist.get_world_size(group)})
    return metrics


def _optimizer_steps(args, model, optimizer, svrpg, micro_batches, loss_config) -> dict:
    if svrpg is not None:
        return _svrpg_step(args, model, svrpg, micro_batches, loss_config)
    per_mini = len(micro_batches) // args.num_mini_batches
    calls, norms = [], []
    for start in range(0, len(micro_batches), per_mini):
        _, metrics = rl_forward_backward(model, micro_batches[start:start + per_mini], loss_config=loss_config)
        calls.append(metrics)
        norms.append(optimizer.step()[1])
    return {**combine_call_metrics(calls, units=units_key(loss_config)), **grad_norm_metrics(norms)}


def step_prompts_per_rank(args, svrpg, dp: int) -> int:
    """Prompts each DP rank draws this step. An SVRPG anchor step draws only the anchor batch
    (|D_L| sequences from π_θ̃ = the current model) and takes its inner step on it too: with
    θ_t = θ̃ the direction is v = g(θ_t) − g(θ̃) + μ = μ on any batch, so another one is not drawn."""
    if svrpg is not None and svrpg.needs_anchor:
        return args.svrpg_anchor_batch_size // (dp * args.rollout_samples_per_prompt)
    return args.rollout_batch_size // dp


def _svrpg_step(args, model, svrpg, micro_batches, loss_config) -> dict:
    current = []  # the loss metrics at θ_t: those of the "current" pass, as in a plain step
    grad_fn = rl_grad_fn(model, loss_config,
                         on_metrics=lambda kind, metrics: current.append(metrics) if kind == "current" else None)
    metrics = {}
    if svrpg.needs_anchor:  # micro_batches are the anchor batch (step_prompts_per_rank)
        metrics.update(svrpg.anchor(grad_fn, [micro_batches]))
    if svrpg.config.update_ref:
        # at the sampling temperature, like the old log-probs and the loss: KL = 0 where θ_t = θ̃
        references = svrpg.reference_logprobs(model, micro_batches, temperature=args.rollout_temperature)
        for micro_batch, ref in zip(micro_batches, references):
            micro_batch["ref_logp"] = ref
    _, grad_norm, _, step_metrics = svrpg.step(grad_fn, micro_batches)
    metrics.update(combine_call_metrics(current, units=units_key(loss_config)), **step_metrics)
    metrics.update(grad_norm_metrics([grad_norm]))
    return metrics


def train(args) -> list[dict]:
    """Runs RL steps up to --train-iters (from the resumed step with a resumable --load); returns the
    per-step metrics of this run (every rank gets the same)."""
    check_model_machine(args)  # TE / FP8 on this machine: fail before any process group or model
    history = []
    with distributed_run():
        dp = check_layout(args, dist.get_world_size())
        initialize_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, seed=args.seed)
        try:
            model, optimizer, hf_config = build_model_and_optimizer(args)
            svrpg = SVRPGOptimizer.from_args(optimizer, args)
            vocab_size = int(hf_config.vocab_size)
            rollout_step = RolloutStep(args, model, vocab_size, dp)
            start = 0
            if resumes(args):
                start, rank_state = resume_checkpoint(model, optimizer, svrpg, args.load, rollout_step.state_dict())
                if rank_state is not None:
                    rollout_step.load_state_dict(rank_state)
                else:  # another layout: the samples cannot continue exactly
                    rollout_step.restart_at(start)
            if start and args.log_jsonl and dist.get_rank() == 0:  # a previous run may have logged past start
                drop_lines_after_step(args.log_jsonl, start)
            loss_config = loss_config_from_args(args)
            show = dist.get_rank() == 0 and not args.no_progress
            progress = tqdm(range(start, args.train_iters), desc="RPG training", disable=not show,
                            dynamic_ncols=True, initial=start, total=args.train_iters)
            started = time.perf_counter()
            for step in progress:
                micro_batches, stats = rollout_step(step_prompts_per_rank(args, svrpg, dp))
                metrics = _global_rollout_metrics(stats)
                metrics.update(_optimizer_steps(args, model, optimizer, svrpg, micro_batches, loss_config))
                metrics.update(step=step + 1, elapsed_s=time.perf_counter() - started)
                history.append(metrics)
                recent = [entry["reward_mean"] for entry in history[-10:]]
                progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}",
                                     reward_avg10=f"{sum(recent) / len(recent):.3f}",
                                     kl=f"{metrics.get('kl_k3', float('nan')):.1e}")
                if args.log_jsonl and dist.get_rank() == 0:
                    append_line(args.log_jsonl, metrics)
                last = step + 1 == args.train_iters
                if args.save and (last or (args.save_interval and (step + 1) % args.save_interval == 0)):
                    save_checkpoint(model, optimizer, svrpg, hf_config, args, step=step + 1,
                                    rank_state=rollout_step.state_dict())
            progress.close()
        finally:
            destroy_parallel()
    return history
