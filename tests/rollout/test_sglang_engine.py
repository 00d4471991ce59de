"""The SGLang rollout engine against a REAL SGLang server on CPU (tools/setup_sglang_cpu.sh's
.venv-sglang; the server runs with the import stand-in tests/sglang_stub first on its PYTHONPATH).

Properties proved (a tiny random Qwen2 HF folder built here, converted with tools/convert_hf_to_megatron.py):
- the server we launch (our launcher) answers greedy requests with exactly the embedded engine's
  tokens for the same weights, token for token;
- SGLang's log-probs of the tokens it sampled (temperature 1 and 0.7) equal the trainer's
  compute_logprobs within tests/float_bounds.py's bound: 4 × the float32 trainer's measured
  rounding against the same log-probs in float64 (HF float64 model of the same weights); SGLang
  runs float32 on CPU (--dtype float32);
- after a weight change (a perturbation of every parameter, then an optimizer step), each sync mode
  (disk, colocated, distributed over gloo between torch 2.13 and SGLang's torch 2.14.1) makes the
  server's greedy output equal the embedded engine's with the new weights, where the old weights'
  output differs (so a sync that did nothing fails);
- a 3-step RPG run with --rollout-engine sglang (--rollout-sync colocated) completes with sync metrics
  and an engine/trainer log-prob gap at float rounding each step, although the policy moves;
- a server asked to listen beyond loopback without an API key is refused by our launcher before
  anything is launched.
Machine sharing: one server at a time (the module's spawned run holds one; the RPG run starts its own
after it), always stopped by process-group kill; --max-total-tokens small.
Environment and skip rules: tests/rollout/sglang_env.py (the whole suite installs SGLang while it runs).
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.distributed.harness import run_on_ranks
from tests.rollout.sglang_env import SGLANG_PYTHON, STUB, require_sglang

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVER_ARGS = "--dtype float32 --disable-cuda-graph --disable-radix-cache --random-seed 0"
MAX_TOTAL_TOKENS = 2048
PROMPTS = [[5, 17, 42], [7], [99, 3, 120, 8], [11, 12, 13], [200], [31, 32]]
MAX_NEW = 8

pytestmark = pytest.mark.distributed


def _server_config(**overrides):
    from megatron_rpg.rollout.sglang_engine import SGLangConfig

    return SGLangConfig(python=SGLANG_PYTHON, device="cpu", max_total_tokens=MAX_TOTAL_TOKENS,
                        extra_args=SERVER_ARGS, start_timeout_s=300.0, request_timeout_s=120.0, **overrides)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    require_sglang()
    from tests.tiny_models import tiny_hf_model

    root = tmp_path_factory.mktemp("sglang_model")
    hf_dir, ckpt = str(root / "hf"), str(root / "megatron")
    tiny_hf_model("qwen2", seed=0).save_pretrained(hf_dir)
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_hf_to_megatron.py"), "--hf-dir", hf_dir,
                    "--output", ckpt, "--no-progress"], check=True, env=dict(os.environ, PYTHONPATH=REPO))
    return hf_dir, ckpt, str(root)


@pytest.fixture(scope="module")
def server_env():
    """The server's PYTHONPATH gets the sgl_kernel stand-in (inherited by the launched process)."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = STUB + (os.pathsep + saved if saved else "")
    yield
    if saved is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = saved


