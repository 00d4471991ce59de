"""A PNG of a run from its --log-jsonl file: reward, eval accuracy, KL, response length and
gradient norm over the steps (matplotlib, Agg backend: no display needed).

    python -m megatron_rpg.plot RUN.jsonl [-o RUN.png]      # the trainer draws it at the end of a run

Steps without a value (an evaluation runs only every --eval-interval steps; a null is a non-finite
value in the log) are left out of that panel; the reward panel also shows its 10-step moving mean.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

# (panel title, [(metric, label)], y-axis scale)
PANELS = (
    ("reward", [("reward_mean", "reward (mean of the step's responses)")], "linear"),
    ("held-out eval", [("eval/accuracy", "accuracy (Mean@K)"), ("eval/pass@K", "pass@K"),
                       ("eval/reward_mean", "reward")], "linear"),
    ("KL to the reference (k3)", [("kl_k3", "KL k3")], "log"),
    ("response length", [("response_length_mean", "training"), ("eval/response_length_mean", "eval")], "linear"),
    ("gradient norm", [("grad_norm", "mean over optimizer steps"), ("grad_norm_max", "max")], "log"),
)


def read_records(path: str) -> list[dict]:
    """The JSON objects of a JSONL file (lines that are not objects, e.g. torn by a crash, skipped)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
                records.append(record)
    return records


def _series(records: list[dict], name: str) -> tuple[list, list]:
    if name == "eval/pass@K":  # the largest k logged: pass@samples_per_prompt
        name = next((f"eval/pass@{int(r['eval/samples_per_prompt'])}" for r in records
                     if "eval/samples_per_prompt" in r), name)
    points = [(r["step"], r[name]) for r in records if isinstance(r.get(name), (int, float))
              and math.isfinite(r[name])]
    return [s for s, _ in points], [v for _, v in points]


def _label(records: list[dict], label: str) -> str:
    samples = next((int(r["eval/samples_per_prompt"]) for r in records if "eval/samples_per_prompt" in r), None)
    return label.replace("@K", f"@{samples}") if samples else label


def plot_run(records: list[dict], out_path: str, *, title: str | None = None) -> str:
    """Draws the panels of `records` (per-step metric dicts with "step") into out_path (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    figure, axes = plt.subplots(len(PANELS), 1, figsize=(9, 2.4 * len(PANELS)), sharex=True)
    for axis, (panel, metrics, scale) in zip(axes, PANELS):
        drawn = False
        for name, label in metrics:
            steps, values = _series(records, name)
            if not steps:
                continue
            marker = "o" if name.startswith("eval/") else None
            line, = axis.plot(steps, values, marker=marker, markersize=4, linewidth=1.4, label=_label(records, label))
            if name == "eval/accuracy":  # the numbers the run's summary line prints
                for step, value, offset, align in ((steps[0], values[0], (6, 6), "left"),
                                                   (steps[-1], values[-1], (-6, 6), "right")):
                    axis.annotate(f"{value:.3f}", (step, value), textcoords="offset points", xytext=offset,
                                  ha=align, fontsize=9, color=line.get_color(), fontweight="bold")
            if name == "reward_mean" and len(values) >= 10:
                smooth = [sum(values[max(0, i - 9):i + 1]) / len(values[max(0, i - 9):i + 1]) for i in range(len(values))]
                axis.plot(steps, smooth, linewidth=2.2, label="10-step moving mean")
            drawn = True
        axis.set_title(panel, fontsize=11, loc="left")
        axis.grid(True, alpha=0.3)
        if drawn:
            shown = [v for name, _ in metrics for v in _series(records, name)[1]]
            if scale == "log" and all(v > 0 for v in shown):
                axis.set_yscale("log")
                axis.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))
                narrow = max(shown) / min(shown) < 100  # under two decades: label 2 and 5 between them
                axis.yaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0) if narrow else ()))
                axis.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%.2g") if narrow else ticker.NullFormatter())
            axis.legend(fontsize=8, loc="best")
        else:
            axis.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axis.transAxes, color="gray")
    axes[-1].set_xlabel("step")
    figure.suptitle(title or "megatron_rpg run", fontsize=12)
    figure.tight_layout()
    figure.savefig(out_path, dpi=110)
    plt.close(figure)
    return out_path


def default_png_path(jsonl_path: str) -> str:
    """RUN.jsonl -> RUN.png, beside it."""
    root, ext = os.path.splitext(jsonl_path)
    return (root if ext == ".jsonl" else jsonl_path) + ".png"


def plot_jsonl(jsonl_path: str, out_path: str | None = None) -> str:
    records = read_records(jsonl_path)
    if not records:
        raise ValueError(f"{jsonl_path}: no metrics lines (JSON objects with a \"step\") to plot")
    return plot_run(records, out_path or default_png_path(jsonl_path), title=os.path.basename(jsonl_path))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_rpg.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("jsonl", help="a --log-jsonl file")
    parser.add_argument("-o", "--output", default=None, help="the PNG to write (default: beside the JSONL)")
    args = parser.parse_args(argv)
    try:
        print(f"plot: {plot_jsonl(args.jsonl, args.output)}")
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
