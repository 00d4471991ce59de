"""Fault handling of the SGLang rollout engine (rollout/sglang_engine.py): a dead or hung server is
found, restarted when it is ours, brought back to the trainer's current weights, and the interrupted
requests are sent again, at most --sglang-retries times per generate (or per weight sync), in every
layout (TP, PP, DP) and --rollout-sync mode.

A fault is a request without an answer (SGLangUnreachable: connection refused or reset, or no reply
within --sglang-request-timeout: a dead or a hung server). An HTTP error status is the server's
answer: it ends the run with that answer, as a malformed response does (on every rank: below).

One recovery (collective over all ranks), before each retry:
1. global rank 0 checks every server. One we launched whose process is gone, or that does not answer
   /health_generate (a 1-token generation through its scheduler) within min(30 s,
   --sglang-request-timeout), is killed (SIGKILL to its process group: a SIGSTOPped one too) and
   started again with the same command line, port and model path, its log appended; then waited for
   up to --sglang-start-timeout. A --sglang-url server cannot be restarted by us: it is waited for
   (/health_generate) up to --sglang-start-timeout, else the run ends saying so.
2. every rank takes part in sending the weights again with --rollout-sync's mode, from a fresh sync
   state (distributed: the old weight-update group is destroyed and a new one, under a new name, is
   built with every server): a restarted server holds the weights it was launched from (the HF folder
   of the run's start, or of the resume), and a --sglang-url server may have been restarted by someone else.
3. each replica sends again its own interrupted requests (only those); the answered ones are kept.
A weight sync that meets a fault recovers the same way (1, then the whole sync again). After
--sglang-retries recoveries a request still without answer ends the run with SGLangServerError
naming the server's log (ours) or URL (given). Training state is never at risk: checkpoints are
written before the sync and the error ends the run through the trainer's normal exit.

The collective decision inside generate (data-parallel replicas generate independently: DAPO's
redraws and the evaluation's chunks give them different numbers of generate calls). Generates go in
rounds; in each round every rank adds (u, a, e) to one all_reduce(SUM) over the world (3 int64s):
u = its unanswered requests (the replica's requesting rank), a = 1 while in a generate (0 once it
waits in end_of_rollouts), e = 1 if its requests failed otherwise (an HTTP error: fatal).
    U, A, E = Σ_ranks u, Σ_ranks a, Σ_ranks e
    U = E = 0: the round is settled; a rank in generate returns its responses; one in
               end_of_rollouts leaves it when A = 0 (no rank generates any more), else waits for the next round.
    E > 0:     every rank raises: the failed rank its own error, the others SGLangServerError naming it.
    U > 0:     every rank recovers (1-2 above), then the replicas with unanswered requests send
               them again (3) in the next round; a rank whose replica has none returns.
The fault path adds one all_gather of each rank's report (its counts, first fault, recoveries left),
so every rank decides from the same facts; the recoveries stop (every rank raises the same give-up
error) when a replica with unanswered requests has had --sglang-retries recoveries in its generate.
No-fault cost: that one all_reduce per generate, plus one per rollout phase (end_of_rollouts) with
data parallelism. Every rank runs one collective per round whatever call it is in, so the rounds
stay matched; a rank never leaves a generate or end_of_rollouts while another stays in a collective.
So with data parallelism every rank calls end_of_rollouts once after its last generate of each
rollout phase (the trainer does: training/rollouts.py, training/evaluation.py).

Weight syncs (update_weights, and step 2): every rank's outcome (done, unreachable, or any other
error: a sending rank's HTTP error, an OSError writing the HF folder, ...) is held until the sync's
own collectives are done (the export's TP/PP traffic, the distributed mode's barriers), then
gathered over the world: an unreachable server means a recovery, any other error raises the same
SGLangServerError on every rank naming the rank and its error. A rank whose process died (SIGKILL,
OOM) is seen by the others at once, in the collective they wait in: gloo's "Connection closed by
peer" (measured: its peers' barrier raised within 0.02 s of its death), raised as SGLangServerError
saying a trainer rank left. A sending rank waits for the servers at most --sglang-request-timeout
per HTTP call and per broadcast of the distributed mode, which bounds the other ranks' wait for it
at the sync's barriers (not the process group's timeout, 30 minutes by default for gloo).

Counted per step, in update_weights' metrics (the same on every rank): sglang_restarts (servers
restarted, by rank 0) and sglang_retried_requests (requests sent again, summed over the replicas),
since the previous sync.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_rpg.rollout.sglang_server import SGLangServerError, SGLangUnreachable

HEALTH_TIMEOUT_S = 30.0


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def collective(run):
    """run() (a collective over the world); a peer that died in it is SGLangServerError saying so."""
    try:
        return run()
    except RuntimeError as error:  # gloo: "Connection closed by peer"; NCCL: its watchdog's error
        raise SGLangServerError(f"a collective of the SGLang engine over the trainer ranks failed on global rank "
                                f"{_rank()}: another rank's process ended, or it did not arrive within the process "
                                f"group's timeout (that rank's log has the cause): {error}") from None


def share(value, group=None, source: int = 0):
    """`value` from global rank `source` to every rank of `group` (None: the world); as is when alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return value
    holder = [value]
    collective(lambda: dist.broadcast_object_list(holder, src=source, group=group))
    return holder[0]


