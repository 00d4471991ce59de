"""The trainer end to end on real megatron-core (CPU, gloo): examples/tiny_cpu.yaml's run.

Properties proved:
- the tiny run improves its reward (repeat-token task: a random policy scores ≈ 1/16);
- the engine's log-probs equal the trainer's old log-probs at every step of the learning run and of a
  run from a checkpoint: within tests/float_bounds.py's per-sequence bound, 4× the trainer's float32
  rounding measured by recomputing its log-probs in float64 from the step's weights; in float64
  (tests/training/float64_runs.py) they agree to float64 rounding;
- a TP=2 run from the same checkpoint is the single-process run: same samples and rewards; KL and
  gradient norm within float_bounds' bound, 4× the single-process run's float32 rounding measured
  against the same run in float64; in float64 the TP=2 run is the TP=1 run to float64 rounding;
- --rollout-dynamic-sampling (DAPO) redraws until every group it trains on has unequal rewards;
- --loss grpo / grpo_is_kl / dapo / ppo_clip / reinforce_pp train through the same loop (finite, non-zero steps);
- --svrpg trains through the SVRPG wrapper (anchor every m steps, ρ statistics reported);
- --save writes a checkpoint that --load reads back bit-exactly (at TP=1 and resharded at TP=2) and
  that tools' megatron -> HF export turns into a transformers model with the same logits;
- a run saved after step 2 and resumed in NEW processes continues bit-exactly (same rewards, grad
  norms and final weights as the uninterrupted run): plain Adam, SVRPG mid inner loop, and DP=2 with
  the distributed optimizer; resumed at another world size it continues from the saved step;
- a batch that does not split over the layout exits 2 naming the flags, before any model is built.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.distributed.harness import run_on_ranks
from tests.float_bounds import EPS32, EPS64, assert_float32_equal, float32_bound, ratio_to_bound_per_row
from tests.training.float64_runs import float64_trainer, recorded_logprobs, unclipped

pytestmark = pytest.mark.distributed
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_YAML = os.path.join(REPO, "examples", "tiny_cpu.yaml")
QUICK = ["--config", TINY_YAML, "--no-progress", "--seed", "0", "--no-eval"]  # evaluation: test_evaluation.py
SVRPG = ["--svrpg", "--svrpg-inner-steps", 3, "--svrpg-anchor-batch-size", 64, "--num-mini-batches", 1,
         "--rpg-aggregation", "seq-mean-token-sum"]  # SVRPG is biased under token-mean (refused)
RESUMED = {"adam": [], "svrpg": SVRPG}  # single-process runs resumed in new processes
DP2 = ["--use-distributed-optimizer"]


def _args(*extra):
    from megatron_rpg.training.config import parse_train_config
    return parse_train_config(QUICK + [str(x) for x in extra])


def _weights(model) -> dict:
    """This rank's parameters by name (bare GPTModel names, CPU copies)."""
    from megatron_rpg.megatron.optimizer_setup import bare_model
    return {name: p.detach().clone() for name, p in bare_model(model[0]).named_parameters()}


