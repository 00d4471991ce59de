"""Time and peak extra memory: chunked `vocab_parallel_logprobs` vs a naive full-vocab float32
`log_softmax` + gather (`full_vocab_logprobs`), forward + backward w.r.t. the logits, TP=1.
With `--hidden H` the output layer is included: the inputs are hidden states `[tokens, H]` and an
output weight `[V, H]`, the naive and chunked variants compute the logits `h Wᵀ` first, and the
`fused` variants (`fused_output_logprobs`) compute them tile by tile; the backward produces the
gradients of the hidden states and of the weight (and, unfused, of the logits in between).

    .venv/bin/python tools/bench/logprobs.py --tokens 4096 --vocab 152064 --chunk-size 256 [--forward-only]
    .venv/bin/python tools/bench/logprobs.py --tokens 4096 --vocab 152064 --hidden 896 --chunk-size 256

Method. Each (variant, round) runs in a fresh subprocess, so no allocator cache or earlier peak
leaks between variants. The worker builds the logits (`--dtype`, default bf16, as megatron's output
layer yields) and targets, then measures memory on the first, cold, forward + backward: it records
the process RSS (`VmRSS`), resets the kernel's RSS high-water mark (`echo 5 > /proc/self/clear_refs`),
runs, and reads the high-water mark (`VmHWM`). Peak extra = HWM − RSS before the run: every byte
torch allocates and touches in that run, whatever the allocator (tracemalloc sees none of it). Only
the cold run counts because blocks freed by an earlier run may stay resident in glibc's heap and be
reused unseen. The figure includes the gradients every variant must return (w.r.t. the logits,
`tokens × V × itemsize`; with `--hidden`, w.r.t. the hidden states and the weight,
`(tokens + V) × H × itemsize`), which are printed so they can be subtracted. Time is the median of
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
VARIANTS = ("naive", "chunked", "fused", "naive+entropy", "chunked+entropy", "fused+entropy")


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def run_worker(args) -> dict:
    import torch

    from megatron_rpg.megatron.fused_output import fused_output_logprobs
    from megatron_rpg.megatron.logprobs import full_vocab_logprobs, vocab_parallel_logprobs
    # imported now so that its one-time cost (the TP=1 default looks up parallel_state) is not
    # counted in the chunked variant's cold-run memory
    import megatron.core.parallel_state  # noqa: F401

    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.hidden:  # hidden states and weight scaled so that the logits have std ≈ 4 as below
        hidden = torch.randn(args.tokens, args.hidden).to(dtype).requires_grad_(not args.forward_only)
        weight = (4 / args.hidden ** 0.5 * torch.randn(args.vocab, args.hidden)).to(dtype)
        weight.requires_grad_(not args.forward_only)
        leaves = (hidden, weight)
    else:
        logits = torch.empty(args.tokens, args.vocab, dtype=dtype)
        for start in range(0, args.tokens, 256):  # filled in slices: no full-size float32 temporary
            logits[start:start + 256] = 4 * torch.randn(min(256, args.tokens - start), args.vocab)
        logits.requires_grad_(not args.forward_only)
        leaves = (logits,)
    targets = torch.randint(0, args.vocab, (args.tokens,))
    weights = torch.randn(args.tokens)
    with_entropy = args.worker.endswith("+entropy")

    def step():
        if args.worker.startswith("fused"):
            logp, entropy = fused_output_logprobs(hidden, weight, targets, chunk_size=args.chunk_size,
                                                  with_entropy=with_entropy)
        else:
            # the unfused output layer: the full [tokens, V] logits (and, in backward, their gradient)
            step_logits = torch.matmul(hidden, weight.t()) if args.hidden else logits
            if args.worker.startswith("chunked"):
                logp, entropy = vocab_parallel_logprobs(step_logits, targets, chunk_size=args.chunk_size,
                                                        with_entropy=with_entropy)
            else:
                logp, entropy = full_vocab_logprobs(step_logits, targets, with_entropy=with_entropy)
            del step_logits
        if not args.forward_only:
            loss = (logp * weights).sum() + (entropy.sum() if with_entropy else 0)
            loss.backward()
            for leaf in leaves:
                leaf.grad = None

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
    parser.add_argument("--hidden", type=int, default=0,
                        help="include the output layer: hidden states [tokens, H] and weight [V, H]")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per subprocess")
    parser.add_argument("--rounds", type=int, default=2, help="fresh subprocesses per variant")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS,
                        help="default: all (the fused ones only with --hidden)")
    parser.add_argument("--forward-only", action="store_true",
                        help="no gradient (the old/reference log-prob pass of an RL step)")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variants is None:
        args.variants = [v for v in VARIANTS if args.hidden or not v.startswith("fused")]
    elif not args.hidden and any(v.startswith("fused") for v in args.variants):
        parser.error("the fused variants need --hidden H (they start from hidden states, not logits)")
    if args.worker:
        print(json.dumps(run_worker(args)))
        return

    import torch
    inputs = (f"hidden [{args.tokens}, {args.hidden}] and weight [{args.vocab}, {args.hidden}]"
              if args.hidden else f"logits [{args.tokens}, {args.vocab}]")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {inputs} {args.dtype}; "
          f"chunk {args.chunk_size} tokens; TP=1")
    runs = {v: {"times_s": [], "peak_extra_mib": []} for v in args.variants}
    for _ in range(args.rounds):
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--worker", variant] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                if k in ("tokens", "vocab", "chunk_size", "dtype", "repeats", "hidden")]
            cmd += ["--forward-only"] if args.forward_only else []
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            runs[variant]["times_s"] += result["times_s"]
            runs[variant]["peak_extra_mib"].append(result["peak_extra_mib"])

    itemsize = 2 if args.dtype == "bf16" else 4
    grad_cells = (args.tokens + args.vocab) * args.hidden if args.hidden else args.tokens * args.vocab
    grad_mib = 0.0 if args.forward_only else grad_cells * itemsize / 2 ** 20
    print(f"gradients w.r.t. the {'hidden states and weight' if args.hidden else 'logits'} "
          f"(outputs of every variant): {grad_mib:.0f} MiB\n")
    print(f"| variant | {'fwd' if args.forward_only else 'fwd+bwd'} time (s, median [min–max]) | "
          "peak extra memory (MiB, max) | peak extra − grad output (MiB) | time vs naive | "
          "memory vs naive (with / without grad) |")
    print("|---|---:|---:|---:|---:|---:|")
    for variant in args.variants:
        times = runs[variant]["times_s"]
        time_s = statistics.median(times)
        peak = max(runs[variant]["peak_extra_mib"])
        naive = variant.replace("chunked", "naive").replace("fused", "naive")
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
