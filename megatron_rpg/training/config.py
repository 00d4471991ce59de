"""The trainer's flags (Megatron-LM names for what megatron owns; --rpg-*, --rollout-*, --svrpg-* for
ours), a YAML file that may set any of them, and their validation — all before anything is built.

    args = parse_train_args(["--config", "examples/tiny_cpu.yaml", "--train-iters", "20"])

Precedence: command line > YAML (`--config`) > the defaults below. YAML keys are flag names without
the leading dashes, with '-' or '_' (`tensor-model-parallel-size: 2`); an unknown key is an error
naming it. Bad values exit as usage errors naming the flag and what is accepted.
"""
from __future__ import annotations

import argparse
import difflib

import yaml

from megatron_rpg.losses import ADVANTAGE_ESTIMATORS, AGGREGATIONS, DIVERGENCES, IS_LEVELS, STYLES, RPGClip
from megatron_rpg.losses.policy_loss import LOSS_FIELDS, POLICY_LOSSES, RPG_DEFAULT_CLIP, LossConfig
from megatron_rpg.megatron.model_args import add_model_args, validate_model_args
from megatron_rpg.optim.svrpg_config import SVRPGConfig, add_svrpg_args
from megatron_rpg.training.tasks import TASKS

MODEL_PRESETS = ("tiny",)
RPG_CLIP_DEFAULT = [RPG_DEFAULT_CLIP.eps_low, RPG_DEFAULT_CLIP.eps_high, RPG_DEFAULT_CLIP.dual_clip]  # the paper's
# reinforce_pp needs per-token advantages from old/ref log-probs (advantages.reinforce_pp_advantages),
# which the loop does not build yet
TRAINER_LOSSES = tuple(name for name in POLICY_LOSSES if name != "reinforce_pp")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_rpg.train",
                                     description="RPG reinforcement learning on megatron-core")
    parser.add_argument("--config", default=None, help="YAML file setting any of the flags below")
    model = parser.add_argument_group("model")
    source = model.add_mutually_exclusive_group()
    source.add_argument("--model-preset", choices=MODEL_PRESETS, default=None,
                        help="a built-in random model (tiny: Qwen2-style, hidden 64, 2 layers, vocab 16)")
    source.add_argument("--hf-config", default=None,
                        help="an HF config.json (or a folder holding one): random weights of that shape")
    source.add_argument("--load", default=None,
                        help="a megatron checkpoint from tools/convert_hf_to_megatron.py or --save")
    add_model_args(parser)
    parallel = parser.add_argument_group("parallelism")
    parallel.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parallel.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parallel.add_argument("--use-distributed-optimizer", action="store_true")
    optim = parser.add_argument_group("optimizer (Adam)")
    optim.add_argument("--lr", type=float, default=1e-6)
    optim.add_argument("--weight-decay", type=float, default=0.1)
    optim.add_argument("--adam-beta1", type=float, default=0.9)
    optim.add_argument("--adam-beta2", type=float, default=0.999)
    optim.add_argument("--adam-eps", type=float, default=1e-8)
    optim.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clip (0: off)")
    loss = parser.add_argument_group("policy loss (algorithms.md §1)")
    loss.add_argument("--loss", choices=TRAINER_LOSSES, default="rpg",
                      help="rpg, or a baseline (losses/policy_loss.py); --rpg-beta, --rpg-clip and "
                           "--rpg-aggregation apply to the baselines too")
    loss.add_argument("--rpg-divergence", choices=DIVERGENCES, default="urkl")
    loss.add_argument("--rpg-style", choices=STYLES, default="differentiable")
    loss.add_argument("--rpg-beta", type=float, default=1e-4, help="KL coefficient β")
    loss.add_argument("--rpg-aggregation", choices=AGGREGATIONS, default="token-mean")
    loss.add_argument("--rpg-is-level", choices=IS_LEVELS, default="token")
    loss.add_argument("--rpg-clip", nargs=3, type=float, default=None, metavar=("EPS_LOW", "EPS_HIGH", "DUAL_CLIP"),
                      help=f"RPG-Style Clip ε_low ε_high c (default {RPG_CLIP_DEFAULT}); for a baseline "
                           f"its clip (default: the baseline's own, e.g. PPO 0.2 0.2, DAPO 0.2 0.28)")
    loss.add_argument("--rpg-no-clip", action="store_true", help="no RPG-Style Clip")
    loss.add_argument("--rpg-kl-outside-advantage", action="store_true",
                      help="β·KL as a separate unclipped term (the public code), not inside Â (the paper)")
    loss.add_argument("--advantage-estimator", choices=ADVANTAGE_ESTIMATORS, default="rpg")
    rollout = parser.add_argument_group("rollout")
    rollout.add_argument("--rollout-engine", choices=("embedded",), default="embedded",
                         help="embedded: sample with the training model itself (no SGLang)")
    rollout.add_argument("--rollout-batch-size", type=int, default=8, help="prompts per step, all DP ranks")
    rollout.add_argument("--rollout-samples-per-prompt", type=int, default=8)
    rollout.add_argument("--rollout-max-new-tokens", type=int, default=8)
    rollout.add_argument("--rollout-temperature", type=float, default=1.0)
    rollout.add_argument("--rollout-dynamic-sampling", action="store_true",
                         help="DAPO: drop prompt groups whose rewards are all equal and draw again")
    rollout.add_argument("--rollout-max-sampling-passes", type=int, default=3,
                         help="draws per step with --rollout-dynamic-sampling before the batch is filled "
                              "with uninformative groups")
    training = parser.add_argument_group("training")
    training.add_argument("--task", choices=TASKS, default="repeat-token",
                          help="repeat-token: synthetic, no data; math: --prompt-data with DAPO's reward")
    data = parser.add_argument_group("math prompts (--task math)")
    data.add_argument("--prompt-data", default=None, help="JSONL (or Parquet) of prompts with reference answers")
    data.add_argument("--prompt-key", default="prompt", help="the prompt's field (a string or chat messages)")
    data.add_argument("--answer-key", default="answer", help="the reference answer's field")
    data.add_argument("--prompt-template", default="{prompt}", help="text around each prompt, with {prompt}")
    data.add_argument("--max-prompt-tokens", type=int, default=None, help="drop longer prompts")
    data.add_argument("--tokenizer", default=None,
                      help="HF tokenizer folder (default: the one kept with --load, or beside --hf-config)")
    data.add_argument("--overlong-buffer", type=int, default=None,
                      help="DAPO's L_buf: responses within this many tokens of --rollout-max-new-tokens are "
                           "penalised (default min(512, max-new-tokens / 4); 0: off)")
    training.add_argument("--train-iters", type=int, default=100, help="rollout steps")
    training.add_argument("--micro-batch-size", type=int, default=16, help="sequences per micro-batch")
    training.add_argument("--num-mini-batches", type=int, default=2,
                          help="optimizer steps per rollout batch (the batch is split evenly)")
    training.add_argument("--seed", type=int, default=1234)
    training.add_argument("--save", default=None,
                          help="checkpoint folder (model, optimizer, sampling state; torch_dist, exportable "
                               "to HF), written every --save-interval steps and at the end")
    training.add_argument("--save-interval", type=int, default=None, help="steps between checkpoints")
    training.add_argument("--finetune", action="store_true",
                          help="with --load of a checkpoint of ours: take its weights only (step 0, fresh optimizer)")
    training.add_argument("--log-jsonl", default=None, help="append one JSON line of metrics per step")
    training.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_svrpg_args(parser)
    return parser


