"""tp_layout: splitting a full tensor over TP ranks and gathering it back is exact for every tensor of
every family, and fc1's gather is not a plain concatenation (the real-model check against megatron's
own TP=2 shards is in test_load_converted.py)."""
import pytest
import torch

from megatron_rpg.checkpoint import hf_mapping
from megatron_rpg.checkpoint.tp_layout import full_from_tp_shards, tp_shard, tp_split_dim
from tests.tiny_models import FAMILIES, tiny_hf_config, tiny_hf_model


@pytest.mark.parametrize("family", FAMILIES)
def test_split_then_gather_is_exact_for_every_tensor(family):
    model = tiny_hf_model(family)
    full = dict(hf_mapping.hf_to_megatron(model.config, model.state_dict(), padded_vocab_size=256))
    for name, tensor in full.items():
        for size in (1, 2):
            shards = [tp_shard(name, tensor, rank, size) for rank in range(size)]
            assert torch.equal(full_from_tp_shards(name, shards), tensor), (name, size)


def test_fc1_shards_hold_matching_gate_and_up_rows():
    name = "decoder.layers.0.mlp.linear_fc1.weight"
    full = torch.arange(8.0)[:, None]  # gate rows 0..3, up rows 4..7
    assert [tp_shard(name, full, r, 2).flatten().tolist() for r in (0, 1)] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert not torch.equal(torch.cat([tp_shard(name, full, r, 2) for r in (0, 1)]), full)


def test_every_megatron_tensor_has_a_layout_and_unknown_names_are_rejected():
    layouts = {name: tp_split_dim(name) for name in hf_mapping.megatron_names(tiny_hf_config("qwen3"))}
    assert layouts["decoder.layers.1.self_attention.linear_proj.weight"] == 1
    assert layouts["decoder.layers.1.self_attention.q_layernorm.weight"] is None
    assert layouts["output_layer.weight"] == 0
    with pytest.raises(ValueError, match="'decoder.layers.0.mlp.router.weight' has no known tensor-parallel"):
        tp_split_dim("decoder.layers.0.mlp.router.weight")
