"""Whole RL step against a peer: TRL's GRPOTrainer and megatron_rpg's trainer (--loss grpo) on the
same tiny Qwen2 model, prompts, reward and hyper-parameters, run interleaved (TRL, ours, TRL, ours,
...) so that the machine's load falls on both alike. Prints completions/s of each, their ratio and
the peak RSS of each process tree.

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench/vs_trl.py --steps 10 --threads 1 --rounds 2

TRL lives in its own venv (--trl-env, default ~/.cache/megatron_rpg/bench-trl), created on first use
with python3.11: torch==2.13.0 first (served as the CPU build here; an unpinned torch would pull a
CUDA build), then TRL_PINS. Nothing is installed into the project's environment.

The task: --prompts prompts × --samples responses × --tokens new tokens per step (default the issue's
16 × 8 × 8), arithmetic prompts ("Compute 3 + 4."), reward = the project's math correctness of the
decoded response (+1 / −1; --task math with --overlong-buffer 0 here, the same function on TRL's
decoded completions there). Both: temperature 1, Adam (lr --lr, no weight decay, clip 1.0), PPO clip
0.2, β = 0 (no reference model), group-normalised advantages, token-mean loss over the batch, one
optimizer step per rollout batch, micro-batches of --micro-batch-size. The model is random, built
locally by tools/make_tiny_hf_model.py (no hub download): a byte-level BPE tokenizer filled to VOCAB
tokens and a Qwen2 of hidden 64, 2 layers, saved as an HF folder and converted with tools/convert_hf_to_megatron.py for our trainer.

completions/s is the steady state: completions of steps 2..N over the time from the end of step 1 to
the end of step N (process start-up, imports and the first step's warm-up left out; the whole
process wall time is printed too). On a shared, busy machine the wall-clock rate of one run swings
with the load; completions per CPU-second (the process tree's user + system time over the same
steps, read when each step's log line appears) moves much less, and is printed beside it. The one asymmetry left in: TRL with num_iterations=1 takes its
old log-probs from the training forward, our trainer recomputes them (a forward-only pass) because
its engine/trainer log-prob gap metric compares against them.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
TORCH_PIN = "torch==2.13.0"
TRL_PINS = ("trl==1.16.0", "transformers==5.24.0", "tokenizers==0.23.3", "accelerate==1.15.0",
            "datasets==5.2.0", "psutil==7.2.2")
VOCAB = 384  # a multiple of 128: megatron pads the vocabulary to one, so both sample over the same ids
NUM_PROMPTS = 64


def ensure_trl_env(env: Path) -> Path:
    """The TRL venv's python, creating and filling the venv if TRL is not importable there."""
    python = env / "bin" / "python"
    check = [str(python), "-c", "import trl, sys; sys.exit(trl.__version__ != '%s')" % TRL_PINS[0].split("==")[1]]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"creating the TRL environment {env} (once)", flush=True)
    subprocess.run(["python3.11", "-m", "venv", str(env)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [TORCH_PIN], check=True)  # first: the CPU build; later pins must not replace it
    subprocess.run(pip + [TORCH_PIN, *TRL_PINS], check=True)
    return python


def build_assets(work: Path) -> None:
    """work/hf (tools/make_tiny_hf_model.py's random Qwen2 + BPE tokenizer, trained on the prompts and
    answers, its vocabulary filled to VOCAB), work/prompts.jsonl, work/megatron (the converted checkpoint)."""
    sys.path.insert(0, str(REPO / "tools"))
    from make_tiny_hf_model import build

    rng = random.Random(0)
    pairs = [(rng.randint(0, 20), rng.randint(0, 20)) for _ in range(NUM_PROMPTS)]
    rows = [{"prompt": f"Compute {a} + {b}.", "answer": str(a + b)} for a, b in pairs]
    with open(work / "prompts.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    # every id either side can sample decodes the same way: the tokenizer fills the padded vocabulary
    build(str(work / "hf"), str(work / "prompts.jsonl"), vocab_size=VOCAB, hidden_size=64, layers=2, seed=0,
          fill_vocab=True)
    subprocess.run([sys.executable, str(REPO / "tools/convert_hf_to_megatron.py"), "--hf-dir", str(work / "hf"),
                    "--output", str(work / "megatron"), "--overwrite", "--no-progress"], check=True,
                   env=_env(1), capture_output=True)


def _env(threads: int, tree: Path = REPO) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    others = [path for path in os.environ.get("PYTHONPATH", "").split(os.pathsep) if path and Path(path) != REPO]
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *others])
    return env


