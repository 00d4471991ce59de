"""Weight sync from the trainer's Megatron shards into SGLang servers (--rollout-sync), after every
optimizer step. Every rank runs the exporter (rollout/weight_export.py: TP gather, PP broadcast,
HF names; collective); global rank 0 alone talks to the servers and sends the tensors, except in the
distributed mode, where each pipeline stage's first rank sends its own stage.

- disk: the HF folder of the current weights (safetensors + config.json), then
  /update_weights_from_disk on each server. Slow and simple; works for any server that sees the path.
- colocated: /update_weights_from_tensor per bucket (≤ --update-weight-buffer-size bytes of one
  dtype), in SGLang's "flattened_bucket" format: one byte buffer per bucket plus (name, shape, dtype,
  byte range) per tensor. CPU tensors travel pickled inline (their bytes, base64 over HTTP); CUDA
  tensors as CUDA-IPC handles (ForkingPickler), so each bucket is kept alive until the server has
  answered for it.
- distributed: per pipeline stage, a process group of the stage's source rank (TP rank 0 of DP
  replica 0; group rank 0) with every server rank (/init_weights_update_group; gloo on CPU, NCCL on
  GPU), then per bucket of that stage /update_weights_from_distributed (metadata over HTTP) while the
  source broadcasts the bucket's bytes. No PP broadcast: each stage's tensors go from the rank that
  gathered them straight to the servers, all stages at once.
Between /begin_weight_update and /end_weight_update when the server has them (SGLang 0.5.23 refuses
tensor and distributed updates outside such a session; 0.5.17 has no such routes).
A sending rank's error, of any kind, stops its sending but not its part in the collectives (the
export's, the distributed mode's turns and barriers); it is raised after them, and every rank learns
it at the sync's end (rollout/sglang_recovery.py: synced). In the distributed mode every rank also
learns after the group turns and after the session's opening whether any rank failed, and then no
stage sends (a server outside a session would never join the broadcast).
"""
from __future__ import annotations

import base64
import datetime
import io
import os
import pickle
import shutil
import threading
import types

import torch
import torch.distributed as dist

from megatron_rpg.checkpoint.hf_files import write_safetensors_shards
from megatron_rpg.rollout.sglang_recovery import collective, gather
from megatron_rpg.rollout.sglang_server import SGLangServerError, SGLangUnreachable
from megatron_rpg.rollout.weight_export import WeightBucket, export_hf_buckets, export_hf_tensors


def write_hf_folder(model, hf_config, path: str, *, write: bool) -> int:
    """The live model as an HF folder at `path` (collective: every rank exports; `write` on one rank
    writes safetensors + config.json, replacing the folder). Returns the bytes exported."""
    tensors = export_hf_tensors(model, hf_config)
    if not write:
        return sum(t.numel() * t.element_size() for _, t in tensors)
    staging = path + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    index = write_safetensors_shards(tensors, staging)
    hf_config.save_pretrained(staging)
    shutil.rmtree(path, ignore_errors=True)
    os.rename(staging, path)  # the server never reads a half-written folder
    return int(index["metadata"]["total_size"])


def _checked(answer, what: str):
    """SGLang answers some failures with HTTP 200 and success=false."""
    if isinstance(answer, dict) and answer.get("success") is False:
        raise SGLangServerError(f"{what}: {answer.get('message')}")
    return answer


def flattened_bucket_payload(bucket: WeightBucket) -> tuple[dict, torch.Tensor]:
    """SGLang's flattened_bucket dict for one bucket: the bytes of its tensors back to back (uint8)
    and per tensor its name, shape, dtype and byte range (SimpleNamespace: SGLang reads attributes
    and its unpickler allows SimpleNamespace). Also returns the buffer, to keep it alive."""
    flat = torch.cat([tensor.detach().contiguous().reshape(-1).view(torch.uint8)
                      for _, tensor in bucket.named_tensors])
    metadata, offset = [], 0
    for name, tensor in bucket.named_tensors:
        size = tensor.numel() * tensor.element_size()
        metadata.append(types.SimpleNamespace(name=name, shape=torch.Size(tensor.shape), dtype=tensor.dtype,
                                              start_idx=offset, end_idx=offset + size, numel=size))
        offset += size
    return {"flattened_tensor": flat, "metadata": metadata}, flat


