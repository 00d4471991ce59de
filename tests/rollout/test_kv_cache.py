"""The embedded engine's KV-cache decoding (megatron-core's static cache) against recomputation and HF.

Properties proved, on prompts of different lengths (left-aligned in the cache, padding masked):
- greedy tokens with the cache equal the recompute path's (`kv_cache=False`, a full forward per
  token) and HF `generate`'s (greedy, one prompt at a time: no padding on the HF side);
- sampled tokens with the same seed are the recompute path's token for token, at temperature 1 and
  0.7 and with stop tokens (the cache draws from the generator exactly as the recompute path does);
- the cache's log-probs equal the trainer's own (compute_logprobs) within 4× the trainer's float32
  rounding measured against a float64 HF run of the same tokens (tests/float_bounds.py);
- a rollout micro-batch size smaller than the batch (uneven split) gives the same greedy tokens,
  and TP=2 and PP=2 with micro-batches give the single-process greedy tokens (decoded with
  megatron's cache there: the lean decoder of the single-process run does not cover them, and the
  engine's fallback_reason says so).
The single-process cache here is the engine's default, the lean decoder (megatron/lean_decode.py);
test_lean_decode.py compares it with megatron's cached decode directly.
The spawned runs (fixtures `single`, `two_ranks`) are shared with test_embedded.py: tests/rollout/conftest.py.
"""
from __future__ import annotations

import pytest
import torch

from tests.float_bounds import assert_float32_equal, float32_bound
from tests.megatron import rl_step_fixtures as fx
from tests.rollout.test_embedded import PROMPTS, _model

pytestmark = pytest.mark.distributed

MAX_NEW = 8
MICRO_BATCH = 4  # 6 prompts: micro-batches of 4 and 2


def _generate(model, *, kv_cache=True, micro_batch_size=None, seed=1, **sampling):
    from megatron_rpg.rollout.embedded import EmbeddedEngine
    from megatron_rpg.rollout.engine import SamplingParams

    engine = EmbeddedEngine(model, vocab_size=fx.hf_config().vocab_size, seed=seed,
                            micro_batch_size=micro_batch_size, kv_cache=kv_cache)
    return engine.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW, **sampling))


def _hf_greedy() -> list[list[int]]:
    from tests.tiny_models import tiny_hf_model

    hf = tiny_hf_model(fx.FAMILY, seed=0, num_hidden_layers=fx.NUM_LAYERS)
    hf.generation_config.eos_token_id = None  # always MAX_NEW tokens, as the engine without stop ids
    hf.generation_config.pad_token_id = 0
    responses = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                              do_sample=False)
            responses.append(out[0, len(prompt):].tolist())
    return responses


def single_process_results(model) -> dict:
    """What the single-process tests below check (run by spawned_runs.py with the TP=1 model)."""
    from megatron_rpg.megatron.forward_backward import compute_logprobs

    out = {"hf_greedy": _hf_greedy()}
    for kv_cache in (True, False):
        out[f"greedy_{kv_cache}"] = _generate(model, kv_cache=kv_cache, greedy=True)
        for temperature in (1.0, 0.7):
            out[f"sampled_{kv_cache}_{temperature}"] = _generate(model, kv_cache=kv_cache, temperature=temperature)
    stop = int(torch.mode(torch.tensor([t for r in out["sampled_True_1.0"].responses() for t in r])).values)
    for kv_cache in (True, False):
        out[f"stopped_{kv_cache}"] = _generate(model, kv_cache=kv_cache, stop_token_ids=(stop,))
    out["greedy_micro"] = _generate(model, greedy=True, micro_batch_size=MICRO_BATCH)
    rollout = out["sampled_True_1.0"]
    (out["trainer_logp"],) = compute_logprobs(model, [dict(tokens=rollout.tokens)])
    out["hf64_logp"], _ = fx.hf_logprobs(rollout.tokens, dtype=torch.float64)
    return out


def layout_results(model, layout: str) -> dict:
    """What the two-rank tests check, per model-parallel layout (tp2, pp2)."""
    if layout == "dp2":
        return {}
    from megatron_rpg.rollout.embedded import EmbeddedEngine
    from megatron_rpg.rollout.engine import SamplingParams

    engine = EmbeddedEngine(model, vocab_size=fx.hf_config().vocab_size, seed=1, micro_batch_size=MICRO_BATCH)
    tokens = engine.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW, greedy=True)).tokens
    return {f"{layout}_greedy_micro": tokens, f"{layout}_fallback_reason": engine.fallback_reason}


def test_prompts_have_different_lengths():
    assert len({len(prompt) for prompt in PROMPTS}) > 1  # the cache's padding mask is exercised


def test_greedy_tokens_with_the_cache_equal_recomputation_and_hf_generate(single):
    cached = single["greedy_True"]
    assert torch.equal(cached.tokens, single["greedy_False"].tokens)
    assert cached.responses() == single["hf_greedy"]
    assert len({tuple(r) for r in cached.responses()}) > 1  # not one constant response


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_tokens_with_the_cache_equal_recomputation(single, temperature):
    cached, recomputed = single[f"sampled_True_{temperature}"], single[f"sampled_False_{temperature}"]
    assert torch.equal(cached.tokens, recomputed.tokens)
    assert not torch.equal(cached.tokens, single["greedy_True"].tokens)  # it did sample


def test_stop_tokens_end_rows_alike_with_and_without_the_cache(single):
    cached, recomputed = single["stopped_True"], single["stopped_False"]
    assert torch.equal(cached.tokens, recomputed.tokens)
    assert torch.equal(cached.response_lengths, recomputed.response_lengths)
    assert torch.equal(cached.loss_mask, recomputed.loss_mask)
    assert int(cached.response_lengths.min()) < MAX_NEW  # a row did stop early


def test_cached_log_probs_equal_the_trainers_within_its_float32_rounding(single):
    rollout = single["sampled_True_1.0"]
    mask = rollout.loss_mask.bool()
    got, want, want64 = rollout.engine_logp[mask], single["trainer_logp"][mask], single["hf64_logp"][mask]
    assert_float32_equal(got, want, float32_bound(want, want64), "cached engine_logp vs compute_logprobs")
    assert float((rollout.engine_logp * (1 - rollout.loss_mask)).abs().max()) == 0.0


def test_a_smaller_rollout_micro_batch_gives_the_same_greedy_tokens(single):
    assert torch.equal(single["greedy_micro"].tokens, single["greedy_True"].tokens)


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_model_parallel_layouts_decode_the_single_process_greedy_tokens(single, two_ranks, layout):
    for rank in (0, 1):
        assert torch.equal(two_ranks[rank][f"{layout}_greedy_micro"], single["greedy_True"].tokens)
        # the lean decoder runs one whole model: these layouts decode with megatron's cache, and say so
        assert "tensor/pipeline parallel sizes" in two_ranks[rank][f"{layout}_fallback_reason"]


def test_micro_batch_size_must_be_positive_and_greedy_a_bool():
    from megatron_rpg.rollout.embedded import EmbeddedEngine
    from megatron_rpg.rollout.engine import SamplingParams
    with pytest.raises(ValueError, match="micro_batch_size=0"):
        EmbeddedEngine(None, micro_batch_size=0)
    with pytest.raises(ValueError, match="greedy=1"):
        SamplingParams(max_new_tokens=1, greedy=1)
