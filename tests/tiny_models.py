"""Tiny random Hugging Face models, built locally (no hub), one per supported architecture family.

    config = tiny_hf_config("llama3", num_hidden_layers=4)
    model = tiny_hf_model("qwen3", seed=0)          # float32, eval mode

Families and what each one exercises:
- "qwen2":      Qwen2 with q/k/v bias, untied input/output embeddings.
- "qwen2-tied": the same with `tie_word_embeddings=True` (output layer shares the embedding).
- "llama3":     Llama with grouped-query attention and rope scaling of type "llama3". Its
                `original_max_position_embeddings` (32) is deliberately NOT megatron's hard-coded
                default (8192), and with head_dim 16 the 8 RoPE frequencies fall in all three bands
                (kept / smoothed / divided by `factor`), so parity proves the scaling is mapped exactly.
- "qwen3":      Qwen3 with per-head q/k RMSNorm (qk-norm), no qkv bias, explicit head_dim.
- TIED_VARIANTS "llama3-tied", "qwen3-tied": those two with `tie_word_embeddings=True` (not in
                FAMILIES, so tests iterating FAMILIES are unchanged; the parity test adds them).

All: hidden 64, 2 layers (override `num_hidden_layers`), 4 query heads / 2 kv heads, intermediate 128,
max positions 64, vocab 250 (not a multiple of 128, so Megatron's vocab padding is exercised).
"""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

FAMILIES = ("qwen2", "qwen2-tied", "llama3", "qwen3")
TIED_VARIANTS = ("llama3-tied", "qwen3-tied")

TINY_VOCAB_SIZE = 250

_COMMON = dict(
    vocab_size=TINY_VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    attention_dropout=0.0,
    initializer_range=0.2,  # large enough that logits differ visibly between positions and tokens
    tie_word_embeddings=False,
)

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

_FAMILY_CLASSES = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen2-tied": (Qwen2Config, Qwen2ForCausalLM),
    "llama3": (LlamaConfig, LlamaForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "llama3-tied": (LlamaConfig, LlamaForCausalLM),
    "qwen3-tied": (Qwen3Config, Qwen3ForCausalLM),
}


def _family_settings(family: str) -> dict:
    if family in TIED_VARIANTS:
        return dict(_family_settings(family.removesuffix("-tied")), tie_word_embeddings=True)
    if family == "qwen2":
        return dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if family == "qwen2-tied":
        return dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                    tie_word_embeddings=True)
    if family == "llama3":
        return dict(rope_parameters=dict(_LLAMA3_ROPE), attention_bias=False, mlp_bias=False)
    if family == "qwen3":
        return dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                    head_dim=16, attention_bias=False)
    raise ValueError(f"unknown tiny model family {family!r}; choose one of {FAMILIES + TIED_VARIANTS}")


def tiny_hf_config(family: str, **overrides) -> PretrainedConfig:
    """A tiny HF config of `family`; keyword overrides replace any field (e.g. num_hidden_layers=4)."""
    settings = {**_COMMON, **_family_settings(family), **overrides}
    config_class, _ = _FAMILY_CLASSES[family]
    config = config_class(**settings)
    config.dtype = torch.float32
    return config


def tiny_hf_model(family: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A tiny randomly initialised float32 HF causal LM in eval mode, deterministic given `seed`."""
    config = tiny_hf_config(family, **overrides)
    _, model_class = _FAMILY_CLASSES[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config).to(torch.float32)
        # HF zero-initialises biases and sets norms to one; randomise them so parity checks see them.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    param.add_(0.1 * torch.randn_like(param))
    return model.eval()
