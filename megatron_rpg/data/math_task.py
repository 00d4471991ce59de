"""A math prompt set as a training task: the interface of data/synthetic.py (sample, reward).

    prompt_set = load_prompt_set("math.jsonl", tokenizer, max_prompt_tokens=1024)
    task = MathTask(prompt_set, tokenizer, max_response_tokens=4096, overlong_buffer=512)
    batch = task.sample(num_prompts, generator)        # PromptBatch(prompts=token ids, targets=answers)
    rewards = task.reward(responses, batch.targets)    # float64 [n]
    SamplingParams(..., stop_token_ids=task.stop_token_ids)

The reward of a response of L tokens (its stop token included) is DAPO's (rewards/dapo.py):

    R = (+1 if the final answer equals the target else −1) + min(−(L − (L_max − L_buf)) / L_buf, 0)

with L_max = max_response_tokens and L_buf = overlong_buffer (0 switches the penalty off).
Correctness is rewards/math.py's on the text decoded without special tokens. `reward_range` is
(−2, 1) with the penalty ((−1, 1) without) for responses of at most L_max tokens, what the engine
generates; a response whose check runs past its time budget (rewards/math.DEFAULT_TIME_BUDGET_S)
gets the minimum, and `last_over_budget` [n] marks them in the last call.
"""
from __future__ import annotations

import torch

from megatron_rpg.data.prompts import PromptSampler, PromptSet
from megatron_rpg.data.synthetic import PromptBatch
from megatron_rpg.rewards.dapo import DEFAULT_OVERLONG_BUFFER, dapo_math_reward
from megatron_rpg.rewards.math import DEFAULT_TIME_BUDGET_S, score_answers


class MathTask:
    """Prompts drawn without replacement within an epoch by `sampler` (data/prompts.PromptSampler:
    this DP rank's slice of each epoch; default: one rank, seed 0), rewarded by final-answer correctness with DAPO's overlong penalty."""

    def __init__(self, prompt_set: PromptSet, tokenizer, *, max_response_tokens: int,
                 overlong_buffer: int = DEFAULT_OVERLONG_BUFFER, sampler: PromptSampler | None = None,
                 stop_token_ids: tuple[int, ...] | None = None, time_budget_s: float = DEFAULT_TIME_BUDGET_S):
        if max_response_tokens < 1:
            raise ValueError(f"max_response_tokens={max_response_tokens} must be ≥ 1")
        if not 0 <= overlong_buffer < max_response_tokens:
            raise ValueError(f"overlong_buffer={overlong_buffer} must lie in [0, max_response_tokens="
                             f"{max_response_tokens}) (the penalty starts at max_response_tokens − "
                             f"overlong_buffer; 0 switches it off)")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id, so generation could not stop; set its "
                             "eos_token (tokenizer_config.json) or pass a tokenizer that has one")
        self.prompt_set = prompt_set
        self.tokenizer = tokenizer
        self.max_response_tokens = max_response_tokens
        self.overlong_buffer = overlong_buffer
        self.time_budget_s = time_budget_s
        self.reward_range = (-2.0 if overlong_buffer > 0 else -1.0, 1.0)
        self.last_over_budget = torch.zeros(0, dtype=torch.bool)
        # every end id of the model (training/tasks.end_token_ids), at least the tokenizer's
        self.stop_token_ids: tuple[int, ...] = tuple(sorted({tokenizer.eos_token_id, *(stop_token_ids or ())}))
        self.sampler = sampler if sampler is not None else PromptSampler(len(prompt_set))
        if self.sampler.num_prompts != len(prompt_set):
            raise ValueError(f"the sampler draws from {self.sampler.num_prompts} prompts but the prompt set "
                             f"holds {len(prompt_set)}; build it as PromptSampler(len(prompt_set), ...)")
        self.max_prompt_tokens = max(len(prompt) for prompt in prompt_set.prompts)  # the longest it draws

    def sample(self, num_prompts: int, generator: torch.Generator | None = None) -> PromptBatch:
        """num_prompts prompts (token ids) and their reference answers, the next of this rank's share
        of the epoch. `generator` (the synthetic tasks' interface) is not used: the sampler's epochs
        are seeded alike on every DP rank so that the ranks partition them."""
        indices = self.sampler.draw(num_prompts)
        return PromptBatch(prompts=[list(self.prompt_set.prompts[i]) for i in indices],
                           targets=[self.prompt_set.answers[i] for i in indices])

    correct_means = "the final answer equals the reference answer (rewards/math.py)"

    def correct(self, responses: list[list[int]], targets: list[str]) -> torch.Tensor:
        """bool [n]: the final answer of each response (decoded without special tokens) equals its
        target, each checked within the reward's time budget (those past it: not correct, and marked
        in `last_over_budget`)."""
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        correct, self.last_over_budget = score_answers(texts, targets, time_budget_s=self.time_budget_s)
        return correct

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    def reward(self, responses: list[list[int]], targets: list[str]) -> torch.Tensor:
        """DAPO reward [n] float64 of each response (token ids) against its reference answer."""
        if len(responses) != len(targets):
            raise ValueError(f"got {len(responses)} responses but {len(targets)} targets; pass one "
                             f"target per response")
        correct = self.correct(responses, targets)
        lengths = torch.tensor([len(response) for response in responses], dtype=torch.int64)
        use_penalty = self.overlong_buffer > 0
        reward = dapo_math_reward(correct, lengths, max_length=self.max_response_tokens,
                                  buffer_length=self.overlong_buffer if use_penalty else 1,
                                  use_overlong_penalty=use_penalty)
        return torch.where(self.last_over_budget, self.reward_range[0], reward.to(torch.float64))
