"""The checks behind TrainConfig: flags that would have no effect, settings that cannot work
together, and the start-up checks that need the world size or the model (layout, sequence length).
training/config.py calls the first two while parsing; training/loop.py the others at start-up.
"""
from __future__ import annotations

import importlib.util
import math
import os
import warnings
from typing import TYPE_CHECKING

from megatron_rpg.losses.policy_loss import LOSS_FIELDS
from megatron_rpg.losses.svrpg import SVRPG_AGGREGATIONS
from megatron_rpg.training.flags import (ROLLOUT_IS_FLAGS, SGLANG_FLAGS, SGLANG_LAUNCH_FLAGS, GivenFlags,
                                         flag_name)

REFERENCE_LOSSES = ("rpg", "grpo", "grpo_is_kl", "reinforce_pp")  # the losses with a KL to π_ref

if TYPE_CHECKING:
    from megatron_rpg.training.config import TrainConfig


# which LossConfig field each --rpg-* flag sets: a flag whose field the chosen loss does not read is refused
_LOSS_FLAG_FIELDS = {"rpg_divergence": "divergence", "rpg_style": "style", "rpg_beta": "beta",
                     "rpg_aggregation": "aggregation", "rpg_is_level": "is_level", "rpg_clip": "clip",
                     "rpg_no_clip": "no_clip", "rpg_kl_outside_advantage": "kl_in_advantage"}
_MATH_FLAGS = ("prompt_data", "prompt_key", "answer_key", "prompt_template", "max_prompt_tokens", "tokenizer",
               "overlong_buffer", "chat_template")
_EVAL_FLAGS = ("eval_data", "eval_interval", "eval_samples", "eval_temperature", "eval_max_prompts")
_WANDB_FLAGS = ("wandb_exp_name", "wandb_save_dir")
_SVRPG_FLAGS = ("svrpg_inner_steps", "svrpg_anchor_batch_size", "svrpg_rho_clip", "svrpg_rho_cap",
                "svrpg_update_ref")
_CAPO_FLAGS = ("capo_preset", "capo_tau_f", "capo_tau_h", "capo_top_k", "capo_levels", "capo_hessian_symmetric",
               "capo_optimizer_model")
_R2VPO_FLAGS = ("r2vpo_level", "r2vpo_delta", "r2vpo_dual_lr", "r2vpo_lambda_init", "r2vpo_reuse_steps",
                "r2vpo_stale_clip")


# the ranges the trainer accepts (each refusal says why; docs in the flag's help)
MAX_LR = 1.0  # Adam moves every weight by about lr per step: above 1 no model survives a step
TEMPERATURE_RANGE = (1e-3, 1e3)  # logits / T: below, sampling is argmax with overflowing log-probs; above, uniform
SEED_RANGE = (0, 2**32 - 1)  # torch generators take < 2**63 and the samplers derive seeds from it


def check_value_ranges(args) -> None:
    """ValueError naming the flag for a number outside the range the trainer can work with."""
    for name in ("weight_decay", "clip_grad", "rpg_beta"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{flag_name(name)}={value} must be a finite number >= 0")
    if not math.isfinite(args.lr):
        raise ValueError(f"--lr={args.lr} must be a finite number in (0, {MAX_LR:g}]")
    if args.lr == 0:
        raise ValueError("--lr=0 never changes the model; give a learning rate in (0, 1] (e.g. 1e-6 for a 7B model)")
    if not 0 < args.lr <= MAX_LR:
        raise ValueError(f"--lr={args.lr} must lie in (0, {MAX_LR:g}]: Adam moves each weight by about the "
                         f"learning rate per step, so a larger one destroys the model in one step; use e.g. 1e-6")
    if args.lr * args.weight_decay >= 1:
        raise ValueError(f"--lr {args.lr} x --weight-decay {args.weight_decay} = {args.lr * args.weight_decay:g} must "
                         f"be < 1 (decoupled weight decay multiplies every weight by 1 - lr x wd per step)")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, name) < 1:
            raise ValueError(f"{flag_name(name)}={getattr(args, name)} must lie in [0, 1) (an exponential "
                             f"moving average's decay; 0.9 / 0.999 are Adam's defaults)")
    if not (math.isfinite(args.adam_eps) and args.adam_eps > 0):
        raise ValueError(f"--adam-eps={args.adam_eps} must be a finite number > 0 (it keeps Adam's update "
                         f"finite where the second moment is 0); the default is 1e-8")
    low, high = TEMPERATURE_RANGE
    if not low <= args.rollout_temperature <= high:
        raise ValueError(f"--rollout-temperature={args.rollout_temperature} must lie in [{low:g}, {high:g}] "
                         f"(1.0 samples from the policy itself)")
    low, high = SEED_RANGE
    if not low <= args.seed <= high:
        raise ValueError(f"--seed={args.seed} must lie in [{low}, {high}]")


