"""A megatron-core `GPTModel` from a Hugging Face config: Qwen2/Qwen2.5, Llama 3, Qwen3.

    initialize_parallel(tensor_model_parallel_size=2)
    model = build_gpt_model(hf_config)                                  # local spec (CPU, tests)
    model = build_gpt_model(hf_config, use_te=True, fp8="hybrid", fp8_recipe="delayed",
                            params_dtype=torch.bfloat16)                # Transformer Engine on GPU

What is mapped (HF -> TransformerConfig / GPTModel):
    num_hidden_layers, hidden_size, intermediate_size, num_attention_heads -> same meaning
    num_key_value_heads -> num_query_groups;  head_dim (or hidden/heads) -> kv_channels
    rms_norm_eps -> RMSNorm layernorm_epsilon;  hidden_act "silu" -> SwiGLU (gated_linear_unit)
    Qwen2 q/k/v bias -> add_qkv_bias;  Qwen3 q_norm/k_norm -> qk_layernorm
    rope_theta -> rotary_base;  rope_type "llama3" (factor, low/high_freq_factor,
        original_max_position_embeddings) -> RoPE inverse frequencies scaled exactly as HF does
    tie_word_embeddings -> share_embeddings_and_output_weights
    vocab_size -> padded to a multiple of 128 x TP (padded rows are never real tokens)
Dropout is 0 (RL log-probs must be deterministic). Exactness: at TP=1 in float32 the logits equal
the HF model's up to kernel rounding (tests: max abs diff <= 1e-5 on tiny models).

The trainer's flags reuse FP8_FORMATS / FP8_RECIPES (`--fp8-format`, `--fp8-recipe`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig

from megatron_rpg.losses.validation import check_choice
from megatron_rpg.megatron.parallel import training_device
from megatron_rpg.megatron.compat import scale_rope_frequencies

SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "qwen3")
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
# Minimum (GPU compute capability, Transformer Engine version) per recipe: FP8 GEMMs need Ada/Hopper
# (sm89+); MXFP8 needs Blackwell (sm100); TE versions as required by megatron's fp8_utils.get_fp8_recipe.
_FP8_RECIPE_NEEDS = {
    "delayed": ((8, 9), "2.1.0"),
    "tensorwise": ((8, 9), "2.2.0.dev0"),
    "blockwise": ((9, 0), "2.3.0.dev0"),
    "mxfp8": ((10, 0), "2.1.0"),
}
_TRANSFORMER_CONFIG_FIELDS = {f.name for f in dataclasses.fields(TransformerConfig)}


def _reader(hf_config):
    """`get(key, default)` over an HF config object or a config.json dict."""
    if isinstance(hf_config, Mapping):
        return lambda key, default=None: hf_config.get(key, default)
    return lambda key, default=None: getattr(hf_config, key, default)


def rope_settings(hf_config) -> dict:
    """RoPE base and scaling of an HF config: {"rotary_base", "scaling": None | llama3 parameters}.

    Reads transformers>=5 `rope_parameters` or the older `rope_theta` + `rope_scaling`.
    """
    get = _reader(hf_config)
    params = dict(get("rope_parameters") or get("rope_scaling") or {})
    theta = params.get("rope_theta", get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    # transformers>=5 keeps partial_rotary_factor in rope_parameters; older configs at the top level
    partial = params.get("partial_rotary_factor", get("partial_rotary_factor"))
    if partial is not None and partial != 1.0:
        raise ValueError(f"partial_rotary_factor={partial} is not supported; megatron's GPTModel here "
                         f"rotates the whole head (1.0); use a model with full rotary embeddings")
    if rope_type == "default":
        return {"rotary_base": float(theta), "scaling": None}
    if rope_type != "llama3":
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: 'default' and "
                         f"'llama3' (megatron-core's GPTModel RoPE scaling)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in params]
    if missing:
        raise ValueError(f"llama3 rope scaling is missing {missing}; a Llama 3.x config carries all "
                         f"of {list(keys)}")
    return {"rotary_base": float(theta), "scaling": {k: params[k] for k in keys}}


def _check_architecture(get) -> str:
    model_type = get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not supported; supported model types: "
                         f"{list(SUPPORTED_MODEL_TYPES)} (Qwen2/Qwen2.5, Llama 3, Qwen3)")
    if get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={get('hidden_act')!r} is not supported; only 'silu' (SwiGLU)")
    # Qwen2's q/k/v bias is implicit; an explicit attention_bias would also bias o_proj.
    unsupported = ["mlp_bias"] + (["attention_bias"] if model_type != "qwen2" else [])
    unsupported += ["use_sliding_window"]
    for option in unsupported:
        if get(option, False):
            raise ValueError(f"{option}=True is not supported for model_type={model_type!r}: megatron's "
                             f"GPTModel (local/TE spec) cannot express it; use a model without it")
    other_layers = sorted(set(get("layer_types") or ()) - {"full_attention"})
    if other_layers:
        raise ValueError(f"layer_types {other_layers} are not supported; only 'full_attention' layers "
                         f"(no sliding-window attention)")
    heads = get("num_attention_heads")
    kv_heads = get("num_key_value_heads") or heads
    if isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads:
        raise ValueError(f"num_key_value_heads={kv_heads} does not divide num_attention_heads={heads}; "
                         f"the config is not a valid grouped-query attention layout")
    return model_type


def check_supported_hf_config(hf_config) -> None:
    """ValueError for any HF config (object or config.json dict) that `transformer_config_from_hf` /
    `build_gpt_model` would reject on the config alone (TP/PP checks aside), without building anything.
    The checkpoint converter calls this too, so both reject the same configs with the same message."""
    _check_architecture(_reader(hf_config))
    rope_settings(hf_config)


def _parallel_sizes(overrides: dict) -> tuple[int, int]:
    """TP and PP: explicit overrides win, else megatron's parallel state, else 1."""
    initialized = parallel_state.model_parallel_is_initialized()
    tp = overrides.get("tensor_model_parallel_size",
                       parallel_state.get_tensor_model_parallel_world_size() if initialized else 1)
    pp = overrides.get("pipeline_model_parallel_size",
                       parallel_state.get_pipeline_model_parallel_world_size() if initialized else 1)
    return tp, pp