def run_measured(command: list[str], threads: int, log: Path, steps_file: Path, tree: Path = REPO) -> dict:
    """Wall seconds, peak RSS (bytes) of the process and all its children, and their CPU seconds at
    the moment steps_file (one line per finished step) first had k lines, for each k seen; polled
    every 20 ms."""
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        process = subprocess.Popen(command, env=_env(threads, tree), stdout=out, stderr=subprocess.STDOUT, cwd=tree)
    peak, cpu_at_step = 0, {}
    watched = psutil.Process(process.pid)

    def poll():
        nonlocal peak
        while process.poll() is None:
            try:
                tree = [watched, *watched.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree))
                if steps_file.exists():
                    done = len(steps_file.read_bytes().splitlines())
                    if done and done not in cpu_at_step:
                        cpu_at_step[done] = sum(sum(p.cpu_times()[:2]) for p in tree)
            except (psutil.Error, OSError):
                pass
            time.sleep(0.02)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    code = process.wait()
    thread.join()
    if code != 0:
        raise SystemExit(f"{command[:4]} failed with exit status {code}; see {log}")
    return {"wall": time.perf_counter() - started, "rss": peak, "cpu_at_step": cpu_at_step}


def cpu_rate(cpu_at_step: dict, completions_per_step: int) -> float:
    """Completions per CPU-second of the process tree from the first step end seen (step 1 unless a
    poll missed it) to the last: what a busy shared machine changes least (one thread each)."""
    if not cpu_at_step or min(cpu_at_step) == max(cpu_at_step):
        return float("nan")
    first, last = min(cpu_at_step), max(cpu_at_step)
    return (last - first) * completions_per_step / (cpu_at_step[last] - cpu_at_step[first])


def steady_rate(step_end_s: list[float], completions_per_step: int) -> float:
    """Completions/s of steps 2..N: the first step's warm-up (allocations, lazy set-up) left out."""
    if len(step_end_s) < 2:
        raise SystemExit("need --steps ≥ 2 to measure the steady state")
    return (len(step_end_s) - 1) * completions_per_step / (step_end_s[-1] - step_end_s[0])


def run_trl(python: Path, work: Path, args, index: int) -> dict:
    out = work / f"trl_{index}.json"
    command = [str(python), str(REPO / "tools/bench/vs_trl_peer.py"), "--work", str(work), "--out", str(out),
               "--steps", str(args.steps), "--threads", str(args.threads), "--prompts", str(args.prompts),
               "--samples", str(args.samples), "--tokens", str(args.tokens),
               "--micro-batch-size", str(args.micro_batch_size), "--lr", str(args.lr)]
    measured = run_measured(command, args.threads, work / f"trl_{index}.log", out.with_suffix(".steps"))
    with open(out, encoding="utf-8") as f:
        step_end = json.load(f)["step_end_s"]
    return _result(measured, step_end, args)


def _result(measured: dict, step_end: list[float], args) -> dict:
    completions = args.prompts * args.samples
    return {"rate": steady_rate(step_end, completions), "cpu_rate": cpu_rate(measured["cpu_at_step"], completions),
            "wall": measured["wall"], "rss": measured["rss"]}


