#!/usr/bin/env python
"""Benchmark: HF -> megatron (and back) conversion time and peak memory vs a plain `torch.save`.

    OMP_NUM_THREADS=2 .venv/bin/python tools/bench/conversion.py --workdir /tmp/conversion_bench

Writes a random ~1B-parameter Qwen2-shaped model (bf16 safetensors, two shards + index) once, then
runs each job in its own process, in the same invocation:
- baseline: `safetensors.load_file` of every shard + `torch.save` of the whole state dict;
- HF -> megatron: tools/convert_hf_to_megatron.py (TP=2, PP=2 metadata);
- megatron -> HF: tools/convert_megatron_to_hf.py.
Peak memory, three ways: the job process's own peak RSS (`wait4` ru_maxrss; includes mmap'd file
pages), and, sampled every 20 ms over the job's process tree (megatron's writer forks helpers), the
peak summed PSS and the peak summed anonymous PSS (without file-backed page cache). Not part of CI.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BASELINE = """
import glob, sys, torch
from safetensors.torch import load_file
state = {}
for path in sorted(glob.glob(sys.argv[1] + "/*.safetensors")):
    state.update(load_file(path))
torch.save(state, sys.argv[2])
"""


def write_random_model(hf_dir: str, args) -> int:
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Config

    from megatron_rpg.checkpoint import hf_mapping

    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, tie_word_embeddings=False)
    config.architectures = ["Qwen2ForCausalLM"]
    config.dtype = torch.bfloat16
    os.makedirs(hf_dir, exist_ok=True)
    config.save_pretrained(hf_dir)
    shapes = hf_mapping.hf_shapes(config)
    names = list(shapes)
    halves = (names[: len(names) // 2], names[len(names) // 2:])
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, part in enumerate(halves):
        file_name = f"model-{i + 1:05d}-of-00002.safetensors"
        shard = {n: (torch.randn(shapes[n], generator=generator) * 0.02).to(torch.bfloat16) for n in part}
        save_file(shard, os.path.join(hf_dir, file_name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in shard.values())
        weight_map.update({n: file_name for n in part})
        del shard
    with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return sum(torch.Size(s).numel() for s in shapes.values())


def _rollup(pid: int) -> tuple[int, int]:
    """(Pss, Pss_Anon) in bytes from /proc/<pid>/smaps_rollup."""
    values = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if parts[0] in ("Pss:", "Pss_Anon:"):
                values[parts[0]] = int(parts[1]) * 1024
    return values.get("Pss:", 0), values.get("Pss_Anon:", 0)


def tree_pss(process: psutil.Process) -> tuple[int, int]:
    """(Pss, Pss_Anon) summed over the process tree. PSS counts pages shared between the job and the
    helper processes megatron's writer forks once in total. Pss_Anon leaves out file-backed pages:
    safetensors tensors are mmap views of the file (page cache, reclaimable), so Pss_Anon is the
    memory the job really needs."""
    total, anon = 0, 0
    for p in [process, *process.children(recursive=True)]:
        try:
            pss, pss_anon = _rollup(p.pid)
        except (OSError, psutil.Error):
            continue
        total, anon = total + pss, anon + pss_anon
    return total, anon


def measure(command: list[str]) -> dict:
    """Wall time, own peak RSS and sampled process-tree peak PSS / anonymous PSS of one job."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    handle = psutil.Process(proc.pid)
    peak_tree, peak_anon = 0, 0
    done = threading.Event()

    def sample():
        nonlocal peak_tree, peak_anon
        while not done.is_set():
            try:
                pss, anon = tree_pss(handle)
                peak_tree, peak_anon = max(peak_tree, pss), max(peak_anon, anon)
            except psutil.Error:
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    stderr = proc.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{command} failed:\n{stderr[-4000:]}")
    return dict(wall_s=wall, peak_rss_gib=usage.ru_maxrss * 1024 / 2**30, peak_tree_pss_gib=peak_tree / 2**30,
                peak_tree_anon_gib=peak_anon / 2**30)


def folder_gib(path: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/conversion_bench")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()

    hf_dir = os.path.join(args.workdir, "hf")
    shutil.rmtree(args.workdir, ignore_errors=True)
    params = write_random_model(hf_dir, args)
    python = sys.executable
    jobs = {
        "baseline: load_file + torch.save": [python, "-c", BASELINE, hf_dir, os.path.join(args.workdir, "plain.pt")],
        "HF -> megatron (torch_dist)": [python, "tools/convert_hf_to_megatron.py", "--hf-dir", hf_dir, "--output",
                                        os.path.join(args.workdir, "megatron"), "--tensor-model-parallel-size", "2",
                                        "--pipeline-model-parallel-size", "2", "--no-progress"],
        "megatron -> HF (safetensors)": [python, "tools/convert_megatron_to_hf.py", "--input",
                                         os.path.join(args.workdir, "megatron"), "--output",
                                         os.path.join(args.workdir, "hf_back"), "--no-progress"],
    }
    print(f"model: {params / 1e9:.3f} B parameters, bf16 safetensors {folder_gib(hf_dir):.2f} GiB")
    print("| job | wall s | peak RSS GiB (process) | peak PSS GiB (tree) | peak anonymous PSS GiB (tree) |")
    print("|---|---|---|---|---|")
    for name, command in jobs.items():
        result = measure(command)
        print(f"| {name} | {result['wall_s']:.1f} | {result['peak_rss_gib']:.2f} | {result['peak_tree_pss_gib']:.2f} "
              f"| {result['peak_tree_anon_gib']:.2f} |", flush=True)
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
