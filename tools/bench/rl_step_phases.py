"""Where one RL step's time goes: the trainer run with its phases timed (process CPU time, one process).

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench/rl_step_phases.py --skip 3 -- --config examples/tiny_cpu.yaml \\
        --train-iters 13 --no-progress
    ... --cprofile /tmp/step.prof -- ...      # also a cProfile of the timed steps (python -m pstats)

Phases: sampling (the engine's generate), reward, old log-probs (attach_old_logprobs: the trainer's
forward-only recompute), forward-backward (rl_forward_backward), optimizer (guarded_step: the
finiteness guard and the optimizer step), evaluation (--eval-interval's, when due), and "other" (the rest of the step: advantages, micro-batching, metrics, logging). Prints CPU ms per step,
mean over the steps after the first --skip (warm-up).
"""
from __future__ import annotations

import argparse
import cProfile
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere: the repo root

from megatron_rpg.training import loop, rollouts, update  # noqa: E402
from megatron_rpg.training.config import parse_train_config  # noqa: E402

CLOCK = time.process_time  # CPU seconds of this process: on a busy shared machine far steadier than wall time
PHASES = ("sampling", "reward", "old log-probs", "forward-backward", "optimizer", "evaluation", "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the means")
    parser.add_argument("--cprofile", default=None, help="write a cProfile of the timed steps here")
    parser.add_argument("trainer_args", nargs=argparse.REMAINDER, help="-- then the trainer's flags")
    args = parser.parse_args()
    trainer_args = args.trainer_args[1:] if args.trainer_args[:1] == ["--"] else args.trainer_args
    config = parse_train_config(trainer_args)
    if config.training.train_iters <= args.skip:
        parser.error(f"--train-iters {config.training.train_iters} must exceed --skip {args.skip}")

    steps = []  # per step: {phase: seconds}
    profiler = cProfile.Profile() if args.cprofile else None

    inside = set()  # the phase being timed: a call made inside another timed phase counts there

    def timed(phase, function):
        def wrapper(*a, **k):
            if not steps or inside:  # before the first step (the evaluation at step 0), or nested
                return function(*a, **k)
            inside.add(phase)
            started = CLOCK()
            try:
                return function(*a, **k)
            finally:
                steps[-1][phase] += CLOCK() - started
                inside.discard(phase)
        return wrapper

    build_run = loop.build_run

    def build_timed_run(*a, **k):
        run = build_run(*a, **k)
        run.engine.generate = timed("sampling", run.engine.generate)
        run.sampler.task.reward = timed("reward", run.sampler.task.reward)
        if not hasattr(update, "guarded_step"):  # a tree before the step guard: the optimizer's own step
            run.optimizer.step = timed("optimizer", run.optimizer.step)
        draw = run.sampler.draw

        def draw_starts_step(*a, **k):  # the first call of a step: a new row, the profiler on after --skip
            if steps and "_started" in steps[-1]:
                steps[-1]["_total"] = CLOCK() - steps[-1]["_started"]
            steps.append(defaultdict(float, _started=CLOCK()))
            if profiler is not None and len(steps) == args.skip + 1:
                profiler.enable()
            return draw(*a, **k)
        run.sampler.draw = draw_starts_step
        return run

    loop.build_run = build_timed_run
    loop.attach_old_logprobs = timed("old log-probs", rollouts.attach_old_logprobs)
    update.rl_forward_backward = timed("forward-backward", update.rl_forward_backward)
    if hasattr(update, "guarded_step"):  # the optimizer step and its finiteness guard
        update.guarded_step = timed("optimizer", update.guarded_step)
    if hasattr(loop, "_evaluate"):  # (absent before the evaluation landed: a tree without it has none)
        loop._evaluate = timed("evaluation", loop._evaluate)
    loop.train(config)
    steps[-1]["_total"] = CLOCK() - steps[-1]["_started"]  # the last step: to train()'s return
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.cprofile)
    timed_steps = steps[args.skip:]
    for step in timed_steps:
        step["other"] = step["_total"] - sum(step[p] for p in PHASES if p != "other")
    print(f"CPU ms per step, mean of steps {args.skip + 1}..{len(steps)}: " + " ".join(trainer_args))
    print("| phase | ms |")
    print("|---|---|")
    for phase in PHASES + ("_total",):
        mean = sum(step[phase] for step in timed_steps) / len(timed_steps)
        print(f"| {'step' if phase == '_total' else phase} | {1000 * mean:.1f} |")


if __name__ == "__main__":
    main()
