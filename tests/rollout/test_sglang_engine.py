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
- a server SIGKILLed (its process group) between two generates is restarted by the next sync
  (--rollout-sync distributed: the weight-update group is built again) and then answers greedy
  requests with exactly the embedded engine's tokens for the current weights, which differ from those
  of the weights it was launched with (so a restart without re-sync fails);
- a 2-step RPG run (embedded engine, --save) resumed with --load and --rollout-engine sglang
  (--rollout-sync colocated, steps 3-4) completes with sync metrics and an engine/trainer log-prob gap
  at float rounding each step, although the policy moves: step 3, the first after the resume, included
  (the server starts from the resumed weights); after step 3's
  sync the server is SIGSTOPped (hung), step 4's requests time out, the server is restarted and
  re-synced (sglang_restarts 1, all 32 requests re-sent) and step 4's gap is at float rounding too;
- a --sglang-url server that stops answering, and a server of ours whose restart dies, end the run
  with a message naming the URL, or the log and its tail (no SGLang needed);
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
        out["killed"] = _kill_between_generates(sglang, embedded, model, optimizer, greedy)
    finally:
        sglang.close()
    out["stopped"] = all(not server.alive() for server in sglang.servers) and not sglang.servers
    return out


def _kill_between_generates(sglang, embedded, model, optimizer, greedy) -> dict:
    """The weights move, the server is SIGKILLed (its whole process group) where the loop's sync runs:
    the sync (--rollout-sync distributed here, the last mode above: its group must be built again)
    finds it dead, restarts it (same command, so it loads hf-initial: the first weights) and sends the
    current weights; the next generate follows them."""
    import signal

    _perturb_and_step(model, optimizer, seed=3)
    expected = embedded.generate(PROMPTS, greedy).responses()
    server = sglang.servers[0]
    os.killpg(os.getpgid(server.process.pid), signal.SIGKILL)
    started = time.perf_counter()
    metrics = sglang.update_weights()
    out = dict(metrics, recover_s=time.perf_counter() - started, restarts=server.restarts, embedded=expected,
               server=sglang.generate(PROMPTS, greedy).responses(), alive=server.alive())
    with open(server.log_path, encoding="utf-8") as log:
        out["log_marked"] = "restart 1 of this server" in log.read()
    out["metrics_after"] = sglang.update_weights()  # the counts start again from 0
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


def test_killed_server_is_restarted_and_resynced(engine_results):
    result, first = engine_results["killed"], engine_results["disk"]["before"]  # the first weights' output
    assert "error" not in engine_results["distributed"], engine_results["distributed"]
    assert result["restarts"] == 1 and result["sglang_restarts"] == 1 and result["alive"] and result["log_marked"]
    assert result["embedded"] != first  # a restarted server left at its launch weights fails the next line
    assert result["server"] == result["embedded"]
    assert result["metrics_after"]["sglang_restarts"] == 0 and result["metrics_after"]["sync_bytes"] > 0


HUNG_TIMEOUT_S = 8  # run B's --sglang-request-timeout: a SIGSTOPped server is found after 2 x this


