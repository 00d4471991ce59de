"""CPU time of a tiny HF model's forward+backward with and without CPU mode's torch function mode.

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench/cpu_mode_overhead.py

The mode intercepts every torch call in Python, so its cost is per call; a tiny model (hidden 64,
2 layers) is the worst case. Baseline and mode runs alternate in one process; process CPU time is
used because the shared CI machine's wall clock is noisy.
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from megatron_rpg.megatron.cpu_mode import _CudaToCpuMode  # noqa: E402
from tests.tiny_models import tiny_hf_model  # noqa: E402


def cpu_ms_per_iteration(model, tokens, iterations=40) -> float:
    start = time.process_time()
    for _ in range(iterations):
        model(tokens, labels=tokens).loss.backward()
    return (time.process_time() - start) / iterations * 1e3


def main():
    torch.set_num_threads(1)
    model = tiny_hf_model("qwen2").train()
    tokens = torch.randint(0, 250, (2, 24))
    cpu_ms_per_iteration(model, tokens, 5)  # warm-up
    plain, mode = [], []
    for _ in range(5):
        plain.append(cpu_ms_per_iteration(model, tokens))
        with _CudaToCpuMode():
            mode.append(cpu_ms_per_iteration(model, tokens))
    print(f"tiny qwen2 fwd+bwd, CPU ms/iteration (median of 5 x 40): plain {sorted(plain)[2]:.2f}, "
          f"under CPU mode {sorted(mode)[2]:.2f}")


if __name__ == "__main__":
    main()