def _logprobs64(hf_dir: str, rollout, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of the rollout's tokens from the HF model of the same weights in float64."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64).eval()
    out = torch.zeros(rollout.tokens.shape, dtype=torch.float64)
    with torch.no_grad():
        for row in range(len(rollout.tokens)):
            n = int(rollout.prompt_lengths[row] + rollout.response_lengths[row])
            ids = rollout.tokens[row:row + 1, :n]
            logp = torch.log_softmax(hf(ids).logits[0, :-1] / temperature, dim=-1)
            out[row, 1:n] = logp.gather(1, ids[0, 1:, None])[:, 0]
    return out * rollout.loss_mask


def _trainer_logprobs(model, rollout, temperature: float) -> torch.Tensor:
    from megatron_rpg.megatron.forward_backward import compute_logprobs

    batch = {"tokens": rollout.tokens, "loss_mask": rollout.loss_mask}
    return compute_logprobs(model, [batch], temperature=temperature)[0].cpu() * rollout.loss_mask


def _perturb_and_step(model, optimizer, seed: int) -> None:
    """Every parameter moves by noise, then one Adam step on a random gradient."""
    from megatron_rpg.megatron.optimizer_setup import bare_model

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in bare_model(model[0]).parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
            param.main_grad.copy_(torch.randn(param.shape, generator=generator))
    optimizer.step()


def engine_body(rank, world_size, hf_dir, ckpt, work_dir):
    from megatron_rpg.megatron.parallel import initialize_parallel
    from megatron_rpg.rollout.embedded import EmbeddedEngine
    from megatron_rpg.rollout.engine import SamplingParams
    from megatron_rpg.rollout.sglang_engine import SGLangEngine
    from megatron_rpg.rollout.sglang_sync import write_hf_folder
    from megatron_rpg.training.build import build_model_and_optimizer, model_hf_config
    from megatron_rpg.training.config import parse_train_config

    torch.set_num_threads(1)
    initialize_parallel(1, 1, seed=0)
    config = parse_train_config(["--load", ckpt, "--lr", "1e-2", "--weight-decay", "0", "--no-progress"])
    hf_config = model_hf_config(config)
    model, optimizer, _ = build_model_and_optimizer(config, hf_config)
    embedded = EmbeddedEngine(model, vocab_size=hf_config.vocab_size)
    sglang = SGLangEngine(_server_config(work_dir=work_dir, sync="disk"), model, hf_config)
    greedy = SamplingParams(max_new_tokens=MAX_NEW, greedy=True)
    out = {}
    try:
        started = time.perf_counter()
        first = sglang.generate(PROMPTS, greedy)  # launches the server
        out["start_s"] = time.perf_counter() - started
        out["greedy"] = (first.responses(), embedded.generate(PROMPTS, greedy).responses())
        for temperature in (1.0, 0.7):
            sampled = sglang.generate(PROMPTS * 4, SamplingParams(max_new_tokens=MAX_NEW, temperature=temperature))
            out[f"logp_{temperature}"] = (sampled.engine_logp * sampled.loss_mask,
                                          _trainer_logprobs(model, sampled, temperature),
                                          _logprobs64(hf_dir, sampled, temperature), sampled.loss_mask)
        started = time.perf_counter()
        timed = sglang.generate(PROMPTS * 8, SamplingParams(max_new_tokens=32, temperature=1.0))
        out["tokens_per_s"] = float(timed.response_lengths.sum()) / (time.perf_counter() - started)
        for step, mode in enumerate(("disk", "colocated", "distributed")):
            before = embedded.generate(PROMPTS, greedy).responses()
            _perturb_and_step(model, optimizer, seed=step)
            sglang.config = dataclasses.replace(sglang.config, sync=mode)
            sglang.close_syncer()
            try:  # one mode's failure is its test's, not the others'
                metrics = sglang.update_weights()
            except Exception as error:  # noqa: BLE001 - reported by test_sync_makes_server_follow_new_weights
                out[mode] = dict(error=f"{type(error).__name__}: {error}")
                sglang.config = dataclasses.replace(sglang.config, sync="disk")
                sglang.close_syncer()
                sglang.update_weights()  # the later checks need the server at the current weights
                continue
            out[mode] = dict(before=before, server=sglang.generate(PROMPTS, greedy).responses(),
                             embedded=embedded.generate(PROMPTS, greedy).responses(), **metrics)
        # the last weights' HF folder, for the float64 reference of the log-probs after syncs
        write_hf_folder(model, hf_config, os.path.join(work_dir, "hf-final"), write=True)
        sampled = sglang.generate(PROMPTS * 4, SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0))
        out["logp_after_sync"] = (sampled.engine_logp * sampled.loss_mask, _trainer_logprobs(model, sampled, 1.0),
                                  _logprobs64(os.path.join(work_dir, "hf-final"), sampled, 1.0), sampled.loss_mask)
    finally:
        sglang.close()
    out["stopped"] = all(not server.alive() for server in sglang.servers) and not sglang.servers
    return out


@pytest.fixture(scope="module")
def engine_results(model_dirs, server_env):
    hf_dir, ckpt, root = model_dirs
    work_dir = os.path.join(root, "engine")
    os.makedirs(work_dir)
    return run_on_ranks(engine_body, world_size=1, args=(hf_dir, ckpt, work_dir), timeout_s=900)[0]


def test_greedy_equals_embedded_engine(engine_results):
    server, embedded = engine_results["greedy"]
    assert server == embedded
    assert all(len(r) == MAX_NEW for r in server)  # no stop tokens: every response has max_new_tokens