def rpg_body(rank, world_size, load, work_dir, extra, stop_after_sync, marker=None):
    """A run with --rollout-engine sglang (world_size ranks: DP replicas). `stop_after_sync`: in the
    first generate after that many weight syncs, rank 0 SIGSTOPs the server's process group (hung: it
    neither answers nor dies) right after its own requests were answered and writes `marker`; rank 1
    sends its requests only once `marker` exists, so only the second replica's go unanswered."""
    import signal

    from megatron_rpg.rollout.sglang_engine import SGLangEngine
    from megatron_rpg.training import loop
    from megatron_rpg.training.config import parse_train_config

    torch.set_num_threads(1)
    if stop_after_sync:
        update_weights, request_some, syncs, stopped = SGLangEngine.update_weights, SGLangEngine._request_some, [], []

        def counting_update_weights(self):
            metrics = update_weights(self)
            syncs.append(1)
            return metrics

        def stopping_request_some(self, prompts, sampling, indices):
            if len(syncs) != stop_after_sync or stopped:
                return request_some(self, prompts, sampling, indices)
            stopped.append(1)
            if rank == 0:
                answers = request_some(self, prompts, sampling, indices)
                os.killpg(os.getpgid(self.servers[0].process.pid), signal.SIGSTOP)
                open(marker, "w").close()
                return answers
            deadline = time.monotonic() + 300
            while not os.path.exists(marker) and time.monotonic() < deadline:
                time.sleep(0.1)
            return request_some(self, prompts, sampling, indices)

        SGLangEngine.update_weights, SGLangEngine._request_some = counting_update_weights, stopping_request_some
    argv = ["--config", os.path.join(REPO, "examples", "tiny_cpu.yaml"), "--load", load, "--no-progress",
            "--seed", "0", "--rollout-batch-size", "4", "--micro-batch-size", "8", "--lr", "1e-2", *extra]
    if work_dir is not None:  # else the embedded engine
        argv += ["--rollout-engine", "sglang", "--rollout-sync", "colocated", "--sglang-device", "cpu",
                 "--sglang-python", SGLANG_PYTHON, "--sglang-max-total-tokens", str(MAX_TOTAL_TOKENS),
                 "--sglang-extra-args", SERVER_ARGS, "--sglang-start-timeout", "300"]
    config = parse_train_config(argv)
    if work_dir is not None:
        config = dataclasses.replace(config, sglang=dataclasses.replace(config.sglang, work_dir=work_dir))
    return loop.train(config)


def _at_float_rounding(metrics) -> bool:
    """The step's engine/trainer log-prob gap at float rounding, where a server one optimizer step
    behind leaves the gap of the step's update (lr 1e-2: orders of magnitude larger)."""
    return metrics["engine_logp_max_abs_diff"] < 1e-4


def test_rpg_run_with_sglang_engine(model_dirs, server_env, engine_results, tmp_path):
    """Runs after the module's engine run (engine_results): one server at a time. Run A: steps 1-2
    with the embedded engine (no server to start), saved. Run B, --rollout-engine sglang on 2 DP
    replicas (2 gloo ranks): --load of A's checkpoint, steps 3-5 (three RPG steps on the server, with
    eval before and after); its server starts from the resumed weights; in step 4's generate, after
    replica 0's requests were answered, the server hangs (SIGSTOP) before replica 1 sends its own:
    replica 1 finds it by timeout, and both replicas recover together (rank 0 restarts it: it loads the
    resumed weights, one step behind; both ranks sync step 3's weights into it), then replica 1 alone
    sends its requests again."""
    hf_dir, ckpt, root = model_dirs
    saved = str(tmp_path / "checkpoints")
    run_a = run_on_ranks(rpg_body, world_size=1, timeout_s=900,
                         args=(ckpt, None, ["--train-iters", "2", "--no-eval", "--save", saved], 0))[0]
    started = time.perf_counter()
    run_b = run_on_ranks(rpg_body, world_size=2, timeout_s=900,
                         args=(saved, os.path.join(root, "rpg-b"),
                               ["--train-iters", "5", "--sglang-request-timeout", str(HUNG_TIMEOUT_S)], 1,
                               str(tmp_path / "stopped")))
    run_b_s = time.perf_counter() - started
    counts = [[(m["step"], m["sglang_restarts"], m["sglang_retried_requests"]) for m in rank] for rank in run_b]
    assert counts[0] == counts[1]  # every rank reports the same counts
    run_b = run_b[0]
    assert [m["step"] for m in run_a] == [1, 2] and [m["step"] for m in run_b] == [3, 4, 5]
    for metrics in run_b:
        assert metrics["sync_bytes"] > 0 and metrics["sync_s"] > 0
        assert _at_float_rounding(metrics), metrics  # step 3: the first after the resume; the max over both replicas
    assert [m["sglang_restarts"] for m in run_b] == [0, 1, 0]
    assert [m["sglang_retried_requests"] for m in run_b] == [0, 2 * 8, 0]  # replica 1's 2 prompts x 8 samples
    print(f"run B (2 DP ranks, 3 steps, one restart) took {run_b_s:.1f} s")


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


