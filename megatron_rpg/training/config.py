"""The trainer's settings as one `TrainConfig` made of small dataclasses, parsed once from the flags
and YAML (training/flags.py) and validated before anything is built.

    config = parse_train_config(["--config", "examples/tiny_cpu.yaml", "--train-iters", "20"])
    config.rollout.temperature, config.loss.beta, config.svrpg.enabled

| section | dataclass | flags |
|---|---|---|
| model | ModelConfig | --model-preset/--hf-config/--load (source), --transformer-impl, --fp8-*, --bf16/--fp16 |
| parallel | ParallelConfig | --tensor-/--pipeline-model-parallel-size, --use-distributed-optimizer |
| optimizer | OptimizerConfig | --lr, --weight-decay, --adam-*, --clip-grad |
| loss | losses.policy_loss.LossConfig | --loss, --rpg-* |
| rollout | RolloutConfig | --rollout-*, --advantage-estimator |
| data | DataConfig | --task, --prompt-*, --answer-key, --max-prompt-tokens, --tokenizer, --overlong-buffer |
| svrpg | optim.svrpg_config.SVRPGConfig | --svrpg-* |
| checkpoint | CheckpointConfig | --load, --save, --save-interval, --finetune |
| logging | LoggingConfig | --log-jsonl, --no-progress |
| training | TrainingConfig | --train-iters, --micro-batch-size, --num-mini-batches, --seed |

The library layers (losses/, megatron/, optim/, rollout/, checkpoint/) take these dataclasses or
explicit arguments, never an argparse namespace. A flag that would have no effect with the other
settings (a `--rpg-*` flag the chosen loss does not read, `--svrpg-*` without `--svrpg`, a math flag
with the synthetic task) is an error naming it.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import warnings
from dataclasses import dataclass

import torch

from megatron_rpg.losses import RPGClip
from megatron_rpg.losses.policy_loss import LOSS_FIELDS, LossConfig
from megatron_rpg.losses.svrpg import SVRPG_AGGREGATIONS
from megatron_rpg.megatron.models import check_transformer_engine_ready
from megatron_rpg.optim.svrpg_config import SVRPGConfig
from megatron_rpg.training.flags import GivenFlags, build_parser, flag_name, parse_flags

PARAMS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    """Where the model comes from (preset or hf_config; a --load checkpoint is CheckpointConfig.load)
    and how megatron builds it."""

    preset: str | None = None
    hf_config: str | None = None
    transformer_impl: str = "local"
    fp8_format: str | None = None
    fp8_recipe: str | None = None
    params_dtype: str = "float32"

    def __post_init__(self):
        if self.fp8_recipe is not None and self.fp8_format is None:
            raise ValueError(f"--fp8-recipe {self.fp8_recipe} was given without --fp8-format; add "
                             f"--fp8-format or drop --fp8-recipe")
        if self.fp8_format is not None and self.transformer_impl != "transformer_engine":
            raise ValueError(f"--fp8-format {self.fp8_format} needs --transformer-impl transformer_engine "
                             f"(got {self.transformer_impl}): FP8 runs only through Transformer Engine layers")
        if self.params_dtype not in PARAMS_DTYPES:
            raise ValueError(f"params_dtype={self.params_dtype!r}; use one of {list(PARAMS_DTYPES)}")

    def gpt_kwargs(self) -> dict:
        """Keyword arguments of megatron/models.build_gpt_model."""
        return dict(use_te=self.transformer_impl == "transformer_engine", fp8=self.fp8_format,
                    fp8_recipe=self.fp8_recipe, params_dtype=PARAMS_DTYPES[self.params_dtype])

    def check_machine(self) -> None:
        """RuntimeError when Transformer Engine / the FP8 recipe cannot run on this machine."""
        kwargs = self.gpt_kwargs()
        check_transformer_engine_ready(use_te=kwargs["use_te"], fp8=kwargs["fp8"], fp8_recipe=kwargs["fp8_recipe"])


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    use_distributed_optimizer: bool = False

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 1e-6
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass(frozen=True)
class RolloutConfig:
    """batch_size prompts per step over all DP ranks, samples_per_prompt responses each."""

    engine: str = "embedded"
    batch_size: int = 8
    samples_per_prompt: int = 8
    max_new_tokens: int = 8
    temperature: float = 1.0
    dynamic_sampling: bool = False
    max_sampling_passes: int = 3
    advantage_estimator: str = "rpg"
    micro_batch_size: int | None = None  # sequences the engine generates at a time (None: all)


@dataclass(frozen=True)
class DataConfig:
    task: str = "repeat-token"
    prompt_data: str | None = None
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    prompt_template: str = "{prompt}"
    max_prompt_tokens: int | None = None
    tokenizer: str | None = None
    overlong_buffer: int | None = None


@dataclass(frozen=True)
class CheckpointConfig:
    load: str | None = None
    save: str | None = None
    save_interval: int | None = None
    finetune: bool = False


@dataclass(frozen=True)
class LoggingConfig:
    log_jsonl: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class TrainingConfig:
    train_iters: int = 100
    micro_batch_size: int = 16
    num_mini_batches: int = 2
    seed: int = 1234


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    parallel: ParallelConfig
    optimizer: OptimizerConfig
    loss: LossConfig
    rollout: RolloutConfig
    data: DataConfig
    svrpg: SVRPGConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    training: TrainingConfig


def parse_train_config(argv=None) -> TrainConfig:
    """The validated TrainConfig of a command line (and its --config YAML); a bad setting exits with
    status 2 and a message naming the flag, before anything is built."""
    parser = build_parser()
    args, given = parse_flags(argv, parser)
    try:
        return config_from_args(args, given)
    except ValueError as error:
        parser.error(str(error))


def config_from_args(args: argparse.Namespace, given: GivenFlags = GivenFlags()) -> TrainConfig:
    """Namespace (+ the dests the user set) → TrainConfig; ValueError naming the flag."""
    _check_positive(args, "tensor_model_parallel_size", "pipeline_model_parallel_size", "rollout_batch_size",
                    "rollout_samples_per_prompt", "rollout_max_new_tokens", "train_iters", "micro_batch_size",
                    "num_mini_batches", "rollout_max_sampling_passes")
    for name in ("lr", "weight_decay", "clip_grad", "rpg_beta", "adam_eps"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{flag_name(name)}={value} must be a finite number >= 0")
    if not args.rollout_temperature > 0 or not math.isfinite(args.rollout_temperature):
        raise ValueError(f"--rollout-temperature={args.rollout_temperature} must be a finite number > 0")
    if args.rollout_micro_batch_size is not None and args.rollout_micro_batch_size < 1:
        raise ValueError(f"--rollout-micro-batch-size={args.rollout_micro_batch_size} must be a positive "
                         f"integer (sequences generated at a time); omit it to generate all at once")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise ValueError(f"--max-prompt-tokens={args.max_prompt_tokens} must be a positive integer")
    if args.overlong_buffer is not None and not 0 <= args.overlong_buffer < args.rollout_max_new_tokens:
        raise ValueError(f"--overlong-buffer={args.overlong_buffer} must lie in [0, --rollout-max-new-tokens="
                         f"{args.rollout_max_new_tokens}) (0 switches DAPO's overlong penalty off)")
    _check_no_effect(args, given)
    config = _build(args)
    _check_combinations(config)
    return config


@contextlib.contextmanager
def _named(flags: str):
    """A library dataclass's ValueError (RPGClip, RatioClip) re-raised with the flags that set it."""
    try:
        yield
    except ValueError as error:
        if str(error).startswith("--"):  # names its flag already
            raise
        raise ValueError(f"{flags}: {error}") from error


