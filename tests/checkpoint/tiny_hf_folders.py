"""Tiny HF model folders on disk (weights as safetensors, config, a word-level tokenizer), for the
conversion tests. Built locally from tests/tiny_models.py; nothing is downloaded."""
from __future__ import annotations

import os

from tests.tiny_models import TINY_VOCAB_SIZE, tiny_hf_model


def save_tokenizer(directory: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # the last id is Qwen2's "<|endoftext|>": Qwen2Tokenizer adds it when absent, one token past the vocabulary
    vocab = {f"t{i}": i for i in range(TINY_VOCAB_SIZE - 1)} | {"<|endoftext|>": TINY_VOCAB_SIZE - 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", eos_token="t1").save_pretrained(directory)


def save_tiny_hf_folder(family: str, directory: str, seed: int = 0, tokenizer: bool = True, **overrides):
    """Saves `tiny_hf_model(family, seed)` with `save_pretrained(safe_serialization=True)`; returns the model."""
    model = tiny_hf_model(family, seed=seed, **overrides)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer:
        save_tokenizer(directory)
    return model