def parse_train_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config is not None:
        parser.set_defaults(**_yaml_defaults(parser, known.config))
    args = parser.parse_args(argv)
    try:
        validate_train_args(args)
    except ValueError as error:
        parser.error(str(error))
    return args


def _yaml_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except OSError as error:
        parser.error(f"--config {path}: cannot read it ({error.strerror})")
    except yaml.YAMLError as error:
        parser.error(f"--config {path}: not valid YAML ({error})")
    if not isinstance(values, dict):
        parser.error(f"--config {path}: must hold a mapping of flag names to values")
    known = {action.dest: action for action in parser._actions if action.dest not in ("help", "config")}
    defaults = {}
    for key, value in values.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in known:
            close = difflib.get_close_matches(dest, known, n=3)
            hint = f"; did you mean {', '.join(name.replace('_', '-') for name in close)}?" if close else ""
            parser.error(f"--config {path}: unknown key {key!r}{hint}")
        action = known[dest]
        if action.type is not None and value is not None:  # YAML gives typed values; coerce like argparse
            value = [action.type(v) for v in value] if isinstance(value, list) else action.type(value)
        if action.choices is not None and value is not None and value not in action.choices:
            parser.error(f"--config {path}: {key}={value!r} is not one of {list(action.choices)}")
        defaults[dest] = value
    return defaults


