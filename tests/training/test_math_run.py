"""--task math end to end: a JSONL prompt set, an HF tokenizer found beside --hf-config, DAPO's
reward, and an exact resume that includes the prompt sampler's position (real megatron-core, CPU).

Properties proved:
- the run draws its prompts from the file, tokenized with the tokenizer, and every reward is a DAPO
  reward of its response (−1/+1 plus the overlong penalty, within [−2, 1]);
- saved after step 2 and resumed in a new process from the checkpoint alone (model, tokenizer files
  kept in its hf/ folder), the run continues bit-exactly (same rewards and grad norms: the sampler's
  epoch and position are part of the checkpoint);
- a tokenizer larger than the model's vocabulary is refused with both sizes named;
- with dynamic sampling and a policy that never answers right (every group all −1), the step draws
  --rollout-max-sampling-passes passes, then trains on the uninformative groups rather than stop.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.data.conftest import build_tiny_tokenizer
from tests.distributed.harness import run_on_ranks
from tests.float_bounds import EPS64, ratio_to_bound_per_row
from tests.training.float64_runs import float64_trainer, recorded_logprobs

pytestmark = pytest.mark.distributed
QUESTIONS = [("What is 1/2 + 1/4?", "3/4"), ("Compute 12 times 13.", "156"), ("What is 2 + 2?", "4"),
             ("What is 7 - 5?", "2"), ("What is 3 times 3?", "9")]


def _model_folder(root: str, vocab_size: int | None = None) -> str:
    folder = os.path.join(root, f"model_{vocab_size}")
    tokenizer = build_tiny_tokenizer(folder)
    config = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=vocab_size or len(tokenizer) + 16,  # models pad their vocabulary too
                  hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0,
                  tie_word_embeddings=True, hidden_act="silu")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:  # its end ids, kept with checkpoints
        json.dump({"eos_token_id": [tokenizer.eos_token_id, tokenizer.pad_token_id]}, f)
    return folder


def _args(root: str, folder: str | None, *extra):
    """folder None: the model and tokenizer come with --load (in extra)."""
    from megatron_rpg.training.config import parse_train_config
    flags = (["--hf-config", folder] if folder else []) + ["--task", "math", "--prompt-data", os.path.join(root, "math.jsonl"),
             "--prompt-template", "{prompt} Put the answer in \\boxed{}.",
             "--rollout-batch-size", 2, "--rollout-samples-per-prompt", 4, "--rollout-max-new-tokens", 8,
             "--micro-batch-size", 4, "--num-mini-batches", 2, "--lr", 1e-3, "--no-progress", "--seed", 3, *extra]
    return parse_train_config([str(flag) for flag in flags])


def first_half_body(rank, world_size, root):
    from megatron_rpg.training.loop import train
    folder = _model_folder(root)
    with open(os.path.join(root, "math.jsonl"), "w") as f:
        for question, answer in QUESTIONS:
            f.write(json.dumps({"prompt": question, "answer": answer}) + "\n")
    four_steps = _args(root, folder, "--train-iters", 4)
    with recorded_logprobs(four_steps) as logprobs:  # with each step's log-probs recomputed in float64
        full = train(four_steps)
    with float64_trainer(), recorded_logprobs() as logprobs64:
        full64 = train(four_steps)
    train(_args(root, folder, "--train-iters", 2, "--save", os.path.join(root, "half")))
    dynamic = train(_args(root, folder, "--train-iters", 1, "--rollout-dynamic-sampling"))
    too_big = _model_folder(root, vocab_size=64)
    try:
        train(_args(root, too_big, "--train-iters", 1))
        refused = None
    except ValueError as error:
        refused = str(error)
    return {"full": full, "folder": folder, "refused": refused, "dynamic": dynamic, "logprobs": logprobs,
            "full64": full64, "logprobs64": logprobs64}


def resume_body(rank, world_size, root, folder):
    from megatron_rpg.training.loop import train
    return train(_args(root, None, "--train-iters", 4, "--load", os.path.join(root, "half")))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("math_run"))
    first = run_on_ranks(first_half_body, world_size=1, args=(root,))[0]
    resumed = run_on_ranks(resume_body, world_size=1, args=(root, first["folder"]))[0]
    return first, resumed


def test_math_run_rewards_are_dapo_rewards_of_the_responses(runs):
    first, _ = runs
    assert len(first["full"]) == 4
    for step in first["full"]:
        assert -2.0 <= step["reward_mean"] <= 1.0
        assert 1 <= step["response_length_mean"] <= 8


def test_engine_log_probs_equal_the_trainers_at_every_step(runs):
    first, _ = runs
    assert len(first["logprobs"]) == len(first["full"]) == 4
    for step, metrics in zip(first["logprobs"], first["full"]):
        mask = step["loss_mask"]
        engine, trainer, trainer64 = (step[key] * mask for key in ("engine_logp", "old_logp", "logp64"))
        assert metrics["engine_logp_max_abs_diff"] == float((trainer - engine).abs().max())
        assert ratio_to_bound_per_row(engine, trainer, trainer64) <= 1.0
    # in float64 the two agree to float64 rounding (FLOAT64_ROUNDINGS as in test_loop.py)
    for step, metrics in zip(first["logprobs64"], first["full64"]):
        assert step["old_logp"].dtype == torch.float64
        scale = float((step["old_logp"] * step["loss_mask"]).abs().max())
        assert metrics["engine_logp_max_abs_diff"] <= 2 ** 10 * EPS64 * scale


def test_math_run_resumes_bit_exactly_including_the_prompt_sampler(runs):
    first, resumed = runs
    assert [step["step"] for step in resumed] == [3, 4]
    for ours, reference in zip(resumed, first["full"][2:]):
        assert ours["reward_mean"] == reference["reward_mean"]
        assert ours["grad_norm"] == reference["grad_norm"]


def test_the_checkpoint_keeps_the_models_generation_config(runs):
    first, _ = runs
    half = os.path.join(os.path.dirname(first["folder"]), "half", "iter_0000002")  # --save's latest
    with open(os.path.join(first["folder"], "generation_config.json")) as f, \
            open(os.path.join(half, "hf", "generation_config.json")) as g:
        assert json.load(g) == json.load(f)


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(runs):
    first, _ = runs
    assert first["refused"] is not None and "tokens but the model's vocabulary is 64" in first["refused"]


def test_dynamic_sampling_without_any_informative_group_fills_the_batch_after_its_passes(runs):
    first, _ = runs
    (step,) = first["dynamic"]
    assert step["informative_group_fraction"] == 0.0
    assert step["dynamic_sampling/drawn_groups"] == 3 * 2  # 3 passes (the default) x 2 prompts
    assert step["dynamic_sampling/passes_mean"] == 3
