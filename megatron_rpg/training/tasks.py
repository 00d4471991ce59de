"""The trainer's task from its TrainConfig: the synthetic repeat-token task, or a math prompt set
(--prompt-data JSONL/Parquet, tokenized with --tokenizer, DAPO reward) — loaded and checked before
any step runs. A task's `max_prompt_tokens` is the longest prompt it can draw."""
from __future__ import annotations

import json
import os

from megatron_rpg.checkpoint.convert import HF_SIDE_DIR
from megatron_rpg.checkpoint.hf_files import TOKENIZER_FILES
from megatron_rpg.data.math_task import MathTask
from megatron_rpg.data.prompts import PromptSampler, load_prompt_set
from megatron_rpg.data.synthetic import make_task

GENERATION_CONFIG = "generation_config.json"


def model_hf_dir(config) -> str | None:
    """The model's own HF files: the hf/ folder of --load, else the --hf-config folder (None: a preset)."""
    load, hf_config = config.checkpoint.load, config.model.hf_config
    if load:
        return os.path.join(load, HF_SIDE_DIR)
    if hf_config:
        return hf_config if os.path.isdir(hf_config) else os.path.dirname(hf_config)
    return None


def find_tokenizer_dir(config) -> str | None:
    """--tokenizer, else the model's own HF files (model_hf_dir); None when neither holds tokenizer files."""
    candidates = [folder for folder in (config.data.tokenizer, model_hf_dir(config)) if folder]
    for folder in candidates:
        if any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES):
            return folder
    return None


def _ids(value) -> list[int]:
    return [value] if isinstance(value, int) else [i for i in value or () if isinstance(i, int)]


def end_token_ids(config, tokenizer, vocab_size: int) -> tuple[int, ...]:
    """Every id that ends a turn: the tokenizer's eos and the eos_token_id (an int or a list) of the
    model's config.json and generation_config.json, those below vocab_size."""
    ids = set(_ids(tokenizer.eos_token_id))
    folder = model_hf_dir(config)
    for name in ("config.json", GENERATION_CONFIG):
        path = os.path.join(folder, name) if folder else None
        if path and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                ids.update(_ids(json.load(f).get("eos_token_id")))
    return tuple(sorted(i for i in ids if 0 <= i < vocab_size))


def build_task(config, vocab_size: int, *, dp_rank: int, dp_size: int):
    """The TrainConfig's task; a math prompt set is partitioned over the dp_size DP ranks (each epoch
    one permutation seeded by --seed, rank dp_rank its slice). The synthetic repeat-token task draws
    i.i.d. random keys with each rank's own generator: there is no set to partition."""
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
    try:
        prompt_set = load_prompt_set(data.prompt_data, tokenizer, prompt_key=data.prompt_key,
                                     answer_key=data.answer_key, template=data.prompt_template,
                                     max_prompt_tokens=data.max_prompt_tokens, chat_template=data.chat_template)
    except (FileNotFoundError, ImportError) as error:  # bad input like the ValueErrors: train.py exits 2
        raise ValueError(f"--prompt-data {data.prompt_data}: {error}") from error
    if len(prompt_set) < dp_size:
        raise ValueError(f"--prompt-data {data.prompt_data}: {len(prompt_set)} prompts cannot be split over "
                         f"{dp_size} data-parallel ranks; use a larger prompt set or fewer DP ranks")
    buffer = data.overlong_buffer if data.overlong_buffer is not None else min(512, max_new_tokens // 4)
    sampler = PromptSampler(len(prompt_set), seed=config.training.seed, rank=dp_rank, num_ranks=dp_size)
    return MathTask(prompt_set, tokenizer, max_response_tokens=max_new_tokens, overlong_buffer=buffer,
                    sampler=sampler, stop_token_ids=end_token_ids(config, tokenizer, vocab_size))