def _positive(args, *names):
    for name in names:
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')}={value} must be a positive integer")


def validate_train_args(args: argparse.Namespace) -> None:
    """ValueError naming the flag for a setting that cannot work on any machine (the layout checks
    that need the world size run at start-up, in loop.check_layout)."""
    validate_model_args(args)
    _positive(args, "tensor_model_parallel_size", "pipeline_model_parallel_size", "rollout_batch_size",
              "rollout_samples_per_prompt", "rollout_max_new_tokens", "train_iters", "micro_batch_size",
              "num_mini_batches", "rollout_max_sampling_passes")
    for name in ("lr", "weight_decay", "clip_grad", "rpg_beta"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 0")
    if args.task == "math" and args.prompt_data is None:
        raise ValueError("--task math needs --prompt-data FILE (JSONL or Parquet with prompts and answers)")
    if args.task != "math" and args.prompt_data is not None:
        raise ValueError(f"--prompt-data is read only with --task math (got --task {args.task})")
    if args.save_interval is not None and (args.save_interval < 1 or args.save is None):
        raise ValueError(f"--save-interval={args.save_interval} needs --save DIR and must be >= 1")
    if args.rollout_temperature <= 0:
        raise ValueError(f"--rollout-temperature={args.rollout_temperature} must be > 0")
    if args.model_preset is None and args.hf_config is None and args.load is None:
        raise ValueError("no model: give --model-preset tiny, --hf-config CONFIG or --load CHECKPOINT")
    if args.rpg_clip is not None:
        RPGClip(*args.rpg_clip)  # names the bad ε or c
    if args.rpg_no_clip and args.loss != "rpg":
        raise ValueError(f"--rpg-no-clip applies to --loss rpg; --loss {args.loss} is defined with its clip")
    if args.finetune and args.load is None:
        raise ValueError("--finetune takes the weights of --load CHECKPOINT; give --load")
    SVRPGConfig.from_args(args)  # names the bad --svrpg-* value
    if args.svrpg and args.loss != "rpg":
        raise ValueError(f"--svrpg is defined for the RPG losses; got --loss {args.loss}: use --loss rpg")
    if args.loss == "dapo" and args.rpg_aggregation != "token-mean":
        raise ValueError(f"--loss dapo is token-mean by definition; got --rpg-aggregation {args.rpg_aggregation}")
    if args.svrpg and args.num_mini_batches != 1:
        raise ValueError(f"--svrpg takes one optimizer step per rollout batch (its inner step); got "
                         f"--num-mini-batches={args.num_mini_batches}: set it to 1")


def loss_config_from_args(args: argparse.Namespace) -> LossConfig:
    """The LossConfig of --loss, with only the fields that loss reads (LOSS_FIELDS); a baseline keeps
    its own clip unless --rpg-clip sets one (clip=None: the loss's default)."""
    values = dict(divergence=args.rpg_divergence, style=args.rpg_style, beta=args.rpg_beta,
                  aggregation=args.rpg_aggregation, is_level=args.rpg_is_level,
                  clip=RPGClip(*args.rpg_clip) if args.rpg_clip is not None else None,
                  no_clip=args.rpg_no_clip, kl_in_advantage=not args.rpg_kl_outside_advantage)
    reads = LOSS_FIELDS[args.loss]
    return LossConfig(name=args.loss, **{name: value for name, value in values.items() if name in reads})