def gather(value) -> list:
    """Every rank's `value`, in global rank order, on every rank (collective over the world)."""
    if not _distributed():
        return [value]
    values = [None] * dist.get_world_size()
    collective(lambda: dist.all_gather_object(values, value))
    return values


def _server_name(engine, index: int) -> str:
    client = engine.clients[index]
    if engine.servers:
        return f"the SGLang server at {client.url} (log: {engine.servers[index].log_path})"
    return f"the SGLang server at {client.url} (given by --sglang-url: not ours to restart)"


def restart_failed_servers(engine) -> str | None:
    """Global rank 0: restarts every launched server that is dead or fails its health check, waits
    for --sglang-url servers; None, or why the run cannot go on."""
    config = engine.config
    health_timeout = min(HEALTH_TIMEOUT_S, config.request_timeout_s)
    for index, client in enumerate(engine.clients):
        if not engine.servers:  # given by URL
            try:
                client.wait_healthy(config.start_timeout_s, path="/health_generate")
            except SGLangServerError:
                return (f"{_server_name(engine, index)} did not answer /health_generate within "
                        f"--sglang-start-timeout {config.start_timeout_s:g} s after a request went unanswered; "
                        f"restart it (the trainer sends it the current weights when it answers again) or "
                        f"let the trainer launch its own servers (no --sglang-url)")
            continue
        server = engine.servers[index]
        if server.alive() and client.healthy("/health_generate", health_timeout):
            continue
        server.restart()
        engine.restarts += 1
        try:
            client.wait_healthy(config.start_timeout_s, server)
        except SGLangServerError as error:
            return f"{_server_name(engine, index)} did not come back after restart {server.restarts}: {error}"
    return None


def synced(engine) -> tuple[int, str | None]:
    """One sync of every server by every rank (engine._syncer, built when absent): (bytes exported,
    None) or (0, the first rank's unreachable-server fault), the same on every rank; any other error
    on any rank raises SGLangServerError on every rank (module docstring)."""
    from megatron_rpg.rollout.sglang_sync import build_syncer

    sent, outcome, error = 0, None, None
    try:
        if engine._syncer is None:
            engine._syncer = build_syncer(engine.config.sync, engine)
        sent = engine._syncer.sync(barrier=False)
    except SGLangUnreachable as caught:  # a rank that talks to the servers (distributed: each stage's source)
        outcome = ("unreachable", str(caught))
    except Exception as caught:  # noqa: BLE001 - every rank raises it below, not this one alone
        outcome, error = ("error", f"{type(caught).__name__}: {caught}"), caught
    outcomes = gather(outcome)
    for rank, other in enumerate(outcomes):
        if other is not None and other[0] == "error":
            raise SGLangServerError(f"the weight sync into the SGLang servers failed on global rank {rank}: "
                                    f"{other[1]}") from error
    fault = next((other[1] for other in outcomes if other is not None), None)
    return (0, fault) if fault is not None else (sent, None)


def recover(engine) -> tuple[int, str | None]:
    """One recovery (steps 1-2 of the module docstring; collective over all ranks): synced()'s
    (bytes, fault) of its weight sync, the same on every rank."""
    problem = share(restart_failed_servers(engine) if _rank() == 0 else None)
    if problem:
        raise SGLangServerError(problem)
    engine.close_syncer()
    return synced(engine)


def give_up(engine, what: str, faults: list[str]) -> SGLangServerError:
    servers = "; ".join(_server_name(engine, i) for i in range(len(engine.clients)))
    tails = "".join(f"\n--- the end of {server.log_path}:\n{server.log_tail(1500)}" for server in engine.servers)
    return SGLangServerError(f"{what}: still no answer after --sglang-retries {engine.config.retries} "
                             f"recoveries (restart of dead or hung servers we launched, weights sent again); "
                             f"faults: {' | '.join(faults)}; servers: {servers}{tails}")


