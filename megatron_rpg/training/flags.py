"""The trainer's command line: Megatron-LM's flag names for what megatron owns, `--rpg-*`,
`--rollout-*`, `--svrpg-*`, `--r2vpo-*` for ours, and a YAML file (`--config`) that may set any of them.

    args, given = parse_flags(["--config", "examples/tiny_cpu.yaml", "--train-iters", "20"])

Precedence: command line > YAML > the defaults below. YAML keys are flag names without the leading
dashes, with '-' or '_' (`tensor-model-parallel-size: 2`); an unknown key is an error naming it, and
each value is checked against its flag's type first (training/yaml_flags.py).
`given` says which flags the user set on the command line or in the YAML file: training/config.py
refuses those that would have no effect. Only this module and config.py know
about argparse; the library layers take config.py's dataclasses.
"""
from __future__ import annotations

import argparse
import dataclasses

from megatron_rpg.losses import ADVANTAGE_ESTIMATORS, AGGREGATIONS, DIVERGENCES, IS_LEVELS, STYLES
from megatron_rpg.losses.policy_loss import POLICY_LOSSES, RPG_DEFAULT_CLIP
from megatron_rpg.losses.capo import CAPO_LEVELS, CAPO_OPTIMIZER_MODELS, CAPO_PRESETS, CAPOConfig
from megatron_rpg.losses.r2vpo import R2VPO_LEVELS, R2VPOConfig
from megatron_rpg.losses.rollout_is import DEFAULT_THRESHOLD, ROLLOUT_IS_CORRECTIONS, ROLLOUT_IS_LEVELS
from megatron_rpg.megatron.lean_forward import MODEL_FORWARD_CHOICES
from megatron_rpg.megatron.lr_schedule import LR_DECAY_STYLES
from megatron_rpg.megatron.models import FP8_FORMATS, FP8_RECIPES
from megatron_rpg.optim.reference_policy import REF_POLICY_MODES
from megatron_rpg.optim.svrpg_config import SVRPGConfig
from megatron_rpg.rewards.guard import ON_BAD_REWARD, REWARD_LIMIT
from megatron_rpg.rollout.sglang_engine import DEVICES as SGLANG_DEVICES, SYNC_MODES, SGLangConfig
from megatron_rpg.training.yaml_flags import yaml_values

