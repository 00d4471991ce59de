"""The trainer's settings as one `TrainConfig` made of small dataclasses, parsed once from the flags
and YAML (training/flags.py) and validated before anything is built.

    config = parse_train_config(["--config", "examples/tiny_cpu.yaml", "--train-iters", "20"])
    config.rollout.temperature, config.loss.beta, config.svrpg.enabled

| section | dataclass | flags |
|---|---|---|
| model | ModelConfig | --model-preset/--hf-config/--load (source), --transformer-impl, --fp8-*, --bf16/--fp16 |
| parallel | ParallelConfig | --tensor-/--pipeline-model-parallel-size, --use-distributed-optimizer |
| optimizer | OptimizerConfig | --lr, --weight-decay, --adam-*, --clip-grad, --lr-warmup-*, --lr-decay-*, --min-lr |
| loss | losses.policy_loss.LossConfig | --loss, --rpg-*, --r2vpo-* (LossConfig.r2vpo: losses.r2vpo.R2VPOConfig) |
| rollout | RolloutConfig | --rollout-*, --advantage-estimator, --on-bad-reward |
| rollout_is | losses.rollout_is.RolloutISConfig | --rollout-is-correction, --rollout-is-level, --rollout-is-threshold(-low) |
| data | DataConfig | --task, --prompt-*, --answer-key, --max-prompt-tokens, --tokenizer, --overlong-buffer, --chat-template |
| svrpg | optim.svrpg_config.SVRPGConfig | --svrpg-* |
| checkpoint | CheckpointConfig | --load, --save, --save-interval, --finetune, --keep-last, --pretrained-checkpoint |
| logging | LoggingConfig | --log-jsonl, --tensorboard-dir, --wandb-*, --log-samples, --no-progress |
| evaluation | training.evaluation.EvalConfig | --eval-*, --no-eval |
| training | TrainingConfig | --train-iters, --micro-batch-size, --num-mini-batches, --seed, --max-skipped-steps |
| reference | optim.reference_policy.ReferenceConfig | --ref-policy, --ref-update-interval, --ref-update-kl |
| capo | losses.capo.CAPOConfig | --capo, --capo-* |
| sglang | rollout.sglang_engine.SGLangConfig | --sglang-*, --rollout-sync, --rollout-num-engines, --update-weight-buffer-size |

The library layers (losses/, megatron/, optim/, rollout/, checkpoint/) take these dataclasses or
explicit arguments, never an argparse namespace. A flag that would have no effect with the other
settings (a `--rpg-*` flag the chosen loss does not read, `--svrpg-*` without `--svrpg`, a math flag
with the synthetic task) is an error naming it (training/config_checks.py holds those checks).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
from dataclasses import dataclass

import torch

from megatron_rpg.losses import RPGClip
from megatron_rpg.losses.capo import CAPOConfig
from megatron_rpg.losses.policy_loss import LOSS_FIELDS, LossConfig
from megatron_rpg.losses.r2vpo import R2VPOConfig
from megatron_rpg.losses.rollout_is import DEFAULT_THRESHOLD, RolloutISConfig
from megatron_rpg.megatron.lr_schedule import LRSchedule
from megatron_rpg.megatron.models import check_transformer_engine_ready
from megatron_rpg.optim.reference_policy import ReferenceConfig
from megatron_rpg.optim.svrpg_config import SVRPGConfig
from megatron_rpg.rollout.sglang_engine import SGLangConfig
from megatron_rpg.training.config_checks import check_combinations, check_flags_have_effect, check_value_ranges
from megatron_rpg.training.evaluation import EvalConfig
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
        """ValueError naming the flags when Transformer Engine / the FP8 recipe cannot run on this machine."""
        kwargs = self.gpt_kwargs()
        try:
            check_transformer_engine_ready(use_te=kwargs["use_te"], fp8=kwargs["fp8"], fp8_recipe=kwargs["fp8_recipe"])
        except RuntimeError as error:  # the machine, not a bug: a clean error (train.py exits 2)
            flags = f"--transformer-impl {self.transformer_impl}" + (f" --fp8-format {self.fp8_format}"
                                                                    if self.fp8_format else "")
            raise ValueError(f"{flags}: {error}; on this machine drop them (the default "
                             f"--transformer-impl local runs everywhere)") from error


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
    schedule: LRSchedule | None = None  # megatron/lr_schedule.py; None: the constant --lr


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
    on_bad_reward: str = "min"  # a NaN/inf reward: the task's minimum, masked out, or an error (rewards/guard.py)
    micro_batch_size: int | None = None  # sequences the engine generates at a time (None: all)
    top_k: int = 0      # sample from the top k tokens only (0: all)
    top_p: float = 1.0  # nucleus: the most likely tokens holding this probability (1.0: all)


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
    chat_template: str = "auto"


@dataclass(frozen=True)
class CheckpointConfig:
    load: str | None = None
    save: str | None = None
    save_interval: int | None = None
    finetune: bool = False
    keep_last: int | None = None  # iter_ folders kept in --save (None: all)
    pretrained: str | None = None  # --pretrained-checkpoint: the weights of a first run of --load = --save


@dataclass(frozen=True)
class LoggingConfig:
    log_jsonl: str | None = None
    progress: bool = True
    tensorboard_dir: str | None = None
    wandb_project: str | None = None
    wandb_exp_name: str | None = None
    wandb_save_dir: str | None = None
    log_samples: int = 0


@dataclass(frozen=True)
class TrainingConfig:
    train_iters: int = 100
    micro_batch_size: int = 16
    logprob_micro_batch_size: int | None = None  # the old log-prob recompute's rows per forward (None: micro_batch_size)
    num_mini_batches: int = 2
    model_forward: str = "auto"  # megatron/lean_forward.py: auto | megatron | lean
    seed: int = 1234
    max_skipped_steps: int = 10  # in a row: the run ends (training/skipped_steps.py)


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
    reference: ReferenceConfig = ReferenceConfig()
    evaluation: EvalConfig = EvalConfig()
    capo: CAPOConfig = CAPOConfig()  # --capo: losses/capo.py
    sglang: SGLangConfig = SGLangConfig()  # --rollout-engine sglang's servers and weight sync
    rollout_is: RolloutISConfig = RolloutISConfig()  # --rollout-is-*: losses/rollout_is.py


def parse_train_config(argv=None) -> TrainConfig:
    """The validated TrainConfig of a command line (and its --config YAML); a bad setting exits with
    status 2 and a message naming the flag, before anything is built."""
    parser = build_parser()
    args, given = parse_flags(argv, parser)
    try:
        return config_from_args(args, given)
    except ValueError as error:
        parser.error(str(error) + _yaml_origin(str(error), given, args.config))


def _yaml_origin(message: str, given: GivenFlags, config_path: str | None) -> str:
    """" (lr: in --config FILE)" when the message starts with a flag whose value came from the YAML file."""
    match = re.match(r"--([a-z0-9-]+)", message)
    dest = match.group(1).replace("-", "_") if match else None
    if dest in given.yaml and dest not in given.command_line:
        return f" ({match.group(1)}: in --config {config_path})"
    return ""


def config_from_args(args: argparse.Namespace, given: GivenFlags = GivenFlags()) -> TrainConfig:
    """Namespace (+ the dests the user set) → TrainConfig; ValueError naming the flag."""
    _check_positive(args, "tensor_model_parallel_size", "pipeline_model_parallel_size", "rollout_batch_size",
                    "rollout_samples_per_prompt", "rollout_max_new_tokens", "train_iters", "micro_batch_size",
                    "num_mini_batches", "rollout_max_sampling_passes", "max_skipped_steps")
    check_value_ranges(args)
    logprob_size = args.logprob_micro_batch_size
    if logprob_size is not None and (logprob_size < 1 or logprob_size % args.micro_batch_size):
        raise ValueError(f"--logprob-micro-batch-size={logprob_size} must be a positive multiple of "
                         f"--micro-batch-size {args.micro_batch_size} (whole micro-batches per forward); "
                         f"omit it to recompute one micro-batch at a time")
    if args.rollout_micro_batch_size is not None and args.rollout_micro_batch_size < 1:
        raise ValueError(f"--rollout-micro-batch-size={args.rollout_micro_batch_size} must be a positive "
                         f"integer (sequences generated at a time); omit it to generate all at once")
    if args.rollout_top_k < 0:
        raise ValueError(f"--rollout-top-k={args.rollout_top_k} must be >= 0 (0: no top-k truncation)")
    if not 0 < args.rollout_top_p <= 1:
        raise ValueError(f"--rollout-top-p={args.rollout_top_p} must lie in (0, 1] (1: no nucleus truncation)")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise ValueError(f"--max-prompt-tokens={args.max_prompt_tokens} must be a positive integer")
    if args.overlong_buffer is not None and not 0 <= args.overlong_buffer < args.rollout_max_new_tokens:
        raise ValueError(f"--overlong-buffer={args.overlong_buffer} must lie in [0, --rollout-max-new-tokens="
                         f"{args.rollout_max_new_tokens}) (0 switches DAPO's overlong penalty off)")
    check_flags_have_effect(args, given)
    config = _build(args)
    check_combinations(config)
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
                                  adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad,
                                  schedule=_lr_schedule(args)),
        loss=_loss_config(args),
        rollout=RolloutConfig(engine=args.rollout_engine, batch_size=args.rollout_batch_size,
                              samples_per_prompt=args.rollout_samples_per_prompt,
                              max_new_tokens=args.rollout_max_new_tokens, temperature=args.rollout_temperature,
                              dynamic_sampling=args.rollout_dynamic_sampling,
                              max_sampling_passes=args.rollout_max_sampling_passes,
                              advantage_estimator=args.advantage_estimator, on_bad_reward=args.on_bad_reward,
                              micro_batch_size=args.rollout_micro_batch_size, top_k=args.rollout_top_k,
                              top_p=args.rollout_top_p),
        data=DataConfig(task=args.task, prompt_data=args.prompt_data, prompt_key=args.prompt_key,
                        answer_key=args.answer_key, prompt_template=args.prompt_template,
                        max_prompt_tokens=args.max_prompt_tokens, tokenizer=args.tokenizer,
                        overlong_buffer=args.overlong_buffer, chat_template=args.chat_template),
        svrpg=_svrpg_config(args),
        checkpoint=CheckpointConfig(load=args.load, save=args.save, save_interval=args.save_interval,
                                    finetune=args.finetune, keep_last=args.keep_last,
                                    pretrained=args.pretrained_checkpoint),
        logging=LoggingConfig(log_jsonl=args.log_jsonl, progress=not args.no_progress,
                              tensorboard_dir=args.tensorboard_dir, wandb_project=args.wandb_project,
                              wandb_exp_name=args.wandb_exp_name, wandb_save_dir=args.wandb_save_dir,
                              log_samples=args.log_samples),
        training=TrainingConfig(train_iters=args.train_iters, micro_batch_size=args.micro_batch_size,
                                logprob_micro_batch_size=args.logprob_micro_batch_size,
                                num_mini_batches=args.num_mini_batches, model_forward=args.model_forward,
                                seed=args.seed,
                                max_skipped_steps=args.max_skipped_steps),
        capo=_capo_config(args),
        reference=ReferenceConfig(mode=args.ref_policy, interval=args.ref_update_interval,
                                  kl_threshold=args.ref_update_kl),
        evaluation=EvalConfig(enabled=not args.no_eval, data=args.eval_data, interval=args.eval_interval,
                              samples=args.eval_samples, temperature=args.eval_temperature,
                              max_prompts=args.eval_max_prompts),
        sglang=_sglang_config(args),
        rollout_is=RolloutISConfig(correction=args.rollout_is_correction, level=args.rollout_is_level,
                                   threshold=DEFAULT_THRESHOLD if args.rollout_is_threshold is None
                                   else args.rollout_is_threshold, threshold_low=args.rollout_is_threshold_low))


def _sglang_config(args) -> SGLangConfig:
    with _named("--sglang-*"):
        return SGLangConfig(urls=tuple(args.sglang_url or ()), num_engines=args.rollout_num_engines,
                            num_gpus_per_engine=args.rollout_num_gpus_per_engine, python=args.sglang_python,
                            host=args.sglang_host, api_key=args.sglang_api_key or os.environ.get("SGLANG_API_KEY"),
                            device=args.sglang_device, max_total_tokens=args.sglang_max_total_tokens,
                            mem_fraction_static=args.sglang_mem_fraction_static, extra_args=args.sglang_extra_args,
                            start_timeout_s=args.sglang_start_timeout, request_timeout_s=args.sglang_request_timeout,
                            retries=args.sglang_retries, max_concurrency=args.sglang_max_concurrency,
                            sync=args.rollout_sync, bucket_bytes=args.update_weight_buffer_size)


def _check_positive(args, *names) -> None:
    for name in names:
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"{flag_name(name)}={value} must be a positive integer")


def _lr_schedule(args) -> LRSchedule:
    decay_iters = args.lr_decay_iters if args.lr_decay_iters is not None else args.train_iters
    return LRSchedule(lr=args.lr, weight_decay=args.weight_decay, min_lr=args.min_lr,
                      warmup_iters=args.lr_warmup_iters, warmup_init=args.lr_warmup_init,
                      decay_style=args.lr_decay_style, decay_iters=decay_iters)


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
                  no_clip=args.rpg_no_clip, kl_in_advantage=not args.rpg_kl_outside_advantage,
                  r2vpo=_r2vpo_config(args) if args.loss == "r2vpo" else None)
    return LossConfig(name=args.loss, **{key: value for key, value in values.items() if key in LOSS_FIELDS[args.loss]})


def _capo_config(args) -> CAPOConfig:
    """K defaults to the sampler's top-k (--rollout-top-k) when that is set, else CAPOConfig's 50."""
    top_k = args.capo_top_k if args.capo_top_k is not None else (args.rollout_top_k or CAPOConfig.top_k)
    return CAPOConfig(enabled=args.capo, preset=args.capo_preset, tau_f=args.capo_tau_f, tau_h=args.capo_tau_h,
                      top_k=top_k, levels=tuple(args.capo_levels), hessian_symmetric=args.capo_hessian_symmetric,
                      optimizer_model=args.capo_optimizer_model)


def _r2vpo_config(args) -> R2VPOConfig:
    """R2VPOConfig's errors name their --r2vpo-* flag."""
    return R2VPOConfig(level=args.r2vpo_level, delta=args.r2vpo_delta, dual_lr=args.r2vpo_dual_lr,
                       lambda_init=args.r2vpo_lambda_init, stale_clip=args.r2vpo_stale_clip,
                       reuse_steps=args.r2vpo_reuse_steps)


def _rpg_clip(values) -> RPGClip | None:
    if values is None:
        return None
    with _named("--rpg-clip EPS_LOW EPS_HIGH DUAL_CLIP"):
        return RPGClip(*values)