@pytest.mark.parametrize("retries", [0, 2])
def test_url_server_without_answer_ends_with_a_clear_error(retries):
    """A --sglang-url server that stops answering (nothing listens at its port) is waited for, not
    restarted, and the run ends naming it: at once with --sglang-retries 0, else after the wait."""
    from megatron_rpg.rollout.engine import SamplingParams
    from megatron_rpg.rollout.sglang_engine import SGLangConfig, SGLangEngine
    from megatron_rpg.rollout.sglang_server import SGLangClient, SGLangServerError, free_port

    url = f"http://127.0.0.1:{free_port()}"
    engine = SGLangEngine(SGLangConfig(urls=(url,), start_timeout_s=1.0, retries=retries), None, None)
    engine.clients = [SGLangClient(url, timeout_s=5.0, retries=0)]  # connected once (SGLangEngine._start)
    with pytest.raises(SGLangServerError) as caught:
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=4, greedy=True))
    message = str(caught.value)
    assert url in message and "--sglang-url" in message
    if retries == 0:
        assert "still no answer after --sglang-retries 0 recoveries" in message
    else:
        assert "did not answer /health_generate within --sglang-start-timeout 1 s" in message
    assert engine.restarts == 0


def test_launched_server_that_cannot_restart_ends_naming_its_log(tmp_path):
    """A server of ours that died and whose restart dies too: the run ends with its log's name and tail."""
    from megatron_rpg.rollout.engine import SamplingParams
    from megatron_rpg.rollout.sglang_engine import SGLangConfig, SGLangEngine
    from megatron_rpg.rollout.sglang_server import LaunchedServer, SGLangClient, SGLangServerError, free_port

    command = [sys.executable, "-c", "print('model weights missing'); raise SystemExit(3)"]
    log_path = str(tmp_path / "server-0.log")
    process = subprocess.Popen(command, start_new_session=True)
    process.wait()
    url = f"http://127.0.0.1:{free_port()}"
    engine = SGLangEngine(SGLangConfig(device="cpu", start_timeout_s=30.0, retries=2, work_dir=str(tmp_path)),
                          None, None)
    engine.servers = [LaunchedServer(url=url, process=process, log_path=log_path, command=command,
                                     env=dict(os.environ))]
    engine.clients = [SGLangClient(url, timeout_s=5.0, retries=0)]
    with pytest.raises(SGLangServerError) as caught:
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=4, greedy=True))
    message = str(caught.value)
    assert log_path in message and "did not come back after restart 1" in message
    assert "exited with status 3" in message and "model weights missing" in message
    assert engine.restarts == 1 and not engine.servers[0].alive()


@pytest.mark.parametrize("argv, message", [
    (["--sglang-retries", "3"], "--sglang-retries has no effect without --rollout-engine sglang"),
    (["--rollout-engine", "sglang", "--sglang-retries", "-1"], "--sglang-retries=-1 must be >= 0"),
    (["--rollout-engine", "sglang", "--sglang-request-timeout", "0"], "--sglang-request-timeout=0.0 must be a positive"),
])
def test_fault_flags_are_checked(argv, message, capsys):
    from megatron_rpg.training.config import parse_train_config

    with pytest.raises(SystemExit):  # a usage error (exit 2) with the message
        parse_train_config(["--config", os.path.join(REPO, "examples", "tiny_cpu.yaml"), *argv])
    assert message in capsys.readouterr().err
    retries = parse_train_config(["--config", os.path.join(REPO, "examples", "tiny_cpu.yaml"), "--rollout-engine",
                                  "sglang", "--sglang-retries", "5"]).sglang.retries
    assert retries == 5  # the flag reaches the engine's config
