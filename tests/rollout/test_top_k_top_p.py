"""Top-k / top-p sampling (rollout/engine.truncated_log_probs): the kept set and the renormalised
log-probs, and the embedded engine sampling from (and reporting the log-probs of) that distribution."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from megatron_rpg.rollout.engine import SamplingParams, truncated_log_probs
from tests.distributed.harness import run_on_ranks


def _kept_by_enumeration(probs: list[float], top_k: int, top_p: float) -> set[int]:
    """The definition, written out: most likely first (ties by id), the first k, then the shortest
    prefix whose mass reaches top_p."""
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
    if top_k:
        order = order[:top_k]
    total = sum(probs[i] for i in order)
    kept, mass = [], 0.0
    for i in order:
        if mass / total >= top_p:
            break
        kept.append(i)
        mass += probs[i]
    return set(kept)


@pytest.mark.parametrize("top_k, top_p", list(itertools.product([0, 1, 2, 4], [1.0, 0.9, 0.5, 0.05])))
def test_the_kept_tokens_and_renormalised_log_probs_follow_the_definition(top_k, top_p):
    generator = torch.Generator().manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(6, 7, generator=generator, dtype=torch.float64) * 2, dim=-1)
    got = truncated_log_probs(log_probs, top_k=top_k, top_p=top_p)
    for row in range(6):
        probs = log_probs[row].exp().tolist()
        kept = _kept_by_enumeration(probs, top_k, top_p)
        assert {i for i in range(7) if torch.isfinite(got[row, i])} == kept
        mass = sum(probs[i] for i in kept)
        for i in kept:  # log π(i) − log Σ_kept π
            assert float(got[row, i]) == pytest.approx(float(log_probs[row, i]) - math.log(mass), abs=1e-14)


def test_no_truncation_is_the_identity_and_top_k_1_is_greedy():
    log_probs = torch.log_softmax(torch.randn(4, 9, dtype=torch.float64), dim=-1)
    assert torch.allclose(truncated_log_probs(log_probs), log_probs, rtol=0, atol=1e-15)
    greedy = truncated_log_probs(log_probs, top_k=1)
    assert torch.equal(greedy.argmax(-1), log_probs.argmax(-1)) and torch.equal(greedy.max(-1).values, torch.zeros(4,
                                                                                                    dtype=torch.float64))


@pytest.mark.parametrize("kwargs, message", [({"top_k": -1}, "top_k=-1"), ({"top_p": 0.0}, "top_p"),
                                             ({"top_p": 1.5}, "top_p")])
def test_bad_truncation_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(max_new_tokens=4, **kwargs)


def engine_body(rank, world_size):
    from megatron_rpg.megatron.forward_backward import forward_logits
    from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_rpg.rollout.embedded import EmbeddedEngine
    from megatron_rpg.training.build import build_model_and_optimizer
    from megatron_rpg.training.config import parse_train_config

    torch.set_num_threads(1)
    initialize_parallel(1, 1, seed=0)
    model, _, _ = build_model_and_optimizer(parse_train_config(["--model-preset", "tiny"]))
    engine = EmbeddedEngine(model, vocab_size=16, seed=3)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]] * 4
    out = {}
    for name, sampling in {"top_k": SamplingParams(max_new_tokens=6, top_k=3, temperature=0.7),
                           "top_p": SamplingParams(max_new_tokens=6, top_p=0.6)}.items():
        rollout = engine.generate(prompts, sampling)
        out[name] = dict(rollout=rollout, sampling=sampling,
                         logits=forward_logits(model, rollout.tokens, vocab_size=16))  # [n, s, V]
    destroy_parallel()
    return out


@pytest.mark.distributed
def test_the_engine_samples_only_kept_tokens_and_reports_their_renormalised_log_probs():
    out = run_on_ranks(engine_body, world_size=1)[0]
    for name in ("top_k", "top_p"):
        rollout, sampling, logits = out[name]["rollout"], out[name]["sampling"], out[name]["logits"].double()
        shifted = 0
        for row, t in rollout.loss_mask.bool().nonzero().tolist():
            full = torch.log_softmax(logits[row, t - 1] / sampling.temperature, dim=-1)  # position t−1 predicts t
            kept = truncated_log_probs(full[None], top_k=sampling.top_k, top_p=sampling.top_p)[0]
            token, reported = int(rollout.tokens[row, t]), float(rollout.engine_logp[row, t])
            assert torch.isfinite(kept[token]), (name, row, t)  # never a truncated-away token
            shift = float(kept[token] - full[token])  # −log of the kept mass: what truncation changes
            if shift > 1e-3:  # the engine reports the renormalised value, far closer to it than to the full one
                shifted += 1
                assert abs(reported - float(kept[token])) < abs(reported - float(full[token])) / 100
        assert shifted > 0, name


@pytest.mark.parametrize("argv, message", [(["--rollout-top-k", "-1"], "--rollout-top-k=-1 must be >= 0"),
                                           (["--rollout-top-p", "0"], r"--rollout-top-p=0.0 must lie in \(0, 1\]")])
def test_the_trainer_refuses_bad_truncation_flags_before_building_anything(argv, message, capsys):
    from megatron_rpg.training.config import parse_train_config

    with pytest.raises(SystemExit):
        parse_train_config(["--model-preset", "tiny", *argv])
    assert __import__("re").search(message, capsys.readouterr().err)