def _build(args) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(preset=args.model_preset, hf_config=args.hf_config,
                          transformer_impl=args.transformer_impl, fp8_format=args.fp8_format,
                          fp8_recipe=args.fp8_recipe,
                          params_dtype="bfloat16" if args.bf16 else "float16" if args.fp16 else "float32"),
        parallel=ParallelConfig(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                args.use_distributed_optimizer),
        optimizer=OptimizerConfig(lr=args.lr, weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
                                  adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad),
        loss=_loss_config(args),
        rollout=RolloutConfig(engine=args.rollout_engine, batch_size=args.rollout_batch_size,
                              samples_per_prompt=args.rollout_samples_per_prompt,
                              max_new_tokens=args.rollout_max_new_tokens, temperature=args.rollout_temperature,
                              dynamic_sampling=args.rollout_dynamic_sampling,
                              max_sampling_passes=args.rollout_max_sampling_passes,
                              advantage_estimator=args.advantage_estimator,
                              micro_batch_size=args.rollout_micro_batch_size),
        data=DataConfig(task=args.task, prompt_data=args.prompt_data, prompt_key=args.prompt_key,
                        answer_key=args.answer_key, prompt_template=args.prompt_template,
                        max_prompt_tokens=args.max_prompt_tokens, tokenizer=args.tokenizer,
                        overlong_buffer=args.overlong_buffer),
        svrpg=_svrpg_config(args),
        checkpoint=CheckpointConfig(load=args.load, save=args.save, save_interval=args.save_interval,
                                    finetune=args.finetune),
        logging=LoggingConfig(log_jsonl=args.log_jsonl, progress=not args.no_progress),
        training=TrainingConfig(train_iters=args.train_iters, micro_batch_size=args.micro_batch_size,
                                num_mini_batches=args.num_mini_batches, seed=args.seed))


