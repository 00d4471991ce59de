"""Time and peak extra memory: chunked `vocab_parallel_logprobs` vs a naive full-vocab float32
`log_softmax` + gather (`full_vocab_logprobs`), forward + backward w.r.t. the logits, TP=1.

    .venv/bin/python tools/bench/logprobs.py --tokens 4096 --vocab 152064 --chunk-size 256 [--forward-only]

Method. Each (variant, round) runs in a fresh subprocess, so no allocator cache or earlier peak
leaks between variants. The worker builds the logits (`--dtype`, default bf16, as megatron's output
layer yields) and targets, then measures memory on the first, cold, forward + backward: it records
the process RSS (`VmRSS`), resets the kernel's RSS high-water mark (`echo 5 > /proc/self/clear_refs`),
runs, and reads the high-water mark (`VmHWM`). Peak extra = HWM − RSS before the run: every byte
torch allocates and touches in that run, whatever the allocator (tracemalloc sees none of it). Only
the cold run counts because blocks freed by an earlier run may stay resident in glibc's heap and be
reused unseen. The figure includes the gradient w.r.t. the logits (an output both variants must
produce, `tokens × V × itemsize`), which is printed so it can be subtracted. Time is the median of
the warm runs (`--repeats` per subprocess) over all rounds; rounds alternate the variants to spread
the noise of a shared machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

DTYPES = ("bf16", "fp32")
VARIANTS = ("naive", "chunked", "naive+entropy", "chunked+entropy")


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def run_worker(args) -> dict:
    import torch

    from megatron_rpg.megatron.logprobs import full_vocab_logprobs, vocab_parallel_logprobs
    # imported now so that its one-time cost (the TP=1 default looks up parallel_state) is not
    # counted in the chunked variant's cold-run memory
    import megatron.core.parallel_state  # noqa: F401

    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    logits = torch.empty(args.tokens, args.vocab, dtype=dtype)
    for start in range(0, args.tokens, 256):  # filled in slices: no full-size float32 temporary
        logits[start:start + 256] = 4 * torch.randn(min(256, args.tokens - start), args.vocab)
    logits.requires_grad_(not args.forward_only)
    targets = torch.randint(0, args.vocab, (args.tokens,))
    weights = torch.randn(args.tokens)
    with_entropy = args.worker.endswith("+entropy")

    def step():
        if args.worker.startswith("chunked"):
            logp, entropy = vocab_parallel_logprobs(logits, targets, chunk_size=args.chunk_size,
                                                    with_entropy=with_entropy)
        else:
            logp, entropy = full_vocab_logprobs(logits, targets, with_entropy=with_entropy)
        if not args.forward_only:
            loss = (logp * weights).sum() + (entropy.sum() if with_entropy else 0)
            loss.backward()
            logits.grad = None

    # Memory: the first (cold) run only. After it, blocks it freed may stay resident in glibc's heap
    # (its mmap threshold grows with freed block sizes) and be reused unseen by a later RSS delta.
    before = _proc_status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    step()
    peak_extra_kib = _proc_status_kib("VmHWM") - before
    times = []
    for _ in range(args.repeats):  # time: warm runs
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"variant": args.worker, "times_s": times, "peak_extra_mib": peak_extra_kib / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per subprocess")
    parser.add_argument("--rounds", type=int, default=2, help="fresh subprocesses per variant")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--forward-only", action="store_true",
                        help="no gradient (the old/reference log-prob pass of an RL step)")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args)))
        return

    import torch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; logits [{args.tokens}, "
          f"{args.vocab}] {args.dtype}; chunk {args.chunk_size} tokens; TP=1")
    runs = {v: {"times_s": [], "peak_extra_mib": []} for v in args.variants}
    for _ in range(args.rounds):
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--worker", variant] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                if k in ("tokens", "vocab", "chunk_size", "dtype", "repeats")]
            cmd += ["--forward-only"] if args.forward_only else []
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            runs[variant]["times_s"] += result["times_s"]
            runs[variant]["peak_extra_mib"].append(result["peak_extra_mib"])

    itemsize = 2 if args.dtype == "bf16" else 4
    grad_mib = 0.0 if args.forward_only else args.tokens * args.vocab * itemsize / 2 ** 20
    print(f"gradient w.r.t. the logits (an output of every variant): {grad_mib:.0f} MiB\n")
    print(f"| variant | {'fwd' if args.forward_only else 'fwd+bwd'} time (s, median [min–max]) | "
          "peak extra memory (MiB, max) | peak extra − grad output (MiB) | time vs naive | "
          "memory vs naive (with / without grad) |")
    print("|---|---:|---:|---:|---:|---:|")
    for variant in args.variants:
        times = runs[variant]["times_s"]
        time_s = statistics.median(times)
        peak = max(runs[variant]["peak_extra_mib"])
        naive = variant.replace("chunked", "naive")
        ratios = ""
        if naive != variant and naive in runs:
            naive_time = statistics.median(runs[naive]["times_s"])
            naive_peak = max(runs[naive]["peak_extra_mib"])
            ratios = (f"{time_s / naive_time:.2f}× | {peak / naive_peak:.3f} / "
                      f"{(peak - grad_mib) / (naive_peak - grad_mib):.3f}")
        else:
            ratios = "1.00× | 1 / 1"
        print(f"| {variant} | {time_s:.2f} [{min(times):.2f}–{max(times):.2f}] | {peak:.0f} | {peak - grad_mib:.0f} | {ratios} |")


if __name__ == "__main__":
    main()