def serialize_for_sglang(obj) -> str:
    """base64 of the pickle SGLang's MultiprocessingSerializer.deserialize reads: CPU tensors with
    their bytes inline (plain pickle), CUDA tensors as IPC handles (ForkingPickler)."""
    buffer = io.BytesIO()
    if isinstance(obj, dict) and obj["flattened_tensor"].is_cuda:
        from torch.multiprocessing.reductions import ForkingPickler

        ForkingPickler(buffer).dump(obj)
    else:
        pickle.Pickler(buffer, protocol=4).dump(obj)
    return base64.b64encode(buffer.getvalue()).decode()


class _Syncer:
    def __init__(self, engine):
        self.engine = engine
        self.is_sender = (dist.get_rank() if dist.is_initialized() else 0) == 0
        self._has_session_routes = None

    def _each_server(self, path: str, payload: dict, what: str) -> None:
        for client in self.engine.clients:
            _checked(client.post(path, payload), f"{client.url}{path} ({what})")

    def _begin(self) -> None:
        if self._has_session_routes is False:
            return
        try:
            self._each_server("/begin_weight_update", {}, "open the weight-update session")
            self._has_session_routes = True
        except SGLangServerError as error:
            if "HTTP 404" not in str(error) or self._has_session_routes:
                raise
            self._has_session_routes = False  # an SGLang without sessions (before 0.5.2x)

    def _end(self) -> None:
        if self._has_session_routes:
            self._each_server("/end_weight_update", {}, "close the weight-update session")

    def _finish(self, opened: bool, error: SGLangServerError | None) -> None:
        """Close the weight-update session opened by _begin (not on a server that cannot be reached),
        raise the first send error, else flush the servers' prefix cache (it holds the old weights' KV)."""
        if opened and not isinstance(error, SGLangUnreachable):
            self._end()
        if error is not None:
            raise error
        if self.is_sender:
            self._each_server("/flush_cache", {}, "flush the prefix cache")

    def _send_buckets(self, send_bucket, prepare=None) -> int:
        """Every rank exports (collective); rank 0 sends each bucket inside a weight-update session
        (after `prepare()`), then flushes the servers' prefix caches (computed with the old weights).
        An error on rank 0 (a server's, or any other) stops the sending, not the export (the other
        ranks' collectives must still be matched), and is raised after it. Bytes exported."""
        engine, sent, error, opened = self.engine, 0, None, False
        if self.is_sender:
            try:
                if prepare is not None:
                    prepare()
                self._begin()
                opened = True
            except Exception as caught:  # noqa: BLE001 - raised after the export's collectives
                error = caught
        for bucket in export_hf_buckets(engine.model, engine.hf_config, bucket_bytes=engine.config.bucket_bytes):
            sent += bucket.nbytes
            if self.is_sender and error is None:
                try:
                    send_bucket(bucket)
                except Exception as caught:  # noqa: BLE001 - raised after the export's collectives
                    error = caught
        self._finish(opened, error)
        return sent

    def sync(self, *, barrier: bool = True) -> int:
        """Bytes sent; collective over all trainer ranks (over rank 0's replica without the barrier)."""
        sent = self._send()
        if barrier and dist.is_initialized():
            dist.barrier()
        return sent

    def close(self) -> None:
        pass


class DiskSync(_Syncer):
    def _send(self) -> int:
        engine = self.engine
        path = os.path.join(engine.work_dir, "hf-sync")
        sent = write_hf_folder(engine.model, engine.hf_config, path, write=self.is_sender)
        if self.is_sender:
            self._each_server("/update_weights_from_disk", {"model_path": os.path.abspath(path), "flush_cache": True},
                              "load the exported HF folder")
        return sent


class ColocatedSync(_Syncer):
    def _send(self) -> int:
        return self._send_buckets(self._send_bucket)

    def _send_bucket(self, bucket: WeightBucket) -> None:
        payload, flat = flattened_bucket_payload(bucket)
        serialized = [serialize_for_sglang(payload) for _ in range(self.engine.config.num_gpus_per_engine)]
        for client in self.engine.clients:  # one payload per server TP rank
            _checked(client.post("/update_weights_from_tensor",
                                 {"serialized_named_tensors": serialized, "load_format": "flattened_bucket",
                                  "flush_cache": False}), f"{client.url} update_weights_from_tensor")
        del payload, flat  # only now: every server has taken the bucket (answered)


