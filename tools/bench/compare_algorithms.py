"""The comparison study: every policy-optimisation method of the trainer side by side on two tasks
that run on a CPU, several seeds each, the same budget of sampled tokens (compare_methods.py).

    python tools/bench/compare_algorithms.py --output runs/compare            # the study (docs/results.md)
    python tools/bench/compare_algorithms.py --output runs/quick --quick      # smoke test, < 1 min

Tasks: repeat-token (the tiny built-in model, synthetic prompts) and arithmetic (a tiny Qwen2 from
tools/make_tiny_hf_model.py, warm-started by tools/sft_warmstart.py, converted; prompts from
examples/data). Each run is the trainer's entry point (`python -m megatron_rpg.train ... --log-jsonl`)
in a process of its own, --jobs at a time, forked from this one after it imported the trainer once
(compare_runner.py); its curves and its held-out score come from the JSONL: the trainer's evaluation
before the first step and after the last (arithmetic: --eval-data examples/data/arithmetic_eval.jsonl,
accuracy; repeat-token: 32 held-out prompts, the task's reward, since whole-response accuracy stays
near 0 at this budget). Writes
OUTPUT/results.json, OUTPUT/results.md (the table) and OUTPUT/curves.png. A run already finished in
OUTPUT with the same flags is not run again (an interrupted study resumes; --report-only tables what
has finished).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), ROOT]  # this checkout's megatron_rpg, not an installed one
from compare_methods import (QUICK_METHODS, all_methods, math_task,  # noqa: E402
                             repeat_token_task, train_iters_for)
from compare_report import summarise, write_plot, write_table  # noqa: E402
from compare_runner import run_all, run_tool  # noqa: E402


def trainer_flags() -> set[str]:
    """The trainer's option strings (which methods it can run: CAPO while it is being built)."""
    from megatron_rpg.training.flags import build_parser

    return set(build_parser()._option_string_actions)


def check_command(argv: list[str], label: str) -> None:
    """The trainer's own validation of a run's flags, before any run starts: a bad method fails fast."""
    import contextlib
    import io

    from megatron_rpg.training.config import parse_train_config

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            parse_train_config(argv)
    except SystemExit:
        raise SystemExit(f"error: {label}: the trainer refuses its flags: {errors.getvalue().strip()}") from None


def build_math_model(folder: str, sft_steps: int) -> str:
    """The megatron checkpoint of the SFT-warm-started tiny arithmetic model (built once per folder)."""
    hf, sft, ckpt = (os.path.join(folder, n) for n in ("tiny-hf", "tiny-sft-hf", "tiny-sft"))
    if not os.path.isdir(ckpt):
        data = os.path.join(ROOT, "examples", "data", "arithmetic_train.jsonl")
        run_tool([sys.executable, "tools/make_tiny_hf_model.py", "--output", hf, "--text", data, "--overwrite"],
             os.path.join(folder, "make_model.log"))
        run_tool([sys.executable, "tools/sft_warmstart.py", "--hf-dir", hf, "--data", data, "--output", sft,
              "--steps", str(sft_steps), "--overwrite"], os.path.join(folder, "sft.log"))
        run_tool([sys.executable, "tools/convert_hf_to_megatron.py", "--hf-dir", sft, "--output", ckpt,
              "--no-progress", "--overwrite"], os.path.join(folder, "convert.log"))
    return ckpt


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def eval_flags(task) -> list[str]:
    """The trainer's default cadence: before the first step and after the last (the table reads those
    two; evaluation samples with its own seeds, so it does not change the training run)."""
    return ["--eval-data", task.heldout["eval_data"]] if task.heldout["kind"] == "math" else []


def run_name(task, method, seed: int) -> str:
    return f"{task.name}_{method.name}_s{seed}"


def train_argv(task, method, seed: int, folder: str) -> list[str]:
    capo = task.capo_flags if method.needs_flag == "--capo" else ()
    return [*task.flags, *method.flags, *capo, "--train-iters", str(train_iters_for(method, task)), "--seed", str(seed),
            "--log-jsonl", os.path.join(folder, run_name(task, method, seed) + ".jsonl"), "--no-progress",
            *eval_flags(task)]


def _kept(task, method, seed: int, folder: str, suffix: str, key: str):
    """`key` of the NAME`suffix` record this (task, method, seed) left in `folder`, if it was written
    for the same flags; else None."""
    path = os.path.join(folder, run_name(task, method, seed) + suffix)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            kept = json.load(f)
        if kept.get("argv") == train_argv(task, method, seed, folder):
            return kept[key]
    return None


def finished_run(task, method, seed: int, folder: str) -> dict | None:
    """The result of this (task, method, seed) finished earlier in `folder` with the same flags, if any
    (an interrupted study resumes)."""
    return _kept(task, method, seed, folder, ".result.json", "result")


def failed_reason(task, method, seed: int, folder: str) -> str | None:
    """Why this (task, method, seed) stopped, if its last run with the same flags did (--report-only)."""
    return _kept(task, method, seed, folder, ".failed.json", "reason")


