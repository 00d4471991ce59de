"""Held-out evaluation during training: K responses per prompt, accuracy Mean@K and pass@k.

    prompts, targets = eval_prompts(config, task)        # read and checked before the model is built
    evaluator = Evaluator(config, task, engine, prompts, targets, dp_rank=r, dp_size=dp)
    metrics = evaluator.evaluate()      # {"eval/accuracy": ..., "eval/pass@4": ..., ...}, every rank

The prompts: --eval-data (a math prompt file, read like --prompt-data with the same keys, template
and --max-prompt-tokens; its first --eval-max-prompts), or for the synthetic repeat-token task a
held-out draw of its own prompts (--eval-max-prompts of them, default 32) from a generator seeded
outside the training prompt streams (seed·7919 + DP rank): the repeat-token task has only
vocab − 1 distinct prompts, so held-out means an independent draw, not unseen keys. Correct is the
task's own notion (`task.correct`): repeat-token, every response token equals the prompt's token
(reward 1); math, the final answer equals the reference.

The prompts are cut into chunks of max(1, B·n // K) prompts (B·n = --rollout-batch-size ×
--rollout-samples-per-prompt, one training step's responses over all DP ranks; K = --eval-samples),
one engine call each; chunk j is sampled on DP rank j mod DP with its own seed (SamplingParams.seed, the same at every
evaluation: before and after are compared on common random numbers), so every layout samples the
same tokens and the per-prompt counts, summed over the DP ranks (each prompt filled by one rank,
zeros elsewhere), are exactly those of one process. The training sampler's streams (its prompt
generator, the engine's call counter) are not touched.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_rpg.rewards.guard import guard_rewards
from megatron_rpg.rollout.engine import SamplingParams
from megatron_rpg.training.eval_metrics import COLUMNS, CORRECT, LENGTH_SUM, REWARD_SUM, TRUNCATED, eval_summary

SYNTHETIC_EVAL_PROMPTS = 32
_EVAL_STREAM = 7918  # seed·7919 + 7918: no training prompt stream (seed·7919 + DP rank, rank < 7918)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """enabled: evaluate before training, every `interval` steps (None: only before and at the end)
    and after the last step; data: the math eval prompt file (None with the synthetic task: its own
    held-out draw); samples: K responses per prompt; temperature: 0 = greedy; max_prompts: the
    first this many prompts of `data` (None: all), or the synthetic draw's size."""

    enabled: bool = True
    data: str | None = None
    interval: int | None = None
    samples: int = 8
    temperature: float = 1.0
    max_prompts: int | None = None

    def due(self, steps_done: int, last_step: int) -> bool:
        """Evaluate after step `steps_done`: every `interval` steps and after the last one."""
        return steps_done == last_step or bool(self.interval and steps_done % self.interval == 0)


class Evaluator:
    """Samples K responses to each eval prompt with the rollout engine and reduces the counts over
    the DP ranks; `evaluate()` returns the same eval/* metrics on every rank."""

    def __init__(self, config, task, engine, prompts: list[list[int]], targets: list, *, dp_rank: int,
                 dp_size: int, device="cpu"):
        if not prompts:
            raise ValueError("evaluation needs at least one prompt")
        self.eval = config.evaluation
        self.task, self.engine, self.prompts, self.targets = task, engine, prompts, targets
        self.dp_rank, self.dp_size, self.device = dp_rank, dp_size, device
        self.max_new_tokens = config.rollout.max_new_tokens
        self.stop_token_ids = tuple(getattr(task, "stop_token_ids", ()))
        self.chunk = max(1, config.rollout.batch_size * config.rollout.samples_per_prompt // self.eval.samples)
        self.seed = (config.training.seed * 7919 + _EVAL_STREAM) * 1_000_003
        self.max_prompt_tokens = max(len(prompt) for prompt in prompts)

    def evaluate(self) -> dict:
        samples = self.eval.samples
        table = torch.zeros(len(self.prompts), COLUMNS, dtype=torch.float64)
        for chunk, start in enumerate(range(0, len(self.prompts), self.chunk)):
            if chunk % self.dp_size == self.dp_rank:
                rows = slice(start, min(start + self.chunk, len(self.prompts)))
                table[rows] = self._chunk_counts(self.prompts[rows], self.targets[rows], seed=self.seed + chunk)
        self.engine.end_of_rollouts()  # the DP ranks may have different numbers of chunks
        if self.dp_size > 1:
            table = table.to(self.device)
            # each prompt's row is non-zero on one rank only: the sum is exact
            dist.all_reduce(table, group=parallel_state.get_data_parallel_group())
            table = table.cpu()
        return eval_summary(table, samples)

    def _chunk_counts(self, prompts: list[list[int]], targets: list, *, seed: int) -> torch.Tensor:
        k = self.eval.samples
        sampling = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.eval.temperature,
                                  stop_token_ids=self.stop_token_ids, seed=seed)
        rollout = self.engine.generate([prompt for prompt in prompts for _ in range(k)], sampling)
        responses = rollout.responses()
        repeated = [target for target in targets for _ in range(k)]
        ended = torch.tensor([bool(r) and r[-1] in self.stop_token_ids for r in responses])
        columns = torch.zeros(len(responses), COLUMNS, dtype=torch.float64)
        columns[:, CORRECT] = self.task.correct(responses, repeated).double()
        reward_range = getattr(self.task, "reward_range", None)  # a NaN/inf reward counts as the task's minimum
        columns[:, REWARD_SUM] = guard_rewards(self.task.reward(responses, repeated),
                                               minimum=None if reward_range is None else reward_range[0]).rewards
        columns[:, LENGTH_SUM] = rollout.response_lengths.double()
        columns[:, TRUNCATED] = ((rollout.response_lengths >= self.max_new_tokens) & ~ended).double()
        return columns.view(len(prompts), k, COLUMNS).sum(dim=1)


def evaluates(config) -> bool:
    """Whether the run evaluates: not with --no-eval; a math run only with --eval-data."""
    return config.evaluation.enabled and (config.data.task != "math" or config.evaluation.data is not None)


def eval_prompts(config, task) -> tuple[list[list[int]], list]:
    """(prompts, targets): the --eval-data file's first --eval-max-prompts, or the synthetic task's
    held-out draw."""
    evaluation, data = config.evaluation, config.data
    if evaluation.data is None:
        count = evaluation.max_prompts or SYNTHETIC_EVAL_PROMPTS
        batch = task.sample(count, torch.Generator().manual_seed(config.training.seed * 7919 + _EVAL_STREAM))
        return batch.prompts, batch.targets
    from megatron_rpg.data.prompts import load_prompt_set

    prompt_set = load_prompt_set(evaluation.data, task.tokenizer, prompt_key=data.prompt_key,
                                 answer_key=data.answer_key, template=data.prompt_template,
                                 max_prompt_tokens=data.max_prompt_tokens)
    count = len(prompt_set) if evaluation.max_prompts is None else min(evaluation.max_prompts, len(prompt_set))
    if count == 0:
        raise ValueError(f"--eval-data {evaluation.data}: no prompt left to evaluate on")
    return [list(prompt) for prompt in prompt_set.prompts[:count]], list(prompt_set.answers[:count])
