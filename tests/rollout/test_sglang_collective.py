"""The SGLang engine's collective fault decision (rollout/sglang_recovery.py) over two real gloo ranks
(DP=2), without a server: requests and syncs that meet no server (a port where nothing listens) or a
real local failure. Runs inside the rollout tests' shared two-rank run (tests/rollout/conftest.py,
its dp2 layout); the recovery with a real SGLang server restarted mid-generate is
test_sglang_engine.py's DP=2 RPG run.

Properties proved (each rank's outcome is recorded; a rank left in a collective would hang the run):
- a replica whose requests go unanswered, while the other replica has finished its generates and
  waits in end_of_rollouts, gets a recovery in which the idle replica takes part: rank 0 (idle)
  waits for the --sglang-url server and both ranks end with the same error naming its URL;
- with --sglang-retries 0 both ranks end with the same give-up error naming the faulting replica;
- a sending rank whose part of a weight sync fails (rank 0 cannot write the disk mode's HF folder:
  a real OSError) makes every rank raise the same error naming that rank and the OSError, at once
  (the other rank's wait is measured against the world's 30-minute collective timeout);
- the distributed mode with a server that never joins its weight-update group: the failing source
  (rank 0) holds the error through the sync's collectives (the group turns, the session barrier,
  the byte count), both ranks learn it and end with the same give-up error.
"""
from __future__ import annotations

import os
import time

import pytest

pytestmark = pytest.mark.distributed
PROMPTS = [[5, 17, 42], [7], [99, 3]]


def single_process_results(model) -> dict:
    return {}


def _engine(model, url: str, **overrides):
    from megatron_rpg.rollout.sglang_engine import SGLangConfig, SGLangEngine
    from megatron_rpg.rollout.sglang_server import SGLangClient
    from tests.megatron import rl_step_fixtures as fx

    engine = SGLangEngine(SGLangConfig(urls=(url,), **{"start_timeout_s": 1.0, "request_timeout_s": 3.0,
                                                      **overrides}), model, fx.hf_config())
    engine.clients = [SGLangClient(url, timeout_s=3.0, retries=0)]  # connected once (SGLangEngine._start)
    return engine


def _outcome(run) -> dict:
    started = time.perf_counter()
    try:
        run()
        return {"error": None, "s": time.perf_counter() - started}
    except Exception as error:  # noqa: BLE001 - the test compares both ranks' errors
        return {"error": f"{type(error).__name__}: {error}", "s": time.perf_counter() - started}


def layout_results(model, layout: str) -> dict:
    if layout != "dp2":
        return {}
    import torch.distributed as dist

    from megatron_rpg.rollout.engine import SamplingParams
    from megatron_rpg.rollout.sglang_server import free_port

    started = time.perf_counter()
    rank, greedy = dist.get_rank(), SamplingParams(max_new_tokens=4, greedy=True)
    holder = [f"http://127.0.0.1:{free_port()}"]
    dist.broadcast_object_list(holder, src=0)  # one server address for both ranks, as SGLangEngine._start shares it
    url = holder[0]
    out = {}
    for retries in (1, 0):  # rank 0 has nothing to generate; rank 1's requests meet no server
        engine = _engine(model, url, retries=retries)

        def phase(engine=engine):
            if rank == 1:
                engine.generate(PROMPTS, greedy)
            engine.end_of_rollouts()
        out[f"collective_idle_{retries}"] = _outcome(phase)
    work_dir = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"megatron_rpg_not_a_folder_{os.getpid()}")
    with open(work_dir, "w") as f:  # rank 0's HF folder cannot be made under a file
        f.write("a file where the engine's work folder should be")
    try:
        out["collective_disk_error"] = _outcome(_engine(model, url, sync="disk", work_dir=work_dir).update_weights)
    finally:
        os.remove(work_dir)
    out["collective_distributed"] = _outcome(_engine(model, url, sync="distributed", retries=0).update_weights)
    out["collective_s"] = time.perf_counter() - started
    return out


def test_an_idle_replica_takes_part_in_the_other_replicas_recovery(two_ranks):
    first, second = (r["collective_idle_1"] for r in two_ranks)
    assert first["error"] == second["error"]
    assert "did not answer /health_generate within --sglang-start-timeout 1 s" in first["error"]
    assert "--sglang-url" in first["error"]


def test_without_retries_every_rank_gives_up_together_naming_the_faulting_replica(two_ranks):
    first, second = (r["collective_idle_0"] for r in two_ranks)
    assert first["error"] == second["error"]
    assert "still no answer after --sglang-retries 0 recoveries" in first["error"]
    assert "replica of global rank 1: 3 of 3 requests unanswered" in first["error"]
    assert "replica of global rank 0" not in first["error"]  # the idle replica had nothing unanswered


def test_a_sending_ranks_failure_reaches_every_rank_at_once(two_ranks):
    first, second = (r["collective_disk_error"] for r in two_ranks)
    assert first["error"] == second["error"]
    assert "weight sync into the SGLang servers failed on global rank 0: NotADirectoryError" in first["error"]
    assert second["s"] < 60.0, second  # the world's collective timeout is 30 minutes
    print(f"rank 1 learned of rank 0's failed sync after {second['s']:.2f} s")


def test_distributed_sync_error_path_keeps_the_collectives_matched(two_ranks):
    first, second = (r["collective_distributed"] for r in two_ranks)
    assert first["error"] == second["error"]
    assert "the weight sync: still no answer after --sglang-retries 0" in first["error"]
    assert "weight-update group with the servers was not formed" in first["error"]
    print(f"this module's part of the two-rank run: {two_ranks[0]['collective_s']:.1f} s; errors:",
          *(two_ranks[0][key]["error"][:400] for key in sorted(k for k in two_ranks[0] if isinstance(k, str))
            if key.startswith("collective_") and key != "collective_s"), sep="\n")