MODEL_PRESETS = ("tiny",)
TASKS = ("repeat-token", "math")
TRANSFORMER_IMPLS = ("local", "transformer_engine")
ROLLOUT_ENGINES = ("embedded", "sglang")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_rpg.train",
                                     description="RPG reinforcement learning on megatron-core")
    parser.add_argument("--config", default=None, help="YAML file setting any of the flags below")
    _model_flags(parser)
    parallel = parser.add_argument_group("parallelism")
    parallel.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parallel.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parallel.add_argument("--use-distributed-optimizer", action="store_true")
    optim = parser.add_argument_group("optimizer (Adam)")
    optim.add_argument("--lr", type=float, default=1e-6, help="learning rate, in (0, 1]")
    optim.add_argument("--weight-decay", type=float, default=0.1)
    optim.add_argument("--adam-beta1", type=float, default=0.9)
    optim.add_argument("--adam-beta2", type=float, default=0.999)
    optim.add_argument("--adam-eps", type=float, default=1e-8)
    optim.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clip (0: off)")
    _lr_schedule_flags(optim)
    _loss_flags(parser)
    _r2vpo_flags(parser)
    _capo_flags(parser)
    _rollout_flags(parser)
    _sglang_flags(parser)
    _reward_guard_flags(parser)
    training = parser.add_argument_group("training")
    training.add_argument("--task", choices=TASKS, default="repeat-token",
                          help="repeat-token: synthetic, no data; math: --prompt-data with DAPO's reward")
    training.add_argument("--train-iters", type=int, default=100, help="rollout steps")
    training.add_argument("--micro-batch-size", type=int, default=16, help="sequences per micro-batch")
    training.add_argument("--logprob-micro-batch-size", type=int, default=None, help="sequences per forward "
                          "of the old log-prob recompute, a multiple of --micro-batch-size (default: that size)")
    training.add_argument("--model-forward", choices=MODEL_FORWARD_CHOICES, default="auto",
                          help="the training forward and the log-prob passes: lean (megatron/lean_forward.py: the "
                               "model's parameters through functional layers), megatron (its GPTModel modules), "
                               "or auto (lean where it covers the model, else megatron's, saying why)")
    training.add_argument("--num-mini-batches", type=int, default=2,
                          help="optimizer steps per rollout batch (the batch is split evenly)")
    training.add_argument("--seed", type=int, default=1234, help="in [0, 2**32 - 1]")
    training.add_argument("--max-skipped-steps", type=int, default=10,
                          help="optimizer steps in a row skipped for a non-finite loss, gradient or optimizer "
                               "state (or with an exactly-zero gradient) that end the run")
    _data_flags(parser)
    checkpoint = parser.add_argument_group("checkpoints")
    checkpoint.add_argument("--save", default=None,
                            help="checkpoint folder: DIR/iter_<step>/ (model, optimizer, sampling state; "
                                 "torch_dist, checksummed, exportable to HF) every --save-interval steps and at "
                                 "the end, and DIR/latest_checkpointed_iteration.txt naming the newest")
    checkpoint.add_argument("--keep-last", type=int, default=None,
                            help="after each save keep only the newest N iter_ folders (default: all)")
    checkpoint.add_argument("--save-interval", type=int, default=None, help="steps between checkpoints")
    checkpoint.add_argument("--pretrained-checkpoint", default=None,
                            help="the weights a run starts from when --load = --save holds no checkpoint yet (a "
                                 "converted model): a requeued job then resumes from --save, a first one starts "
                                 "from these weights")
    checkpoint.add_argument("--finetune", action="store_true",
                            help="with --load of a checkpoint of ours: take its weights only (step 0, fresh "
                                 "optimizer)")
    _logging_flags(parser)
    _eval_flags(parser)
    _reference_flags(parser)
    _svrpg_flags(parser)
    _show_defaults(parser)
    return parser


def _show_defaults(parser) -> None:
    """--help names the default of every flag that takes a value (switches are off unless given; a
    None default means unset, which each help says in words)."""
    for action in parser._actions:
        if action.option_strings and action.nargs != 0 and action.default is not None \
                and "default" not in (action.help or ""):
            action.help = f"{action.help or ''} (default: %(default)s)".strip()


def _logging_flags(parser) -> None:
    logging = parser.add_argument_group("logging (training/metrics_sinks.py)")
    logging.add_argument("--log-jsonl", default=None,
                         help="append one JSON line of metrics per step (strict JSON: inf/NaN as null); a PNG "
                              "of the run is drawn beside it at the end")
    logging.add_argument("--tensorboard-dir", default=None, help="write TensorBoard scalars here")
    logging.add_argument("--wandb-project", default=None,
                         help="log to Weights & Biases (needs `pip install wandb`; WANDB_MODE=offline works "
                              "without network)")
    logging.add_argument("--wandb-exp-name", default=None, help="the W&B run name (needs --wandb-project)")
    logging.add_argument("--wandb-save-dir", default=None, help="the W&B run folder (needs --wandb-project)")
    logging.add_argument("--log-samples", type=int, default=0,
                         help="log this many decoded prompt/response/reward triples per step")
    logging.add_argument("--no-progress", action="store_true", help="no progress bar")