def _check_positive(args, *names) -> None:
    for name in names:
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"{flag_name(name)}={value} must be a positive integer")


def _svrpg_config(args) -> SVRPGConfig:
    with _named("--svrpg-rho-clip / --svrpg-rho-cap"):
        return SVRPGConfig(enabled=args.svrpg, inner_steps=args.svrpg_inner_steps,
                           anchor_batch_size=args.svrpg_anchor_batch_size,
                           rho_clip=tuple(args.svrpg_rho_clip) if args.svrpg_rho_clip else None,
                           rho_cap=args.svrpg_rho_cap, update_ref=args.svrpg_update_ref)


def _loss_config(args) -> LossConfig:
    """Only the fields the chosen loss reads (the others keep their defaults); clip None is the loss's
    own default clip (rpg: the paper's), --rpg-no-clip rpg without any."""
    values = dict(divergence=args.rpg_divergence, style=args.rpg_style, beta=args.rpg_beta,
                  aggregation=args.rpg_aggregation, is_level=args.rpg_is_level,
                  clip=_rpg_clip(args.rpg_clip),
                  no_clip=args.rpg_no_clip, kl_in_advantage=not args.rpg_kl_outside_advantage)
    return LossConfig(name=args.loss, **{key: value for key, value in values.items() if key in LOSS_FIELDS[args.loss]})


def _rpg_clip(values) -> RPGClip | None:
    if values is None:
        return None
    with _named("--rpg-clip EPS_LOW EPS_HIGH DUAL_CLIP"):
        return RPGClip(*values)


# which LossConfig field each --rpg-* flag sets: a flag whose field the chosen loss does not read is refused
_LOSS_FLAG_FIELDS = {"rpg_divergence": "divergence", "rpg_style": "style", "rpg_beta": "beta",
                     "rpg_aggregation": "aggregation", "rpg_is_level": "is_level", "rpg_clip": "clip",
                     "rpg_no_clip": "no_clip", "rpg_kl_outside_advantage": "kl_in_advantage"}
_MATH_FLAGS = ("prompt_data", "prompt_key", "answer_key", "prompt_template", "max_prompt_tokens", "tokenizer",
               "overlong_buffer")
