"""The trainer's task from its flags: the synthetic repeat-token task, or a math prompt set
(--prompt-data JSONL/Parquet, tokenized with --tokenizer, DAPO reward) — loaded and checked before
any step runs."""
from __future__ import annotations

import os

from megatron_rpg.checkpoint.convert import HF_SIDE_DIR
from megatron_rpg.data.math_task import MathTask
from megatron_rpg.data.prompts import load_prompt_set
from megatron_rpg.data.synthetic import make_task

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def find_tokenizer_dir(config) -> str | None:
    """--tokenizer, else the HF files kept with a --load checkpoint, else the --hf-config folder (of a
    TrainConfig); None when none of them holds tokenizer files."""
    tokenizer, load, hf_config = config.data.tokenizer, config.model.load, config.model.hf_config
    candidates = [tokenizer] if tokenizer else []
    if load:
        candidates.append(os.path.join(load, HF_SIDE_DIR))
    if hf_config:
        candidates.append(hf_config if os.path.isdir(hf_config) else os.path.dirname(hf_config))
    for folder in candidates:
        if any(os.path.isfile(os.path.join(folder, name)) for name in _TOKENIZER_FILES):
            return folder
    return None


def build_task(config, vocab_size: int):
    """The TrainConfig's task; its `max_prompt_tokens` is the longest prompt it can draw."""
    data, max_new_tokens = config.data, config.rollout.max_new_tokens
    if data.task != "math":
        return make_task(data.task, vocab_size)
    from transformers import AutoTokenizer

    folder = find_tokenizer_dir(config)
    if folder is None:
        raise ValueError("--task math needs a tokenizer and none was found (--tokenizer, the hf/ folder of "
                         "--load, the --hf-config folder): pass --tokenizer DIR (an HF tokenizer folder)")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                         f"{vocab_size}: use the tokenizer that belongs to the model")
    prompt_set = load_prompt_set(data.prompt_data, tokenizer, prompt_key=data.prompt_key,
                                 answer_key=data.answer_key, template=data.prompt_template,
                                 max_prompt_tokens=data.max_prompt_tokens)
    buffer = data.overlong_buffer if data.overlong_buffer is not None else min(512, max_new_tokens // 4)
    return MathTask(prompt_set, tokenizer, max_response_tokens=max_new_tokens, overlong_buffer=buffer)
