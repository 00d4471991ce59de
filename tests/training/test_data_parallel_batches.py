"""How DP ranks share a step's batch (real megatron-core, 2 gloo ranks, DP=2).

Properties proved:
- a prompt set is partitioned over the DP ranks: within a step the ranks draw different prompts, and
  over one epoch (2 steps of 1 prompt per rank, 4 prompts) every prompt is drawn exactly once;
- batch_norm advantages are normalised over the global batch: they equal the float64 single-process
  normalisation of both ranks' rewards concatenated;
- under dynamic sampling the uninformative filler groups get advantage 0, and the statistics are
  those of the informative groups of both ranks.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.distributed.harness import run_on_ranks
from tests.training.test_math_run import QUESTIONS, _model_folder

pytestmark = pytest.mark.distributed
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--config", os.path.join(REPO, "examples", "tiny_cpu.yaml"), "--no-progress", "--seed", "0"]
SAMPLES = 8


def _math_args(root, folder, *extra):
    from megatron_rpg.training.config import parse_train_config
    flags = ["--hf-config", folder, "--task", "math", "--prompt-data", os.path.join(root, "math.jsonl"),
             "--rollout-batch-size", 2, "--rollout-samples-per-prompt", 2, "--rollout-max-new-tokens", 2,
             "--micro-batch-size", 2, "--num-mini-batches", 1, "--no-progress", "--seed", 3, *extra]
    return parse_train_config([str(flag) for flag in flags])


def _rank_rewards(rank: int, num_groups: int, informative: bool) -> torch.Tensor:
    """Rewards [num_groups x SAMPLES] that differ between the ranks (their means and spreads)."""
    if not informative:
        return torch.full((num_groups * SAMPLES,), 1.0 + rank, dtype=torch.float64)
    within = torch.arange(SAMPLES, dtype=torch.float64) * (0.1 + 0.3 * rank)
    return torch.cat([within + 2.0 * rank + 0.25 * group for group in range(num_groups)])


def body(rank, world_size, root):
    from megatron_rpg.data.math_task import MathTask
    from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_rpg.rollout.embedded import EmbeddedEngine
    from megatron_rpg.training.build import build_model_and_optimizer
    from megatron_rpg.training.config import parse_train_config
    from megatron_rpg.training.loop import train
    from megatron_rpg.training.rollouts import GroupSampler, to_micro_batches
    from megatron_rpg.training.tasks import build_task

    torch.set_num_threads(1)
    out = {}
    # the prompt partition: which answers this rank drew, step by step
    if rank == 0:
        folder = _model_folder(root)
        with open(os.path.join(root, "math.jsonl"), "w") as f:
            for question, answer in QUESTIONS[:4]:
                f.write(json.dumps({"prompt": question, "answer": answer}) + "\n")
    torch.distributed.barrier()
    drawn, sample = [], MathTask.sample

    def recorded(self, num_prompts, generator):
        batch = sample(self, num_prompts, generator)
        drawn.append(list(batch.targets))
        return batch

    MathTask.sample = recorded
    train(_math_args(root, os.path.join(root, "model_None"), "--train-iters", 4))
    out["drawn"] = drawn
    # batch_norm advantages with rewards set by the test: plain, then dynamic sampling with fillers
    for name, extra in (("plain", []), ("dynamic", ["--rollout-dynamic-sampling"])):
        config = parse_train_config(TINY + ["--advantage-estimator", "batch_norm", *extra])
        initialize_parallel(1, 1, seed=0)
        model, _, hf_config = build_model_and_optimizer(config)
        task = build_task(config, int(hf_config.vocab_size), dp_rank=rank, dp_size=2)
        sampler = GroupSampler(config, task, EmbeddedEngine(model, vocab_size=int(hf_config.vocab_size)))
        passes = []

        def reward(responses, targets):
            groups = len(responses) // SAMPLES
            passes.append(groups)
            # dynamic: the first pass has 2 informative and 2 all-equal groups, later passes none
            informative = name == "plain" or len(passes) == 1
            rewards = _rank_rewards(rank, groups, informative)
            if name == "dynamic" and len(passes) == 1:
                rewards[2 * SAMPLES:] = 1.0 + rank
            return rewards

        task.reward = reward
        groups, _, _ = sampler.draw(4)
        micro_batches = to_micro_batches(config, groups)
        out[name] = torch.cat([mb["advantages"] for mb in micro_batches]).double()
        destroy_parallel()
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_on_ranks(body, world_size=2, args=(str(tmp_path_factory.mktemp("dp_batches")),), timeout_s=900)


def test_dp_ranks_partition_the_prompt_set_within_each_epoch(ranks):
    ours, theirs = ranks[0]["drawn"], ranks[1]["drawn"]
    assert len(ours) == len(theirs) == 4
    for step in range(4):
        assert set(ours[step]).isdisjoint(theirs[step]), step
    answers = sorted(answer for _, answer in QUESTIONS[:4])
    for epoch in (0, 1):
        seen = [a for step in (2 * epoch, 2 * epoch + 1) for a in ours[step] + theirs[step]]
        assert sorted(seen) == answers, epoch


def _expected(rewards_by_rank, keep_by_rank, eps=1e-6):
    from megatron_rpg.losses.advantages import batch_normalized_advantages
    rewards, keep = torch.cat(rewards_by_rank), torch.cat(keep_by_rank)
    return batch_normalized_advantages(rewards, keep, eps=eps).split([len(r) for r in rewards_by_rank])


def test_batch_norm_advantages_are_normalised_over_the_global_batch(ranks):
    rewards = [_rank_rewards(rank, 4, True) for rank in (0, 1)]
    expected = _expected(rewards, [torch.ones_like(r, dtype=torch.bool) for r in rewards])
    for rank in (0, 1):
        # float32 advantages of magnitude < 2: the cast's rounding, 2 ulp
        assert torch.allclose(ranks[rank]["plain"], expected[rank], rtol=0, atol=2 * 2.0 ** -23)


def test_dynamic_sampling_fillers_get_zero_advantage_and_no_weight_in_the_statistics(ranks):
    rewards, keep = [], []
    for rank in (0, 1):
        kept = _rank_rewards(rank, 2, True)
        rewards.append(torch.cat([kept, torch.full((2 * SAMPLES,), 1.0 + rank, dtype=torch.float64)]))
        keep.append(torch.arange(4 * SAMPLES) < 2 * SAMPLES)
    expected = _expected(rewards, keep)
    for rank in (0, 1):
        assert torch.equal(ranks[rank]["dynamic"][2 * SAMPLES:], torch.zeros(2 * SAMPLES, dtype=torch.float64))
        assert torch.allclose(ranks[rank]["dynamic"], expected[rank], rtol=0, atol=2 * 2.0 ** -23)
