"""The one HF <-> megatron-core name/tensor table, shared by checkpoint conversion and weight export.

Megatron side: the state-dict names of a megatron-core 0.16.1 `GPTModel` built with
`get_gpt_layer_local_spec` (checked by printing a real model's `state_dict()`), with GLOBAL layer
indices and FULL (TP=1) tensors:

    embedding.word_embeddings.weight                       [padded_vocab, h]
    decoder.layers.{i}.input_layernorm.weight              [h]
    decoder.layers.{i}.self_attention.linear_qkv.weight    [(n + 2g) * d, h]   (.bias when qkv bias)
    decoder.layers.{i}.self_attention.q_layernorm.weight   [d]                 (qk-norm families)
    decoder.layers.{i}.self_attention.k_layernorm.weight   [d]
    decoder.layers.{i}.self_attention.linear_proj.weight   [h, n * d]
    decoder.layers.{i}.pre_mlp_layernorm.weight            [h]
    decoder.layers.{i}.mlp.linear_fc1.weight               [2 * ffn, h]        = [gate; up]
    decoder.layers.{i}.mlp.linear_fc2.weight               [h, ffn]
    decoder.final_layernorm.weight                         [h]
    output_layer.weight                                    [padded_vocab, h]   (absent when tied)

Fused QKV layout (n query heads, g query groups = kv heads, d head dim): rows are grouped per query
group, `[q_{j*n/g} .. q_{(j+1)*n/g-1}, k_j, v_j]` for j = 0..g-1, which is how
`SelfAttention.get_query_key_value_tensors` views them; because every group is contiguous, a TP split
of dim 0 into tp equal blocks gives each rank whole groups (tp must divide g).
SwiGLU: megatron computes `silu(x[:ffn]) * x[ffn:]` on the fc1 output, so fc1 = [gate_proj; up_proj].
Vocab padding: embedding/output rows vocab..padded_vocab-1 are zeros; the reverse drops them.

Exactness: every rule only concatenates, reshapes or slices; no arithmetic and no dtype change, so
`megatron_to_hf(hf_to_megatron(w)) == w` bit for bit.
Laziness: tensors are read from the input Mapping one rule at a time (a Mapping backed by safetensors
`safe_open` keeps memory at about one layer's largest fused tensor).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from megatron_rpg.megatron.models import check_supported_hf_config

# kinds of rule: how the HF tensors become the megatron tensor
COPY, QKV_WEIGHT, QKV_BIAS, GATE_UP, VOCAB = "copy", "qkv_weight", "qkv_bias", "gate_up", "vocab"


@dataclass(frozen=True)
class ModelShape:
    """What the table needs from an HF config."""
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    tied_embeddings: bool
    qkv_bias: bool
    qk_norm: bool


@dataclass(frozen=True)
class TensorRule:
    """One megatron tensor and the HF tensor(s) it is made of (in concatenation order)."""
    megatron_name: str
    hf_names: tuple[str, ...]
    kind: str


def model_shape(hf_config) -> ModelShape:
    """Reads an HF config (object or dict); ValueError for any config the megatron model builder
    rejects (`check_supported_hf_config`, the one set of checks both use), with its message."""
    check_supported_hf_config(hf_config)
    get = (lambda k, d=None: hf_config.get(k, d)) if isinstance(hf_config, Mapping) else \
        (lambda k, d=None: getattr(hf_config, k, d))
    model_type = get("model_type")
    num_heads = get("num_attention_heads")
    hidden = get("hidden_size")
    head_dim = get("head_dim") or hidden // num_heads
    num_kv_heads = get("num_key_value_heads") or num_heads
    return ModelShape(model_type=model_type, num_layers=get("num_hidden_layers"), hidden_size=hidden,
                      num_heads=num_heads, num_kv_heads=num_kv_heads,
                      head_dim=head_dim, ffn_hidden_size=get("intermediate_size"),
                      vocab_size=get("vocab_size"), tied_embeddings=bool(get("tie_word_embeddings", False)),
                      qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3")


def tensor_rules(hf_config) -> list[TensorRule]:
    """The whole table for one model, in a stable order (embedding, layers 0..L-1, final norm, head)."""
    s = model_shape(hf_config)
    rules = [TensorRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB)]
    for i in range(s.num_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = hf + "self_attn."
        rules.append(TensorRule(mg + "input_layernorm.weight", (hf + "input_layernorm.weight",), COPY))
        rules.append(TensorRule(mg + "self_attention.linear_qkv.weight",
                                tuple(f"{attn}{p}_proj.weight" for p in "qkv"), QKV_WEIGHT))
        if s.qkv_bias:
            rules.append(TensorRule(mg + "self_attention.linear_qkv.bias",
                                    tuple(f"{attn}{p}_proj.bias" for p in "qkv"), QKV_BIAS))
        if s.qk_norm:
            rules.append(TensorRule(mg + "self_attention.q_layernorm.weight", (attn + "q_norm.weight",), COPY))
            rules.append(TensorRule(mg + "self_attention.k_layernorm.weight", (attn + "k_norm.weight",), COPY))
        rules.append(TensorRule(mg + "self_attention.linear_proj.weight", (attn + "o_proj.weight",), COPY))
        rules.append(TensorRule(mg + "pre_mlp_layernorm.weight", (hf + "post_attention_layernorm.weight",), COPY))
        rules.append(TensorRule(mg + "mlp.linear_fc1.weight",
                                (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"), GATE_UP))
        rules.append(TensorRule(mg + "mlp.linear_fc2.weight", (hf + "mlp.down_proj.weight",), COPY))
    rules.append(TensorRule("decoder.final_layernorm.weight", ("model.norm.weight",), COPY))
    if not s.tied_embeddings:
        rules.append(TensorRule("output_layer.weight", ("lm_head.weight",), VOCAB))
    return rules


def megatron_names(hf_config) -> list[str]:
    return [r.megatron_name for r in tensor_rules(hf_config)]


def hf_names(hf_config) -> list[str]:
    """The HF tensors a checkpoint of this config holds (lm_head.weight only when untied)."""
    return [n for r in tensor_rules(hf_config) for n in r.hf_names]


def redundant_hf_copies(hf_config) -> dict[str, str]:
    """HF tensors a checkpoint may store besides `hf_names` as exact copies of another (name ->
    original): a tied model's lm_head.weight, which some writers keep; only the original is converted."""
    return {"lm_head.weight": "model.embed_tokens.weight"} if model_shape(hf_config).tied_embeddings else {}


