"""The distributed weight sync (--rollout-sync distributed) from a TP=2 × PP=2 trainer (4 gloo ranks)
straight into a REAL SGLang server on CPU (test_sglang_engine.py's .venv-sglang and stand-in).

Properties proved (a tiny tied Qwen2, 2 layers: stage 0 holds the embedding and layer 0, stage 1
layer 1 and the final norm; the server is launched from OTHER random weights of the same shape):
- the first generate's sync (a given server is brought to the trainer's weights) makes the server's
  greedy output equal the embedded engine's on the sharded model, where the server's own weights
  answered differently;
- after a training step (an RL loss's backward and an Adam step at TP=2/PP=2) the server, before the
  sync, still answers with the old weights' output (which the step changed), and after the sync with
  the embedded engine's new output, token for token;
- the bytes come from several sources: each stage's TP rank 0 sends its own stage's tensors and
  nothing else, the TP rank 1s send nothing, and the stages' bytes add up to the HF model's size;
- the per-stage export (this_stage_only) yields, over the two stages, exactly the full export's
  tensors, bit for bit, and no tensor twice.
The server is started in the test process while the ranks start and build their models (one server,
killed by process group at the end).
"""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

from tests.distributed.harness import run_on_ranks
from tests.rollout.sglang_env import STUB, require_sglang
from tests.rollout.test_sglang_engine import MAX_NEW, PROMPTS, _server_config

pytestmark = pytest.mark.distributed
FAMILY = "qwen2-tied"


def _greedy_from_client(client) -> list[list[int]]:
    """The server's own greedy answer, asked directly (no engine: no sync before it)."""
    from megatron_rpg.rollout.engine import SamplingParams
    from megatron_rpg.rollout.sglang_engine import _parse_generate, sampling_payload

    params = sampling_payload(SamplingParams(max_new_tokens=MAX_NEW, greedy=True))
    return [_parse_generate(client.post("/generate", {"input_ids": prompt, "sampling_params": params,
                                                      "return_logprob": True}))[0] for prompt in PROMPTS]


def distributed_body(rank, world_size, hf_config_path, url, launched_at):
    spawned_s = time.time() - launched_at  # the rank's process start and imports
    from megatron.core import parallel_state

    from megatron_rpg.megatron.parallel import initialize_parallel
    from megatron_rpg.rollout.embedded import EmbeddedEngine
    from megatron_rpg.rollout.engine import SamplingParams
    from megatron_rpg.rollout.sglang_engine import SGLangEngine
    from megatron_rpg.rollout.weight_export import export_hf_tensors
    from megatron_rpg.training.build import build_model_and_optimizer
    from megatron_rpg.training.config import parse_train_config
    from tests.rollout.test_weight_export import _take_an_optimizer_step

    torch.set_num_threads(1)
    initialize_parallel(2, 2, seed=0)
    config = parse_train_config(["--hf-config", hf_config_path, "--lr", "0.05", "--seed", "0", "--no-progress",
                                 "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"])
    model, optimizer, hf_config = build_model_and_optimizer(config)
    out = {"spawned_s": spawned_s, "built_s": time.time() - launched_at, "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
           "pp_rank": parallel_state.get_pipeline_model_parallel_rank()}
    full = {name: t.clone() for name, t in export_hf_tensors(model, hf_config)}
    own = [(name, t.clone()) for name, t in export_hf_tensors(model, hf_config, this_stage_only=True)]
    out["export"] = (full, own) if out["tp_rank"] == 0 else None

    sglang = SGLangEngine(_server_config(urls=(url,), sync="distributed"), model, hf_config)
    if rank == 0:  # the server started while the ranks built their models
        sglang_client(url).wait_healthy(300.0)
        out["healthy_s"] = time.time() - launched_at
        out["server_own"] = _greedy_from_client(sglang_client(url))
    embedded = EmbeddedEngine(model, vocab_size=hf_config.vocab_size)
    greedy = SamplingParams(max_new_tokens=MAX_NEW, greedy=True)
    try:
        out["first"] = (sglang.generate(PROMPTS, greedy).responses(), embedded.generate(PROMPTS, greedy).responses())
        out["first_sent"] = sglang._syncer.sent_by_this_rank
        _take_an_optimizer_step(model, optimizer, config, dp_rank=0)
        out["stale"] = sglang.generate(PROMPTS, greedy).responses()
        out["metrics"] = sglang.update_weights()
        out["first_sync_s"] = sglang.start_s
        out["sent"] = sglang._syncer.sent_by_this_rank
        out["after"] = (sglang.generate(PROMPTS, greedy).responses(), embedded.generate(PROMPTS, greedy).responses())
    finally:
        sglang.close()
    out["done_s"] = time.time() - launched_at
    return out


