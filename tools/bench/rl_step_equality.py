"""Residuals of one RL training step at TP=2 / PP=2 / DP=2 (distributed optimizer) / PP=2 tied /
TP=2 float64, each against the single-process step (the runs of tests/distributed/test_parallel_equality.py).

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench/rl_step_equality.py

Prints, per layout and rank: relative error of the loss, of the gradient norm, the largest per-tensor
relative error of the updated parameters and of the update Δθ (full TP=1 layout), and the largest
absolute log-prob difference from compute_logprobs.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere: the repo root
from tests.distributed.harness import run_on_ranks  # noqa: E402
from tests.distributed.test_parallel_equality import _relative, parallel_body, reference_body  # noqa: E402

REFERENCE_OF = {"tp2": None, "pp2": None, "dp2_distributed_optimizer": None,
                "tp2_float64": "float64", "pp2_tied": "tied"}


def main() -> None:
    start = time.perf_counter()
    reference = run_on_ranks(reference_body, world_size=1)[0]
    middle = time.perf_counter()
    parallel = run_on_ranks(parallel_body, world_size=2)
    end = time.perf_counter()
    print(f"spawn wall time: reference {middle - start:.1f} s, 2 ranks × 5 layouts {end - middle:.1f} s")
    print("| layout | rank | loss rel | grad-norm rel | params max rel | update max rel | logp max abs |")
    print("|---|---|---|---|---|---|---|")
    for layout, key in REFERENCE_OF.items():
        expected = reference if key is None else reference[key]
        for rank in (0, 1):
            result = parallel[rank][layout]
            params = max(_relative(result["after"][n], expected["after"][n]) for n in expected["after"])
            update = max(_relative(result["update"][n], expected["update"][n]) for n in expected["after"])
            logp = "—"
            if layout != "dp2_distributed_optimizer":  # DP ranks hold different micro-batches
                logp = f"{float((torch.as_tensor(result['logp']) - torch.as_tensor(expected['logp'])).abs().max()):.1e}"
            print(f"| {layout} | {rank} | {abs(result['loss'] / expected['loss'] - 1):.1e} "
                  f"| {abs(result['grad_norm'] / expected['grad_norm'] - 1):.1e} | {params:.1e} "
                  f"| {update:.1e} | {logp} |")


if __name__ == "__main__":
    main()
