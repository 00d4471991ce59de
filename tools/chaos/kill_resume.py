#!/usr/bin/env python
"""Kill the trainer with SIGKILL at random moments, resume it, and compare with an uninterrupted run.

    python tools/chaos/kill_resume.py --trials 20 --tp2-trials 4 --workdir /tmp/chaos

A reference run (the tiny config, --train-iters STEPS, --save-interval INTERVAL) is trained once
(and once at TP=2 over 2 gloo processes when --tp2-trials > 0). Each trial starts the same run with
--load DIR --save DIR (what a requeued job does), kills it — inside a save with probability
--in-save-fraction (the moment our staging marker appears, plus a random part of the first half of
a save's duration),
else at a uniform moment of the run; in a TP=2 trial one of the two ranks — then reruns the same
command until it finishes. A trial counts as:
- clean resume: the rerun exited 0;
- bitwise equal: every model and optimizer tensor (and every stored byte object) of the final
  checkpoint is torch.equal to the reference's, and the HF export's safetensors bytes are identical;
- corrupted: a checkpoint left by the kill fails its checksums, or the rerun could not load;
- leftovers: staging folders after the rerun, and processes forked/spawned by the killed trainer
  still alive 3 s after the kill.
Prints a table; exit status 0 when every trial resumed cleanly and bitwise equal with no leftovers.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from megatron_rpg.checkpoint import integrity, layout  # noqa: E402 - after the path set-up

SETTLE_S = 3.0  # how long a killed trainer's children get to exit before they count as leftovers


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20, help="kill-and-resume trials in all")
    parser.add_argument("--tp2-trials", type=int, default=0,
                        help="how many of them run TP=2 over 2 processes (torchrun) and kill one rank")
    parser.add_argument("--steps", type=int, default=12, help="--train-iters of every run")
    parser.add_argument("--save-interval", type=int, default=2)
    parser.add_argument("--in-save-fraction", type=float, default=0.6, help="share of kills aimed inside a save")
    parser.add_argument("--seed", type=int, default=0, help="draws the kill moments")
    parser.add_argument("--workdir", required=True, help="scratch folder (created; emptied first)")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="limit for one trainer run")
    return parser.parse_args(argv)


def trainer_command(args, save: str, tp: int) -> list[str]:
    flags = ["--config", os.path.join(REPO, "examples", "tiny_cpu.yaml"), "--no-progress",
             "--train-iters", str(args.steps), "--save-interval", str(args.save_interval),
             "--load", save, "--save", save]
    if tp == 1:
        return [sys.executable, "-m", "megatron_rpg.train", *flags]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp),
            "-m", "megatron_rpg.train", *flags, "--tensor-model-parallel-size", str(tp)]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}


def run_to_end(command: list[str], timeout_s: float) -> tuple[int, str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=REPO, env=_env())
    return done.returncode, done.stderr[-3000:]


def _staging_in_progress(save: str) -> bool:
    return os.path.isdir(save) and any(layout.is_staging_folder(os.path.join(save, n)) for n in os.listdir(save))


def kill_during_run(command: list[str], save: str, *, in_save: bool, save_s: float, run_s: float,
                    one_rank: bool, rng: random.Random) -> dict:
    """Starts the trainer, kills it (or one rank) as chosen; returns what happened."""
    import psutil

    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO, env=_env())
    launcher = psutil.Process(process.pid)
    started = time.perf_counter()
    deadline = started + (run_s * 3 + 120)
    moment = rng.uniform(0.2, 1.0) * run_s
    while process.poll() is None and time.perf_counter() < deadline:
        if in_save and _staging_in_progress(save):
            time.sleep(rng.uniform(0.0, 0.5 * save_s))  # the save's first half: the writes, the checksums
            break
        if not in_save and time.perf_counter() - started >= moment:
            break
        time.sleep(0.005)
    if process.poll() is not None:
        return {"killed": False, "survivors": 0, "where": "finished first"}
    family = _descendants(launcher)
    victim = launcher
    if one_rank:  # a rank of the torchrun group: a child running the trainer
        ranks = [p for p in family if "megatron_rpg.train" in " ".join(_cmdline(p)) and p.ppid() == launcher.pid]
        victim = rng.choice(ranks) if ranks else launcher
    where = "save" if _staging_in_progress(save) else "step"
    victim.kill()
    if one_rank:
        try:
            process.wait(timeout=120)  # torchrun notices the dead rank and stops the other
        except subprocess.TimeoutExpired:
            launcher.kill()
    process.wait()
    time.sleep(SETTLE_S)
    survivors = [p for p in family if p.pid != process.pid and _alive(p)]
    for p in survivors:  # reported, then cleaned up so that the next trial starts alone
        p.kill()
    return {"killed": True, "survivors": len(survivors), "where": where,
            "survivor_names": sorted({" ".join(_cmdline(p))[:80] for p in survivors})}


def _descendants(process) -> list:
    import psutil

    try:
        return process.children(recursive=True)
    except psutil.Error:
        return []


def _cmdline(process) -> list[str]:
    import psutil

    try:
        return process.cmdline()
    except psutil.Error:
        return []


def _alive(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def checkpoint_contents(directory: str) -> dict:
    """Every entry of a torch_dist checkpoint (tensors, and megatron's byte objects as bytes) plus
    common.pt, read without building a model."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    _load_state_dict(state, storage_reader=FileSystemReader(directory), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    state["common.pt"] = torch.load(os.path.join(directory, "common.pt"), weights_only=False)
    return state


def equal_contents(left, right) -> bool:
    import io

    import torch

    if isinstance(left, torch.Tensor) or isinstance(right, torch.Tensor):
        return (isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor) and left.dtype == right.dtype
                and left.shape == right.shape and torch.equal(left, right))
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(equal_contents(left[k], right[k]) for k in left)
    if isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
        return len(left) == len(right) and all(equal_contents(a, b) for a, b in zip(left, right))
    if isinstance(left, io.BytesIO) and isinstance(right, io.BytesIO):
        return left.getvalue() == right.getvalue()
    return left == right