def single_process_body(rank, world_size, workdir):
    from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_rpg.training.build import build_model_and_optimizer
    from megatron_rpg.training.checkpointing import save_checkpoint
    from megatron_rpg.training.loop import train

    torch.set_num_threads(1)
    learning = _args("--train-iters", 40)
    with recorded_logprobs(learning) as steps:  # with each step's log-probs recomputed in float64
        out = {"learning": train(learning), "learning_logprobs": steps}
    out["svrpg"] = train(_args("--train-iters", 3, "--svrpg", "--svrpg-inner-steps", 2,
                               "--svrpg-anchor-batch-size", 64, "--num-mini-batches", 1,
                               "--rpg-aggregation", "seq-mean-token-sum"))
    out["baselines"] = {name: train(_args("--train-iters", 3, "--loss", name))
                        for name in ("grpo", "grpo_is_kl", "dapo", "ppo_clip", "reinforce_pp")}
    # groups of 2 one-token responses: mostly both wrong (equal rewards), so DAPO has to redraw
    out["dynamic"] = train(_args("--train-iters", 2, "--rollout-samples-per-prompt", 2, "--rollout-max-new-tokens", 1,
                                 "--micro-batch-size", 4, "--rollout-dynamic-sampling",
                                 "--rollout-max-sampling-passes", 60))
    out["no_dynamic"] = train(_args("--train-iters", 2, "--rollout-samples-per-prompt", 2,
                                    "--rollout-max-new-tokens", 1, "--micro-batch-size", 4))
    saved = os.path.join(workdir, "trained")
    out["saved_run"] = train(_args("--train-iters", 2, "--save", saved))
    for name, extra in RESUMED.items():  # the uninterrupted runs and the first halves
        out[f"{name}_full"] = train(_args("--train-iters", 4, "--save", os.path.join(workdir, f"{name}_full"), *extra))
        train(_args("--train-iters", 2, "--save", os.path.join(workdir, f"{name}_half"), *extra))
    # save/load round trip on weights that differ from any initialisation
    initialize_parallel(1, 1, seed=5)
    args = _args("--save", os.path.join(workdir, "roundtrip"))
    model, optimizer, hf_config = build_model_and_optimizer(args)
    with torch.no_grad():
        for p in model[0].parameters():
            p.add_(torch.randn_like(p))
    out["weights"] = _weights(model)
    save_checkpoint(model, optimizer, None, hf_config, args, step=0, rank_state={})
    loaded, _, _ = build_model_and_optimizer(_args("--load", os.path.join(workdir, "roundtrip"), "--finetune"))
    out["loaded"] = _weights(loaded)
    destroy_parallel()
    # the reference for the TP=2 run: the same initial weights (random init depends on the layout)
    three_steps = _args("--train-iters", 3, "--load", saved, "--finetune")
    with recorded_logprobs(three_steps) as steps:
        out["three_steps"], out["three_steps_logprobs"] = train(three_steps), steps
    with float64_trainer(), recorded_logprobs() as steps:  # the float64 reference of the same run
        out["three_steps_float64"], out["three_steps_float64_logprobs"] = train(three_steps), steps
    out["three_steps_unclipped"] = unclipped(out["three_steps"], three_steps)
    return out


def two_rank_body(rank, world_size, workdir):
    from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_rpg.training.build import build_model_and_optimizer
    from megatron_rpg.training.loop import train
    from tests.megatron import rl_step_fixtures as fx

    torch.set_num_threads(1)
    tp2 = _args("--train-iters", 3, "--tensor-model-parallel-size", 2, "--load", os.path.join(workdir, "trained"),
                "--finetune")
    out = {"tp2": train(tp2)}
    with float64_trainer():
        out["tp2_float64"] = train(tp2)
    out["dp2_full"] = train(_args("--train-iters", 4, "--save", os.path.join(workdir, "dp2_full"), *DP2))
    train(_args("--train-iters", 2, "--save", os.path.join(workdir, "dp2_half"), *DP2))
    train(_args("--train-iters", 2, "--save", os.path.join(workdir, "dp2_plain_half")))
    initialize_parallel(2, 1, seed=5)
    model, _, _ = build_model_and_optimizer(_args("--load", os.path.join(workdir, "roundtrip"),
                                                  "--tensor-model-parallel-size", 2, "--finetune"))
    out["loaded_tp2"] = {name: tensor for name, tensor in fx.gather_full_weights(model[0].module).items()}
    destroy_parallel()
    return out


