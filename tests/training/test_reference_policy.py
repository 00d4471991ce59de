"""--ref-policy (optim/reference_policy.py): π_ref as fp32 weights in the optimizer's main-shard
ranges, swapped in for the reference pass.

Proved, at TP=2, PP=2 and DP=2 (distributed optimizer) as in one process:
- after an optimizer step, the reference pass returns the log-probs the STARTING weights gave
  (bit for bit: same layout, same weights), and the model computes with θ again afterwards (bit
  for bit); the measured KL is the k3 mean of (ref − old) over the global batch's response tokens;
- every-k refreshes: after a refresh the reference log-probs are those of the current weights;
- a trainer run saved mid-way and resumed in new processes continues bit-exactly (rewards, grad
  norms, measured KL, the refresh count) with --ref-policy every-k;
- the reference keeps 4 bytes per main-shard element (1/DP of the parameters with the distributed
  optimizer); flags that cannot work are refused.
"""
from __future__ import annotations

import os

import pytest
import torch

from megatron_rpg.training.config import parse_train_config
from tests.distributed.harness import run_on_ranks

pytestmark = pytest.mark.distributed
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = ["--config", os.path.join(REPO, "examples", "tiny_cpu.yaml"), "--no-progress", "--seed", "0"]
LAYOUTS = {"single": (1, 1, []), "tp2": (2, 1, []), "pp2": (1, 2, []), "dp2": (1, 1, ["--use-distributed-optimizer"])}
EVERY_2 = ["--ref-policy", "every-k", "--ref-update-interval", 2]


def _config(*extra):
    return parse_train_config(QUICK + [str(x) for x in extra])


def _batches(dp_rank: int) -> list[dict]:
    generator = torch.Generator().manual_seed(7 + dp_rank)
    batches = []
    for _ in range(2):
        tokens = torch.randint(0, 16, (4, 10), generator=generator)
        mask = torch.zeros(4, 10)
        mask[:, 2:2 + int(torch.randint(3, 8, (1,), generator=generator))] = 1.0
        batches.append({"tokens": tokens, "loss_mask": mask, "advantages": torch.randn(4, generator=generator)})
    return batches


def _k3_mean(refs, olds, batches) -> float:
    values = [(ref.double() - old.double())[mb["loss_mask"].bool()] for ref, old, mb in zip(refs, olds, batches)]
    log_ratio = torch.cat(values)
    return float((log_ratio.exp() - 1 - log_ratio).mean())


def layouts_body(rank, world_size, names):
    from megatron.core import parallel_state

    from megatron_rpg.losses import build_policy_loss
    from megatron_rpg.megatron.forward_backward import compute_logprobs, rl_forward_backward
    from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_rpg.optim.reference_policy import ReferencePolicy
    from megatron_rpg.training.build import build_model_and_optimizer

    torch.set_num_threads(1)
    out = {}
    for name in names:
        tp, pp, extra = LAYOUTS[name]
        initialize_parallel(tp, pp, seed=0)
        config = _config("--ref-policy", "initial", "--tensor-model-parallel-size", tp,
                         "--pipeline-model-parallel-size", pp, *extra)
        model, optimizer, _ = build_model_and_optimizer(config)
        batches = _batches(parallel_state.get_data_parallel_rank())
        start = compute_logprobs(model, batches)
        for batch, logp in zip(batches, start):
            batch["old_logp"] = logp
        reference = ReferencePolicy(optimizer, config.reference)
        rl_forward_backward(model, batches, build_policy_loss(config.loss))
        optimizer.step()
        moved = compute_logprobs(model, batches)
        for batch, logp in zip(batches, moved):
            batch["old_logp"] = logp  # the next step's π_old: the current weights
        refs, metrics = reference.logprobs(model, batches)
        after = compute_logprobs(model, batches)
        every_k = ReferencePolicy(optimizer, parse_train_config(QUICK + [str(x) for x in EVERY_2]).reference)
        every_k.weights = [w.clone() for w in reference.weights]  # as if built at the start
        every_k.after_step(1, {})
        not_yet = every_k.logprobs(model, batches)[0]
        every_k.after_step(2, {})
        refreshed = every_k.logprobs(model, batches)[0]
        out[name] = dict(start=start, moved=moved, refs=refs, after=after, kl=metrics["ref/kl"], batches=batches,
                         not_yet=not_yet, refreshed=refreshed, bytes=reference.extra_memory_bytes(),
                         numel=sum(p.numel() for p in model[0].parameters()))
        destroy_parallel()
    return out


