"""Where a run's metrics go: one interface, three sinks, written by rank 0.

    sinks = open_sinks(config.logging, start=resumed_step, run_config=config)   # [] without any flag
    for sink in sinks: sink.write(step, metrics)                                   # once per step
    for sink in sinks: sink.close()

- JsonlSink (--log-jsonl): one JSON object per line (training/metrics_log.py), strict JSON: a
  non-finite float (inf, NaN) is written as null;
- TensorBoardSink (--tensorboard-dir): scalars through torch.utils.tensorboard, non-finite values
  as they are (TensorBoard's float format holds them); `samples` as a text entry;
- WandbSink (--wandb-project, --wandb-exp-name, --wandb-save-dir): `wandb.log(step=...)`, non-finite
  values as None (W&B would store `Infinity`); WANDB_MODE=offline runs with no network.

On resume at step s every sink drops what a previous run logged after s: the JSONL rewrites its
file up to s, TensorBoard purges events past s (SummaryWriter's purge_step), and W&B, whose
history cannot be rewritten, starts a new run that begins at step s + 1 (the older run keeps its
steps after s; the new run's config records `resumed_from_step`).
"""
from __future__ import annotations

import os
from typing import Protocol

from megatron_rpg.training.metrics_log import append_line, drop_lines_after_step, strict_json_value


class MetricsSink(Protocol):
    def write(self, step: int, metrics: dict) -> None: ...

    def close(self) -> None: ...


def scalars(metrics: dict) -> dict:
    """The numeric entries of `metrics` (bools and text left out), as floats."""
    return {key: float(value) for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


class JsonlSink:
    def __init__(self, path: str, *, start: int):
        self.path = path  # not a folder: checked at parse time (config_checks)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if start > 0:  # a previous run may have logged past the resumed step
            drop_lines_after_step(path, start)

    def write(self, step: int, metrics: dict) -> None:
        append_line(self.path, dict(metrics, step=step))

    def close(self) -> None:
        pass


class TensorBoardSink:
    def __init__(self, log_dir: str, *, start: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events at steps >= start + 1 left by a previous run are hidden and dropped
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=start + 1 if start > 0 else None)

    def write(self, step: int, metrics: dict) -> None:
        for name, value in scalars(metrics).items():
            if name != "step":
                self.writer.add_scalar(name, value, global_step=step)
        if metrics.get("samples"):
            self.writer.add_text("samples", samples_markdown(metrics["samples"]), global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, project: str, *, name: str | None, save_dir: str | None, start: int, run_config: dict):
        try:
            import wandb
        except ImportError as error:
            raise ValueError(f"--wandb-project {project} needs the wandb package: pip install wandb") from error
        if save_dir:
            os.makedirs(save_dir, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(project=project, name=name, dir=save_dir,
                              config=dict(run_config, resumed_from_step=start))

    def write(self, step: int, metrics: dict) -> None:
        values = strict_json_value(scalars(metrics))
        values.pop("step", None)
        if metrics.get("samples"):
            rows = [[sample["prompt"], sample["response"], sample["reward"]] for sample in metrics["samples"]]
            values["samples"] = self.wandb.Table(columns=["prompt", "response", "reward"], data=rows)
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def samples_markdown(samples: list[dict]) -> str:
    lines = ["| prompt | response | reward |", "|---|---|---|"]
    for sample in samples:
        cells = [str(sample[key]).replace("|", "\\|").replace("\n", " ") for key in ("prompt", "response")]
        lines.append(f"| {cells[0]} | {cells[1]} | {sample['reward']:.3f} |")
    return "\n".join(lines)


def open_sinks(logging, *, start: int, run_config: dict | None = None) -> list:
    """The sinks the LoggingConfig asks for (call on rank 0 only); `start`: the step the run resumes
    from (0: a fresh run), after which earlier runs' entries are dropped."""
    sinks = []
    if logging.log_jsonl:
        sinks.append(JsonlSink(logging.log_jsonl, start=start))
    if logging.tensorboard_dir:
        sinks.append(TensorBoardSink(logging.tensorboard_dir, start=start))
    if logging.wandb_project:
        sinks.append(WandbSink(logging.wandb_project, name=logging.wandb_exp_name, save_dir=logging.wandb_save_dir,
                               start=start, run_config=run_config or {}))
    return sinks