def _eval_flags(parser) -> None:
    evaluation = parser.add_argument_group(
        "evaluation (training/evaluation.py)",
        "before training, every --eval-interval steps and after the last: accuracy Mean@K, pass@k, "
        "response length, truncation rate; on by default for the synthetic task (its own held-out draw)")
    evaluation.add_argument("--eval-data", default=None,
                            help="math eval prompts (JSONL/Parquet, read like --prompt-data)")
    evaluation.add_argument("--eval-interval", type=int, default=None,
                            help="steps between evaluations (default: only before training and at the end)")
    evaluation.add_argument("--eval-samples", type=int, default=8, help="responses per eval prompt (K)")
    evaluation.add_argument("--eval-temperature", type=float, default=1.0, help="0: greedy")
    evaluation.add_argument("--eval-max-prompts", type=int, default=None,
                            help="evaluate on the first N prompts of --eval-data (synthetic task: N held-out "
                                 "prompts, default 32)")
    evaluation.add_argument("--no-eval", action="store_true", help="no evaluation")


def _model_flags(parser) -> None:
    model = parser.add_argument_group("model")
    source = model.add_mutually_exclusive_group()
    source.add_argument("--model-preset", choices=MODEL_PRESETS, default=None,
                        help="a built-in random model (tiny: Qwen2-style, hidden 64, 2 layers, vocab 16)")
    source.add_argument("--hf-config", default=None,
                        help="an HF config.json (or a folder holding one): random weights of that shape")
    model.add_argument("--load", default=None,
                       help="a megatron checkpoint from tools/convert_hf_to_megatron.py, or a --save folder (its "
                            "latest iter_, or DIR/iter_N); with --load = --save a first run starts fresh from "
                            "--model-preset/--hf-config")
    model.add_argument("--transformer-impl", choices=TRANSFORMER_IMPLS, default="local",
                       help="layer implementation: local PyTorch layers, or Transformer Engine (GPU)")
    model.add_argument("--fp8-format", choices=FP8_FORMATS, default=None,
                       help="FP8 GEMMs in this format; needs --transformer-impl transformer_engine")
    model.add_argument("--fp8-recipe", choices=FP8_RECIPES, default=None,
                       help="FP8 scaling recipe (default: delayed); needs --fp8-format")
    precision = model.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bfloat16 parameters")
    precision.add_argument("--fp16", action="store_true", help="float16 parameters")


def _lr_schedule_flags(optim) -> None:
    """Megatron-LM's schedule flags (megatron/lr_schedule.py); iters are RL steps, like --train-iters."""
    optim.add_argument("--lr-warmup-iters", type=int, default=0, help="linear warm-up from --lr-warmup-init")
    optim.add_argument("--lr-warmup-init", type=float, default=0.0, help="the lr of the warm-up's first step")
    optim.add_argument("--lr-decay-style", choices=LR_DECAY_STYLES, default="constant",
                       help="after the warm-up: constant --lr, or linear/cosine decay to --min-lr")
    optim.add_argument("--lr-decay-iters", type=int, default=None,
                       help="steps until the lr reaches --min-lr (default: --train-iters)")
    optim.add_argument("--min-lr", type=float, default=0.0, help="the lr at the end of the decay")