@pytest.mark.parametrize("key", ["logp_1.0", "logp_0.7", "logp_after_sync"])
def test_sglang_logprobs_equal_trainer_logprobs(engine_results, key):
    from tests.float_bounds import distance, float32_bound

    engine, trainer, trainer64, mask = engine_results[key]
    assert mask.sum() > 0
    assert distance(engine, trainer) <= float32_bound(trainer, trainer64)


@pytest.mark.parametrize("mode", ["disk", "colocated", "distributed"])
def test_sync_makes_server_follow_new_weights(engine_results, mode):
    result = engine_results[mode]
    assert "error" not in result, result.get("error")
    assert result["embedded"] != result["before"]  # the weights changed the greedy output
    assert result["server"] == result["embedded"]
    assert result["sync_bytes"] > 0 and result["sync_s"] > 0


def test_servers_are_stopped(engine_results):
    assert engine_results["stopped"]


def rpg_body(rank, world_size, ckpt, work_dir):
    from megatron_rpg.training import loop
    from megatron_rpg.training.config import parse_train_config

    torch.set_num_threads(1)
    argv = ["--config", os.path.join(REPO, "examples", "tiny_cpu.yaml"), "--load", ckpt, "--no-progress",
            "--seed", "0", "--rollout-batch-size", "4", "--micro-batch-size", "8", "--train-iters", "3",
            "--lr", "1e-2", "--rollout-engine", "sglang", "--rollout-sync", "colocated", "--sglang-device", "cpu",
            "--sglang-python", SGLANG_PYTHON, "--sglang-max-total-tokens", str(MAX_TOTAL_TOKENS),
            "--sglang-extra-args", SERVER_ARGS, "--sglang-start-timeout", "300"]
    config = parse_train_config(argv)
    config = dataclasses.replace(config, sglang=dataclasses.replace(config.sglang, work_dir=work_dir))
    return loop.train(config)


def test_rpg_run_with_sglang_engine(model_dirs, server_env, engine_results):
    """Runs after the module's engine run (engine_results): one server at a time."""
    hf_dir, ckpt, root = model_dirs
    work_dir = os.path.join(root, "rpg")
    os.makedirs(work_dir)
    history = run_on_ranks(rpg_body, world_size=1, args=(ckpt, work_dir), timeout_s=900)[0]
    assert [m["step"] for m in history] == [1, 2, 3]
    for metrics in history:
        assert metrics["sync_bytes"] > 0 and metrics["sync_s"] > 0
        # float rounding, where a step without a sync would leave the gap of the step's update
        assert metrics["engine_logp_max_abs_diff"] < 1e-4, metrics


def test_refuses_to_bind_beyond_loopback_without_key(tmp_path, monkeypatch):
    from megatron_rpg.rollout.sglang_server import launch_server

    monkeypatch.delenv("SGLANG_API_KEY", raising=False)
    config = dataclasses.replace(_server_config(), host="127.0.0.1")
    object.__setattr__(config, "host", "0.0.0.0")  # past SGLangConfig's own check: the launcher checks too
    with pytest.raises(ValueError, match="--sglang-host 0.0.0.0 listens beyond loopback"):
        launch_server(config, str(tmp_path), 1, str(tmp_path / "log"))
    assert not (tmp_path / "log").exists()  # refused before anything was launched
    from megatron_rpg.rollout.sglang_engine import SGLangConfig

    with pytest.raises(ValueError, match="--sglang-api-key"):
        SGLangConfig(host="0.0.0.0", device="cpu")
    assert SGLangConfig(host="0.0.0.0", api_key="k").host == "0.0.0.0"


def test_figures_are_measured(engine_results):
    """The measured figures (shown with pytest -rP): server start, generate rate, sync time and rate."""
    assert engine_results["start_s"] > 0 and engine_results["tokens_per_s"] > 0
    print(f"server start {engine_results['start_s']:.1f} s (incl. the HF folder export); "
          f"generate {engine_results['tokens_per_s']:.0f} tokens/s (48 prompts x 32 tokens, temperature 1)")
    for mode in ("disk", "colocated", "distributed"):
        result = engine_results[mode]
        if "sync_s" in result:
            print(f"sync {mode}: {result['sync_s']:.3f} s, {result['sync_bytes'] / 1e6:.2f} MB, "
                  f"{result['sync_bytes'] / result['sync_s'] / 1e9:.3f} GB/s")
