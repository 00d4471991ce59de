"""The SGLang rollout engine (--rollout-engine sglang): rollouts from SGLang servers, weights synced
from the trainer's Megatron shards after every optimizer step.

    engine = SGLangEngine(SGLangConfig(device="cpu", max_total_tokens=2048), model, hf_config)
    rollout = engine.generate(prompts, SamplingParams(max_new_tokens=16))   # the embedded engine's Rollout
    metrics = engine.update_weights()   # {"sync_s": ..., "sync_bytes": ...}
    engine.close()                      # stops the servers we launched

Servers: --rollout-num-engines of them launched by us (python -m sglang.launch_server with
--sglang-python; rollout/sglang_server.py) on the first generate, from an HF folder of the trainer's
weights at that moment (after a resume, so the first step samples the resumed policy), or the ones
given by --sglang-url. Requests carry token ids (the servers skip tokenizer init), one per prompt,
spread round-robin over the servers with at most --sglang-max-concurrency in flight.

Log-probs: SGLang returns log_softmax(logits / temperature) of each sampled token, taken BEFORE top-k
/ top-p truncation. Our engine_logp from SGLang is that value: the untruncated tempered log-prob,
which is exactly what the trainer's compute_logprobs(temperature) computes, so
engine_logp_max_abs_diff is the pure numeric train/inference gap. (The embedded engine reports the
truncated, renormalised log-prob instead: with --rollout-top-k/-top-p the two differ by
log(mass of the kept set), the embedded one being the larger.) Greedy is sent as top_k=1 at the
sampling temperature, so its log-prob is also at that temperature, as the embedded engine's.

Faults (rollout/sglang_recovery.py): a request without an answer (dead or hung server) is retried
at most --sglang-retries times, each after a recovery: servers we launched that died or fail their
health check are restarted with the same command, then every server gets the current weights again;
--sglang-url servers are waited for (we cannot restart them). Restarts and retried requests are in
the step metrics (sglang_restarts, sglang_retried_requests). The decision is collective over all
ranks (every replica recovers together), so with data parallelism every rank calls
end_of_rollouts() after its last generate of each rollout phase (the trainer does).

Weight sync (--rollout-sync; rollout/sglang_sync.py): disk (HF folder + update_weights_from_disk),
colocated (update_weights_from_tensor per bucket), distributed (a gloo/NCCL group with the servers,
update_weights_from_distributed). Every rank takes part in the export (it is collective); global rank
0 alone talks to the servers. With several ranks the replica's first rank sends the requests and
broadcasts the rollout to its TP/PP peers (one set of samples per model replica).
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

from megatron_rpg.rollout.engine import Rollout, SamplingParams
from megatron_rpg.rollout.sglang_recovery import (gather, generate_with_recovery, share, sync_with_recovery,
                                                  wait_for_other_replicas)
from megatron_rpg.rollout.sglang_server import (SGLangClient, SGLangUnreachable, check_bind_address, free_port,
                                                launch_server)
from megatron_rpg.rollout.weight_export import DEFAULT_BUCKET_BYTES

SYNC_MODES = ("disk", "colocated", "distributed")
DEVICES = ("cuda", "cpu")
# tools/setup_sglang_cpu.sh's environment in the repository root
DEFAULT_SGLANG_PYTHON = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                     ".venv-sglang", "bin", "python")


@dataclasses.dataclass(frozen=True)
class SGLangConfig:
    """urls: servers to use (empty: launch num_engines ourselves); the launch settings; request
    timeouts and retries (recoveries per generate or sync: rollout/sglang_recovery.py); the weight
    sync mode and its bucket size."""

    urls: tuple[str, ...] = ()
    num_engines: int = 1
    num_gpus_per_engine: int = 1
    python: str | None = None  # None: DEFAULT_SGLANG_PYTHON if it exists, else python3
    host: str = "127.0.0.1"
    api_key: str | None = None
    device: str = "cuda"
    max_total_tokens: int | None = None
    mem_fraction_static: float = 0.8
    extra_args: str = ""
    start_timeout_s: float = 600.0
    request_timeout_s: float = 600.0
    retries: int = 2
    max_concurrency: int = 64
    sync: str = "disk"
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    work_dir: str | None = None  # HF folders and server logs (default: a temporary folder)

    def __post_init__(self):
        if self.sync not in SYNC_MODES:
            raise ValueError(f"--rollout-sync {self.sync!r}; use one of {list(SYNC_MODES)}")
        if self.device not in DEVICES:
            raise ValueError(f"--sglang-device {self.device!r}; use one of {list(DEVICES)}")
        for name in ("num_engines", "num_gpus_per_engine", "max_concurrency", "bucket_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SGLangConfig.{name}={value!r} must be a positive integer")
        if self.retries < 0:
            raise ValueError(f"--sglang-retries={self.retries} must be >= 0")
        if self.max_total_tokens is not None and self.max_total_tokens < 1:
            raise ValueError(f"--sglang-max-total-tokens={self.max_total_tokens} must be a positive integer")
        if self.python is None:
            object.__setattr__(self, "python", DEFAULT_SGLANG_PYTHON if os.path.isfile(DEFAULT_SGLANG_PYTHON)
                               else "python3")
        if not self.urls:
            check_bind_address(self.host, self.api_key)

    def with_key_from_environment(self) -> "SGLangConfig":
        key = self.api_key or os.environ.get("SGLANG_API_KEY") or None
        return dataclasses.replace(self, api_key=key) if key != self.api_key else self


def sampling_payload(sampling: SamplingParams) -> dict:
    """SGLang's sampling_params for ours: greedy = top_k 1 at the same temperature (so the returned
    log-prob is at that temperature); ignore_eos so only our stop_token_ids end a response."""
    return {"max_new_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
            "top_k": 1 if sampling.greedy else (sampling.top_k or -1), "top_p": sampling.top_p,
            "stop_token_ids": list(sampling.stop_token_ids), "ignore_eos": True,
            "skip_special_tokens": False}


def rollout_from_responses(prompts: list[list[int]], responses: list[tuple[list[int], list[float]]],
                           max_new_tokens: int) -> Rollout:
    """The embedded engine's Rollout layout from (response ids, their log-probs) per prompt."""
    prompt_lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    response_lengths = torch.tensor([len(ids) for ids, _ in responses], dtype=torch.long)
    for (ids, logps), prompt in zip(responses, prompts):
        if len(ids) != len(logps) or len(ids) > max_new_tokens:
            raise ValueError(f"SGLang answered {len(ids)} tokens with {len(logps)} log-probs for a prompt of "
                             f"{len(prompt)} tokens (max_new_tokens {max_new_tokens})")
    width = int((prompt_lengths + response_lengths).max())
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    engine_logp = torch.zeros(len(prompts), width, dtype=torch.float32)
    loss_mask = torch.zeros(len(prompts), width, dtype=torch.float32)
    for row, (prompt, (ids, logps)) in enumerate(zip(prompts, responses)):
        p, r = len(prompt), len(ids)
        tokens[row, :p + r] = torch.tensor(list(prompt) + list(ids), dtype=torch.long)
        engine_logp[row, p:p + r] = torch.tensor(logps, dtype=torch.float32)
        loss_mask[row, p:p + r] = 1.0
    return Rollout(tokens=tokens, loss_mask=loss_mask, engine_logp=engine_logp, prompt_lengths=prompt_lengths,
                   response_lengths=response_lengths)


