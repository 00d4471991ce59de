"""The table and the curves of tools/bench/compare_algorithms.py, from its runs' JSONL records."""
from __future__ import annotations

import statistics

SMOOTHING = 5  # steps in the moving average that "steps to reach" reads


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def steps_to_reach(rewards: list[float], threshold: float) -> int | None:
    """The first step (1-based) whose trailing SMOOTHING-step mean training reward is >= threshold."""
    for end in range(1, len(rewards) + 1):
        window = rewards[max(0, end - SMOOTHING):end]
        if sum(window) / len(window) >= threshold:
            return end
    return None


def sampled_tokens(steps: list[dict]) -> float:
    """Response tokens sampled: the rollout batches' plus SVRPG's anchor sequences at the run's mean
    response length (the trainer logs the anchors' sequence count, not their tokens)."""
    tokens = sum(s.get("num_tokens", 0.0) for s in steps)
    sequences = sum(s.get("num_sequences", 0.0) for s in steps)
    anchors = sum(s.get("svrpg/anchor_sequences", 0.0) for s in steps)
    return tokens + (anchors * tokens / sequences if sequences else 0.0)


def _rejected(step: dict) -> float | None:
    keys = [k for k in step if "capo" in k and "reject" in k]
    total = [k for k in keys if "total" in k]
    return step[total[0]] if total else (step[keys[0]] if keys else None)


