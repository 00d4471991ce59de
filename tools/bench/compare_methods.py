"""The methods and tasks of tools/bench/compare_algorithms.py: trainer flags for each, and the
budget rule that gives every method the same number of sampled sequences.

Budget: every step samples rollout-batch-size × samples-per-prompt responses of at most
max-new-tokens tokens, so equal --train-iters is an equal cap on sampled tokens for every method that
samples one batch a step. SVRPG also samples an anchor batch (here one rollout batch) at every
snapshot refresh, every --svrpg-inner-steps steps: its --train-iters are scaled by m / (m + 1) so
its rollout and anchor sequences together equal the others' rollout sequences. DAPO runs without
dynamic sampling (its redraws would spend tokens the others do not get): its loss (clip-higher,
token-mean) and, on math, its overlong penalty. Evaluation responses are not counted.
"""
from __future__ import annotations

import dataclasses

RPG_CLIP = ["--rpg-clip", "0.2", "0.28", "3.0"]
SVRPG_INNER_STEPS = 4


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    flags: tuple[str, ...]
    needs_flag: str | None = None  # a trainer flag that must exist (CAPO while it is being built)
    sampling_factor: float = 1.0   # sequences sampled per rollout sequence (SVRPG's anchors)


def _rpg(divergence: str, style: str) -> Method:
    return Method(f"rpg-{divergence}-{'diff' if style == 'differentiable' else 'reinf'}",
                  ("--loss", "rpg", "--rpg-divergence", divergence, "--rpg-style", style, "--rpg-beta", "0.001",
                   "--advantage-estimator", "rpg", *RPG_CLIP))


def all_methods(rollout_sequences: int) -> list[Method]:
    rpg = [_rpg(d, s) for d in ("fkl", "ufkl", "rkl", "urkl") for s in ("differentiable", "reinforce")]
    return rpg + [
        Method("grpo", ("--loss", "grpo", "--advantage-estimator", "grpo", "--rpg-beta", "0.001")),
        Method("dapo", ("--loss", "dapo", "--advantage-estimator", "grpo")),
        Method("reinforce_pp", ("--loss", "reinforce_pp", "--rpg-beta", "0.001")),
        Method("ppo_clip", ("--loss", "ppo_clip", "--advantage-estimator", "grpo")),
        Method("r2vpo", ("--loss", "r2vpo", "--advantage-estimator", "grpo")),
        Method("svrpg-urkl", ("--loss", "rpg", "--rpg-divergence", "urkl", "--rpg-style", "differentiable",
                              "--rpg-beta", "0.001", "--advantage-estimator", "rpg", *RPG_CLIP, "--svrpg",
                              "--num-mini-batches", "1", "--rpg-aggregation", "seq-mean-token-sum",
                              "--svrpg-inner-steps", str(SVRPG_INNER_STEPS),
                              "--svrpg-anchor-batch-size", str(rollout_sequences)),
               sampling_factor=(SVRPG_INNER_STEPS + 1) / SVRPG_INNER_STEPS),
        Method("capo-grpo", ("--loss", "grpo", "--advantage-estimator", "grpo", "--rpg-beta", "0.001", "--capo"),
               needs_flag="--capo"),
    ]


QUICK_METHODS = ("rpg-urkl-diff", "r2vpo")


@dataclasses.dataclass(frozen=True)
class Task:
    """One study task: the trainer flags shared by all methods, the threshold of 'steps to reach',
    and what the held-out evaluation needs."""
    name: str
    flags: tuple[str, ...]
    train_iters: int
    threshold: float        # on the training reward's 5-step moving average
    heldout: dict
    rollout_sequences: int  # per step
    capo_flags: tuple[str, ...] = ()  # CAPO's top-K must fit the vocabulary (the tiny preset's is 16)


def repeat_token_task(train_iters: int) -> Task:
    flags = ("--task", "repeat-token", "--model-preset", "tiny", "--lr", "0.003", "--weight-decay", "0.0",
             "--clip-grad", "1.0", "--rollout-batch-size", "8", "--rollout-samples-per-prompt", "8",
             "--rollout-max-new-tokens", "8", "--micro-batch-size", "16", "--num-mini-batches", "2")
    return Task("repeat-token", flags, train_iters, threshold=0.2,
                heldout={"kind": "repeat-token", "eval_metric": "eval/reward_mean"}, rollout_sequences=64,
                capo_flags=("--capo-top-k", "16"))


MATH_TEMPLATE = "{prompt} Put the final answer in \\boxed{}."


def math_task(train_iters: int, checkpoint: str, train_data: str, eval_data: str) -> Task:
    flags = ("--task", "math", "--load", checkpoint, "--prompt-data", train_data,
             "--prompt-template", MATH_TEMPLATE, "--max-prompt-tokens", "64", "--lr", "0.001",
             "--weight-decay", "0.0", "--rollout-batch-size", "8", "--rollout-samples-per-prompt", "8",
             "--rollout-max-new-tokens", "16", "--micro-batch-size", "16", "--num-mini-batches", "2")
    return Task("arithmetic", flags, train_iters, threshold=-0.75,
                heldout={"kind": "math", "eval_metric": "eval/accuracy", "eval_data": eval_data},
                rollout_sequences=64)


def train_iters_for(method: Method, task: Task) -> int:
    return max(1, round(task.train_iters / method.sampling_factor))
