"""The functional transformer layer shared by the lean decoder (lean_decode.py) and the lean training
forward (lean_forward.py): megatron's local-spec GPT layer computed from the GPTModel's own
parameters with `F.linear` / `F.rms_norm` / RoPE / `scaled_dot_product_attention`, without megatron's
module Python. Nothing is copied, so the current weights are always the ones used, and a gradient
flows into the very `nn.Parameter`s megatron's DDP hooks watch.

Per layer, with x `[b, s, H]` (megatron's TransformerLayer, local spec, dropout 0):

    h = x + W_proj · attn(RoPE(q), RoPE(k), v),   (q, k, v) = split(W_qkv · rms(x) + b_qkv)
    y = h + W_fc2 · (silu(gate) ⊙ up),            (gate, up) = split(W_fc1 · rms(h))

q/k are RMS-normed per head before RoPE when the model has qk-norm (Qwen3); scores are
`q·kᵀ/√d` with masked keys at −10000 (megatron's masked softmax); query head j attends to KV group
j // (heads/group) (megatron's repeat_interleave GQA expansion); RoPE is megatron's non-interleaved
rotation with the model's own `rotary_pos_emb` frequencies (so llama3 scaling is included); the
logits are `W_out · rms(y)` with W_out the embedding when tied.

`lean_layers_unsupported(model, dtypes)` names the first thing these layers do not compute as
megatron does (None when covered); the decoder and the training forward add their own checks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state

from megatron_rpg.megatron.optimizer_setup import bare_model

MASKED_SCORE = -10000.0  # what megatron's local masked softmax writes at a masked key


def lean_layers_unsupported(chunks, dtypes: tuple[torch.dtype, ...]) -> str | None:
    """None when the functional layers compute megatron's forward for the one model chunk in
    `chunks` with parameters of one of `dtypes`, else the reason (the first check that fails)."""
    if len(chunks) != 1:
        return f"{len(chunks)} model chunks (virtual pipeline): the lean layers run one whole model"
    if parallel_state.model_parallel_is_initialized():
        tp = parallel_state.get_tensor_model_parallel_world_size()
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        if tp != 1 or pp != 1:
            return f"tensor/pipeline parallel sizes {tp}/{pp}: the lean layers run one whole model (TP = PP = 1)"
        if parallel_state.get_context_parallel_world_size() != 1:
            return "context parallelism: the lean layers run whole sequences"
    gpt = bare_model(chunks[0])
    config = gpt.config
    dtype_names = "/".join(str(dtype).removeprefix("torch.") for dtype in dtypes)
    checks = (
        (gpt.pre_process and gpt.post_process, "the model is one pipeline stage of several"),
        (config.transformer_impl == "local", f"transformer_impl={config.transformer_impl!r} (only the local spec)"),
        (config.normalization == "RMSNorm" and not config.layernorm_zero_centered_gamma,
         f"normalization={config.normalization!r} (only RMSNorm)"),
        (config.gated_linear_unit and config.activation_func is F.silu, "the MLP is not SwiGLU"),
        (not config.add_bias_linear, "add_bias_linear=True (only the QKV bias is supported)"),
        (getattr(config, "num_moe_experts", None) in (None, 0), "a mixture-of-experts MLP"),
        (gpt.position_embedding_type == "rope" and not config.rotary_interleaved,
         f"position_embedding_type={gpt.position_embedding_type!r} (only non-interleaved RoPE)"),
        (config.softmax_scale is None and not config.apply_query_key_layer_scaling, "a custom softmax scale"),
        (getattr(config, "softmax_type", "vanilla") == "vanilla", f"softmax_type={getattr(config, 'softmax_type', None)!r}"),
        (getattr(config, "window_size", None) is None, "sliding-window attention"),
        (not config.apply_residual_connection_post_layernorm, "apply_residual_connection_post_layernorm=True"),
        (not config.fp32_residual_connection, "fp32_residual_connection=True"),
        (not getattr(config, "attention_output_gate", False), "gated attention"),
        (not getattr(config, "multi_latent_attention", False), "multi-latent attention"),
        (config.params_dtype in dtypes and not (config.bf16 or config.fp16),
         f"params_dtype={config.params_dtype} (the lean layers are verified in {dtype_names} only)"),
    )
    for ok, reason in checks:
        if not ok:
            return reason
    rotary = gpt.rotary_pos_emb
    if type(rotary).__name__ != "RotaryEmbedding" or getattr(gpt, "mrope_section", None):
        return f"rotary embedding {type(rotary).__name__} (only megatron's RotaryEmbedding)"
    if 2 * rotary.inv_freq.numel() != config.kv_channels:
        return f"RoPE over {2 * rotary.inv_freq.numel()} of {config.kv_channels} head channels (rotary_percent < 1)"
    for layer in gpt.decoder.layers:
        attention = layer.self_attention
        norms = [layer.input_layernorm, layer.pre_mlp_layernorm]
        optional = [attention.q_layernorm, attention.k_layernorm]  # IdentityOp without qk-norm
        if not all(isinstance(norm, torch.nn.RMSNorm) for norm in norms) \
                or not all(optional_norm(norm) is not False for norm in optional):
            return "a norm other than torch's RMSNorm (the local spec's)"
        if not hasattr(attention, "linear_qkv"):
            return "the attention has no fused QKV projection"
    if gpt.decoder.final_layernorm is None:
        return "no final layer norm"
    return None


class LeanLayers:
    """The functional layers of one GPTModel `gpt` (its parameters read at each call)."""

    def __init__(self, gpt):
        self.gpt = gpt
        config = gpt.config
        self.groups = config.num_query_groups or config.num_attention_heads
        self.per_group = config.num_attention_heads // self.groups
        self.head_dim = config.kv_channels
        self.scale = self.head_dim ** -0.5
        weight = gpt.embedding.word_embeddings.weight
        self.device, self.dtype = weight.device, weight.dtype
        self._rope_tables = {}

    @property
    def layers(self):
        return self.gpt.decoder.layers

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """`[b, s]` ids → `[b, s, H]` (megatron's word embedding; RoPE models have no position embedding)."""
        return F.embedding(tokens, self.gpt.embedding.word_embeddings.weight)

    def rope_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) `[length, d]` of positions 0..length−1, from megatron's own `rotary_pos_emb`
        (cached per length: they depend on the frequencies only, which are not trained)."""
        tables = self._rope_tables.get(length)
        if tables is None:
            freqs = self.gpt.rotary_pos_emb(length)[:, 0, 0].to(self.device)  # [S, d]
            tables = (torch.cos(freqs).to(self.dtype), torch.sin(freqs).to(self.dtype))
            self._rope_tables = {length: tables}
        return tables

    def qkv(self, layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """rms(x) `[b, s, H]` of one layer → (RoPE'd query `[b, heads, s, d]`, RoPE'd key and value
        `[b, groups, s, d]`); cos/sin `[s, d]` at the rows' positions."""
        attention = layer.self_attention
        batch, length = x.shape[:2]
        qkv = F.linear(x, attention.linear_qkv.weight, attention.linear_qkv.bias)
        # megatron's fused layout: per KV group, its heads/group queries, then its key, then its value
        qkv = qkv.view(batch, length, self.groups, (self.per_group + 2) * self.head_dim)
        query, key, value = qkv.split([self.per_group * self.head_dim, self.head_dim, self.head_dim], dim=-1)
        query = query.reshape(batch, length, self.groups * self.per_group, self.head_dim)  # head g·(q/g) + j
        if optional_norm(attention.q_layernorm) is not None:
            query = rms(attention.q_layernorm, query)
        if optional_norm(attention.k_layernorm) is not None:
            key = rms(attention.k_layernorm, key)
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
        return (rope(query, cos, sin).transpose(1, 2), rope(key, cos, sin).transpose(1, 2),
                value.transpose(1, 2))

    def run_layers(self, hidden, cos, sin, attention):
        """Every layer over `hidden` `[b, s, H]` (the module docstring's h and y), before the final
        norm; `attention(index, query, key, value)` → context `[b, s, heads·d]` is the caller's: the
        decoder's cache, the training forward's causal or explicit mask."""
        for index, layer in enumerate(self.layers):
            query, key, value = self.qkv(layer, rms(layer.input_layernorm, hidden), cos, sin)
            hidden = hidden + self.project(layer, attention(index, query, key, value))
            hidden = hidden + self.mlp(layer, rms(layer.pre_mlp_layernorm, hidden))
        return hidden

    def attend(self, query, key, value, *, bias=None, is_causal=False):
        """softmax(q·kᵀ/√d + bias)·v with GQA (query head j reads group j // (heads/group)) →
        `[b, s, heads·d]`. bias: additive `[b, 1, s_q, s_k]` (0 or MASKED_SCORE), or is_causal."""
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, is_causal=is_causal,
                                                 scale=self.scale, enable_gqa=self.per_group > 1)
        return context.transpose(1, 2).flatten(2)

    @staticmethod
    def project(layer, context):
        return F.linear(context, layer.self_attention.linear_proj.weight)

    @staticmethod
    def mlp(layer, x):
        gate, up = F.linear(x, layer.mlp.linear_fc1.weight).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, layer.mlp.linear_fc2.weight)

    def final_norm(self, hidden):
        return rms(self.gpt.decoder.final_layernorm, hidden)

    def output_weight(self):
        """The output layer's weight `[V, H]`: the embedding's when tied (megatron's `weight=`)."""
        gpt = self.gpt
        return gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights \
            else gpt.output_layer.weight


def optional_norm(norm):
    """The RMSNorm, None for no norm (megatron's IdentityOp or None), False for anything else."""
    if isinstance(norm, torch.nn.RMSNorm):
        return norm
    return None if norm is None or type(norm).__name__ == "IdentityOp" else False


def rms(norm, x):
    return F.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)


def rope(t, cos, sin):
    """megatron's non-interleaved RoPE: t·cos + rotate_half(t)·sin, rotate_half(x1, x2) = (−x2, x1)."""
    first, second = t.chunk(2, dim=-1)
    return t * cos + torch.cat((-second, first), dim=-1) * sin
