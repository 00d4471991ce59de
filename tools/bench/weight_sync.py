"""Weight-sync time and bandwidth into a real SGLang server, per --rollout-sync mode, against a raw
gloo broadcast of the same bytes, in one run.

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench/weight_sync.py [--repeats 5] [--hidden 768 --layers 6]

Trainer: one process (TP=PP=1, gloo world of 1), a random Qwen2-shaped megatron model (default: hidden
768, 6 layers, 12 heads / 4 KV heads, FFN 2048, vocab 16000, untied: ≈ 245 MB of float32). Server:
one SGLang server on this machine launched by the SGLang engine (--sglang-device cpu: the CPU
launch of tests/test_sglang_engine.py, with its sgl_kernel stand-in; --sglang-device cuda on a GPU
machine), --max-total-tokens 512. Rows, each timed --repeats times, interleaved (every repetition
runs every row, in an order rotated per repetition, so machine load hits all rows alike):
- export only: export_hf_buckets + the flattened byte buffer per bucket, nothing sent (the
  exporter's share of every mode);
- disk / colocated / distributed: SGLangEngine.update_weights() with that mode, after the weights
  were moved (noise on every parameter), and a check that the server's greedy tokens then equal the
  embedded engine's (a sync that did not arrive would fail it);
- raw gloo broadcast: the bytes of the same buckets, one broadcast per bucket from this process to a
  plain torch process (a 2-rank ProcessGroupGloo over TCP on 127.0.0.1), the buffers exported
  beforehand: the transport floor of the distributed mode, with no HTTP, no SGLang, no export.
GB/s = exported bytes / median seconds. The distributed mode's first sync forms its process group;
that one is reported apart ("group setup") and left out of the medians.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from anywhere: the repo root
from tests.distributed.harness import run_on_ranks  # noqa: E402

SERVER_ARGS = "--dtype float32 --disable-cuda-graph --disable-radix-cache --random-seed 0"
PROMPTS = [[5, 17, 42], [7, 99]]
ROWS = ("export only", "disk", "colocated", "distributed", "raw gloo broadcast")


def _receiver(port: int, sizes: list[int], rounds: int) -> None:
    """The raw baseline's other end: a 2-rank gloo group, `rounds` times one broadcast per bucket size."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, 2, False, timeout=datetime.timedelta(seconds=600))
    group = dist.ProcessGroupGloo(store, 1, 2, datetime.timedelta(seconds=600))
    buffers = [torch.empty(size, dtype=torch.uint8) for size in sizes]
    for _ in range(rounds):
        for buffer in buffers:
            group.broadcast(buffer, 0).wait()


class RawBroadcast:
    """This process as rank 0 of a 2-rank gloo group with a spawned plain-torch receiver."""

    def __init__(self, sizes: list[int], rounds: int):
        import multiprocessing

        import torch.distributed as dist

        from megatron_rpg.rollout.sglang_server import free_port

        port = free_port()
        self.process = multiprocessing.get_context("spawn").Process(target=_receiver, args=(port, sizes, rounds))
        self.process.start()
        store = dist.TCPStore("127.0.0.1", port, 2, True, timeout=datetime.timedelta(seconds=600))
        self.group = dist.ProcessGroupGloo(store, 0, 2, datetime.timedelta(seconds=600))

    def send(self, buffers: list[torch.Tensor]) -> None:
        for buffer in buffers:
            self.group.broadcast(buffer, 0).wait()

    def close(self) -> None:
        self.process.join(timeout=60)


def _perturb(model, generator) -> None:
    from megatron_rpg.megatron.optimizer_setup import bare_model

    with torch.no_grad():
        for param in bare_model(model[0]).parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))