def sglang_client(url):
    from megatron_rpg.rollout.sglang_server import SGLangClient

    return SGLangClient(url, timeout_s=120.0)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    require_sglang()
    from megatron_rpg.rollout.sglang_server import free_port, launch_server
    from tests.tiny_models import tiny_hf_config, tiny_hf_model

    root = tmp_path_factory.mktemp("sglang_distributed")
    server_dir = str(root / "server-hf")
    server_model = tiny_hf_model(FAMILY, seed=1)  # other weights than the trainer's random init
    server_model.save_pretrained(server_dir)
    hf_config_path = str(root / "trainer.json")
    trainer_config = tiny_hf_config(FAMILY).to_dict()
    for key in ("dtype", "torch_dtype"):
        trainer_config.pop(key, None)
    with open(hf_config_path, "w") as f:
        json.dump(trainer_config, f)
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = STUB + (os.pathsep + saved if saved else "")
    launched_at = time.time()
    try:
        server = launch_server(_server_config(), server_dir, free_port(), str(root / "server.log"))
    finally:
        os.environ.pop("PYTHONPATH")
        if saved is not None:
            os.environ["PYTHONPATH"] = saved
    try:
        results = run_on_ranks(distributed_body, world_size=4, args=(hf_config_path, server.url, launched_at),
                               timeout_s=600)
    except Exception as error:
        raise RuntimeError(f"server alive: {server.alive()}; its log ends:\n{server.log_tail()}") from error
    finally:
        server.stop()
    model_bytes = sum(p.numel() * p.element_size() for p in server_model.parameters())  # tied: counted once
    return results, model_bytes, server


def test_first_sync_brings_a_given_server_to_the_trainers_weights(ranks):
    results, _, _ = ranks
    server, embedded = results[0]["first"]
    assert results[0]["server_own"] != embedded  # the server's own weights answer differently
    assert server == embedded
    assert all(r["first"] == results[0]["first"] for r in results)  # every rank got the same rollout


def test_sync_after_a_training_step_at_tp2_pp2(ranks):
    results, _, _ = ranks
    _, before_step = results[0]["first"]
    server, embedded = results[0]["after"]
    assert embedded != before_step  # the step changed the greedy output
    assert results[0]["stale"] == before_step  # without a sync the server keeps the old weights
    assert server == embedded
    assert results[0]["metrics"]["sync_s"] > 0


def test_each_stage_sends_its_own_tensors_from_its_tp_rank_0(ranks):
    results, model_bytes, _ = ranks
    for key in ("first_sent", "sent"):
        by_stage = {r["pp_rank"]: r[key] for r in results if r["tp_rank"] == 0}
        assert sorted(by_stage) == [0, 1] and all(sent > 0 for sent in by_stage.values())
        assert all(r[key] == 0 for r in results if r["tp_rank"] == 1)
        assert sum(by_stage.values()) == model_bytes
    assert all(r["metrics"]["sync_bytes"] == model_bytes for r in results)


def test_stage_exports_add_up_to_the_full_export_bit_for_bit(ranks):
    results, _, _ = ranks
    sources = [r for r in results if r["tp_rank"] == 0]
    names = [name for r in sources for name, _ in r["export"][1]]
    assert len(names) == len(set(names))
    for r in sources:
        full, _ = r["export"]
        assert set(names) == set(full)
        for other in sources:
            for name, tensor in other["export"][1]:
                assert torch.equal(tensor, full[name]), name
    assert "lm_head.weight" not in names  # tied: the last stage's copy of the embedding stays home


def test_server_is_stopped(ranks):
    _, _, server = ranks
    assert not server.alive()


def test_figures_are_measured(ranks):
    """Shown with pytest -rP: where the module's time goes, and the sync's time at TP=2/PP=2."""
    results, model_bytes, _ = ranks
    first = results[0]
    assert first["built_s"] > 0 and first["metrics"]["sync_s"] > 0
    print(f"seconds after the server's launch, rank 0: body started {first['spawned_s']:.1f}, model built "
          f"{first['built_s']:.1f}, server healthy {first['healthy_s']:.1f}, done {first['done_s']:.1f}; engine "
          f"start incl. the first sync {first['first_sync_s']:.2f} s; sync after the step "
          f"{first['metrics']['sync_s']:.3f} s for {model_bytes / 1e3:.0f} kB")
