"""Run a test body in N gloo processes on this machine and collect what each rank returns.

    results = run_on_ranks(body, world_size=2, args=(...,))

`body(rank, world_size, *args)` must be a module-level function (workers are spawned and import it).
The process group is initialised (gloo, rendezvous through a FileStore in a fresh temporary
directory, so no TCP port is picked and none can be taken by a concurrent test) before `body` runs
and destroyed after.
A failing rank's traceback is re-raised in the test process, naming the rank. Tensors in results
come back as CPU tensors (pickled through a queue).
"""
from __future__ import annotations

import os
import pickle
import tempfile
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world_size, store_path, body, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        result = body(rank, world_size, *args)
        # plain pickle bytes: torch's queue would pass tensors as shared-memory file descriptors, which
        # the parent can no longer open once this process has exited
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - the traceback travels to the test process
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(body, world_size: int = 2, args: tuple = (), timeout_s: float = 600.0) -> list:
    """Returns `[result of rank 0, result of rank 1, ...]`; raises if any rank failed or hung."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    rendezvous = tempfile.TemporaryDirectory(prefix="megatron_rpg_ranks_")
    store_path = os.path.join(rendezvous.name, "store")
    procs = [ctx.Process(target=_worker, args=(r, world_size, store_path, body, args, queue), daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout_s)
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break  # the other ranks may now hang in a collective; stop them below
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
        rendezvous.cleanup()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