class DistributedSync(_Syncer):
    """One process group per pipeline stage, named GROUP_pp<stage>: the stage's source rank (its
    TP rank 0 in data-parallel replica 0, which holds the stage's full tensors after the TP gather) is
    rank 0, every server rank follows (the servers join over HTTP, one thread each). Each source
    exports its own stage only (export_hf_buckets(this_stage_only=True): TP gather, no PP traffic) and
    broadcasts it bucket by bucket; the stages send at the same time (a server takes one request at a
    time, and each group's broadcasts stay in order). Global rank 0 (stage 0's source) opens the
    weight-update session before any stage sends and closes it after all have finished."""

    GROUP = "megatron_rpg_weights"
    opened = 0  # groups built in this process: each gets its own name (a server that survived a
    #             restart of another may still hold the previous one)

    def __init__(self, engine):
        super().__init__(engine)
        self.group, self._groups_opened = None, False
        self.stage, self.num_stages, self.exports, self.is_source = _stage_role()
        self.group_name = f"{self.GROUP}_pp{self.stage}"
        self.sent_by_this_rank = 0  # bytes this rank broadcast in the last sync (0 off the sources)

    def _open_groups(self) -> Exception | None:
        """Each stage's group in turn (the servers join them one at a time); after each turn every
        rank learns whether it failed, and no later stage opens one then. This rank's error, or None."""
        error, blocked = None, False
        for stage in range(self.num_stages):
            if self.is_source and stage == self.stage and not blocked:
                try:
                    self._open_group()
                except Exception as caught:  # noqa: BLE001 - raised after the sync's collectives
                    error = caught
            blocked = _any_failed(error)
        return error

    def _open_group(self) -> None:
        from megatron_rpg.rollout.sglang_server import free_port

        engine = self.engine
        DistributedSync.opened += 1
        self.group_name = f"{self.GROUP}_pp{self.stage}_{DistributedSync.opened}"
        tp = engine.config.num_gpus_per_engine
        world = 1 + tp * len(engine.clients)
        port = free_port()
        backend = "gloo" if engine.config.device == "cpu" else "nccl"
        timeout = datetime.timedelta(seconds=engine.config.request_timeout_s)
        make_group = lambda: self._make_group(port, world, backend, timeout)  # noqa: E731
        try:
            answers = _in_threads([(client, "/init_weights_update_group",
                                    {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1 + i * tp,
                                     "world_size": world, "group_name": self.group_name, "backend": backend})
                                   for i, client in enumerate(engine.clients)], make_group)
        except RuntimeError as error:  # the rendezvous timed out: a server did not join
            if isinstance(error, SGLangServerError):
                raise
            raise SGLangUnreachable(f"the weight-update group with the servers was not formed: {error}") from None
        for answer in answers:
            _checked(answer, f"init_weights_update_group {self.group_name}")

    def _make_group(self, port: int, world: int, backend: str, timeout) -> None:
        """Rank 0 of the group, built exactly as SGLang's init_custom_process_group builds its side (a
        tcp:// rendezvous, a PrefixStore named after the group, then torch's group helper, which adds
        its own per-device prefixes); a torch-private helper, as in SGLang, since a group of
        processes outside the trainer's world has no public constructor."""
        from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world
        from torch.distributed.rendezvous import rendezvous

        store, _, _ = next(rendezvous(f"tcp://127.0.0.1:{port}", 0, world, timeout=timeout))
        store.set_timeout(timeout)
        self.group, _ = _new_process_group_helper(world, 0, [], Backend(backend),
                                                  PrefixStore(self.group_name, store),
                                                  group_name=self.group_name, timeout=timeout)
        # this process is the group's rank 0; the server ranks are outside the trainer's world
        _world.pg_group_ranks[self.group] = {dist.get_rank() if dist.is_initialized() else 0: 0}

    def _send(self) -> int:
        engine = self.engine
        error = None  # this rank's failure (any error): it stops its sending, not its part in the collectives
        if not self._groups_opened:  # collective: every rank takes part in the turns
            error = self._open_groups()
            self._groups_opened = True
        self.sent_by_this_rank = 0
        opened = False
        if self.is_sender and error is None:
            try:
                self._begin()
                opened = True
            except Exception as caught:  # noqa: BLE001 - raised after the sync's collectives
                error = caught
        # the session is open before any stage sends; a failure on any rank so far: no stage sends
        blocked = _any_failed(error)
        if self.exports:
            for bucket in export_hf_buckets(engine.model, engine.hf_config, bucket_bytes=engine.config.bucket_bytes,
                                            this_stage_only=True):
                if self.is_source and not blocked and error is None:
                    try:
                        self._send_bucket(bucket)
                    except Exception as caught:  # noqa: BLE001 - raised after the sync's collectives
                        error = caught
                    self.sent_by_this_rank += bucket.nbytes
        _barrier()  # every stage has sent
        sent = _sum_over_ranks(self.sent_by_this_rank, engine.model)  # before any rank raises: matched
        self._finish(opened, error)
        return sent

    def _send_bucket(self, bucket: WeightBucket) -> None:
        _, flat = flattened_bucket_payload(bucket)
        meta = {"names": [n for n, _ in bucket.named_tensors],
                "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket.named_tensors],
                "shapes": [list(t.shape) for _, t in bucket.named_tensors], "group_name": self.group_name,
                "load_format": "flattened_bucket", "flush_cache": False}
        answers = _in_threads([(client, "/update_weights_from_distributed", meta) for client in self.engine.clients],
                              lambda: _broadcast_to_servers(flat, self.group))
        for answer in answers:
            _checked(answer, "update_weights_from_distributed")

    def close(self) -> None:
        """Our end of the group, and the servers' where they still answer (a restarted server has none)."""
        if self.group is not None:
            for client in self.engine.clients:
                try:
                    client.post("/destroy_weights_update_group", {"group_name": self.group_name}, timeout_s=10.0)
                except SGLangServerError:
                    pass  # dead, hung or restarted: nothing to destroy there
            dist.destroy_process_group(self.group)
            self.group = None
        self._groups_opened = False