def _loss_flags(parser) -> None:
    loss = parser.add_argument_group("policy loss (docs/algorithms.md)")
    loss.add_argument("--loss", choices=POLICY_LOSSES, default="rpg",
                      help="rpg, or a baseline (losses/policy_loss.py); a flag the chosen loss does not "
                           "read is refused")
    loss.add_argument("--rpg-divergence", choices=DIVERGENCES, default="urkl", help="rpg only")
    loss.add_argument("--rpg-style", choices=STYLES, default="differentiable", help="rpg only")
    loss.add_argument("--rpg-beta", type=float, default=1e-4,
                      help="KL coefficient β (rpg, grpo, grpo_is_kl; reinforce_pp: of the k1 in its token rewards)")
    loss.add_argument("--rpg-aggregation", choices=AGGREGATIONS, default="token-mean",
                      help="how token losses combine over the global batch (dapo: token-mean only)")
    loss.add_argument("--rpg-is-level", choices=IS_LEVELS, default="token", help="rpg only")
    loss.add_argument("--rpg-clip", nargs=3, type=float, default=None, metavar=("EPS_LOW", "EPS_HIGH", "DUAL_CLIP"),
                      help=f"RPG-Style Clip ε_low ε_high c (default {RPG_DEFAULT_CLIP.eps_low} {RPG_DEFAULT_CLIP.eps_high} {RPG_DEFAULT_CLIP.dual_clip}); for a baseline "
                           f"its clip (default: the baseline's own, e.g. PPO 0.2 0.2, DAPO 0.2 0.28)")
    loss.add_argument("--rpg-no-clip", action="store_true", help="no RPG-Style Clip (rpg only)")
    loss.add_argument("--rpg-kl-outside-advantage", action="store_true",
                      help="β·KL as a separate unclipped term (the public code), not inside Â (the paper); "
                           "rpg only")
    loss.add_argument("--advantage-estimator", choices=ADVANTAGE_ESTIMATORS, default="rpg",
                      help="per-sequence advantages from the group's rewards (reinforce_pp builds its own "
                           "per-token ones)")


def _r2vpo_flags(parser) -> None:
    defaults = R2VPOConfig()
    group = parser.add_argument_group("r2vpo", "ratio-variance regularised policy optimisation, --loss r2vpo "
                                      "(docs/algorithms.md)")
    group.add_argument("--r2vpo-level", choices=R2VPO_LEVELS, default=defaults.level,
                       help="importance ratio per token, or per sequence (the product of its tokens')")
    group.add_argument("--r2vpo-delta", type=float, default=defaults.delta,
                       help="δ: the budget on Var(w) = E[(w − 1)²]")
    group.add_argument("--r2vpo-dual-lr", type=float, default=defaults.dual_lr,
                       help="η_λ: λ ← max(0, λ + η_λ·(Var̂(w) − δ)) after each step")
    group.add_argument("--r2vpo-lambda-init", type=float, default=defaults.lambda_init, help="λ at step 0")
    group.add_argument("--r2vpo-reuse-steps", type=int, default=defaults.reuse_steps,
                       help="rollout batches of past steps trained on again, weighted by π_θ/π_behaviour (0: off)")
    group.add_argument("--r2vpo-stale-clip", type=float, default=defaults.stale_clip,
                       help="truncate a reused sample's ratio at this value (default: untruncated)")


def _capo_flags(parser) -> None:
    defaults = CAPOConfig()
    group = parser.add_argument_group("capo", "curvature-aware token masking on top of any --loss (docs/algorithms.md)")
    group.add_argument("--capo", action="store_true", help="mask the tokens whose last-layer step is predicted to "
                       "move the objective or the policy too far")
    group.add_argument("--capo-preset", choices=sorted(CAPO_PRESETS), default=defaults.preset,
                       help="the thresholds of a published recipe: capo (tau_F 1e-4, tau_H 0.01), drcapo (1e-3, "
                            "5e-4), reincapo (1e-5, 0.1)")
    group.add_argument("--capo-tau-f", type=float, default=None, help="tau_F, overriding the preset's")
    group.add_argument("--capo-tau-h", type=float, default=None, help="tau_H, overriding the preset's")
    group.add_argument("--capo-top-k", type=int, default=None,
                       help="K of the last-layer softmax (default: --rollout-top-k if set, else 50)")
    group.add_argument("--capo-levels", nargs="+", choices=CAPO_LEVELS, default=list(defaults.levels),
                       help="applied in this order, each on the tokens the previous kept")
    group.add_argument("--capo-hessian-symmetric", action="store_true", help="keep |m_H| <= tau_H (default: "
                       "0 <= m_H <= tau_H)")
    group.add_argument("--capo-optimizer-model", choices=CAPO_OPTIMIZER_MODELS, default=defaults.optimizer_model,
                       help="the update the curvature is predicted for: Adam (our per-row moment table) or SGD")