def check_flags_have_effect(args, given: GivenFlags) -> None:
    """ValueError for a flag the user set that the other settings would ignore. A YAML value made
    ignorable by a command-line choice (a base config run with `--loss grpo`) is a warning instead."""
    reads = LOSS_FIELDS[args.loss]
    for dest, field in _LOSS_FLAG_FIELDS.items():
        if field not in reads:
            refuse_without_effect(given, dest, "loss", f"{flag_name(dest)} has no effect with --loss {args.loss} (it reads "
                    f"{', '.join(sorted(reads))}); drop it, or use --loss rpg")
    if args.loss == "reinforce_pp":
        refuse_without_effect(given, "advantage_estimator", "loss", "--advantage-estimator has no effect with "
                              "--loss reinforce_pp (it builds per-token advantages from the rewards and the KL)")
    if args.task != "math":
        for dest in _MATH_FLAGS:
            refuse_without_effect(given, dest, "task", f"{flag_name(dest)} is read only with --task math (got --task {args.task})")
    if not args.capo:
        for dest in _CAPO_FLAGS:
            refuse_without_effect(given, dest, "capo",
                                  f"{flag_name(dest)} has no effect without --capo; add --capo or drop it")
    if not args.svrpg:
        for dest in _SVRPG_FLAGS:
            refuse_without_effect(given, dest, "svrpg", f"{flag_name(dest)} has no effect without --svrpg; add --svrpg or drop it")
    if args.loss != "r2vpo":
        for dest in _R2VPO_FLAGS:
            refuse_without_effect(given, dest, "loss", f"{flag_name(dest)} has no effect without --loss r2vpo "
                                  f"(got --loss {args.loss}); use --loss r2vpo or drop it")
    if not args.rollout_dynamic_sampling:
        refuse_without_effect(given, "rollout_max_sampling_passes", "rollout_dynamic_sampling",
                "--rollout-max-sampling-passes has no effect without --rollout-dynamic-sampling")
    if args.save is None:
        refuse_without_effect(given, "save_interval", "save", f"--save-interval={args.save_interval} needs --save DIR")
    if args.rpg_no_clip and args.rpg_clip is not None:
        if "rpg_no_clip" in given.command_line and "rpg_clip" not in given.command_line:
            warnings.warn("--rpg-no-clip on the command line overrides rpg-clip from --config", stacklevel=3)
            args.rpg_clip = None  # the command line wins
        else:
            raise ValueError("--rpg-no-clip and --rpg-clip contradict each other; give one of them")
    if args.save is None:
        refuse_without_effect(given, "keep_last", "save", f"--keep-last={args.keep_last} needs --save DIR")
    if args.pretrained_checkpoint is not None and (args.load is None or args.save is None):
        raise ValueError("--pretrained-checkpoint is read only on a first run of --load DIR --save DIR (the same "
                         "folder, empty yet): give both, or load the weights directly with --load")
    if args.lr_decay_style == "constant":
        for dest in ("lr_decay_iters", "min_lr"):
            refuse_without_effect(given, dest, "lr_decay_style", f"{flag_name(dest)} has no effect with "
                                  f"--lr-decay-style constant; add --lr-decay-style linear or cosine")
    if args.lr_warmup_iters == 0:
        refuse_without_effect(given, "lr_warmup_init", "lr_warmup_iters",
                              "--lr-warmup-init has no effect without --lr-warmup-iters > 0")
    _check_sglang_flags(args, given)
    _check_rollout_is_flags(args, given)
    if args.finetune and args.load is None:
        raise ValueError("--finetune takes the weights of --load CHECKPOINT; give --load")
    _check_eval_and_logging_flags(args, given)