def _round(engine, unanswered: int, active: bool, error: bool) -> tuple[int, int, int]:
    """(U, A, E) of the module docstring: this rank's (u, a, e) summed over the world."""
    if not _distributed():
        return unanswered, int(active), int(error)
    chunk = engine.model[0] if isinstance(engine.model, (list, tuple)) else engine.model
    totals = torch.tensor([unanswered, int(active), int(error)], dtype=torch.int64,
                          device=next(chunk.parameters()).device)  # NCCL reduces CUDA tensors
    collective(lambda: dist.all_reduce(totals))
    return tuple(int(x) for x in totals.tolist())


def _settle(engine, report: dict, exception: Exception | None = None) -> list[dict]:
    """The fault path of a round (U > 0 or E > 0): every rank's report, then, the same on every rank,
    raise (E > 0, or no recovery left) or recover (until a recovery's weight sync succeeds). Returns
    the reports, with the recoveries made. `exception`: this rank's own error (E), raised as is."""
    reports = gather(report)
    failed = next((r for r in reports if r["error"]), None)
    if failed is not None:
        if exception is not None and failed["rank"] == report["rank"]:
            raise exception  # its own traceback on the failed rank; the same decision everywhere
        raise SGLangServerError(f"the SGLang requests of global rank {failed['rank']} (a replica's requesting "
                                f"rank) failed: {failed['error']}")
    faulting = [r for r in reports if r["unanswered"]]
    faults = [f"replica of global rank {r['rank']}: {fault}" for r in faulting for fault in r["faults"]]
    left = min(r["recoveries_left"] for r in faulting)
    for made in range(1, left + 1):
        _, fault = recover(engine)
        if fault is None:
            for r in reports:
                r["recoveries_made"] = made
            return reports
        faults.append(f"weight sync after recovery {made}: {fault}")
    raise give_up(engine, "generate", faults)


def _report(rank: int, unanswered: int, faults: list[str], recoveries_left: int, exception=None) -> dict:
    return {"rank": rank, "unanswered": unanswered, "faults": list(faults), "recoveries_left": recoveries_left,
            "error": None if exception is None else f"{type(exception).__name__}: {exception}"}


def generate_with_recovery(engine, request_some, count: int, group, source: int) -> list | None:
    """Responses for `count` requests: request_some(indices) -> {index: response} | {"failed": {index:
    fault}} run by the replica's requesting rank (global rank `source`; this rank when `group` is
    None), faults recovered from in rounds (module docstring). Collective over the world; the
    responses on the requesting rank, None elsewhere."""
    rank = _rank()
    requester_rank = rank if group is None else source
    requester = rank == requester_rank
    responses, pending, faults, recoveries = {}, list(range(count)), [], 0
    while True:
        failed, exception = {}, None
        if requester and pending:
            try:
                answered = request_some(pending)
                failed = answered.pop("failed", {})
                responses.update(answered)
            except Exception as caught:  # noqa: BLE001 - raised on every rank by _settle
                exception = caught
        if failed:
            faults.append(f"{len(failed)} of {len(pending)} requests unanswered ({next(iter(failed.values()))})")
        unanswered, _, errors = _round(engine, len(failed), True, exception is not None)
        if unanswered == 0 and errors == 0:
            return [responses[i] for i in range(count)] if requester else None
        report = _report(rank, len(failed), faults, engine.config.retries - recoveries, exception)
        reports = _settle(engine, report, exception)
        if not reports[requester_rank]["unanswered"]:  # this replica has all its answers
            return [responses[i] for i in range(count)] if requester else None
        recoveries += reports[rank]["recoveries_made"]
        if requester:
            engine.retried_requests += len(failed)
        pending = sorted(failed)


def wait_for_other_replicas(engine) -> None:
    """end_of_rollouts: rounds with nothing of this rank's own until no rank generates, taking part in
    the other replicas' recoveries (module docstring). Without data parallelism every generate is
    lockstep over the world: nothing to wait for."""
    if not _distributed() or dist.get_world_size() == engine.replica_size():
        return
    while True:
        unanswered, active, errors = _round(engine, 0, False, False)
        if unanswered == 0 and errors == 0:
            if active == 0:
                return
            continue
        _settle(engine, _report(_rank(), 0, [], engine.config.retries))


def sync_with_recovery(engine) -> int:
    """The weight sync of every server (collective over all ranks), faults recovered from (module
    docstring): bytes exported by the last (successful) sync."""
    sent, fault = synced(engine)
    faults = []
    while fault is not None:
        faults.append(f"weight sync: {fault}")
        if len(faults) > engine.config.retries:
            raise give_up(engine, "the weight sync", faults)
        sent, fault = recover(engine)
    return sent