def collect_run(task, method, seed: int, folder: str, wall_s: float) -> dict:
    """A finished run's steps' records and its held-out score (the last evaluation's), from its JSONL;
    kept beside it as NAME.result.json."""
    name = run_name(task, method, seed)
    records = read_jsonl(os.path.join(folder, name + ".jsonl"))
    evals = [{k: v for k, v in r.items() if k == "step" or k.startswith("eval/")} for r in records
             if "eval/accuracy" in r]
    metric = task.heldout["eval_metric"]
    result = {"task": task.name, "method": method.name, "seed": seed, "train_iters": train_iters_for(method, task),
              "steps": [r for r in records if "reward_mean" in r], "evals": evals, "heldout": evals[-1][metric],
              "heldout_source": f"the trainer's {metric}, Mean@8 at temperature 1, after the last step",
              "wall_s": wall_s}
    with open(os.path.join(folder, name + ".result.json"), "w", encoding="utf-8") as f:
        json.dump({"argv": train_argv(task, method, seed, folder), "result": result}, f)
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output", required=True, help="folder for the runs, results.md/json and curves.png")
    parser.add_argument("--quick", action="store_true", help=f"a smoke test: repeat-token only, 1 seed, 8 steps, "
                        f"methods {', '.join(QUICK_METHODS)}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=None, help="a subset of the method names, run in this order")
    parser.add_argument("--tasks", nargs="+", choices=("repeat-token", "arithmetic"),
                        default=["repeat-token", "arithmetic"])
    parser.add_argument("--repeat-iters", type=int, default=40, help="rollout steps on repeat-token")
    parser.add_argument("--math-iters", type=int, default=40, help="rollout steps on arithmetic")
    parser.add_argument("--math-methods", nargs="+", default=None,
                        help="a subset of the methods on arithmetic (default: all of them)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, each in its own process")
    parser.add_argument("--report-only", action="store_true",
                        help="no training: the table and plot of the runs already finished in --output")
    parser.add_argument("--sft-steps", type=int, default=200, help="SFT warm-start steps of the arithmetic model")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.repeat_iters, args.tasks = 1, 8, ["repeat-token"]
        args.methods = args.methods or list(QUICK_METHODS)
    for flag, value in (("--seeds", args.seeds), ("--jobs", args.jobs)):
        if value < 1:
            parser.error(f"{flag} {value} must be >= 1")
    known = {m.name for m in all_methods(64)}
    for flag, names in (("--methods", args.methods), ("--math-methods", args.math_methods)):
        unknown = sorted(set(names or ()) - known)
        if unknown:
            parser.error(f"{flag}: unknown method(s) {unknown}; choose from {sorted(known)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    flags = trainer_flags()
    tasks = []
    if "repeat-token" in args.tasks:
        tasks.append((repeat_token_task(args.repeat_iters), args.methods))
    if "arithmetic" in args.tasks:
        data = os.path.join(ROOT, "examples", "data")
        ckpt = build_math_model(os.path.abspath(args.output), args.sft_steps)
        tasks.append((math_task(args.math_iters, ckpt, os.path.join(data, "arithmetic_train.jsonl"),
                                os.path.join(data, "arithmetic_eval.jsonl")), args.math_methods))
    folder, plan, skipped, start = os.path.abspath(args.output), [], [], time.perf_counter()
    for seed in range(args.seeds):  # seed-major: a study stopped early has every method at fewer seeds
        for task, names in tasks:
            methods = {m.name: m for m in all_methods(task.rollout_sequences)}
            for method in (methods.values() if names is None else [methods[n] for n in names]):  # in that order
                if method.needs_flag and method.needs_flag not in flags:
                    skipped.append(f"{method.name} (the trainer has no {method.needs_flag} yet)")
                    continue
                plan.append((task, method, seed))
                check_command(train_argv(task, method, seed, folder), f"{task.name} {method.name} seed {seed}")
    runs, missing, failed, todo = [], [], [], []
    for task, method, seed in plan:
        kept = finished_run(task, method, seed, folder)
        if kept is not None:
            runs.append(kept)
        elif args.report_only:
            reason = failed_reason(task, method, seed, folder)
            (failed if reason else missing).append(reason or (task.name, method.name, seed))
        else:
            todo.append((train_argv(task, method, seed, folder),
                         os.path.join(folder, run_name(task, method, seed) + ".log"), (task, method, seed)))

    def done(key, error, wall_s):
        task, method, seed = key
        if error is not None:  # one run stopped by the trainer: the study goes on, the table says so
            reason = [line for line in error.splitlines() if line.startswith("error:")] or ["failed"]
            failed.append(f"{task.name} {method.name} seed {seed}: {reason[-1]}")
            with open(os.path.join(folder, run_name(task, method, seed) + ".failed.json"), "w", encoding="utf-8") as f:
                json.dump({"argv": train_argv(task, method, seed, folder), "reason": failed[-1]}, f)
            print(failed[-1], flush=True)
            return
        runs.append(collect_run(task, method, seed, folder, wall_s))
        print(f"{task.name:12s} {method.name:14s} seed {seed}: held-out {runs[-1]['heldout']:.3f} ({wall_s:.0f} s)",
              flush=True)

    run_all(todo, args.jobs, done)
    runs.sort(key=lambda r: [(t.name, m.name, s) for t, m, s in plan].index((r["task"], r["method"], r["seed"])))
    skipped += [f"stopped by the trainer: {line}" for line in failed]
    if not runs:
        raise SystemExit(f"error: no run of this plan finished in --output {args.output} (same flags, same folder; "
                         f"a --report-only needs a study run first)")
    if missing:
        counts: dict = {}
        for task, method, _ in missing:
            counts[f"{task} {method}"] = counts.get(f"{task} {method}", 0) + 1
        skipped.append("unfinished runs: " + ", ".join(f"{name} ({n} seed(s))" for name, n in counts.items()))
    thresholds = {task.name: task.threshold for task, _ in tasks}
    summary = summarise(runs, thresholds)
    with open(os.path.join(args.output, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"runs": runs, "summary": summary, "skipped": sorted(set(skipped)), "missing": missing,
                   "wall_s": time.perf_counter() - start}, f)
    table = write_table(os.path.join(args.output, "results.md"), summary, thresholds, sorted(set(skipped)))
    write_plot(os.path.join(args.output, "curves.png"), runs, summary)
    print(table)
    print(f"wrote {args.output}/results.md, results.json, curves.png in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
