"""Shared inputs for the RL forward-backward tests: one tiny HF model's weights loaded into megatron
models of any TP/PP layout (and gathered back), and a global batch of micro-batches whose response
lengths differ, so a per-micro-batch mean differs from the global token mean.

Weights move between layouts by slicing the full TP=1 tensors (from `hf_to_megatron`): a TP-split
parameter (`tensor_model_parallel`) is cut into TP equal blocks along `partition_dim`, except the
SwiGLU fc1 weight `[gate; up]`, whose rank r holds `[gate_r; up_r]`; layers are indexed globally
through `layer_number`, so a pipeline stage picks its own layers. With tied embeddings the last
pipeline stage's `output_layer.weight` is megatron's copy of the embedding: it is loaded from the
embedding and left out of the gathered full weights (callers check the copy separately).
"""
from __future__ import annotations

import functools
import re

import torch
import torch.distributed as dist

from megatron_rpg.checkpoint.hf_mapping import hf_to_megatron
from tests.tiny_models import tiny_hf_config, tiny_hf_model

FAMILY = "qwen2"
NUM_LAYERS = 2
SEQ_LEN = 12
MICRO_BATCH_SIZE = 2
NUM_MICRO_BATCHES = 4
PROMPT_LEN = 3
# Response lengths per sequence (0: an all-padding row): micro-batches hold 2, 9, 15, 15 tokens and
# 1, 2, 2, 2 sequences, so per-micro-batch means differ from the global token and sequence means.
RESPONSE_LENGTHS = ((2, 0), (4, 5), (7, 8), (9, 6))


TIED_OUTPUT = "output_layer.weight"
EMBEDDING = "embedding.word_embeddings.weight"


def hf_config(family: str = FAMILY):
    return tiny_hf_config(family, num_hidden_layers=NUM_LAYERS)


def full_megatron_weights(padded_vocab_size: int, family: str = FAMILY) -> dict[str, torch.Tensor]:
    """Full (TP=1, global layer index) megatron tensors of the tiny HF model, by megatron name."""
    model = tiny_hf_model(family, seed=0, num_hidden_layers=NUM_LAYERS)
    return dict(hf_to_megatron(hf_config(family), model.state_dict(),
                               padded_vocab_size=padded_vocab_size))


def _full_name(model, name: str, full: dict) -> str:
    name = global_name(model, name)
    # tied embeddings: the last stage's output layer is a copy of the embedding
    return EMBEDDING if name == TIED_OUTPUT and name not in full else name


def global_name(model, local_name: str) -> str:
    """Local parameter name → global megatron name (pipeline stages number their layers from 0)."""
    match = re.match(r"decoder\.layers\.(\d+)\.(.*)", local_name)
    if match is None:
        return local_name
    layer = model.decoder.layers[int(match.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}.{match.group(2)}"


def _is_glu_fc1(name: str, model) -> bool:
    return name.endswith("mlp.linear_fc1.weight") and model.config.gated_linear_unit


def tp_shard(full: torch.Tensor, param, name: str, model, tp_rank: int, tp_size: int) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim = param.partition_dim
    if _is_glu_fc1(name, model):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]])
    return full.chunk(tp_size, dim=dim)[tp_rank]


def load_full_weights(model, full: dict[str, torch.Tensor]) -> None:
    """Copy this rank's TP shard of this stage's layers from the full TP=1 tensors into `model`."""
    from megatron.core import parallel_state
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        for name, param in model.named_parameters():
            shard = tp_shard(full[_full_name(model, name, full)], param, name, model, tp_rank, tp_size)
            assert shard.shape == param.shape, (name, shard.shape, param.shape)
            param.copy_(shard)


def gather_full_weights(model) -> dict[str, torch.Tensor]:
    """The inverse of `load_full_weights`: full TP=1 tensors by global name, on every rank
    (all-gathered over TP, then merged over pipeline stages)."""
    from megatron.core import parallel_state
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    stage = {}
    for name, param in model.named_parameters():
        tensor = param.detach().clone()
        if getattr(param, "tensor_model_parallel", False) and tp_size > 1:
            parts = [torch.empty_like(tensor) for _ in range(tp_size)]
            dist.all_gather(parts, tensor.contiguous(), group=tp_group)
            if _is_glu_fc1(name, model):
                halves = [p.chunk(2, dim=0) for p in parts]
                tensor = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
            else:
                tensor = torch.cat(parts, dim=param.partition_dim)
        if name == TIED_OUTPUT and model.share_embeddings_and_output_weights:
            continue  # the embedding's copy on the last stage (checked by the caller)
        stage[global_name(model, name)] = tensor
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return stage
    stages = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(stages, stage, group=parallel_state.get_pipeline_model_parallel_group())
    return {name: tensor for part in stages for name, tensor in part.items()}


