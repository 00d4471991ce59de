"""MathTask: the synthetic task's interface over a prompt file, with DAPO-shaped math rewards."""
import json

import pytest
import torch

from megatron_rpg.data.math_task import MathTask
from megatron_rpg.data.prompts import load_prompt_set

MAX_RESPONSE, BUFFER = 32, 8


@pytest.fixture
def prompt_set(tmp_path, tiny_tokenizer):
    path = tmp_path / "math.jsonl"
    rows = [{"prompt": f"What is {n} + {n}?", "answer": str(2 * n)} for n in range(5)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return load_prompt_set(path, tiny_tokenizer)


def response_of_length(tokenizer, text, length):
    """Token ids of `text` padded with the stop token (decoded away) to `length` tokens."""
    ids = tokenizer(text)["input_ids"]
    assert len(ids) < length
    return ids + [tokenizer.eos_token_id] * (length - len(ids))


def test_sample_returns_prompt_token_ids_with_their_answers_as_targets(prompt_set, tiny_tokenizer):
    task = MathTask(prompt_set, tiny_tokenizer, max_response_tokens=MAX_RESPONSE, overlong_buffer=BUFFER)
    batch = task.sample(5, torch.Generator().manual_seed(0))
    assert sorted(batch.targets) == ["0", "2", "4", "6", "8"]
    for prompt, target in zip(batch.prompts, batch.targets):
        n = int(target) // 2
        assert tiny_tokenizer.decode(prompt) == f"What is {n} + {n}?"
    assert task.stop_token_ids == (tiny_tokenizer.eos_token_id,)


def test_reward_is_plus_one_correct_minus_one_wrong_and_the_dapo_penalty_when_overlong(
        prompt_set, tiny_tokenizer):
    task = MathTask(prompt_set, tiny_tokenizer, max_response_tokens=MAX_RESPONSE, overlong_buffer=BUFFER)
    start = MAX_RESPONSE - BUFFER  # the penalty starts here
    responses = [response_of_length(tiny_tokenizer, "So \\boxed{4}", start),            # correct, in time
                 response_of_length(tiny_tokenizer, "The answer is 5.", start),         # wrong, in time
                 response_of_length(tiny_tokenizer, "So \\boxed{4}", start + 6),        # correct, overlong
                 response_of_length(tiny_tokenizer, "no answer here", MAX_RESPONSE)]   # no answer, at L_max
    rewards = task.reward(responses, ["4", "4", "4", "4"])
    assert rewards.dtype == torch.float64
    # R = ±1 + min(−(L − (L_max − L_buf))/L_buf, 0): 1 + 0, −1 + 0, 1 − 6/8, −1 − 8/8
    assert rewards.tolist() == [1.0, -1.0, 0.25, -2.0]


def test_a_zero_overlong_buffer_switches_the_penalty_off(prompt_set, tiny_tokenizer):
    task = MathTask(prompt_set, tiny_tokenizer, max_response_tokens=MAX_RESPONSE, overlong_buffer=0)
    overlong = response_of_length(tiny_tokenizer, "So \\boxed{4}", MAX_RESPONSE + 4)
    assert task.reward([overlong], ["4"]).tolist() == [1.0]


def test_bad_lengths_are_rejected_when_the_task_is_built(prompt_set, tiny_tokenizer):
    with pytest.raises(ValueError, match=r"overlong_buffer=32 must lie in \[0, max_response_tokens=32\)"):
        MathTask(prompt_set, tiny_tokenizer, max_response_tokens=32, overlong_buffer=32)
    with pytest.raises(ValueError, match=r"max_response_tokens=0 must be ≥ 1"):
        MathTask(prompt_set, tiny_tokenizer, max_response_tokens=0, overlong_buffer=0)


def test_reward_rejects_a_target_count_that_differs_from_the_responses(prompt_set, tiny_tokenizer):
    task = MathTask(prompt_set, tiny_tokenizer, max_response_tokens=MAX_RESPONSE, overlong_buffer=BUFFER)
    with pytest.raises(ValueError, match="got 1 responses but 2 targets"):
        task.reward([[1, 2]], ["1", "2"])
