"""rollout/weight_export.py: the live model's TP/PP shards → HF-named full tensors in buckets.

Proved: at TP=2, PP=2 and DP=2 (distributed optimizer), for a tied (Qwen2) and an untied model
(Llama 3), every rank exports exactly the tensors that tools/convert_megatron_to_hf.py writes for a
checkpoint of the same weights (after an optimizer step), bit for bit; the embedding goes out once;
buckets hold one dtype and stay within the byte budget unless a single tensor exceeds it.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.distributed.harness import run_on_ranks
from tests.tiny_models import tiny_hf_config

pytestmark = pytest.mark.distributed
LAYOUTS = {"tp2": (2, 1, []), "pp2": (1, 2, []), "dp2": (1, 1, ["--use-distributed-optimizer"])}
FAMILIES = {"qwen2": True, "llama3": False}  # tied, untied embeddings
BUCKET_BYTES = 40_000  # several buckets for the tiny models (their largest tensor is ~66 kB)


def _hf_config_file(workdir: str, family: str, **overrides) -> str:
    path = os.path.join(workdir, f"{family}.json")
    config = tiny_hf_config(family, num_hidden_layers=2, **overrides).to_dict()
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    with open(path, "w") as f:
        json.dump(config, f)
    return path


def _take_an_optimizer_step(model, optimizer, config, dp_rank: int) -> None:
    """One RL step on random sequences, so the weights are a trained model's, not a checkpoint's."""
    from megatron_rpg.losses import build_policy_loss
    from megatron_rpg.megatron.forward_backward import compute_logprobs, rl_forward_backward

    generator = torch.Generator().manual_seed(3 + dp_rank)
    tokens = torch.randint(0, 100, (4, 12), generator=generator)
    mask = torch.zeros(4, 12)
    mask[:, 3:10] = 1.0
    batch = {"tokens": tokens, "loss_mask": mask, "advantages": torch.randn(4, generator=generator)}
    batch["old_logp"] = compute_logprobs(model, [batch])[0]
    rl_forward_backward(model, [batch], build_policy_loss(config.loss))
    optimizer.step()


def export_body(rank, world_size, workdir, families):
    from megatron.core import parallel_state

    from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_rpg.rollout.weight_export import export_hf_buckets
    from megatron_rpg.training.build import build_model_and_optimizer
    from megatron_rpg.training.checkpointing import save_checkpoint
    from megatron_rpg.training.config import parse_train_config

    torch.set_num_threads(1)
    out = {}
    for family in families:
        for name, (tp, pp, extra) in LAYOUTS.items():
            initialize_parallel(tp, pp, seed=0)
            save = os.path.join(workdir, f"{family}-{name}")
            config = parse_train_config(["--hf-config", os.path.join(workdir, f"{family}.json"), "--save", save, "--lr", "0.01",
                                         "--tensor-model-parallel-size", str(tp),
                                         "--pipeline-model-parallel-size", str(pp), *extra])
            model, optimizer, hf_config = build_model_and_optimizer(config)
            _take_an_optimizer_step(model, optimizer, config, parallel_state.get_data_parallel_rank())
            save_checkpoint(model, optimizer, None, hf_config, config, step=0, rank_state={})
            buckets = list(export_hf_buckets(model, hf_config, bucket_bytes=BUCKET_BYTES))
            out[(family, name)] = [(b.dtype, b.nbytes, [(n, t.clone()) for n, t in b.named_tensors]) for b in buckets]
            destroy_parallel()
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("export"))
    for family, tied in FAMILIES.items():
        _hf_config_file(workdir, family, tie_word_embeddings=tied)
    return workdir, run_on_ranks(export_body, world_size=2, args=(workdir, list(FAMILIES)))


def _converted(workdir: str, family: str, layout: str) -> dict:
    from safetensors.torch import load_file

    from megatron_rpg.checkpoint.convert import megatron_to_hf_checkpoint

    out = os.path.join(workdir, f"{family}-{layout}-hf")
    if not os.path.isdir(out):
        megatron_to_hf_checkpoint(os.path.join(workdir, f"{family}-{layout}"), out, progress=False)
    tensors = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(out, name)))
    return tensors


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_every_rank_exports_the_converters_tensors_bit_for_bit(exported, family, layout):
    workdir, ranks = exported
    want = _converted(workdir, family, layout)
    assert ("lm_head.weight" in want) == (not FAMILIES[family])
    for rank in (0, 1):
        names = [name for _, _, tensors in ranks[rank][(family, layout)] for name, _ in tensors]
        assert len(names) == len(set(names)), "a tensor was exported twice"
        got = {name: tensor for _, _, tensors in ranks[rank][(family, layout)] for name, tensor in tensors}
        assert got.keys() == want.keys()
        for name, tensor in want.items():
            assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), (rank, name)


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_buckets_hold_one_dtype_within_the_byte_budget(exported, family):
    _, ranks = exported
    buckets = ranks[0][(family, "tp2")]
    assert len(buckets) > 1
    for dtype, nbytes, tensors in buckets:
        assert all(t.dtype == dtype for _, t in tensors)
        assert nbytes == sum(t.numel() * t.element_size() for _, t in tensors)
        assert nbytes <= BUCKET_BYTES or len(tensors) == 1