def hf_export_bytes(directory: str, out: str) -> dict[str, bytes]:
    from megatron_rpg.checkpoint.convert import megatron_to_hf_checkpoint

    megatron_to_hf_checkpoint(directory, out, overwrite=True, progress=False)
    return {name: open(os.path.join(out, name), "rb").read() for name in sorted(os.listdir(out))
            if name.endswith(".safetensors")}


def damaged_checkpoints(save: str) -> list[str]:
    damaged = []
    for step in layout.iterations(save):
        try:
            integrity.verify_checkpoint(os.path.join(save, layout.iteration_name(step)))
        except integrity.DamagedCheckpoint as error:
            damaged.append(str(error))
    return damaged


def reference(args, tp: int) -> dict:
    save = os.path.join(args.workdir, f"reference_tp{tp}")
    started = time.perf_counter()
    code, stderr = run_to_end(trainer_command(args, save, tp), args.timeout_s)
    if code != 0:
        raise SystemExit(f"the reference run (TP={tp}) failed:\n{stderr}")
    run_s = time.perf_counter() - started
    save_times = [float(line.rsplit(", ", 1)[1].split(" s)")[0]) for line in stderr.splitlines()
                  if line.startswith("saved checkpoint ")]
    final = os.path.join(save, layout.iteration_name(args.steps))
    return {"run_s": run_s, "save_s": max(save_times, default=0.2), "contents": checkpoint_contents(final),
            "hf": hf_export_bytes(final, os.path.join(args.workdir, f"reference_tp{tp}_hf"))}


def trial(args, index: int, tp: int, ref: dict, rng: random.Random) -> dict:
    save = os.path.join(args.workdir, f"trial{index:03d}_tp{tp}")
    command = trainer_command(args, save, tp)
    in_save = rng.random() < args.in_save_fraction
    kill = kill_during_run(command, save, in_save=in_save, save_s=ref["save_s"], run_s=ref["run_s"],
                           one_rank=tp > 1, rng=rng)
    damaged = damaged_checkpoints(save)
    finished = os.path.isdir(save) and layout.read_latest(save) == args.steps
    # a run killed after its last save is done: rerunning it is refused (nothing to train)
    code, stderr = (0, "") if finished else run_to_end(command, args.timeout_s)
    result = {"index": index, "tp": tp, "aimed": "save" if in_save else "random", **kill, "damaged": damaged,
              "clean": code == 0, "stderr": stderr if code else "", "equal": False,
              "staging_left": sum(layout.is_staging_folder(os.path.join(save, n)) for n in os.listdir(save))
              if os.path.isdir(save) else 0}
    final = os.path.join(save, layout.iteration_name(args.steps))
    if code == 0 and os.path.isdir(final):
        same_tensors = equal_contents(checkpoint_contents(final), ref["contents"])
        same_hf = hf_export_bytes(final, save + "_hf") == ref["hf"]
        result["equal"] = same_tensors and same_hf
    return result


def print_table(results: list[dict]) -> None:
    rows = [("trials", len(results)),
            ("killed inside a save", sum(r["killed"] and r["where"] == "save" for r in results)),
            ("killed between saves", sum(r["killed"] and r["where"] == "step" for r in results)),
            ("one rank of TP=2 killed", sum(r["killed"] and r["tp"] > 1 for r in results)),
            ("finished before the kill", sum(not r["killed"] for r in results)),
            ("clean resumes", sum(r["clean"] for r in results)),
            ("bitwise equal to the reference", sum(r["equal"] for r in results)),
            ("corrupted (damaged checkpoint or failed resume)", sum(bool(r["damaged"]) or not r["clean"] for r in results)),
            ("leftover staging folders", sum(r["staging_left"] for r in results)),
            ("leftover child processes", sum(r["survivors"] for r in results))]
    width = max(len(name) for name, _ in rows)
    print(f"| {'':{width}} | count |\n|{'-' * (width + 2)}|-------|")
    for name, value in rows:
        print(f"| {name:{width}} | {value:5d} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not 0 <= args.tp2_trials <= args.trials:
        print(f"error: --tp2-trials={args.tp2_trials} must be between 0 and --trials={args.trials}", file=sys.stderr)
        return 2
    from megatron_rpg.megatron.cpu_mode import enable_cpu_mode

    enable_cpu_mode()  # the HF export reads with megatron's loader
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    rng = random.Random(args.seed)
    references = {1: reference(args, 1)} if args.trials > args.tp2_trials else {}
    if args.tp2_trials:
        references[2] = reference(args, 2)
    layouts = [2] * args.tp2_trials + [1] * (args.trials - args.tp2_trials)
    rng.shuffle(layouts)
    results = []
    for index, tp in enumerate(layouts):
        results.append(trial(args, index, tp, references[tp], rng))
        last = results[-1]
        print(f"trial {index}: TP={tp} aimed at {last['aimed']}, killed in {last['where']}, clean={last['clean']}, "
              f"equal={last['equal']}, damaged={len(last['damaged'])}, staging left={last['staging_left']}, "
              f"survivors={last['survivors']} {last.get('survivor_names') or ''}{' ' + last['stderr'] if last['stderr'] else ''}",
              flush=True)
    print_table(results)
    ok = all(r["clean"] and r["equal"] and not r["damaged"] and not r["staging_left"] and not r["survivors"]
             for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