def resume_body(rank, world_size, workdir):
    from megatron_rpg.training.loop import train

    torch.set_num_threads(1)
    half = os.path.join(workdir, "half")
    return {"full": train(_config("--train-iters", 4, *EVERY_2)),
            "half": train(_config("--train-iters", 2, "--save", half, *EVERY_2)),
            "initial": train(_config("--train-iters", 2, "--ref-policy", "initial"))}


def resumed_body(rank, world_size, workdir):
    from megatron_rpg.training.loop import train

    torch.set_num_threads(1)
    return train(_config("--train-iters", 4, "--load", os.path.join(workdir, "half"), *EVERY_2))


@pytest.fixture(scope="module")
def single():
    return run_on_ranks(layouts_body, world_size=1, args=(["single"],))[0]["single"]


@pytest.fixture(scope="module")
def two_ranks():
    return run_on_ranks(layouts_body, world_size=2, args=(["tp2", "pp2", "dp2"],))


def _check_layout(result, batches_of_all_ranks):
    assert all(torch.equal(r, s) for r, s in zip(result["refs"], result["start"]))  # the starting weights'
    assert all(torch.equal(a, m) for a, m in zip(result["after"], result["moved"]))  # θ restored
    assert not all(torch.equal(m, s) for m, s in zip(result["moved"], result["start"]))  # the step moved θ
    assert all(torch.equal(n, s) for n, s in zip(result["not_yet"], result["start"]))  # step 1: no refresh
    assert all(torch.equal(r, m) for r, m in zip(result["refreshed"], result["moved"]))  # step 2: π_ref ← π_θ


def test_single_process_reference_pass_gives_the_starting_weights_log_probs(single):
    _check_layout(single, None)
    assert single["kl"] == pytest.approx(_k3_mean(single["refs"], single["moved"], single["batches"]), rel=1e-12)
    assert single["kl"] > 0
    assert single["bytes"] == 4 * single["numel"]


@pytest.mark.parametrize("name", ["tp2", "pp2", "dp2"])
def test_reference_pass_at_tp2_pp2_dp2(two_ranks, name):
    for rank in (0, 1):
        _check_layout(two_ranks[rank][name], None)
    assert two_ranks[0][name]["kl"] == two_ranks[1][name]["kl"]  # one global value
    if name == "dp2":  # the global batch is both ranks' batches; each rank keeps half the weights
        both = [two_ranks[rank]["dp2"] for rank in (0, 1)]
        want = _k3_mean([r for b in both for r in b["refs"]], [m for b in both for m in b["moved"]],
                        [mb for b in both for mb in b["batches"]])
        assert both[0]["kl"] == pytest.approx(want, rel=1e-12)
        assert sum(b["bytes"] for b in both) == pytest.approx(4 * both[0]["numel"], abs=4 * 64)  # DP padding


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ref"))
    first = run_on_ranks(resume_body, world_size=1, args=(workdir,))[0]
    first["resumed"] = run_on_ranks(resumed_body, world_size=1, args=(workdir,))[0]
    return first


def test_a_resumed_run_continues_bit_exactly_with_its_reference(runs):
    assert [s["step"] for s in runs["resumed"]] == [3, 4]
    for ours, reference in zip(runs["resumed"], runs["full"][2:]):
        for key in ("reward_mean", "grad_norm", "ref/kl", "ref/refreshes", "kl_k3"):
            assert ours[key] == reference[key], key
    assert [s["ref/refreshes"] for s in runs["full"]] == [0, 1, 1, 2]


def test_initial_reference_measures_a_growing_kl(runs):
    kls = [s["ref/kl"] for s in runs["initial"]]
    assert kls[0] == 0.0 and kls[1] > 0  # step 1 samples from the starting weights themselves


@pytest.mark.parametrize("argv, message", [
    (["--ref-policy", "every-k"], "--ref-update-interval N is what --ref-policy every-k needs"),
    (["--ref-update-kl", "0.1"], "--ref-update-kl X is what --ref-policy kl needs, and only it"),
    (["--ref-policy", "kl", "--ref-update-kl", "0"], "--ref-update-kl 0.0 must be > 0"),
    (["--ref-policy", "initial", "--loss", "ppo_clip"], "--ref-policy initial has no effect with --loss ppo_clip"),
    (["--ref-policy", "initial", "--svrpg", "--svrpg-update-ref", "--num-mini-batches", "1",
      "--rpg-aggregation", "seq-mean-token-sum"], "--svrpg-update-ref sets π_ref to the SVRPG snapshot"),
])
def test_reference_flags_that_cannot_work_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_train_config(QUICK + argv)
    assert message in capsys.readouterr().err
