"""Held-out evaluation (training/evaluation.py) on real megatron-core (CPU, gloo).

Properties proved:
- the eval metrics at DP=2 (each rank its chunks of prompts, counts summed) and TP=2 equal
  the single-process metrics exactly (same weights; the chunks carry their own sampling seeds);
- an evaluation is repeatable (the same metrics twice) and leaves the engine's call counter — the
  training sampler's stream — untouched;
- a run that evaluates every step trains exactly as one that never does (same rewards, gradient
  norms, KL at every step): evaluation draws on no training random stream and leaves the weights;
- greedy evaluation (temperature 0) gives K equal responses per prompt: pass@k = accuracy for every k;
- a math evaluation (--eval-data) reads the file like --prompt-data, decodes with the tokenizer and
  counts right answers, pass@k and truncations (no end token at the length cap) as scripted;
- the synthetic task's held-out prompts come from their own generator, not the training stream's;
- the flags: eval runs by default for the synthetic task; --eval-* flags without effect are errors.
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.distributed.harness import run_on_ranks
from tests.megatron import rl_step_fixtures as fx

pytestmark = pytest.mark.distributed

FLAGS = ["--model-preset", "tiny", "--rollout-batch-size", "2", "--rollout-samples-per-prompt", "4",
         "--rollout-max-new-tokens", "3", "--eval-samples", "4"]  # chunks of 2·4/4 = 2 prompts
PROMPTS = [[5, 17], [7], [99, 3, 4], [11], [200, 1], [31]]  # 3 chunks: DP=2 splits them 2 + 1


class EvenTokenTask:
    """Correct: the first response token is even (about half of a random model's responses);
    reward: the fraction of even response tokens. Non-trivial counts, so equality means something."""

    stop_token_ids = ()

    def correct(self, responses, targets):
        return torch.tensor([bool(r) and r[0] % 2 == 0 for r in responses])

    def reward(self, responses, targets):
        return torch.tensor([sum(t % 2 == 0 for t in r) / len(r) for r in responses], dtype=torch.float64)


TINY = ["--config", os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                 "examples", "tiny_cpu.yaml"), "--no-progress", "--train-iters", "3"]


def eval_body(rank, world_size, layouts, with_training=False):
    from megatron.core import parallel_state

    from megatron_rpg.megatron.models import build_gpt_model
    from megatron_rpg.megatron.optimizer_setup import setup_model_and_optimizer
    from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_rpg.rollout.embedded import EmbeddedEngine
    from megatron_rpg.training.config import parse_train_config
    from megatron_rpg.training.evaluation import Evaluator

    torch.set_num_threads(1)
    out = {}
    for name, (tp, pp) in layouts.items():
        initialize_parallel(tp, pp, seed=3)
        gpt = build_gpt_model(fx.hf_config())
        fx.load_full_weights(gpt, fx.full_megatron_weights(gpt.vocab_size))
        model, _ = setup_model_and_optimizer([gpt], lr=0.0)
        engine = EmbeddedEngine(model, vocab_size=fx.hf_config().vocab_size, seed=1)
        for temperature in ("1.0", "0"):
            config = parse_train_config(FLAGS + ["--eval-temperature", temperature])
            evaluator = Evaluator(config, EvenTokenTask(), engine, PROMPTS, [None] * len(PROMPTS),
                                  dp_rank=parallel_state.get_data_parallel_rank(),
                                  dp_size=parallel_state.get_data_parallel_world_size())
            out[f"{name}_T{temperature}"] = evaluator.evaluate()
            out[f"{name}_T{temperature}_again"] = evaluator.evaluate()
        out[f"{name}_calls"] = engine.calls
        destroy_parallel()
    if with_training:  # the same tiny run, evaluating every step and never
        from megatron_rpg.training.loop import train

        evaluated = train(parse_train_config(TINY + ["--eval-interval", "1", "--eval-max-prompts", "4"]))
        out.update(evaluated=evaluated, evaluations=evaluated.evaluations, plain=train(parse_train_config(TINY + ["--no-eval"])))
    return out


def test_evaluating_every_step_changes_nothing_in_training(single):
    out = single
    assert [e["step"] for e in out["evaluations"]] == [0, 1, 2, 3]
    for evaluated, plain in zip(out["evaluated"], out["plain"], strict=True):
        assert "eval/accuracy" in evaluated and "eval/accuracy" not in plain
        for key in ("reward_mean", "grad_norm", "grad_norm_max", "kl_k3", "ratio_max"):
            assert evaluated[key] == plain[key], key


@pytest.fixture(scope="module")
def single():
    return run_on_ranks(eval_body, world_size=1, args=({"single": (1, 1)}, True))[0]


@pytest.fixture(scope="module")
def two_ranks():
    return run_on_ranks(eval_body, world_size=2, args=({"dp2": (1, 1), "tp2": (2, 1)},))


@pytest.mark.parametrize("layout", ["dp2", "tp2"])
@pytest.mark.parametrize("temperature", ["1.0", "0"])
def test_eval_over_two_ranks_equals_the_single_process_eval(single, two_ranks, layout, temperature):
    reference = single[f"single_T{temperature}"]
    assert 0 < reference["eval/accuracy"] < 1  # counts that can disagree
    for rank in (0, 1):
        assert two_ranks[rank][f"{layout}_T{temperature}"] == reference, (layout, rank)


def test_an_evaluation_repeats_and_leaves_the_training_stream_alone(single):
    for temperature in ("1.0", "0"):
        assert single[f"single_T{temperature}_again"] == single[f"single_T{temperature}"]
    assert single["single_calls"] == 0


def test_greedy_evaluation_has_pass_at_k_equal_to_accuracy(single):
    greedy, sampled = single["single_T0"], single["single_T1.0"]
    for k in (2, 4):
        assert greedy[f"eval/pass@{k}"] == pytest.approx(greedy["eval/accuracy"], abs=1e-15)
    assert sampled["eval/pass@4"] > sampled["eval/accuracy"]  # sampling: some prompts partly right


def test_synthetic_held_out_prompts_are_drawn_apart_from_the_training_stream():
    from megatron_rpg.data.synthetic import RepeatTokenTask
    from megatron_rpg.training.config import parse_train_config
    from megatron_rpg.training.evaluation import SYNTHETIC_EVAL_PROMPTS, eval_prompts

    config = parse_train_config(["--model-preset", "tiny", "--seed", "0"])
    task = RepeatTokenTask(16)
    prompts, targets = eval_prompts(config, task)
    assert len(prompts) == SYNTHETIC_EVAL_PROMPTS and [p[0] for p in prompts] == targets
    training = task.sample(SYNTHETIC_EVAL_PROMPTS, torch.Generator().manual_seed(0 * 7919 + 0))  # GroupSampler's
    assert training.prompts != prompts
    assert eval_prompts(config, task) == (prompts, targets)  # the same set at every evaluation and resume


@pytest.mark.parametrize("argv, message", [
    (["--no-eval", "--eval-samples", "4"], "--eval-samples has no effect with --no-eval"),
    (["--eval-data", "x.jsonl"], "--eval-data is a math prompt file"),
    (["--task", "math", "--prompt-data", "p.jsonl", "--eval-interval", "5"], "--eval-interval has no effect with --task math without --eval-data"),
    (["--eval-interval", "0"], "--eval-interval=0 must be a positive integer"),
    (["--eval-temperature", "inf"], "--eval-temperature=inf must be 0"),
    (["--log-samples", "2"], "--log-samples has no effect without a metrics log"),
    (["--wandb-exp-name", "x"], "--wandb-exp-name needs --wandb-project"),
    (["--log-jsonl", "/"], "--log-jsonl / is a folder; name a file"),
])
def test_flags_without_effect_are_errors(argv, message, capsys):
    from megatron_rpg.training.config import parse_train_config

    with pytest.raises(SystemExit):
        parse_train_config(["--model-preset", "tiny"] + argv)
    assert message in capsys.readouterr().err


def test_the_synthetic_task_evaluates_by_default_and_math_only_with_eval_data():
    from megatron_rpg.training.config import parse_train_config
    from megatron_rpg.training.evaluation import evaluates

    assert evaluates(parse_train_config(["--model-preset", "tiny"]))
    assert not evaluates(parse_train_config(["--model-preset", "tiny", "--no-eval"]))
    assert not evaluates(parse_train_config(["--model-preset", "tiny", "--task", "math", "--prompt-data", "p.jsonl"]))
    assert evaluates(parse_train_config(["--model-preset", "tiny", "--task", "math", "--prompt-data", "p.jsonl",
                                         "--eval-data", "e.jsonl"]))


class ScriptedEngine:
    """Answers the k-th copy of each prompt with script[k] (token ids), the Rollout layout of the
    embedded engine; records the SamplingParams it was called with."""

    def __init__(self, script):
        self.script, self.calls, self.sampling = script, 0, []

    def generate(self, prompts, sampling):
        from megatron_rpg.rollout.engine import Rollout

        self.sampling.append(sampling)
        k = len(self.script)
        responses = [self.script[i % k](prompt) for i, prompt in enumerate(prompts)]
        rows = [list(p) + r for p, r in zip(prompts, responses)]
        width = max(len(row) for row in rows)
        tokens = torch.tensor([row + [0] * (width - len(row)) for row in rows])
        lengths = torch.tensor([len(p) for p in prompts])
        response_lengths = torch.tensor([len(r) for r in responses])
        positions = torch.arange(width)
        mask = ((positions >= lengths[:, None]) & (positions < (lengths + response_lengths)[:, None])).float()
        return Rollout(tokens=tokens, loss_mask=mask, engine_logp=torch.zeros(tokens.shape), prompt_lengths=lengths,
                       response_lengths=response_lengths)

    def end_of_rollouts(self):
        pass


def test_math_evaluation_counts_answers_pass_at_k_and_truncations(tmp_path):
    import json

    from megatron_rpg.training.config import parse_train_config
    from megatron_rpg.training.evaluation import Evaluator, eval_prompts
    from megatron_rpg.training.tasks import build_task
    from tests.data.conftest import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(str(tmp_path / "tok"))
    questions = [("What is 2 + 2?", "4"), ("What is 7 - 5?", "2"), ("What is 3 times 3?", "9"), ("Unused", "0")]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"question": q, "solution": a}) + "\n" for q, a in questions))
    config = parse_train_config(["--model-preset", "tiny", "--task", "math", "--prompt-data", str(data),
                                 "--prompt-key", "question", "--answer-key", "solution", "--tokenizer",
                                 str(tmp_path / "tok"), "--eval-data", str(data), "--eval-max-prompts", "3",
                                 "--eval-samples", "2", "--eval-temperature", "0", "--rollout-max-new-tokens", "12",
                                 "--rollout-batch-size", "2", "--rollout-samples-per-prompt", "2"])
    task = build_task(config, len(tokenizer) + 16, dp_rank=0, dp_size=1)
    prompts, targets = eval_prompts(config, task)
    assert targets == ["4", "2", "9"] and tokenizer.decode(prompts[1]) == "What is 7 - 5?"
    answer = {tuple(p): a for p, a in zip(prompts, targets)}
    eos, cap = tokenizer.eos_token_id, 12

    def right(prompt):  # the first answer is right for the first two prompts and ends with <eos>
        text = "\\boxed{" + (answer[tuple(prompt)] if prompt != prompts[2] else "5") + "}"
        return tokenizer.encode(text) + [eos]

    def truncated(prompt):  # cut at the cap without an end token
        return (tokenizer.encode(" no idea") * cap)[:cap]

    engine = ScriptedEngine([right, truncated])
    metrics = Evaluator(config, task, engine, prompts, targets, dp_rank=0, dp_size=1).evaluate()
    assert metrics["eval/accuracy"] == (0.5 + 0.5 + 0) / 3
    assert metrics["eval/pass@2"] == 2 / 3
    assert metrics["eval/truncation_rate"] == 0.5
    assert metrics["eval/prompts"] == 3 and engine.calls == 0
    assert engine.sampling[0].temperature == 0 and eos in engine.sampling[0].stop_token_ids
    seeds = [sampling.seed for sampling in engine.sampling]  # chunks of 2·2/2 = 2 prompts, a seed each
    assert len(seeds) == 2 and seeds[1] == seeds[0] + 1