def _broadcast_to_servers(flat: torch.Tensor, group) -> None:
    """A source's broadcast to the servers; a server that died or hung mid-way is SGLangUnreachable."""
    try:
        dist.broadcast(flat, group_src=0, group=group)
    except RuntimeError as error:  # gloo/NCCL: connection closed by the peer, or the group's timeout
        raise SGLangUnreachable(f"broadcast of a weight bucket to the servers failed: {error}") from None


def _stage_role() -> tuple[int, int, bool, bool]:
    """(pipeline stage, number of stages, exports: in data-parallel replica 0 (context-parallel rank 0),
    is_source: also tensor-parallel rank 0) of this rank; (0, 1, True, True) without model parallelism."""
    from megatron.core import parallel_state

    if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
        return 0, 1, True, True
    exports = parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
    return (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_world_size(),
            exports, exports and parallel_state.get_tensor_model_parallel_rank() == 0)


def _barrier() -> None:
    if dist.is_initialized():
        collective(dist.barrier)


def _any_failed(error) -> bool:
    """Whether any rank holds an error (collective over the world: a barrier that carries it)."""
    return any(gather(error is not None))


def _sum_over_ranks(value: int, model) -> int:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    chunk = model[0] if isinstance(model, (list, tuple)) else model
    total = torch.tensor([value], dtype=torch.int64, device=next(chunk.parameters()).device)
    collective(lambda: dist.all_reduce(total))
    return int(total.item())


def _in_threads(requests, work):
    """POST each (client, path, payload) in its own thread while `work()` runs here (a collective the
    servers join only while answering); the answers, after both finished."""
    answers, errors = [None] * len(requests), []

    def post(i, client, path, payload):
        try:
            answers[i] = client.post(path, payload)
        except Exception as error:  # re-raised below, after the collective
            errors.append(error)

    threads = [threading.Thread(target=post, args=(i, *request)) for i, request in enumerate(requests)]
    for thread in threads:
        thread.start()
    try:
        work()
    finally:
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    return answers


def build_syncer(mode: str, engine) -> _Syncer:
    return {"disk": DiskSync, "colocated": ColocatedSync, "distributed": DistributedSync}[mode](engine)
