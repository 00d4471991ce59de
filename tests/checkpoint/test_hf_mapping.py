"""Properties of the HF <-> megatron name/tensor table (pure tensors, no megatron runtime)."""
import pytest
import torch
import transformers

from megatron_rpg.checkpoint import hf_mapping

TINY = dict(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
CONFIGS = {
    "qwen2": lambda: transformers.Qwen2Config(**TINY, tie_word_embeddings=False),
    "qwen2-tied": lambda: transformers.Qwen2Config(**TINY, tie_word_embeddings=True),
    "llama3": lambda: transformers.LlamaConfig(**TINY),
    "qwen3": lambda: transformers.Qwen3Config(**TINY, head_dim=16),
}


def random_hf_state(config, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    # random (not init-default) norms and biases so a swapped or dropped tensor cannot go unnoticed
    return {n: torch.randn_like(t) for n, t in model.state_dict().items() if n in hf_mapping.hf_names(config)}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_round_trip_is_bit_exact_and_covers_every_hf_tensor(family):
    config = CONFIGS[family]()
    hf = random_hf_state(config)
    assert set(hf) == set(hf_mapping.hf_names(config))
    megatron = dict(hf_mapping.hf_to_megatron(config, hf, padded_vocab_size=256))
    assert list(megatron) == hf_mapping.megatron_names(config)
    assert megatron["embedding.word_embeddings.weight"].shape[0] == 256
    assert torch.count_nonzero(megatron["embedding.word_embeddings.weight"][200:]) == 0
    back = dict(hf_mapping.megatron_to_hf(config, megatron))
    assert set(back) == set(hf)
    for name, tensor in hf.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_fused_qkv_holds_whole_query_groups_so_a_tp_split_gives_each_rank_its_own_kv_heads():
    config = CONFIGS["llama3"]()  # 4 query heads, 2 kv heads, head dim 8
    n, g, d, h = 4, 2, 8, 32
    # each row is tagged with (kind, head): q head i -> 100+i, k head j -> 200+j, v head j -> 300+j
    tag = lambda base, heads: (base + torch.arange(heads)).repeat_interleave(d)[:, None].expand(-1, h).float()
    hf = random_hf_state(config)
    prefix = "model.layers.0.self_attn."
    hf[prefix + "q_proj.weight"], hf[prefix + "k_proj.weight"], hf[prefix + "v_proj.weight"] = \
        tag(100, n), tag(200, g), tag(300, g)
    fused = dict(hf_mapping.hf_to_megatron(config, hf, padded_vocab_size=200))[
        "decoder.layers.0.self_attention.linear_qkv.weight"]
    heads = fused[::d, 0].tolist()
    assert heads == [100, 101, 200, 300, 102, 103, 201, 301]  # [q of group j, k_j, v_j] per group
    # TP=2 splits dim 0 in halves: rank r holds query heads 2r, 2r+1 and kv head r
    assert fused.chunk(2)[1][::d, 0].tolist() == [102, 103, 201, 301]


def test_unsupported_model_type_is_named_with_the_supported_ones():
    config = transformers.MistralConfig(**TINY)
    with pytest.raises(ValueError, match=r"model_type='mistral'.*\['qwen2', 'llama', 'qwen3'\]"):
        hf_mapping.model_shape(config)


def test_missing_or_misshapen_hf_tensor_is_named():
    config = CONFIGS["qwen2"]()
    hf = random_hf_state(config)
    del hf["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        list(hf_mapping.hf_to_megatron(config, hf, padded_vocab_size=256))
    hf = random_hf_state(config)
    hf["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    with pytest.raises(ValueError, match=r"k_proj.weight.*\(8, 32\).*\(16, 32\)"):
        list(hf_mapping.hf_to_megatron(config, hf, padded_vocab_size=256))
    with pytest.raises(ValueError, match="padded_vocab_size=128"):
        list(hf_mapping.hf_to_megatron(config, hf, padded_vocab_size=128))


@pytest.mark.parametrize("option, value", [("mlp_bias", True), ("use_sliding_window", True), ("hidden_act", "gelu")])
def test_options_the_megatron_model_cannot_express_are_rejected_by_name(option, value):
    config = CONFIGS["llama3"]() if option == "mlp_bias" else CONFIGS["qwen2"]()
    setattr(config, option, value)
    with pytest.raises(ValueError, match=f"{option}={value!r}"):
        hf_mapping.model_shape(config)


# configs megatron_rpg.megatron.models refuses to build; the table must refuse exactly these, alike
CONFIGS_THE_MODEL_BUILDER_REJECTS = {
    "yarn rope": lambda: transformers.Qwen2Config(**TINY, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 32}),
    "partial rotary": lambda: transformers.LlamaConfig(**TINY, partial_rotary_factor=0.5),
    "partial rotary, old config.json": lambda: dict(CONFIGS["llama3"]().to_dict(), partial_rotary_factor=0.5),
    "sliding-window layers": lambda: dict(CONFIGS["qwen3"]().to_dict(),
                                          layer_types=["full_attention", "sliding_attention"]),
    "mlp bias": lambda: transformers.LlamaConfig(**TINY, mlp_bias=True),
    "gelu": lambda: transformers.Qwen2Config(**TINY, hidden_act="gelu"),
    "mistral": lambda: transformers.MistralConfig(**TINY),
    "3 kv heads for 4 heads": lambda: dict(CONFIGS["qwen2"]().to_dict(), num_key_value_heads=3),
}


def _rejection(function, config) -> str:
    with pytest.raises(ValueError) as error:
        function(config)
    return str(error.value)


@pytest.mark.parametrize("case", sorted(CONFIGS_THE_MODEL_BUILDER_REJECTS))
def test_the_table_rejects_what_the_model_builder_rejects_with_the_same_message(case):
    from megatron_rpg.megatron.models import transformer_config_from_hf

    config = CONFIGS_THE_MODEL_BUILDER_REJECTS[case]()
    builder_message = _rejection(lambda c: transformer_config_from_hf(c, tensor_model_parallel_size=1,
                                                                      pipeline_model_parallel_size=1), config)
    assert _rejection(hf_mapping.model_shape, config) == builder_message


def test_partial_rotary_factor_is_rejected_where_transformers_5_keeps_it():
    config = transformers.LlamaConfig(**TINY, partial_rotary_factor=0.5)
    assert config.rope_parameters["partial_rotary_factor"] == 0.5  # not a top-level attribute any more
    with pytest.raises(ValueError, match=r"partial_rotary_factor=0.5 is not supported"):
        hf_mapping.model_shape(config)