def _check_eval_and_logging_flags(args, given: GivenFlags) -> None:
    """Evaluation runs by default for the synthetic task (its own held-out draw) and for math with
    --eval-data; an --eval-* flag it would not read, a --wandb-* flag without --wandb-project and
    --log-samples without any metrics sink are refused."""
    for dest in ("eval_samples", "eval_interval", "eval_max_prompts"):
        value = getattr(args, dest)
        if value is not None and value < 1:
            raise ValueError(f"{flag_name(dest)}={value} must be a positive integer")
    if not (args.eval_temperature == 0 or (math.isfinite(args.eval_temperature) and args.eval_temperature > 0)):
        raise ValueError(f"--eval-temperature={args.eval_temperature} must be 0 (greedy) or a finite number > 0")
    if args.log_samples < 0:
        raise ValueError(f"--log-samples={args.log_samples} must be >= 0")
    if args.no_eval:
        for dest in _EVAL_FLAGS:
            refuse_without_effect(given, dest, "no_eval", f"{flag_name(dest)} has no effect with --no-eval; drop one of them")
    elif args.task != "math":
        refuse_without_effect(given, "eval_data", "task", f"--eval-data is a math prompt file (--task math); the "
                              f"{args.task} task evaluates on a held-out draw of its own prompts (--eval-max-prompts)")
    elif args.eval_data is None:
        for dest in _EVAL_FLAGS[1:]:
            refuse_without_effect(given, dest, "eval_data", f"{flag_name(dest)} has no effect with --task math "
                                  f"without --eval-data FILE (the prompts to evaluate on); add --eval-data")
    if args.wandb_project is None:
        for dest in _WANDB_FLAGS:
            refuse_without_effect(given, dest, "wandb_project", f"{flag_name(dest)} needs --wandb-project NAME")
    if not (args.log_jsonl or args.tensorboard_dir or args.wandb_project):
        refuse_without_effect(given, "log_samples", "log_jsonl", "--log-samples has no effect without a metrics "
                              "log: add --log-jsonl FILE, --tensorboard-dir DIR or --wandb-project NAME")
    if args.log_jsonl is not None and os.path.isdir(args.log_jsonl):  # every rank, before anything is built
        raise ValueError(f"--log-jsonl {args.log_jsonl} is a folder; name a file (e.g. {args.log_jsonl}/metrics.jsonl)")
    for flag, value, package in (("--tensorboard-dir", args.tensorboard_dir, "tensorboard"),
                                 ("--wandb-project", args.wandb_project, "wandb")):
        if value is not None and importlib.util.find_spec(package) is None:
            raise ValueError(f"{flag} {value} needs the {package} package, which is not installed: "
                             f"pip install {package}")


def _check_rollout_is_flags(args, given: GivenFlags) -> None:
    """--rollout-is-level/-threshold(-low) need a correction; -threshold-low is mis's. The values
    themselves are RolloutISConfig's to check (their messages name the flags)."""
    if args.rollout_is_correction == "none":
        for dest in ROLLOUT_IS_FLAGS:
            refuse_without_effect(given, dest, "rollout_is_correction", f"{flag_name(dest)} has no effect "
                                  f"without --rollout-is-correction tis or mis; add one or drop it")
    elif args.rollout_is_correction == "tis":
        refuse_without_effect(given, "rollout_is_threshold_low", "rollout_is_correction",
                              "--rollout-is-threshold-low has no effect with --rollout-is-correction tis (it "
                              "truncates from above only, min(w, C)); use mis or drop it")