def _check_fp8_values(fp8, fp8_recipe) -> None:
    if fp8 is not None:
        check_choice("fp8", fp8, FP8_FORMATS)
    if fp8_recipe is not None:
        check_choice("fp8_recipe", fp8_recipe, FP8_RECIPES)
        if fp8 is None:
            raise ValueError(f"fp8_recipe={fp8_recipe!r} was given without fp8; set fp8 (--fp8-format) "
                             f"to one of {list(FP8_FORMATS)} or drop the recipe")


def transformer_config_from_hf(hf_config, *, params_dtype: torch.dtype = torch.float32, fp8=None,
                               fp8_recipe=None, use_te: bool = False, **overrides) -> TransformerConfig:
    """The TransformerConfig of an HF Qwen2/Llama 3/Qwen3 config; `overrides` set any other field."""
    get = _reader(hf_config)
    _check_architecture(get)
    _check_fp8_values(fp8, fp8_recipe)
    unknown = sorted(set(overrides) - _TRANSFORMER_CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"unknown TransformerConfig fields in overrides: {unknown}")
    heads = get("num_attention_heads")
    kv_heads = get("num_key_value_heads") or heads
    tp, pp = _parallel_sizes(overrides)
    if heads % tp or kv_heads % tp:
        raise ValueError(f"tensor_model_parallel_size={tp} must divide num_attention_heads={heads} and "
                         f"num_key_value_heads={kv_heads}; choose a TP size that divides both")
    rope_settings(hf_config)  # validates the RoPE type before anything is built
    settings = dict(
        num_layers=get("num_hidden_layers"),
        hidden_size=get("hidden_size"),
        ffn_hidden_size=get("intermediate_size"),
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        kv_channels=get("head_dim") or get("hidden_size") // heads,
        normalization="RMSNorm",
        layernorm_epsilon=get("rms_norm_eps"),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=get("model_type") == "qwen2",
        qk_layernorm=get("model_type") == "qwen3",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=get("initializer_range", 0.02),
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        use_cpu_initialization=True,  # build_gpt_model initialises on the GPU when training on one
        transformer_impl="transformer_engine" if use_te else "local",
        cuda_graph_scope=[],  # megatron 0.16.1's default "full" is deprecated (a warning per config); [] is the same
    )
    if fp8 is not None:
        settings.update(fp8=fp8, fp8_recipe=fp8_recipe or "delayed")
    settings.update(overrides)
    return TransformerConfig(**settings)