def run_ours(work: Path, args, index: int, tree: Path = REPO) -> dict:
    """Our trainer from `tree` (this checkout, or --baseline-tree: another checkout of the project)."""
    tag = "ours" if tree == REPO else "baseline"
    log_jsonl = work / f"{tag}_{index}.jsonl"
    log_jsonl.unlink(missing_ok=True)
    command = [sys.executable, "-m", "megatron_rpg.train", "--load", str(work / "megatron"), "--task", "math",
               "--prompt-data", str(work / "prompts.jsonl"), "--overlong-buffer", "0",
               "--loss", "grpo", "--advantage-estimator", "grpo", "--rpg-beta", "0",
               "--rollout-batch-size", str(args.prompts), "--rollout-samples-per-prompt", str(args.samples),
               "--rollout-max-new-tokens", str(args.tokens), "--rollout-temperature", "1.0",
               "--micro-batch-size", str(args.micro_batch_size), "--num-mini-batches", "1",
               "--lr", str(args.lr), "--weight-decay", "0", "--clip-grad", "1.0", "--train-iters", str(args.steps),
               "--seed", "0", "--no-progress", "--log-jsonl", str(log_jsonl)]
    if args.logprob_micro_batch_size is not None and tree == REPO:
        command += ["--logprob-micro-batch-size", str(args.logprob_micro_batch_size)]
    measured = run_measured(command, args.threads, work / f"{tag}_{index}.log", log_jsonl, tree)
    with open(log_jsonl, encoding="utf-8") as f:
        step_end = [json.loads(line)["elapsed_s"] for line in f]
    return _result(measured, step_end, args)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="RL steps per run (≥ 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch/OMP threads of each trainer")
    parser.add_argument("--rounds", type=int, default=2, help="TRL, ours pairs, interleaved")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step")
    parser.add_argument("--samples", type=int, default=8, help="responses per prompt (the group size)")
    parser.add_argument("--tokens", type=int, default=8, help="new tokens per response")
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--logprob-micro-batch-size", type=int, default=None,
                        help="our trainer's --logprob-micro-batch-size (its old log-prob recompute; TRL has none)")
    parser.add_argument("--work", default=None, help="folder for the model, prompts and logs (default: a new one)")
    parser.add_argument("--baseline-tree", default=None,
                        help="another checkout of the project whose trainer runs as a third contestant (old vs new)")
    parser.add_argument("--trl-env", default=str(Path.home() / ".cache/megatron_rpg/bench-trl"))
    args = parser.parse_args(argv)
    if args.steps < 2 or args.rounds < 1 or args.threads < 1:
        parser.error(f"--steps {args.steps} must be ≥ 2, --rounds {args.rounds} and --threads {args.threads} ≥ 1")
    if args.prompts > NUM_PROMPTS:
        parser.error(f"--prompts {args.prompts}: the prompt set holds {NUM_PROMPTS}")
    import tempfile

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="vs_trl_"))
    work.mkdir(parents=True, exist_ok=True)
    python = ensure_trl_env(Path(args.trl_env))
    build_assets(work)
    contestants = [("TRL GRPOTrainer", lambda index: run_trl(python, work, args, index)),
                   ("megatron_rpg", lambda index: run_ours(work, args, index))]
    if args.baseline_tree:
        contestants.append(("megatron_rpg baseline", lambda index: run_ours(work, args, index, Path(args.baseline_tree))))
    results = {name: [] for name, _ in contestants}
    for index in range(args.rounds):
        for name, run in contestants:
            result = run(index)
            results[name].append(result)
            print(f"round {index + 1} {name:16s} {result['rate']:8.1f} completions/s  "
                  f"{result['cpu_rate']:8.1f} per CPU-s  wall {result['wall']:6.1f} s  "
                  f"peak RSS {result['rss'] / 2**20:7.0f} MiB", flush=True)
    print(f"\n{args.prompts} prompts × {args.samples} samples × {args.tokens} tokens per step, {args.steps} steps, "
          f"{args.threads} thread(s), {args.rounds} interleaved rounds; work folder {work}")
    print("| trainer | completions/s (median) | per round | completions per CPU-s (median) | peak RSS (MiB, max) "
          "| process wall s (median) |")
    print("|---|---|---|---|---|---|")
    medians = {}
    for name, runs in results.items():
        medians[name] = statistics.median(r["rate"] for r in runs)
        per_round = ", ".join(f"{r['rate']:.1f}" for r in runs)
        cpu_median = statistics.median(r["cpu_rate"] for r in runs)
        print(f"| {name} | {medians[name]:.1f} | {per_round} | {cpu_median:.1f} | "
              f"{max(r['rss'] for r in runs) / 2**20:.0f} | {statistics.median(r['wall'] for r in runs):.1f} |")
    ratios = [ours["rate"] / peer["rate"] for peer, ours in zip(results["TRL GRPOTrainer"], results["megatron_rpg"])]
    print(f"\nratio megatron_rpg / TRL: {medians['megatron_rpg'] / medians['TRL GRPOTrainer']:.2f}× of the medians; "
          f"per round (each pair run back to back) {', '.join(f'{r:.2f}' for r in ratios)}, "
          f"median {statistics.median(ratios):.2f}×")
    for name in [name for name in results if name != "TRL GRPOTrainer"]:
        cpu_ratios = [ours["cpu_rate"] / peer["cpu_rate"]
                      for peer, ours in zip(results["TRL GRPOTrainer"], results[name])]
        print(f"ratio {name} / TRL per CPU-second: per round {', '.join(f'{r:.2f}' for r in cpu_ratios)}, "
              f"median {statistics.median(cpu_ratios):.2f}×")


if __name__ == "__main__":
    main()