def _rollout_flags(parser) -> None:
    rollout = parser.add_argument_group("rollout")
    rollout.add_argument("--rollout-engine", choices=ROLLOUT_ENGINES, default="embedded",
                         help="embedded: sample with the training model itself (no SGLang); sglang: SGLang "
                              "servers, weights synced after every step (--sglang-*, --rollout-sync)")
    rollout.add_argument("--rollout-batch-size", type=int, default=8, help="prompts per step, all DP ranks")
    rollout.add_argument("--rollout-samples-per-prompt", type=int, default=8)
    rollout.add_argument("--rollout-max-new-tokens", type=int, default=8)
    rollout.add_argument("--rollout-temperature", type=float, default=1.0, help="sampling temperature, in [1e-3, 1e3]")
    rollout.add_argument("--rollout-dynamic-sampling", action="store_true",
                         help="DAPO: drop prompt groups whose rewards are all equal and draw again")
    rollout.add_argument("--rollout-max-sampling-passes", type=int, default=3,
                         help="draws per step with --rollout-dynamic-sampling before the batch is filled "
                              "with uninformative groups")
    rollout.add_argument("--rollout-top-k", type=int, default=0,
                         help="sample from the k most likely tokens (0: all); the engine's log-probs are those "
                              "of the truncated distribution it samples")
    rollout.add_argument("--rollout-top-p", type=float, default=1.0,
                         help="nucleus sampling: the most likely tokens holding this probability (1.0: all)")
    rollout.add_argument("--rollout-micro-batch-size", type=int, default=None,
                         help="sequences the embedded engine generates at a time (KV cache and activation "
                              "memory); default: all of the rank's sequences at once")
    # the rollout IS correction, w = π_old/π_engine on each token's loss (losses/rollout_is.py)
    rollout.add_argument("--rollout-is-correction", choices=ROLLOUT_IS_CORRECTIONS, default="none",
                         help="tis: min(w, C) (truncated IS); mis: w, or 0 outside [low, C] (masked IS); none: off")
    rollout.add_argument("--rollout-is-level", choices=ROLLOUT_IS_LEVELS, default="token",
                         help="w per token, or per response (the product of its tokens' ratios, on each token)")
    rollout.add_argument("--rollout-is-threshold", type=float, default=None,
                         help=f"C, the largest weight kept, >= 1 (default {DEFAULT_THRESHOLD:g})")
    rollout.add_argument("--rollout-is-threshold-low", type=float, default=None,
                         help="mis only: the smallest weight kept, in [0, 1] (default 1/C)")


ROLLOUT_IS_FLAGS = ("rollout_is_level", "rollout_is_threshold", "rollout_is_threshold_low")  # need a correction

# every flag of _sglang_flags: refused without --rollout-engine sglang (training/config_checks.py)
SGLANG_FLAGS = ("rollout_sync", "rollout_num_engines", "rollout_num_gpus_per_engine", "update_weight_buffer_size",
                "sglang_url", "sglang_python", "sglang_host", "sglang_api_key", "sglang_device",
                "sglang_max_total_tokens", "sglang_mem_fraction_static", "sglang_extra_args",
                "sglang_start_timeout", "sglang_request_timeout", "sglang_retries", "sglang_max_concurrency")
# the launch settings among them: refused with --sglang-url (servers we do not launch)
SGLANG_LAUNCH_FLAGS = ("rollout_num_engines", "sglang_python", "sglang_host", "sglang_device",
                       "sglang_max_total_tokens", "sglang_mem_fraction_static", "sglang_extra_args")