def padded_vocab_size(vocab_size: int, tensor_model_parallel_size: int, multiple: int = 128) -> int:
    """Smallest multiple of `multiple * tensor_model_parallel_size` that is >= vocab_size.

    Like Megatron-LM's --make-vocab-size-divisible-by: every TP rank gets an equal, aligned slice.
    """
    for name, value in (("vocab_size", vocab_size), ("tensor_model_parallel_size", tensor_model_parallel_size),
                        ("multiple", multiple)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    step = multiple * tensor_model_parallel_size
    return -(-vocab_size // step) * step


def check_transformer_engine_ready(*, use_te: bool, fp8=None, fp8_recipe=None) -> None:
    """RuntimeError naming the flag and what is missing when TE or FP8 cannot run here."""
    _check_fp8_values(fp8, fp8_recipe)
    if not use_te and fp8 is None:
        return
    flag = f"fp8={fp8!r} (--fp8-format)" if fp8 is not None else "use_te=True"
    if fp8 is not None and not use_te:
        raise ValueError(f"{flag} needs use_te=True: FP8 runs only through Transformer Engine layers")
    if not torch.cuda.is_available():
        raise RuntimeError(f"{flag} needs a CUDA GPU with Transformer Engine; none is available here. "
                           f"On CPU build with use_te=False and without fp8.")
    try:
        import transformer_engine  # noqa: F401
    except ImportError as error:
        raise RuntimeError(f"{flag} needs Transformer Engine (pip install transformer-engine[pytorch]) "
                           f"but it cannot be imported: {error}") from error
    if fp8 is None:
        return
    from megatron.core.utils import is_te_min_version

    recipe = fp8_recipe or "delayed"
    capability, te_version = _FP8_RECIPE_NEEDS[recipe]
    found = torch.cuda.get_device_capability()
    if tuple(found) < capability:
        raise RuntimeError(f"{flag} with fp8_recipe={recipe!r} needs a GPU of compute capability >= "
                           f"{capability[0]}.{capability[1]}; this GPU is {found[0]}.{found[1]}")
    if not is_te_min_version(te_version):
        raise RuntimeError(f"{flag} with fp8_recipe={recipe!r} needs Transformer Engine >= {te_version}")


def _apply_llama3_rope_scaling(model: GPTModel, scaling: dict) -> None:
    """Scale the RoPE inverse frequencies with the config's own llama3 parameters.

    megatron's GPTModel(rope_scaling=True) fixes low/high_freq_factor=1/4 and
    original_max_position_embeddings=8192; Llama 3.2 and small test configs differ, so the unscaled
    frequencies are rescaled here through megatron's own scaling with every parameter.
    """
    scale_rope_frequencies(model, factor=scaling["factor"], low_freq_factor=scaling["low_freq_factor"],
                           high_freq_factor=scaling["high_freq_factor"],
                           original_max_position_embeddings=scaling["original_max_position_embeddings"])


def build_gpt_model(hf_config, *, use_te: bool = False, fp8=None, fp8_recipe=None, pre_process=None,
                    post_process=None, **config_overrides) -> GPTModel:
    """A GPTModel for this pipeline stage (`initialize_parallel` first), random weights, eval-ready.

    pre_process/post_process default to "this is the first/last pipeline stage". The vocabulary is
    padded with `padded_vocab_size(vocab, TP)`; logits come back vocab-parallel [b, s, padded/TP].
    """
    check_transformer_engine_ready(use_te=use_te, fp8=fp8, fp8_recipe=fp8_recipe)
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("build_gpt_model() needs megatron's parallel state: call "
                           "megatron_rpg.megatron.parallel.initialize_parallel() first")
    # On CPU there is no device to initialise on; on GPU, device init is much faster.
    config_overrides.setdefault("use_cpu_initialization", training_device().type == "cpu")
    config = transformer_config_from_hf(hf_config, fp8=fp8, fp8_recipe=fp8_recipe, use_te=use_te,
                                        **config_overrides)
    get = _reader(hf_config)
    rope = rope_settings(hf_config)
    qk_layernorm = config.qk_layernorm
    if use_te:
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    model = GPTModel(
        config, spec,
        vocab_size=padded_vocab_size(get("vocab_size"), config.tensor_model_parallel_size),
        max_sequence_length=get("max_position_embeddings"),
        pre_process=parallel_state.is_pipeline_first_stage() if pre_process is None else pre_process,
        post_process=parallel_state.is_pipeline_last_stage() if post_process is None else post_process,
        share_embeddings_and_output_weights=bool(get("tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_base=rope["rotary_base"],
    )
    if rope["scaling"] is not None:
        _apply_llama3_rope_scaling(model, rope["scaling"])
    # read by forward_backward.py: logits of padded ids (>= this) are excluded from the softmax
    model.unpadded_vocab_size = int(get("vocab_size"))
    return model