def resume_body(rank, world_size, workdir, names):
    """Resume each `name`_half checkpoint to step 4 (saving to `name`_resumed), then load both final
    checkpoints' weights (--finetune) for comparison."""
    from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_rpg.training.build import build_model_and_optimizer
    from megatron_rpg.training.loop import train

    torch.set_num_threads(1)
    out = {}
    for name in names:
        extra = SVRPG if name == "svrpg" else DP2 if name == "dp2" else []
        half, resumed = os.path.join(workdir, f"{name}_half"), os.path.join(workdir, f"{name}_resumed")
        out[name] = train(_args("--train-iters", 4, "--load", half, "--save", resumed, *extra))
        weights = {}
        for which in ("full", "resumed"):
            initialize_parallel(1, 1, seed=9)
            model, _, _ = build_model_and_optimizer(_args("--load", os.path.join(workdir, f"{name}_{which}"),
                                                          "--finetune"))
            weights[which] = _weights(model)
            destroy_parallel()
        out[f"{name}_weights"] = weights
    if world_size == 2:  # a single-process checkpoint resumed at DP=2: continues from its step
        out["other_world"] = train(_args("--train-iters", 4, "--load", os.path.join(workdir, "adam_half")))
        # same world size, other layout (saved DP=2, resumed TP=2): the TP ranks must sample alike
        out["other_layout"] = train(_args("--train-iters", 3, "--tensor-model-parallel-size", 2,
                                          "--load", os.path.join(workdir, "dp2_plain_half")))
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("trainer"))


@pytest.fixture(scope="module")
def single(workdir):
    return run_on_ranks(single_process_body, world_size=1, args=(workdir,))[0]


@pytest.fixture(scope="module")
def two_ranks(single, workdir):  # needs the checkpoint the single-process body wrote
    return run_on_ranks(two_rank_body, world_size=2, args=(workdir,))


@pytest.fixture(scope="module")
def resumed_single(single, workdir):
    return run_on_ranks(resume_body, world_size=1, args=(workdir, list(RESUMED)))[0]


@pytest.fixture(scope="module")
def resumed_dp2(two_ranks, workdir):
    return run_on_ranks(resume_body, world_size=2, args=(workdir, ["dp2"]))


def _assert_resumed_exactly(full, resumed, weights):
    assert [step["step"] for step in resumed] == [3, 4]
    for ours, reference in zip(resumed, full[2:]):
        assert ours["reward_mean"] == reference["reward_mean"]
        assert ours["grad_norm"] == reference["grad_norm"]
    assert weights["full"].keys() == weights["resumed"].keys()
    for name, tensor in weights["full"].items():
        assert torch.equal(weights["resumed"][name], tensor), name


@pytest.mark.parametrize("name", list(RESUMED))
def test_resumed_single_process_run_continues_bit_exactly(single, resumed_single, name):
    _assert_resumed_exactly(single[f"{name}_full"], resumed_single[name], resumed_single[f"{name}_weights"])


def test_resumed_dp2_distributed_optimizer_run_continues_bit_exactly(two_ranks, resumed_dp2):
    for rank in (0, 1):
        _assert_resumed_exactly(two_ranks[rank]["dp2_full"], resumed_dp2[rank]["dp2"],
                                resumed_dp2[rank]["dp2_weights"])


def test_resume_at_another_world_size_continues_from_the_saved_step(resumed_dp2):
    steps = resumed_dp2[0]["other_world"]
    assert [step["step"] for step in steps] == [3, 4]
    assert all(0 <= step["reward_mean"] <= 1 for step in steps)


def _mean(values):
    return sum(values) / len(values)


def test_tiny_run_improves_its_reward(single):
    rewards = [step["reward_mean"] for step in single["learning"]]
    assert len(rewards) == 40
    assert _mean(rewards[:10]) < 0.15  # near the random policy's 1/16
    assert _mean(rewards[-10:]) > _mean(rewards[:10]) + 0.08


# A claim of exact equality checked in float64: both sides agree to 2**10 float64 roundings of the
# compared values' size (measured: ≤ ~10), ~1e8 below float32 rounding and ~1e10 below a defect.
FLOAT64_ROUNDINGS = 2 ** 10


@pytest.mark.parametrize("run", ["learning", "three_steps"])
def test_engine_log_probs_equal_the_trainers_at_every_step(single, run):
    steps, history = single[f"{run}_logprobs"], single[run]
    assert len(steps) == len(history)
    for step, metrics in zip(steps, history):
        mask = step["loss_mask"]
        engine, trainer, trainer64 = (step[key] * mask for key in ("engine_logp", "old_logp", "logp64"))
        # the metric is the largest gap of these very tensors
        assert metrics["engine_logp_max_abs_diff"] == float((trainer - engine).abs().max())
        assert ratio_to_bound_per_row(engine, trainer, trainer64) <= 1.0