def _parse_generate(answer: dict) -> tuple[list[int], list[float]]:
    meta = answer["meta_info"]
    ids = [int(i) for i in answer["output_ids"]]
    logps = [float(item[0]) for item in meta["output_token_logprobs"]]
    logp_ids = [int(item[1]) for item in meta["output_token_logprobs"]]
    if logp_ids != ids:
        raise ValueError(f"SGLang's output_token_logprobs name tokens {logp_ids[:8]} but output_ids are {ids[:8]}")
    return ids, logps


class SGLangEngine:
    def __init__(self, config: SGLangConfig, model, hf_config, *, seed: int = 0):
        self.config = config.with_key_from_environment()
        self.model, self.hf_config, self.seed = model, hf_config, int(seed)
        self.calls = 0
        self.servers = []   # LaunchedServer, ours to stop
        self.clients = []   # SGLangClient per server (on global rank 0, or the replica's first rank)
        self.start_s = None
        self.work_dir = self.config.work_dir or tempfile.mkdtemp(prefix="megatron_rpg_sglang_")
        self._syncer = None
        self.restarts = 0          # servers restarted (global rank 0), since the last update_weights
        self.retried_requests = 0  # requests sent again after a recovery (the requesting rank)
        atexit.register(self.close)

    # ---- servers
    def _rank(self) -> int:
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def _start(self) -> None:
        """Launch (or connect to) the servers from the current weights; every rank calls it."""
        from megatron_rpg.rollout.sglang_sync import write_hf_folder

        started = time.perf_counter()
        urls = list(self.config.urls)
        if not urls:
            model_path = os.path.join(self.work_dir, "hf-initial")
            write_hf_folder(self.model, self.hf_config, model_path, write=self._rank() == 0)
            if self._rank() == 0:
                for i in range(self.config.num_engines):
                    log_path = os.path.join(self.work_dir, f"server-{i}.log")
                    self.servers.append(launch_server(self.config, model_path, free_port(), log_path))
                urls = [server.url for server in self.servers]
            urls = share(urls)
        # retries=0: a request without answer is retried by sglang_recovery, after a recovery
        self.clients = [SGLangClient(url, self.config.api_key, timeout_s=self.config.request_timeout_s, retries=0)
                        for url in urls]
        if self._rank() == 0:
            for i, client in enumerate(self.clients):
                client.wait_healthy(self.config.start_timeout_s, self.servers[i] if self.servers else None)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every replica's first rank may send requests now
        if self.config.urls:  # given servers hold other weights: bring them to ours
            self.update_weights()
        self.start_s = time.perf_counter() - started

    def close_syncer(self) -> None:
        """Drop the sync state (the distributed mode's group); the next sync builds config.sync's afresh."""
        if self._syncer is not None:
            self._syncer.close()
            self._syncer = None

    def close(self) -> None:
        self.close_syncer()
        for server in self.servers:
            server.stop()
        self.servers = []

    # ---- rollouts
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> Rollout:
        if not prompts or any(len(prompt) == 0 for prompt in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
        if not self.clients:
            self._start()
        self.calls += 1
        group, source = _replica_group()
        responses = generate_with_recovery(self, lambda indices: self._request_some(prompts, sampling, indices),
                                           len(prompts), group, source)
        if group is not None:
            responses = share(responses, group, source)
        return rollout_from_responses(prompts, responses, sampling.max_new_tokens)

    def end_of_rollouts(self) -> None:
        """This rank's last generate of a rollout phase (a step's draw, an evaluation) is done: with
        data parallelism it waits here until no replica generates, taking part in their recoveries
        (rollout/sglang_recovery.py); collective over all ranks, every rank calls it once per phase.
        A rank that had nothing to generate (fewer evaluation chunks than replicas) starts the engine
        here with the others (the start is collective)."""
        if not self.clients:
            self._start()
        wait_for_other_replicas(self)

    def replica_size(self) -> int:
        """Ranks of one model replica (TP × PP): the world is this many times the DP size."""
        group, _ = _replica_group()
        return 1 if group is None else dist.get_world_size(group)

    def _request_some(self, prompts, sampling, indices: list[int]) -> dict:
        """{index: (ids, log-probs)} of the prompts at `indices`, and "failed": {index: fault} for the
        requests that got no answer (SGLangUnreachable); other errors are raised."""
        params = sampling_payload(sampling)

        def one(index: int):
            client = self.clients[index % len(self.clients)]
            try:
                answer = client.post("/generate", {"input_ids": list(prompts[index]), "sampling_params": params,
                                                   "return_logprob": True})
            except SGLangUnreachable as error:
                return index, None, str(error)
            return index, _parse_generate(answer), None

        out, failed = {}, {}
        with ThreadPoolExecutor(max_workers=min(self.config.max_concurrency, len(indices))) as pool:
            for index, response, fault in pool.map(one, indices):
                if fault is None:
                    out[index] = response
                else:
                    failed[index] = fault
        if failed:
            out["failed"] = failed
        return out

    # ---- weights
    def update_weights(self) -> dict:
        """Brings every server to the trainer's current weights (collective over all ranks); returns
        {"sync_s", "sync_bytes", "sglang_restarts", "sglang_retried_requests"} (the last two: restarts
        by rank 0 and requests sent again by every replica, since the previous call; nothing before the
        servers exist: they start from current weights)."""
        if not self.clients:
            return {}
        started = time.perf_counter()
        sent = sync_with_recovery(self)
        seconds = time.perf_counter() - started
        counts = gather((self.restarts, self.retried_requests))
        restarts, retried = (sum(column) for column in zip(*counts))
        self.restarts = self.retried_requests = 0  # the gather above ends the sync on every rank together
        return {"sync_s": seconds, "sync_bytes": float(sent), "sglang_restarts": float(restarts),
                "sglang_retried_requests": float(retried)}


def _replica_group():
    """(the model-parallel group, its first global rank), or (None, 0) without TP/PP peers."""
    from megatron.core import parallel_state

    if not (dist.is_available() and dist.is_initialized()) or not parallel_state.model_parallel_is_initialized():
        return None, 0
    group = parallel_state.get_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return None, 0
    return group, dist.get_global_rank(group, 0)