def bench_body(rank, world_size, args, hf_config_path, work_dir):
    from megatron_rpg.megatron.parallel import initialize_parallel
    from megatron_rpg.rollout.embedded import EmbeddedEngine
    from megatron_rpg.rollout.engine import SamplingParams
    from megatron_rpg.rollout.sglang_engine import SYNC_MODES, SGLangConfig, SGLangEngine
    from megatron_rpg.rollout.sglang_sync import build_syncer, flattened_bucket_payload
    from megatron_rpg.rollout.weight_export import export_hf_buckets
    from megatron_rpg.training.build import build_model_and_optimizer
    from megatron_rpg.training.config import parse_train_config

    torch.set_num_threads(args.threads)
    initialize_parallel(1, 1, seed=0)
    config = parse_train_config(["--hf-config", hf_config_path, "--lr", "1e-6", "--seed", "0", "--no-progress"])
    model, _, hf_config = build_model_and_optimizer(config)
    bucket_bytes = int(args.bucket_mb * 2**20)
    sglang = SGLangEngine(SGLangConfig(python=args.sglang_python, device=args.device, max_total_tokens=512,
                                       extra_args=SERVER_ARGS, start_timeout_s=900.0, request_timeout_s=900.0,
                                       work_dir=work_dir, bucket_bytes=bucket_bytes), model, hf_config)
    embedded = EmbeddedEngine(model, vocab_size=hf_config.vocab_size)
    greedy = SamplingParams(max_new_tokens=4, greedy=True)

    def export_only() -> int:
        return sum(flattened_bucket_payload(bucket)[1].numel()
                   for bucket in export_hf_buckets(model, hf_config, bucket_bytes=bucket_bytes))

    started = time.perf_counter()
    sglang.generate(PROMPTS, greedy)  # launches the server from the current weights
    out = {"server_start_s": time.perf_counter() - started, "times": {row: [] for row in ROWS}, "checks": {}}
    buffers = [flattened_bucket_payload(b)[1].clone()
               for b in export_hf_buckets(model, hf_config, bucket_bytes=bucket_bytes)]
    out["bytes"], out["buckets"] = sum(b.numel() for b in buffers), len(buffers)
    raw = RawBroadcast([b.numel() for b in buffers], rounds=args.repeats)
    generator = torch.Generator().manual_seed(0)
    syncers = {mode: build_syncer(mode, sglang) for mode in SYNC_MODES}  # each keeps its state (the group)

    def synced(mode: str) -> float:
        t0 = time.perf_counter()
        sent = syncers[mode].sync()
        seconds = time.perf_counter() - t0
        assert sent == out["bytes"], (mode, sent, out["bytes"])
        return seconds

    try:
        _perturb(model, generator)
        out["group_setup_s"] = synced("distributed")  # forms the process group: timed apart
        for repeat in range(args.repeats):
            order = ROWS[repeat % len(ROWS):] + ROWS[:repeat % len(ROWS)]
            for row in order:
                if row == "export only":
                    t0 = time.perf_counter()
                    assert export_only() == out["bytes"]
                    seconds = time.perf_counter() - t0
                elif row == "raw gloo broadcast":
                    t0 = time.perf_counter()
                    raw.send(buffers)
                    seconds = time.perf_counter() - t0
                else:
                    _perturb(model, generator)
                    seconds = synced(row)
                    same = sglang.generate(PROMPTS, greedy).responses() == embedded.generate(PROMPTS, greedy).responses()
                    out["checks"].setdefault(row, []).append(same)
                out["times"][row].append(seconds)
                print(f"repeat {repeat} {row}: {seconds:.3f} s", flush=True)
    finally:
        raw.close()
        for syncer in syncers.values():
            syncer.close()
        sglang.close()
    return out


def _hf_config_file(args, path: str) -> None:
    from tests.tiny_models import tiny_hf_config

    config = tiny_hf_config("qwen2", hidden_size=args.hidden, num_hidden_layers=args.layers,
                            num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                            intermediate_size=args.ffn, vocab_size=args.vocab, max_position_embeddings=512,
                            initializer_range=0.02, architectures=["Qwen2ForCausalLM"]).to_dict()
    for key in ("dtype", "torch_dtype"):
        config.pop(key, None)
    with open(path, "w") as f:
        json.dump(config, f)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--bucket-mb", type=float, default=64.0, help="--update-weight-buffer-size in MiB")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the trainer process")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="--sglang-device")
    parser.add_argument("--sglang-python", default=str(REPO / ".venv-sglang" / "bin" / "python"))
    parser.add_argument("--json", help="also write the raw figures here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats} must be at least 1")
    if not os.path.isfile(args.sglang_python):
        parser.error(f"--sglang-python {args.sglang_python} does not exist: run tools/setup_sglang_cpu.sh")
    if args.device == "cpu":  # SGLang's import of sgl_kernel needs the stand-in on CPU (the server inherits it)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests" / "sglang_stub"),
                                                                 os.environ.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="weight_sync_bench_") as work_dir:
        hf_config_path = os.path.join(work_dir, "config.json")
        _hf_config_file(args, hf_config_path)
        out = run_on_ranks(bench_body, world_size=1, args=(args, hf_config_path, work_dir), timeout_s=3600)[0]
    mb = out["bytes"] / 1e6
    print(f"\n{mb:.1f} MB of float32 weights in {out['buckets']} buckets of <= {args.bucket_mb:g} MiB; "
          f"server start {out['server_start_s']:.1f} s; distributed group setup + first sync "
          f"{out['group_setup_s']:.2f} s; {args.repeats} interleaved repeats, medians:")
    raw = statistics.median(out["times"]["raw gloo broadcast"])
    print(f"| {'what':<20} | median s | min s | GB/s | x raw broadcast | server = embedded |")
    print("|---|---|---|---|---|---|")
    for row in ROWS:
        times = out["times"][row]
        median = statistics.median(times)
        checks = out["checks"].get(row)
        check = "—" if checks is None else f"{sum(checks)}/{len(checks)}"
        print(f"| {row:<20} | {median:.3f} | {min(times):.3f} | {out['bytes'] / median / 1e9:.3f} | "
              f"{median / raw:.2f} | {check} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