_SVRPG_FLAGS = ("svrpg_inner_steps", "svrpg_anchor_batch_size", "svrpg_rho_clip", "svrpg_rho_cap",
                "svrpg_update_ref")


def _check_no_effect(args, given: GivenFlags) -> None:
    """ValueError for a flag the user set that the other settings would ignore. A YAML value made
    ignorable by a command-line choice (a base config run with `--loss grpo`) is a warning instead."""
    reads = LOSS_FIELDS[args.loss]
    for dest, field in _LOSS_FLAG_FIELDS.items():
        if field not in reads:
            _refuse(given, dest, "loss", f"{flag_name(dest)} has no effect with --loss {args.loss} (it reads "
                    f"{', '.join(sorted(reads))}); drop it, or use --loss rpg")
    if args.task != "math":
        for dest in _MATH_FLAGS:
            _refuse(given, dest, "task", f"{flag_name(dest)} is read only with --task math (got --task {args.task})")
    if not args.svrpg:
        for dest in _SVRPG_FLAGS:
            _refuse(given, dest, "svrpg", f"{flag_name(dest)} has no effect without --svrpg; add --svrpg or drop it")
    if not args.rollout_dynamic_sampling:
        _refuse(given, "rollout_max_sampling_passes", "rollout_dynamic_sampling",
                "--rollout-max-sampling-passes has no effect without --rollout-dynamic-sampling")
    if args.save is None:
        _refuse(given, "save_interval", "save", f"--save-interval={args.save_interval} needs --save DIR")
    if args.rpg_no_clip and args.rpg_clip is not None:
        if "rpg_no_clip" in given.command_line and "rpg_clip" not in given.command_line:
            warnings.warn("--rpg-no-clip on the command line overrides rpg-clip from --config", stacklevel=3)
            args.rpg_clip = None  # the command line wins
        else:
            raise ValueError("--rpg-no-clip and --rpg-clip contradict each other; give one of them")
    if args.finetune and args.load is None:
        raise ValueError("--finetune takes the weights of --load CHECKPOINT; give --load")


def _refuse(given: GivenFlags, dest: str, context: str, message: str) -> None:
    """ValueError(message) if the user set `dest`; only a warning when it came from the YAML file and
    the command line set `context`, the flag that made it ineffective."""
    if dest in given.command_line or (dest in given.yaml and context not in given.command_line):
        raise ValueError(message)
    if dest in given.yaml:
        warnings.warn(f"ignored from --config: {message}", stacklevel=3)


def _check_combinations(config: TrainConfig) -> None:
    """Settings that cannot work together on any machine (the layout checks need the world size and
    run at start-up: check_layout)."""
    if config.data.task == "math" and config.data.prompt_data is None:
        raise ValueError("--task math needs --prompt-data FILE (JSONL or Parquet with prompts and answers)")
    if config.checkpoint.save_interval is not None and config.checkpoint.save_interval < 1:
        raise ValueError(f"--save-interval={config.checkpoint.save_interval} must be >= 1")
    if config.model.preset is None and config.model.hf_config is None and config.checkpoint.load is None:
        raise ValueError("no model: give --model-preset tiny, --hf-config CONFIG or --load CHECKPOINT")
    if config.loss.name == "dapo" and config.loss.aggregation != "token-mean":
        raise ValueError(f"--loss dapo is token-mean by definition; got --rpg-aggregation {config.loss.aggregation}")
    if config.svrpg.enabled:
        if config.loss.name != "rpg":
            raise ValueError(f"--svrpg is defined for the RPG losses; got --loss {config.loss.name}: use --loss rpg")
        if config.loss.aggregation not in SVRPG_AGGREGATIONS:
            raise ValueError(f"--svrpg with --rpg-aggregation {config.loss.aggregation} is biased (the snapshot "
                             f"pass would be normalised by the inner batch's random token count); use "
                             f"--rpg-aggregation seq-mean-token-sum (or one of {list(SVRPG_AGGREGATIONS)})")
        if config.training.num_mini_batches != 1:
            raise ValueError(f"--svrpg takes one optimizer step per rollout batch (its inner step); got "
                             f"--num-mini-batches={config.training.num_mini_batches}: set it to 1")


