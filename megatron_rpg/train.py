"""Entry point: parse and validate the flags, then train; at the end rank 0 draws the run's PNG
(beside --log-jsonl) and prints the summary (with --capo: its rejection rates), ending with the held-out evaluation's line:

    reward 0.072 -> 0.725 over 150 steps (24.7 s)
    capo rejected (mean over the steps): token 0.312, sequence 0.020, total 0.332; 0 optimizer steps all rejected
    logs: runs/x/metrics.jsonl | plot: runs/x/metrics.png
    eval accuracy: before 0.000 -> after 0.527 (Mean@8 over 32 held-out prompts, ...)

    python -m megatron_rpg.train --config examples/tiny_cpu.yaml
    torchrun --nproc-per-node 8 -m megatron_rpg.train --config examples/rpg_7b.yaml
"""
from __future__ import annotations

import os
import sys

from megatron_rpg.training.checkpointing import NothingToTrain
from megatron_rpg.training.config import parse_train_config
from megatron_rpg.training.loop import train
from megatron_rpg.training.skipped_steps import SkippedStepsError


def main(argv=None) -> int:
    config = parse_train_config(argv)
    try:
        history = train(config)
    except ValueError as error:  # bad input found at start-up (layout, model files): no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    except NothingToTrain as done:  # a requeued job whose run had finished
        if os.environ.get("RANK", "0") == "0":
            print(str(done), file=sys.stderr)
        return 0
    except SkippedStepsError as error:  # --max-skipped-steps: the run stopped on purpose
        print(f"error: {error}", file=sys.stderr)
        return 1
    if history and os.environ.get("RANK", "0") == "0":  # every rank has the same history
        first, last = history[0], history[-1]
        print(f"reward {first['reward_mean']:.3f} -> {last['reward_mean']:.3f} over {len(history)} steps "
              f"({last['elapsed_s']:.1f} s)")
        if "capo_rejected_total" in last:
            print(capo_line(history))
        print(" | ".join(where_written(config)))
        if history.evaluations:
            print(eval_line(config, history))
    return 0


def where_written(config) -> list[str]:
    """Where the run's logs and plot went (the plot is drawn here, from the JSONL)."""
    logging = config.logging
    if not (logging.log_jsonl or logging.tensorboard_dir or logging.wandb_project):
        return ["logs: none (add --log-jsonl FILE for a metrics log and its plot)"]
    written = [f"logs: {logging.log_jsonl}"] if logging.log_jsonl else []
    if logging.tensorboard_dir:
        written.append(f"tensorboard: {logging.tensorboard_dir}")
    if logging.wandb_project:
        written.append(f"wandb: project {logging.wandb_project} (in {logging.wandb_save_dir or './wandb'})")
    if logging.log_jsonl:
        try:
            from megatron_rpg.plot import plot_jsonl
            written.append(f"plot: {plot_jsonl(logging.log_jsonl)}")
        except ImportError:
            written.append("plot: skipped (matplotlib is not installed: pip install matplotlib)")
    return written


def capo_line(history) -> str:
    """--capo's rejection rates per level and in total, each the mean of the steps' rates, and how many
    optimizer steps it rejected every token of (those steps were not taken)."""
    names = [name for name in history[-1] if name.startswith("capo_rejected_")]
    rates = ", ".join(f"{name[len('capo_rejected_'):]} {sum(step[name] for step in history) / len(history):.3f}"
                      for name in names)
    empty = int(sum(step.get("capo_all_rejected_steps", 0.0) for step in history))
    return f"capo rejected (mean over the steps): {rates}; {empty} optimizer steps all rejected"


def eval_line(config, history) -> str:
    """`eval accuracy: before A -> after B (...)`, the first and last evaluation of this run."""
    before, after = history.evaluations[0], history.evaluations[-1]
    evaluation = config.evaluation
    where = evaluation.data or "held-out"
    temperature = "greedy" if evaluation.temperature == 0 else f"temperature {evaluation.temperature:g}"
    return (f"eval accuracy: before {before['eval/accuracy']:.3f} -> after {after['eval/accuracy']:.3f} "
            f"(Mean@{evaluation.samples} over {before['eval/prompts']} {where} prompts, steps "
            f"{before['step']} -> {after['step']}, {temperature}; correct: {history.correct_means})")


if __name__ == "__main__":
    sys.exit(main())