@functools.lru_cache(maxsize=4)
def _hf_model(family: str, dtype: torch.dtype):
    return tiny_hf_model(family, seed=0, num_hidden_layers=NUM_LAYERS).to(dtype)


def hf_logprobs(tokens: torch.Tensor, family: str = FAMILY, dtype: torch.dtype = torch.float64
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, entropy) `[b, s]` aligned with tokens (0 at t = 0), from an HF forward in `dtype`."""
    model = _hf_model(family, dtype)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(tokens).logits, dim=-1)[:, :-1]
    logp = log_probs.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    pad = torch.zeros(tokens.shape[0], 1, dtype=dtype)
    return torch.cat([pad, logp], 1), torch.cat([pad, entropy], 1)


def hf_float64_logprobs(tokens: torch.Tensor, family: str = FAMILY) -> tuple[torch.Tensor, torch.Tensor]:
    return hf_logprobs(tokens, family, torch.float64)


def global_micro_batches(vocab_size: int, with_ref: bool = True, family: str = FAMILY
                         ) -> list[dict[str, torch.Tensor]]:
    """NUM_MICRO_BATCHES micro-batches [MICRO_BATCH_SIZE, SEQ_LEN], right-padded, unequal lengths.
    old_logp / ref_logp are the model's own log-probs plus N(0, 0.3²) noise: a nearby behaviour and
    reference policy (w ≠ 1, some ratios outside the clip range), as after a few optimiser steps."""
    generator = torch.Generator().manual_seed(1234)
    batches = []
    for lengths in RESPONSE_LENGTHS:
        tokens = torch.randint(0, vocab_size, (MICRO_BATCH_SIZE, SEQ_LEN), generator=generator)
        mask = torch.zeros(MICRO_BATCH_SIZE, SEQ_LEN)
        for row, length in enumerate(lengths):
            mask[row, PROMPT_LEN:PROMPT_LEN + length] = 1.0
            tokens[row, PROMPT_LEN + length:] = 0  # right padding
        model_logp = hf_float64_logprobs(tokens, family)[0].float()
        shape = (MICRO_BATCH_SIZE, SEQ_LEN)
        batch = dict(tokens=tokens, loss_mask=mask,
                     old_logp=model_logp + 0.3 * torch.randn(shape, generator=generator),
                     advantages=torch.randn(MICRO_BATCH_SIZE, generator=generator))
        if with_ref:
            batch["ref_logp"] = model_logp + 0.3 * torch.randn(shape, generator=generator)
        batches.append(batch)
    return batches


def as_float64(micro_batches) -> list[dict[str, torch.Tensor]]:
    """The micro-batches with their floating-point tensors in float64 (for a float64 reference run)."""
    return [{key: value.double() if value.is_floating_point() else value for key, value in mb.items()}
            for mb in micro_batches]


def concatenate(micro_batches) -> dict[str, torch.Tensor]:
    """One micro-batch holding all of them (along the batch dimension)."""
    return {key: torch.cat([mb[key] for mb in micro_batches]) for key in micro_batches[0]}


@torch.no_grad()
def model_logprobs(gpt, tokens, vocab_size, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`[b, s]` (log-probs, entropies) in the model's dtype from one plain forward (TP=1, PP=1):
    compute_logprobs' result is float32 by design, so float64 reference runs take theirs from here."""
    gpt.eval()
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    logits = gpt(tokens, positions, None)[..., :vocab_size] / temperature  # padded vocab ids excluded
    gpt.train()
    log_probs = torch.log_softmax(logits, dim=-1)[:, :-1]
    logp = log_probs.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    pad = torch.zeros_like(logp[:, :1])
    return torch.cat([pad, logp], dim=1), torch.cat([pad, entropy], dim=1)