def hf_shapes(hf_config) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> the shape the config implies (to check a checkpoint before converting it)."""
    s = model_shape(hf_config)
    return {name: shape for rule in tensor_rules(hf_config)
            for name, shape in zip(rule.hf_names, _hf_shapes(s, rule))}


def megatron_shapes(hf_config, padded_vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Megatron (full, TP=1) tensor name -> the shape the config implies."""
    s = model_shape(hf_config)
    return {rule.megatron_name: _expected_shape(s, rule, padded_vocab_size) for rule in tensor_rules(hf_config)}


def _fuse(s: ModelShape, rule: TensorRule, parts: list[torch.Tensor], padded_vocab_size: int) -> torch.Tensor:
    if rule.kind == COPY:
        return parts[0]
    if rule.kind == GATE_UP:
        return torch.cat(parts, dim=0)
    if rule.kind == VOCAB:
        table = parts[0]
        extra = padded_vocab_size - table.shape[0]
        return table if extra == 0 else torch.cat([table, table.new_zeros(extra, *table.shape[1:])])
    q, k, v = parts  # QKV: interleave per query group
    g, d = s.num_kv_heads, s.head_dim
    tail = q.shape[1:]  # (h,) for the weight, () for the bias
    grouped = torch.cat([q.reshape(g, s.num_heads // g, d, *tail), k.reshape(g, 1, d, *tail),
                         v.reshape(g, 1, d, *tail)], dim=1)
    return grouped.reshape((s.num_heads + 2 * g) * d, *tail)


def _split(s: ModelShape, rule: TensorRule, tensor: torch.Tensor) -> list[torch.Tensor]:
    if rule.kind == COPY:
        return [tensor]
    if rule.kind == GATE_UP:
        return list(tensor.split(s.ffn_hidden_size, dim=0))
    if rule.kind == VOCAB:
        return [tensor[: s.vocab_size]]
    g, d, per_group = s.num_kv_heads, s.head_dim, s.num_heads // s.num_kv_heads
    tail = tensor.shape[1:]
    grouped = tensor.reshape(g, per_group + 2, d, *tail)
    q, k, v = grouped.split([per_group, 1, 1], dim=1)
    return [q.reshape(s.num_heads * d, *tail), k.reshape(g * d, *tail), v.reshape(g * d, *tail)]


def _expected_shape(s: ModelShape, rule: TensorRule, padded_vocab_size: int) -> tuple[int, ...]:
    h, d = s.hidden_size, s.head_dim
    name = rule.megatron_name
    if rule.kind == VOCAB:
        return (padded_vocab_size, h)
    if rule.kind in (QKV_WEIGHT, QKV_BIAS):
        rows = (s.num_heads + 2 * s.num_kv_heads) * d
        return (rows, h) if rule.kind == QKV_WEIGHT else (rows,)
    if rule.kind == GATE_UP:
        return (2 * s.ffn_hidden_size, h)
    if name.endswith(("q_layernorm.weight", "k_layernorm.weight")):
        return (d,)
    if name.endswith("linear_proj.weight"):
        return (h, s.num_heads * d)
    if name.endswith("linear_fc2.weight"):
        return (h, s.ffn_hidden_size)
    return (h,)  # layer norms


def _hf_shapes(s: ModelShape, rule: TensorRule) -> list[tuple[int, ...]]:
    """Shapes of the HF tensors of one rule (checked before fusing, where a reshape could hide a mismatch)."""
    h, d, g = s.hidden_size, s.head_dim, s.num_kv_heads
    if rule.kind in (QKV_WEIGHT, QKV_BIAS):
        tail = (h,) if rule.kind == QKV_WEIGHT else ()
        return [(s.num_heads * d, *tail), (g * d, *tail), (g * d, *tail)]
    if rule.kind == GATE_UP:
        return [(s.ffn_hidden_size, h)] * 2
    if rule.kind == VOCAB:
        return [(s.vocab_size, h)]
    return [_expected_shape(s, rule, s.vocab_size)]


def _check_shape(what: str, name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{what} tensor {name!r} has shape {tuple(tensor.shape)} but the config implies "
                         f"{tuple(expected)}; the checkpoint does not match its config.json")


def _fetch(what: str, tensors: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    try:
        return tensors[name]
    except KeyError:
        raise ValueError(f"{what} checkpoint is missing tensor {name!r}; is it complete and does its "
                         f"config.json describe it?") from None


def _check_padding(s: ModelShape, padded_vocab_size: int) -> None:
    if padded_vocab_size < s.vocab_size:
        raise ValueError(f"padded_vocab_size={padded_vocab_size} is smaller than the config's "
                         f"vocab_size={s.vocab_size}; it must be >= vocab_size")


def hf_to_megatron(hf_config, hf_tensors: Mapping[str, torch.Tensor], *,
                   padded_vocab_size: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields `(megatron_name, full TP=1 tensor)` for every megatron tensor, reading HF tensors lazily.

    Raises ValueError naming the tensor when one is missing or has a shape the config does not imply.
    """
    s = model_shape(hf_config)
    _check_padding(s, padded_vocab_size)
    for rule in tensor_rules(hf_config):
        parts = [_fetch("HF", hf_tensors, n) for n in rule.hf_names]
        for name, part, shape in zip(rule.hf_names, parts, _hf_shapes(s, rule)):
            _check_shape("HF", name, part, shape)
        tensor = _fuse(s, rule, parts, padded_vocab_size)
        yield rule.megatron_name, tensor


def megatron_tensor_to_hf(hf_config, megatron_name: str, tensor: torch.Tensor,
                          *, rules: Mapping[str, TensorRule] | None = None) -> list[tuple[str, torch.Tensor]]:
    """One full (TP-gathered, global layer index) megatron tensor -> its HF tensor(s); the per-tensor
    form that weight export uses. Vocab padding rows are dropped. Pass `rules` (name -> rule, from
    `tensor_rules`) to avoid rebuilding the table per call."""
    s = model_shape(hf_config)
    if rules is None:
        rules = {r.megatron_name: r for r in tensor_rules(hf_config)}
    rule = rules.get(megatron_name)
    if rule is None:
        raise ValueError(f"megatron tensor {megatron_name!r} has no HF counterpart for "
                         f"model_type={s.model_type!r}; expected one of the names from megatron_names()")
    padded = tensor.shape[0] if rule.kind == VOCAB else s.vocab_size
    if rule.kind == VOCAB:
        _check_padding(s, padded)
    _check_shape("megatron", megatron_name, tensor, _expected_shape(s, rule, padded))
    return list(zip(rule.hf_names, _split(s, rule, tensor)))


def megatron_to_hf(hf_config, megatron_tensors: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Exact inverse of `hf_to_megatron`: yields `(hf_name, tensor)`, one megatron tensor at a time.
    Tied models yield no `lm_head.weight` (HF re-ties it from the embedding on load)."""
    rules = {r.megatron_name: r for r in tensor_rules(hf_config)}
    for name in rules:
        yield from megatron_tensor_to_hf(hf_config, name, _fetch("megatron", megatron_tensors, name), rules=rules)