def test_engine_log_probs_equal_the_trainers_in_float64(single):
    for step, metrics in zip(single["three_steps_float64_logprobs"], single["three_steps_float64"]):
        mask = step["loss_mask"]
        assert step["old_logp"].dtype == step["engine_logp"].dtype == torch.float64
        scale = float((step["old_logp"] * mask).abs().max())
        assert metrics["engine_logp_max_abs_diff"] <= FLOAT64_ROUNDINGS * EPS64 * scale


def test_steps_report_loss_metrics_and_grad_norm(single):
    step = single["learning"][0]
    for name in ("kl_k3", "ratio_mean", "grad_norm", "num_tokens", "response_length_mean"):
        assert name in step, name
    assert step["num_tokens"] == 8 * 8 * 8  # the whole step: 8 prompts x 8 samples x 8 tokens


def _tp2_float32_bounds(reference, reference64, logprobs) -> dict:
    """float_bounds' bound on each compared float32 metric of one step. grad_norm: the scale is the
    norm. kl_k3 is a token mean of k3(δ) = e^δ − 1 − δ, δ = ℓ − ℓ_ref, whose float32 rounding is
    ~EPS32·|ℓ|·|δ| per token (δ rounds like ℓ, k3'(δ) ≈ δ): the floor's scale is max|ℓ|·√(2·KL), with
    √(2·KL) the typical |δ| (KL ≈ mean δ²/2)."""
    max_logp = float((logprobs["old_logp"] * logprobs["loss_mask"]).abs().max())
    kl_scale = max_logp * (2 * abs(reference64["kl_k3"])) ** 0.5
    return {"kl_k3": float32_bound(reference["kl_k3"], reference64["kl_k3"], kl_scale),
            "grad_norm": float32_bound(reference["grad_norm"], reference64["grad_norm"])}


def test_tp2_run_is_the_single_process_run(single, two_ranks):
    # the float64 run (clip-grad 0) is the same computation: no float32 step was clipped, same samples
    assert single["three_steps_unclipped"]
    for ours, ours64 in zip(single["three_steps_logprobs"], single["three_steps_float64_logprobs"]):
        assert torch.equal(ours["tokens"], ours64["tokens"])
    bounds = [_tp2_float32_bounds(*step) for step in zip(single["three_steps"], single["three_steps_float64"],
                                                          single["three_steps_logprobs"])]
    for rank in (0, 1):
        for ours, reference, step_bounds in zip(two_ranks[rank]["tp2"], single["three_steps"], bounds):
            assert ours["reward_mean"] == reference["reward_mean"]
            for name, bound in step_bounds.items():
                assert_float32_equal(ours[name], reference[name], bound, name)


def test_tp2_float64_run_is_the_single_process_float64_run(single, two_ranks):
    for rank in (0, 1):
        for ours, reference in zip(two_ranks[rank]["tp2_float64"], single["three_steps_float64"]):
            assert ours["reward_mean"] == reference["reward_mean"]
            assert abs(ours["kl_k3"] - reference["kl_k3"]) <= FLOAT64_ROUNDINGS * EPS64 * abs(reference["kl_k3"])
            # megatron computes the norm in float32 even of float64 grads (get_grad_norm_fp32): a few
            # float32 roundings of the norm, no more
            assert abs(ours["grad_norm"] - reference["grad_norm"]) <= 4 * EPS32 * reference["grad_norm"]


def test_svrpg_run_anchors_every_m_steps_and_reports_rho(single):
    steps = single["svrpg"]
    assert ["svrpg/anchor_sequences" in step for step in steps] == [True, False, True]
    assert steps[0]["svrpg/anchor_sequences"] == 64
    assert all(0 < step["svrpg/rho_mean"] < 10 and step["svrpg/direction_norm"] > 0 for step in steps)