def summarise(runs: list[dict], thresholds: dict) -> list[dict]:
    groups: dict = {}
    for run in runs:
        groups.setdefault((run["task"], run["method"]), []).append(run)
    rows = []
    for (task, method), group in groups.items():
        reached = [steps_to_reach([s["reward_mean"] for s in r["steps"]], thresholds[task]) for r in group]
        heldout = _mean_std([r["heldout"] for r in group])
        metric = group[0]["heldout_source"].split()[2].rstrip(",")  # "the trainer's eval/accuracy, ..."
        start = [r["evals"][0][metric] for r in group if r["evals"] and r["evals"][0].get("step") == 0
                 and metric in r["evals"][0]]
        final = _mean_std([statistics.fmean(s["reward_mean"] for s in r["steps"][-SMOOTHING:]) for r in group])
        rejected = [v for r in group for v in map(_rejected, r["steps"]) if v is not None]
        lambdas = [[s["r2vpo/lambda"] for s in r["steps"] if "r2vpo/lambda" in s] for r in group]
        lambdas = [trace for trace in lambdas if trace]
        trajectory = None
        if lambdas:
            length = min(len(t) for t in lambdas)
            marks = sorted({0, length // 4, length // 2, 3 * length // 4, length - 1})
            trajectory = [(m + 1, statistics.fmean(t[m] for t in lambdas)) for m in marks]
        rows.append({"task": task, "method": method, "seeds": len(group), "heldout_mean": heldout[0],
                     "heldout_std": heldout[1], "heldout_start": statistics.fmean(start) if start else None,
                     "heldout_source": group[0]["heldout_source"],
                     "final_reward_mean": final[0], "final_reward_std": final[1],
                     "reached": sum(r is not None for r in reached),
                     "steps_to_reach_median": statistics.median(r for r in reached if r is not None)
                     if any(r is not None for r in reached) else None,
                     "train_iters": group[0]["train_iters"],
                     "sampled_tokens": statistics.fmean(sampled_tokens(r["steps"]) for r in group),
                     "capo_rejected": statistics.fmean(rejected) if rejected else None,
                     "lambda_trajectory": trajectory,
                     "wall_s": statistics.fmean(r["wall_s"] for r in group)})
    return rows


def _table(rows: list[dict], threshold: float) -> list[str]:
    lines = [f"| method | seeds | held-out (mean ± std) | at step 0 | final train reward | steps to {threshold:g} "
             f"(runs reaching it) | steps | sampled tokens | CAPO rejected | R²VPO λ (step: λ) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["heldout_mean"]):
        reach = (f"{r['steps_to_reach_median']:g} ({r['reached']}/{r['seeds']})" if r["reached"]
                 else f"— (0/{r['seeds']})")
        rejected = f"{100 * r['capo_rejected']:.1f}%" if r["capo_rejected"] is not None else ""
        lam = ", ".join(f"{s}: {v:.3g}" for s, v in r["lambda_trajectory"]) if r["lambda_trajectory"] else ""
        start = f"{r['heldout_start']:.3f}" if r["heldout_start"] is not None else ""
        lines.append(f"| {r['method']} | {r['seeds']} | {r['heldout_mean']:.3f} ± {r['heldout_std']:.3f} | "
                     f"{start} | {r['final_reward_mean']:.3f} ± {r['final_reward_std']:.3f} | {reach} | "
                     f"{r['train_iters']} | "
                     f"{r['sampled_tokens']:.0f} | {rejected} | {lam} |")
    return lines


def write_table(path: str, rows: list[dict], thresholds: dict, skipped: list[str]) -> str:
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        task_rows = [r for r in rows if r["task"] == task]
        out += [f"### {task} (held-out: {task_rows[0]['heldout_source']})", ""]
        out += _table(task_rows, thresholds[task]) + [""]
    if skipped:
        out += ["Not run: " + "; ".join(skipped) + ".", ""]
    text = "\n".join(out)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return text


def _trailing_mean(values: list[float]) -> list[float]:
    return [statistics.fmean(values[max(0, end - SMOOTHING):end]) for end in range(1, len(values) + 1)]


def write_plot(path: str, runs: list[dict], rows: list[dict]) -> None:
    """Per task, top: the seed-mean training reward (trailing SMOOTHING-step mean, what "steps to
    reach" reads) against sampled tokens, one line per method; bottom: the held-out score, mean ± std
    over the seeds, with the score before training as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in runs))
    figure, axes = plt.subplots(2, len(tasks), figsize=(7 * len(tasks), 9), squeeze=False,
                                gridspec_kw={"height_ratios": [3, 2]})
    for column, task in enumerate(tasks):
        axis = axes[0][column]
        methods = list(dict.fromkeys(r["method"] for r in runs if r["task"] == task))
        for index, method in enumerate(methods):
            group = [r for r in runs if r["task"] == task and r["method"] == method]
            length = min(len(r["steps"]) for r in group)
            rewards = [statistics.fmean(r["steps"][i]["reward_mean"] for r in group) for i in range(length)]
            tokens, total = [], 0.0
            for i in range(length):
                total += statistics.fmean(sampled_tokens(r["steps"][i:i + 1]) for r in group)
                tokens.append(total)
            axis.plot(tokens, _trailing_mean(rewards), label=method, linestyle="-" if index < 10 else "--")
        axis.set_title(f"{task}: training reward ({SMOOTHING}-step trailing mean, mean over seeds)")
        axis.set_xlabel("sampled response tokens")
        axis.set_ylabel("reward_mean")
        axis.legend(fontsize=7, ncol=2)
        task_rows = sorted((r for r in rows if r["task"] == task), key=lambda r: -r["heldout_mean"])
        axis = axes[1][column]
        axis.bar(range(len(task_rows)), [r["heldout_mean"] for r in task_rows],
                 yerr=[r["heldout_std"] for r in task_rows], capsize=3, color="tab:blue")
        starts = [r["heldout_start"] for r in task_rows if r["heldout_start"] is not None]
        if starts:
            axis.axhline(statistics.fmean(starts), color="black", linestyle=":", label="before training")
            axis.legend(fontsize=7)
        axis.set_xticks(range(len(task_rows)), [r["method"] for r in task_rows], rotation=60, ha="right", fontsize=7)
        axis.set_ylabel(task_rows[0]["heldout_source"].split()[2].rstrip(",") if task_rows else "held-out")
        axis.set_title(f"{task}: held-out after the last step (mean ± std over seeds)")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