def _check_sglang_flags(args, given: GivenFlags) -> None:
    if args.rollout_engine != "sglang":
        for dest in SGLANG_FLAGS:
            refuse_without_effect(given, dest, "rollout_engine", f"{flag_name(dest)} has no effect without "
                                  f"--rollout-engine sglang (got --rollout-engine {args.rollout_engine})")
        return
    refuse_without_effect(given, "rollout_micro_batch_size", "rollout_engine", "--rollout-micro-batch-size is "
                          "the embedded engine's; SGLang schedules its own batches (see --sglang-max-concurrency)")
    if args.sglang_url:
        for dest in SGLANG_LAUNCH_FLAGS:
            refuse_without_effect(given, dest, "sglang_url", f"{flag_name(dest)} sets up servers we launch; it has "
                                  f"no effect with --sglang-url (servers already running)")
    for dest in ("rollout_num_engines", "rollout_num_gpus_per_engine", "update_weight_buffer_size",
                 "sglang_max_concurrency"):
        if getattr(args, dest) < 1:
            raise ValueError(f"{flag_name(dest)}={getattr(args, dest)} must be a positive integer")
    if args.sglang_max_total_tokens is not None and args.sglang_max_total_tokens < 1:
        raise ValueError(f"--sglang-max-total-tokens={args.sglang_max_total_tokens} must be a positive integer")
    if args.sglang_retries < 0:
        raise ValueError(f"--sglang-retries={args.sglang_retries} must be >= 0")
    for dest in ("sglang_start_timeout", "sglang_request_timeout"):
        if not getattr(args, dest) > 0:
            raise ValueError(f"{flag_name(dest)}={getattr(args, dest)} must be a positive number of seconds")


def refuse_without_effect(given: GivenFlags, dest: str, context: str, message: str) -> None:
    """ValueError(message) if the user set `dest`; only a warning when it came from the YAML file and
    the command line set `context`, the flag that made it ineffective."""
    if dest in given.command_line or (dest in given.yaml and context not in given.command_line):
        raise ValueError(message)
    if dest in given.yaml:
        warnings.warn(f"ignored from --config: {message}", stacklevel=3)


def check_combinations(config: TrainConfig) -> None:
    """Settings that cannot work together on any machine (the layout checks need the world size and
    run at start-up: check_layout)."""
    if config.data.task == "math" and config.data.prompt_data is None:
        raise ValueError("--task math needs --prompt-data FILE (JSONL or Parquet with prompts and answers)")
    if config.data.task == "math" and "{prompt}" not in config.data.prompt_template:
        raise ValueError(f"--prompt-template {config.data.prompt_template!r} has no '{{prompt}}'; it must say "
                         f"where each prompt goes (e.g. '{{prompt}} Put the answer in \\boxed{{}}.')")
    if config.checkpoint.save_interval is not None and config.checkpoint.save_interval < 1:
        raise ValueError(f"--save-interval={config.checkpoint.save_interval} must be >= 1")
    if config.checkpoint.keep_last is not None and config.checkpoint.keep_last < 1:
        raise ValueError(f"--keep-last={config.checkpoint.keep_last} must be >= 1 (omit it to keep every checkpoint)")
    if config.model.preset is None and config.model.hf_config is None and config.checkpoint.load is None:
        raise ValueError("no model: give --model-preset tiny, --hf-config CONFIG or --load CHECKPOINT")
    if config.loss.name == "dapo" and config.loss.aggregation != "token-mean":
        raise ValueError(f"--loss dapo is token-mean by definition; got --rpg-aggregation {config.loss.aggregation}")
    if config.reference.keeps_weights:
        if config.loss.name not in REFERENCE_LOSSES:
            raise ValueError(f"--ref-policy {config.reference.mode} has no effect with --loss {config.loss.name} "
                             f"(no KL term); use one of {list(REFERENCE_LOSSES)}, or drop it")
        if config.svrpg.enabled and config.svrpg.update_ref:
            raise ValueError(f"--svrpg-update-ref sets π_ref to the SVRPG snapshot; it contradicts --ref-policy "
                             f"{config.reference.mode}: give one of them")
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
    _check_lean_forward(config)
    if config.loss.name == "r2vpo":
        _warn_if_r2vpo_constraint_is_idle(config)
    if config.capo.enabled:
        _check_capo(config)
    if config.rollout_is.enabled and config.rollout.engine == "embedded" and (config.rollout.top_k
                                                                              or config.rollout.top_p < 1):
        warnings.warn("--rollout-is-correction with --rollout-top-k/--rollout-top-p on the embedded engine: its "
                      "log-probs are those of the truncated distribution it samples, so w = π_old/π_engine is "
                      "also the kept set's probability mass (< 1 on every token), not only the numeric "
                      "mismatch (SGLang reports untruncated log-probs)", stacklevel=3)