def _sglang_flags(parser) -> None:
    defaults = SGLangConfig()
    group = parser.add_argument_group("sglang", "SGLang rollout servers, --rollout-engine sglang "
                                      "(rollout/sglang_engine.py)")
    group.add_argument("--rollout-sync", choices=SYNC_MODES, default=defaults.sync,
                       help="weight sync after every optimizer step: disk (HF folder + update_weights_from_disk), "
                            "colocated (update_weights_from_tensor per bucket), distributed (a gloo/NCCL group "
                            "with the servers, update_weights_from_distributed)")
    group.add_argument("--rollout-num-engines", type=int, default=defaults.num_engines,
                       help="SGLang servers to launch")
    group.add_argument("--rollout-num-gpus-per-engine", type=int, default=defaults.num_gpus_per_engine,
                       help="tensor-parallel size of each server (SGLang's --tp-size)")
    group.add_argument("--update-weight-buffer-size", type=int, default=defaults.bucket_bytes,
                       help="bytes per weight-sync bucket (one dtype each)")
    group.add_argument("--sglang-url", nargs="+", default=None,
                       help="use these running servers (http://host:port ...) instead of launching")
    group.add_argument("--sglang-python", default=None,
                       help="the interpreter with sglang installed (default: .venv-sglang/bin/python of "
                            "tools/setup_sglang_cpu.sh if present, else python3)")
    group.add_argument("--sglang-host", default=defaults.host,
                       help="address our servers listen on; beyond loopback it needs --sglang-api-key")
    group.add_argument("--sglang-api-key", default=None,
                       help="SGLang's --api-key, sent by our client (default: $SGLANG_API_KEY)")
    group.add_argument("--sglang-device", choices=SGLANG_DEVICES, default=defaults.device,
                       help="cpu: SGLang's CPU path (torch_native attention; tests on CPU machines)")
    group.add_argument("--sglang-max-total-tokens", type=int, default=None,
                       help="SGLang's --max-total-tokens: the KV cache's size in tokens (default: SGLang's)")
    group.add_argument("--sglang-mem-fraction-static", type=float, default=defaults.mem_fraction_static,
                       help="SGLang's --mem-fraction-static")
    group.add_argument("--sglang-extra-args", default=defaults.extra_args,
                       help="further sglang.launch_server flags, one shell-quoted string (e.g. '--dtype float32')")
    group.add_argument("--sglang-start-timeout", type=float, default=defaults.start_timeout_s,
                       help="seconds a server may take to become healthy")
    group.add_argument("--sglang-request-timeout", type=float, default=defaults.request_timeout_s,
                       help="seconds per request (generate, weight update); no answer by then: a hung server")
    group.add_argument("--sglang-retries", type=int, default=defaults.retries,
                       help="recoveries (restart of our dead/hung servers, weights and unanswered requests sent "
                            "again) per generate or sync, then an error naming the log (rollout/sglang_recovery.py)")
    group.add_argument("--sglang-max-concurrency", type=int, default=defaults.max_concurrency,
                       help="requests in flight at once, over all servers")


def _reward_guard_flags(parser) -> None:
    rewards = parser.add_argument_group("reward faults (rewards/guard.py)")
    rewards.add_argument("--on-bad-reward", choices=ON_BAD_REWARD, default="min",
                         help="a NaN or inf reward of one response: give it the task's minimum reward (min), "
                              "mask it out of the step (mask), or stop the run naming it (error); counted as "
                              f"bad_rewards. Finite rewards beyond ±{REWARD_LIMIT:g} are clamped (clamped_rewards)")


