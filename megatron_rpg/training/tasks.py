"""The trainer's task from its flags: the synthetic repeat-token task, or a math prompt set
(--prompt-data JSONL/Parquet, tokenized with --tokenizer, DAPO reward) — loaded and checked before
any step runs."""
from __future__ import annotations

import json
import os

from megatron_rpg.checkpoint.convert import HF_SIDE_DIR
from megatron_rpg.data.math_task import MathTask
from megatron_rpg.data.prompts import PromptSampler, load_prompt_set
from megatron_rpg.data.synthetic import make_task

TASKS = ("repeat-token", "math")
GENERATION_CONFIG = "generation_config.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def find_tokenizer_dir(args) -> str | None:
    """--tokenizer, else the HF files kept with a --load checkpoint, else the --hf-config folder;
    None when none of them holds tokenizer files."""
    candidates = [args.tokenizer] if args.tokenizer else []
    if args.load:
        candidates.append(os.path.join(args.load, HF_SIDE_DIR))
    if args.hf_config:
        candidates.append(args.hf_config if os.path.isdir(args.hf_config) else os.path.dirname(args.hf_config))
    for folder in candidates:
        if any(os.path.isfile(os.path.join(folder, name)) for name in _TOKENIZER_FILES):
            return folder
    return None


def model_hf_dir(args) -> str | None:
    """The model's own HF files: the hf/ folder of --load, else the --hf-config folder (None: a preset)."""
    if args.load:
        return os.path.join(args.load, HF_SIDE_DIR)
    if args.hf_config:
        return args.hf_config if os.path.isdir(args.hf_config) else os.path.dirname(args.hf_config)
    return None


def _ids(value) -> list[int]:
    return [value] if isinstance(value, int) else [i for i in value or () if isinstance(i, int)]


def end_token_ids(args, tokenizer, vocab_size: int) -> tuple[int, ...]:
    """Every id that ends a turn: the tokenizer's eos and the eos_token_id (an int or a list) of the
    model's config.json and generation_config.json, those below vocab_size."""
    ids = set(_ids(tokenizer.eos_token_id))
    folder = model_hf_dir(args)
    for name in ("config.json", GENERATION_CONFIG):
        path = os.path.join(folder, name) if folder else None
        if path and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                ids.update(_ids(json.load(f).get("eos_token_id")))
    return tuple(sorted(i for i in ids if 0 <= i < vocab_size))


def build_task(args, vocab_size: int, *, dp_rank: int = 0, dp_size: int = 1):
    """The --task; a math prompt set is partitioned over the dp_size DP ranks (each epoch one
    permutation seeded by --seed, rank dp_rank its slice). The synthetic repeat-token task draws i.i.d.
    random keys with each rank's own generator: there is no set to partition."""
    if args.task != "math":
        return make_task(args.task, vocab_size)
    from transformers import AutoTokenizer

    folder = find_tokenizer_dir(args)
    if folder is None:
        raise ValueError("--task math needs a tokenizer and none was found (--tokenizer, the hf/ folder of "
                         "--load, the --hf-config folder): pass --tokenizer DIR (an HF tokenizer folder)")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                         f"{vocab_size}: use the tokenizer that belongs to the model")
    prompt_set = load_prompt_set(args.prompt_data, tokenizer, prompt_key=args.prompt_key,
                                 answer_key=args.answer_key, template=args.prompt_template,
                                 max_prompt_tokens=args.max_prompt_tokens)
    buffer = args.overlong_buffer if args.overlong_buffer is not None else min(512, args.rollout_max_new_tokens // 4)
    if len(prompt_set) < dp_size:
        raise ValueError(f"--prompt-data {args.prompt_data}: {len(prompt_set)} prompts cannot be split over "
                         f"{dp_size} data-parallel ranks; use a larger prompt set or fewer DP ranks")
    sampler = PromptSampler(len(prompt_set), seed=args.seed, rank=dp_rank, num_ranks=dp_size)
    return MathTask(prompt_set, tokenizer, max_response_tokens=args.rollout_max_new_tokens, overlong_buffer=buffer,
                    sampler=sampler, stop_token_ids=end_token_ids(args, tokenizer, vocab_size))