def check_layout(config: TrainConfig, world_size: int) -> int:
    """The data-parallel size; ValueError naming the flags when the batch does not split evenly."""
    parallel, rollout, training = config.parallel, config.rollout, config.training
    if world_size % parallel.model_parallel_size:
        raise ValueError(f"{world_size} processes cannot hold --tensor-model-parallel-size "
                         f"{parallel.tensor_model_parallel_size} x --pipeline-model-parallel-size "
                         f"{parallel.pipeline_model_parallel_size}; launch a multiple of {parallel.model_parallel_size}")
    dp = world_size // parallel.model_parallel_size
    if rollout.batch_size % dp:
        raise ValueError(f"--rollout-batch-size={rollout.batch_size} prompts must split evenly over "
                         f"{dp} data-parallel ranks")
    sequences = rollout.batch_size // dp * rollout.samples_per_prompt
    per_step = training.micro_batch_size * training.num_mini_batches
    if sequences % per_step:
        raise ValueError(f"each DP rank gets {sequences} sequences per step (--rollout-batch-size / DP x "
                         f"--rollout-samples-per-prompt), which must be a multiple of --micro-batch-size "
                         f"{training.micro_batch_size} x --num-mini-batches {training.num_mini_batches}")
    anchor_unit = dp * math.lcm(rollout.samples_per_prompt, training.micro_batch_size)
    if config.svrpg.enabled and config.svrpg.anchor_batch_size % anchor_unit:
        raise ValueError(f"--svrpg-anchor-batch-size={config.svrpg.anchor_batch_size} sequences must split "
                         f"into whole prompt groups (--rollout-samples-per-prompt {rollout.samples_per_prompt}) "
                         f"and micro-batches (--micro-batch-size {training.micro_batch_size}) on each of {dp} "
                         f"DP ranks: use a multiple of {anchor_unit}")
    return dp


def check_sequence_length(config: TrainConfig, max_prompt_tokens: int, max_position_embeddings: int) -> None:
    """Prompt + response must fit the model's positions (rotary embeddings would extrapolate silently)."""
    longest = max_prompt_tokens + config.rollout.max_new_tokens
    if longest > max_position_embeddings:
        source = "--max-prompt-tokens / the longest prompt" if config.data.task == "math" else "the task's prompt"
        raise ValueError(f"the longest sequence, {max_prompt_tokens} prompt tokens ({source}) + "
                         f"--rollout-max-new-tokens {config.rollout.max_new_tokens} = {longest}, exceeds the "
                         f"model's max_position_embeddings {max_position_embeddings}: lower "
                         f"--rollout-max-new-tokens{' or --max-prompt-tokens' if config.data.task == 'math' else ''}")


def warn_if_beta_has_no_effect(config: TrainConfig) -> None:
    """Once at start-up: with π_ref = π_old and one optimizer step per rollout batch, the step runs at
    θ = θ_old, where the KL's expected gradient is zero: β then changes nothing in expectation."""
    loss = config.loss
    if "beta" not in LOSS_FIELDS[loss.name] or not loss.beta:
        return
    reference_moves = config.svrpg.enabled and config.svrpg.update_ref
    if config.training.num_mini_batches == 1 and not reference_moves:
        warnings.warn(f"--rpg-beta {loss.beta} can have no expected effect: the reference policy is π_old "
                      f"and --num-mini-batches 1 takes one optimizer step per rollout batch, at θ = θ_old, "
                      f"where the KL gradient vanishes in expectation; use --num-mini-batches > 1 "
                      f"(or --svrpg-update-ref with --svrpg)", stacklevel=2)
