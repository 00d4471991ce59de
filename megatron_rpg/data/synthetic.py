"""Synthetic prompt sets for runs without a data set (the CPU demo, tests, smoke runs on a cluster).

`repeat-token`: the prompt is one random "key" token k; the reward is the fraction of response
tokens equal to k (rewards/toy.py). A random policy scores ≈ 1/vocab; the optimum is 1. A tiny
model can learn it (it is an identity map from the key's embedding to the output layer), so the
reward visibly rises within a few dozen RL steps on a CPU.
"""
from __future__ import annotations

import dataclasses

import torch

from megatron_rpg.rewards.toy import match_fraction_reward


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    prompts: list[list[int]]  # token ids, one list per prompt
    targets: list             # what the reward compares with, one per prompt (a token id, an answer)


class RepeatTokenTask:
    max_prompt_tokens = 1  # the key token
    reward_range = (0.0, 1.0)  # a fraction of tokens (rewards/toy.py)
    correct_means = "every response token equals the prompt's token (reward 1)"

    def __init__(self, vocab_size: int, *, first_key_id: int = 1):
        if not 0 <= first_key_id < vocab_size - 1:
            raise ValueError(f"first_key_id={first_key_id} must leave at least two key ids below "
                             f"vocab_size={vocab_size}")
        self.vocab_size = vocab_size
        self.first_key_id = first_key_id

    def sample(self, num_prompts: int, generator: torch.Generator) -> PromptBatch:
        keys = torch.randint(self.first_key_id, self.vocab_size, (num_prompts,), generator=generator).tolist()
        return PromptBatch(prompts=[[key] for key in keys], targets=keys)

    def reward(self, responses: list[list[int]], targets: list[int]) -> torch.Tensor:
        return match_fraction_reward(responses, targets)

    def correct(self, responses: list[list[int]], targets: list[int]) -> torch.Tensor:
        """bool [n]: the response is its key repeated (reward exactly 1; an empty one is wrong)."""
        return match_fraction_reward(responses, targets) == 1.0

    def decode(self, token_ids: list[int]) -> str:
        """The ids themselves (the task has no tokenizer): "5 5 3"."""
        return " ".join(str(token) for token in token_ids)


def make_task(name: str, vocab_size: int):
    if name == "repeat-token":
        return RepeatTokenTask(vocab_size)
    raise ValueError(f"task={name!r} is not a synthetic task; synthetic tasks: ['repeat-token']")
