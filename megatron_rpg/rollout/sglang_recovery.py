"""Fault handling of the SGLang rollout engine (rollout/sglang_engine.py): a dead or hung server is
found, restarted when it is ours, brought back to the trainer's current weights, and the interrupted
requests are sent again, at most --sglang-retries times per generate (or per weight sync).

A fault is a request without an answer (SGLangUnreachable: connection refused or reset, or no reply
within --sglang-request-timeout: a dead or a hung server). An HTTP error status is the server's
answer: it ends the run with that answer, as a malformed response does.

One recovery, before each retry:
1. global rank 0 checks every server. One we launched whose process is gone, or that does not answer
   /health_generate (a 1-token generation through its scheduler) within min(30 s,
   --sglang-request-timeout), is killed (SIGKILL to its process group: a SIGSTOPped one too) and
   started again with the same command line, port and model path, its log appended; then waited for
   up to --sglang-start-timeout. A --sglang-url server cannot be restarted by us: it is waited for
   (/health_generate) up to --sglang-start-timeout, else the run ends saying so.
2. the weights are sent again with --rollout-sync's mode, from a fresh sync state (distributed: the
   old weight-update group is destroyed and a new one, under a new name, is built with every server):
   a restarted server holds the weights it was launched from (the HF folder of the run's start, or of
   the resume), and a --sglang-url server may have been restarted by someone else.
3. the interrupted requests (only those) are sent again; the answered ones are kept.
A weight sync that meets a fault recovers the same way (1, then the whole sync again). After
--sglang-retries recoveries a request still without answer ends the run with SGLangServerError
naming the server's log (ours) or URL (given). Training state is never at risk: checkpoints are
written before the sync and the error ends the run through the trainer's normal exit.

Counted per step, in update_weights' metrics (every rank gets rank 0's counts): sglang_restarts
(servers restarted) and sglang_retried_requests (requests sent again), since the previous sync.

Collectives: recovery inside generate runs over the model replica that holds global rank 0 (it owns
the servers and its ranks together export the weights; generate is already lockstep within a
replica). With data parallelism another replica cannot restart or re-sync a server on its own: an
interrupted request there ends the run with a message saying so (the checkpoints are intact).
Recovery inside update_weights runs over all ranks (the sync is collective anyway).
"""
from __future__ import annotations

import torch.distributed as dist

from megatron_rpg.rollout.sglang_server import SGLangServerError, SGLangUnreachable

HEALTH_TIMEOUT_S = 30.0


def share(value, group=None, source: int = 0):
    """`value` from global rank `source` to every rank of `group` (None: the world); as is when alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=source, group=group)
    return holder[0]


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


def resend_weights(engine) -> str | None:
    """Every rank of rank 0's replica (the export is collective over it): the current weights into
    every server from a fresh sync state; None, or the fault that interrupted it (rank 0)."""
    from megatron_rpg.rollout.sglang_sync import build_syncer

    engine.close_syncer()
    engine._syncer = build_syncer(engine.config.sync, engine)
    try:
        engine._syncer.sync(barrier=False)
    except SGLangUnreachable as error:
        return str(error)
    return None


def _first_fault(fault: str | None, group=None) -> str | None:
    """The first rank's fault, on every rank of `group` (None: the world; collective over it)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return fault
    faults = [None] * dist.get_world_size(group)
    dist.all_gather_object(faults, fault, group=group)
    return next((f for f in faults if f is not None), None)


def give_up(engine, what: str, faults: list[str]) -> SGLangServerError:
    servers = "; ".join(_server_name(engine, i) for i in range(len(engine.clients)))
    tails = "".join(f"\n--- the end of {server.log_path}:\n{server.log_tail(1500)}" for server in engine.servers)
    return SGLangServerError(f"{what}: still no answer after --sglang-retries {engine.config.retries} "
                             f"recoveries (restart of dead or hung servers we launched, weights sent again); "
                             f"faults: {' | '.join(faults)}; servers: {servers}{tails}")


def generate_with_recovery(engine, request_some, count: int, group, source: int) -> list | None:
    """Responses for `count` requests: request_some(indices) -> {index: response} | {"failed": {index:
    fault}} run by the replica's requesting rank (global rank `source`), faults recovered from (module
    docstring). Collective over the replica `group` (None: this rank alone); the responses on the
    requesting rank, None elsewhere."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    requester = group is None or rank == source
    owner = source == 0 if group is not None else rank == 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if engine.config.sync == "distributed" and world > (1 if group is None else dist.get_world_size(group)):
        owner = False  # its sync (one group per pipeline stage) has barriers over all ranks
    def within_replica(value):  # group None: this rank is its replica (never the world's broadcast)
        return value if group is None else share(value, group, source)

    responses, pending, faults = {}, list(range(count)), []
    for attempt in range(engine.config.retries + 1):
        if attempt > 0:  # a recovery, then the interrupted requests again
            problem = within_replica(restart_failed_servers(engine) if requester else None)
            if problem:
                raise SGLangServerError(problem)
            fault = resend_weights(engine) if group is None else _first_fault(resend_weights(engine), group)
            if fault:
                faults.append(f"weight sync after recovery {attempt}: {fault}")
                continue
            if requester:
                engine.retried_requests += len(pending)
        failed = {}
        if requester:
            answered = request_some(pending)
            failed = answered.pop("failed", {})
            responses.update(answered)
        failed = within_replica(failed)
        if not failed:
            return [responses[i] for i in range(count)] if requester else None
        faults.append(f"{len(failed)} of {len(pending)} requests unanswered ({next(iter(failed.values()))})")
        if not owner:
            raise SGLangServerError(f"{faults[-1]} on the data-parallel replica of global rank {source}: inside "
                                    f"generate only rank 0's replica can restart and re-sync the servers, and not "
                                    f"with data parallelism and --rollout-sync distributed (its sync is collective "
                                    f"over all ranks); restart the run with --load (its checkpoints are intact)")
        pending = sorted(failed)
    raise give_up(engine, "generate", faults)


def sync_with_recovery(engine) -> int:
    """The weight sync of every server (collective over all ranks), faults recovered from (module
    docstring): bytes exported by the last (successful) sync."""
    from megatron_rpg.rollout.sglang_sync import build_syncer

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    faults = []
    for attempt in range(engine.config.retries + 1):
        if attempt > 0:
            problem = share(restart_failed_servers(engine) if rank == 0 else None)
            if problem:
                raise SGLangServerError(problem)
            engine.close_syncer()
        if engine._syncer is None:
            engine._syncer = build_syncer(engine.config.sync, engine)
        fault = None
        try:
            sent = engine._syncer.sync(barrier=False)
        except SGLangUnreachable as error:  # a rank that talks to the servers (distributed: each stage's source)
            fault = str(error)
        fault = _first_fault(fault)
        if fault is None:
            return sent
        faults.append(f"weight sync: {fault}")
    raise give_up(engine, "the weight sync", faults)