def test_save_then_load_is_bit_exact(single):
    assert single["weights"].keys() == single["loaded"].keys()
    for name, tensor in single["weights"].items():
        assert torch.equal(single["loaded"][name], tensor), name


def test_checkpoint_saved_at_tp1_loads_at_tp2_bit_exactly(single, two_ranks):
    for rank in (0, 1):
        loaded = two_ranks[rank]["loaded_tp2"]
        for name, tensor in single["weights"].items():
            if "word_embeddings" in name or "output_layer" in name:
                # vocab padding differs (128 rows at TP=1, 256 at TP=2): the real ids must match
                from megatron_rpg.training.build import TINY_PRESET
                vocab = TINY_PRESET["vocab_size"]
                loaded_rows, tensor = loaded[name][:vocab], tensor[:vocab]
                assert torch.equal(loaded_rows, tensor), name
            else:
                assert torch.equal(loaded[name], tensor), name


def test_saved_run_exports_to_a_transformers_model_with_the_same_logits(single, workdir):
    from megatron_rpg.checkpoint.convert import megatron_to_hf_checkpoint
    from megatron_rpg.checkpoint.verify import verify_conversion

    assert [step["step"] for step in single["saved_run"]] == [1, 2]
    exported = os.path.join(workdir, "trained_hf")
    megatron_to_hf_checkpoint(os.path.join(workdir, "trained"), exported, progress=False)
    report = verify_conversion(exported, os.path.join(workdir, "trained"))
    assert report["ok"] and report["max_abs_logit_diff"] <= 1e-5


def test_a_batch_that_does_not_split_exits_2_naming_the_flags():
    result = subprocess.run([sys.executable, "-m", "megatron_rpg.train", "--model-preset", "tiny",
                             "--rollout-batch-size", "3", "--no-progress"],
                            capture_output=True, text=True, cwd=REPO, timeout=300,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--micro-batch-size 16 x --num-mini-batches 2" in result.stderr
    assert "RPG training" not in result.stderr  # no step ran


def test_dynamic_sampling_trains_only_on_groups_with_unequal_rewards(single):
    for step in single["dynamic"]:
        assert step["informative_group_fraction"] == 1.0
        assert step["dynamic_sampling/drawn_groups"] > 8  # it had to redraw
    # the control: without it the same set-up trains on groups of equal rewards (measured 0.625, 0.125)
    assert min(step["informative_group_fraction"] for step in single["no_dynamic"]) < 1.0
    assert all("dynamic_sampling/drawn_groups" not in step for step in single["no_dynamic"])


@pytest.mark.parametrize("name", ["grpo", "grpo_is_kl", "dapo", "ppo_clip", "reinforce_pp"])
def test_baseline_losses_train_through_the_same_loop(single, name):
    steps = single["baselines"][name]
    assert [step["step"] for step in steps] == [1, 2, 3]
    assert all(0 < step["grad_norm"] < float("inf") for step in steps)


def test_resume_in_another_layout_of_the_same_world_size_gives_tp_ranks_the_same_prompts(resumed_dp2):
    ours, other = resumed_dp2[0]["other_layout"], resumed_dp2[1]["other_layout"]
    assert [step["step"] for step in ours] == [3]
    assert [step["reward_mean"] for step in ours] == [step["reward_mean"] for step in other]
    assert [step["grad_norm"] for step in ours] == [step["grad_norm"] for step in other]


def test_save_refuses_a_folder_that_is_not_a_checkpoint_of_ours(tmp_path):
    from megatron_rpg.training.checkpointing import check_save_dir

    runs = tmp_path / "runs"
    (runs / "other_run").mkdir(parents=True)
    (runs / "other_run" / "weights.bin").write_text("precious")
    with pytest.raises(ValueError, match="not a megatron_rpg checkpoint"):
        check_save_dir(str(runs))
    check_save_dir(str(tmp_path / "new"))  # a new folder is fine, and so is an empty one
    (tmp_path / "empty").mkdir()
    check_save_dir(str(tmp_path / "empty"))
    assert (runs / "other_run" / "weights.bin").read_text() == "precious"