def _check_lean_forward(config: TrainConfig) -> None:
    """--model-forward lean where the flags alone show it cannot cover the model (the rest of
    megatron/lean_forward.py's coverage is checked on the built model)."""
    if config.training.model_forward != "lean":
        return
    parallel, model = config.parallel, config.model
    reason = None
    if parallel.tensor_model_parallel_size != 1 or parallel.pipeline_model_parallel_size != 1:
        reason = (f"--tensor-model-parallel-size {parallel.tensor_model_parallel_size} x "
                  f"--pipeline-model-parallel-size {parallel.pipeline_model_parallel_size} (it runs TP = PP = 1)")
    elif model.transformer_impl != "local":
        reason = f"--transformer-impl {model.transformer_impl} (it runs the local spec only)"
    elif model.params_dtype != "float32":
        reason = f"params dtype {model.params_dtype} (it is verified in float32)"
    if reason is not None:
        raise ValueError(f"--model-forward lean does not cover {reason}; use --model-forward auto (megatron's "
                         f"forward where lean does not apply) or megatron")


def _check_capo(config: TrainConfig) -> None:
    if config.svrpg.enabled:
        raise ValueError("--capo with --svrpg is not supported: the snapshot pass would take masks of its own, "
                         "so the two gradients would not share their tokens; drop one of them")
    if config.rollout.top_k and config.capo.top_k != config.rollout.top_k:
        warnings.warn(f"--capo-top-k {config.capo.top_k} differs from --rollout-top-k {config.rollout.top_k}: the "
                      f"last-layer model's softmax then spans other tokens than the sampler's", stacklevel=3)


def _warn_if_r2vpo_constraint_is_idle(config: TrainConfig) -> None:
    """With one optimizer step per batch and no reuse every gradient is taken at θ = π_old, where
    w ≡ 1: the variance term has zero gradient and λ only decays."""
    if config.training.num_mini_batches == 1 and config.loss.r2vpo.reuse_steps == 0:
        warnings.warn("--loss r2vpo with --num-mini-batches 1 and --r2vpo-reuse-steps 0: every gradient is "
                      "taken at θ = θ_old (w = 1), so the variance term has no gradient and λ only decays; "
                      "use --num-mini-batches > 1 or --r2vpo-reuse-steps >= 1", stacklevel=3)


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


def check_capo_top_k(config: TrainConfig, vocab_size: int) -> None:
    """CAPO's last-layer softmax spans the top-K logits: K cannot exceed the model's vocabulary."""
    if config.capo.enabled and config.capo.top_k > vocab_size:
        raise ValueError(f"--capo-top-k {config.capo.top_k} exceeds the model's vocabulary of {vocab_size} tokens: "
                         f"use at most {vocab_size} (K = the whole vocabulary is exact softmax)")


def warn_if_beta_has_no_effect(config: TrainConfig) -> None:
    """Once at start-up: with π_ref = π_old and one optimizer step per rollout batch, the step runs at
    θ = θ_old, where the KL's expected gradient is zero: β then changes nothing in expectation."""
    loss = config.loss
    if "beta" not in LOSS_FIELDS[loss.name] or not loss.beta:
        return
    reference_moves = (config.svrpg.enabled and config.svrpg.update_ref) or config.reference.keeps_weights
    if config.training.num_mini_batches == 1 and not reference_moves:
        warnings.warn(f"--rpg-beta {loss.beta} can have no expected effect: the reference policy is π_old "
                      f"and --num-mini-batches 1 takes one optimizer step per rollout batch, at θ = θ_old, "
                      f"where the KL gradient vanishes in expectation; use --num-mini-batches > 1 "
                      f"(or a fixed reference: --ref-policy initial)", stacklevel=2)