def _data_flags(parser) -> None:
    data = parser.add_argument_group("math prompts (--task math)")
    data.add_argument("--prompt-data", default=None, help="JSONL (or Parquet) of prompts with reference answers")
    data.add_argument("--prompt-key", default="prompt",
                      help="the prompt's field (a string or chat messages); a dotted path reaches into nested "
                           "objects")
    data.add_argument("--answer-key", default="answer",
                      help="the reference answer's field, e.g. reward_model.ground_truth (verl's Parquet)")
    data.add_argument("--chat-template", default="auto", metavar="{auto,none,FILE}",
                      help="how chat-list prompts become tokens: the tokenizer's own template (auto), the "
                           "contents joined (none), or a Jinja file (then text prompts are one user message)")
    data.add_argument("--prompt-template", default="{prompt}", help="text around each prompt, with {prompt}")
    data.add_argument("--max-prompt-tokens", type=int, default=None, help="drop longer prompts")
    data.add_argument("--tokenizer", default=None,
                      help="HF tokenizer folder (default: the one kept with --load, or beside --hf-config)")
    data.add_argument("--overlong-buffer", type=int, default=None,
                      help="DAPO's L_buf: responses within this many tokens of --rollout-max-new-tokens are "
                           "penalised (default min(512, max-new-tokens / 4); 0: off)")


def _reference_flags(parser) -> None:
    group = parser.add_argument_group("reference policy π_ref of the KL term (optim/reference_policy.py)")
    group.add_argument("--ref-policy", choices=REF_POLICY_MODES, default="old",
                       help="old: π_ref = π_old; initial: the starting weights; every-k: refreshed to π_θ every "
                            "--ref-update-interval steps; kl: refreshed when KL(π_old‖π_ref) > --ref-update-kl")
    group.add_argument("--ref-update-interval", type=int, default=None, help="steps between refreshes (every-k)")
    group.add_argument("--ref-update-kl", type=float, default=None, help="the KL that triggers a refresh (kl)")


def _svrpg_flags(parser) -> None:
    defaults = SVRPGConfig()
    group = parser.add_argument_group("svrpg", "variance-reduced policy gradient (docs/algorithms.md)")
    group.add_argument("--svrpg", action="store_true", help="enable the SVRPG optimizer wrapper")
    group.add_argument("--svrpg-inner-steps", type=int, default=defaults.inner_steps,
                       help="optimizer steps between snapshot refreshes (m)")
    group.add_argument("--svrpg-anchor-batch-size", type=int, default=defaults.anchor_batch_size,
                       help="sequences drawn from the snapshot policy for the anchor gradient μ")
    group.add_argument("--svrpg-rho-clip", type=float, nargs=2, metavar=("LOW", "HIGH"),
                       default=None, help="Dual-Clip truncation of ρ = π_θ̃/π_θt to [LOW, HIGH]")
    group.add_argument("--svrpg-rho-cap", type=float, default=None,
                       help="hard cap c on ρ (applied with --svrpg-rho-clip's HIGH: min(HIGH, c))")
    group.add_argument("--svrpg-update-ref", action="store_true",
                       help="set the reference policy to the snapshot at every refresh")


def flag_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class GivenFlags:
    """The flags (argparse dests) the user set: on the command line, and in the --config YAML file."""

    command_line: frozenset[str] = frozenset()
    yaml: frozenset[str] = frozenset()

    def __contains__(self, dest: str) -> bool:
        return dest in self.command_line or dest in self.yaml


def parse_flags(argv=None, parser: argparse.ArgumentParser | None = None):
    """(namespace with every flag's value, GivenFlags: what the user set on the command line or in
    YAML). Usage errors (bad values, unknown YAML keys) exit with status 2 naming the flag."""
    parser = parser or build_parser()
    known, _ = parser.parse_known_args(argv)
    from_yaml = {}
    if known.config is not None:
        from_yaml = yaml_values(parser, known.config)
        parser.set_defaults(**from_yaml)
    args = parser.parse_args(argv)
    # a YAML `flag: false` (or null) leaves a switch off: it sets nothing
    set_in_yaml = frozenset(dest for dest, value in from_yaml.items() if value is not False and value is not None)
    return args, GivenFlags(frozenset(_given_on_command_line(argv)), set_in_yaml)


def _given_on_command_line(argv) -> set[str]:
    """The dests set on the command line: parsed again by a fresh parser with every default suppressed."""
    quiet = build_parser()
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_args(argv))) - {"config"}
