"""Held-out accuracy of a saved run, for trainers without --eval-data: the --save checkpoint is
exported to a Hugging Face folder (megatron_rpg.checkpoint.convert) and answers greedily with plain
transformers, one prompt at a time.

- repeat-token: every key token of the tiny preset's vocabulary once (1..15, the whole prompt
  distribution: nothing left to hold out), score = the task's own reward (fraction of response tokens
  equal to the key), averaged;
- math: the prompts of the held-out file with the run's --prompt-template, score = the task's own
  correctness check (rewards/math.py), averaged.
"""
from __future__ import annotations

import os
import tempfile


def _greedy(model, prompt: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
    import torch

    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                         pad_token_id=eos if eos is not None else 0)
    response = out[0, len(prompt):].tolist()
    return response[:response.index(eos)] if eos is not None and eos in response else response


def heldout_accuracy(checkpoint: str, task: dict) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_rpg.checkpoint.convert import megatron_to_hf_checkpoint

    with tempfile.TemporaryDirectory(prefix="heldout-hf-") as scratch:
        hf_dir = os.path.join(scratch, "hf")
        megatron_to_hf_checkpoint(checkpoint, hf_dir, progress=False)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32).eval()
        with torch.no_grad():
            if task["kind"] == "repeat-token":
                from megatron_rpg.rewards.toy import match_fraction_reward

                keys = list(range(1, model.config.vocab_size))
                responses = [_greedy(model, [k], task["max_new_tokens"], None) for k in keys]
                return float(match_fraction_reward(responses, keys).mean())
            from megatron_rpg.data.prompts import load_prompt_set
            from megatron_rpg.rewards.math import math_correctness

            tokenizer = AutoTokenizer.from_pretrained(task["tokenizer"], local_files_only=True)
            prompt_set = load_prompt_set(task["eval_data"], tokenizer, template=task["template"])
            texts = [tokenizer.decode(_greedy(model, p, task["max_new_tokens"], tokenizer.eos_token_id))
                     for p in prompt_set.prompts]
            return float(math_correctness(texts, [str(a) for a in prompt_set.answers]).float().mean())
