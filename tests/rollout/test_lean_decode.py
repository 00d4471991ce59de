"""The lean KV-cache decoder (megatron/lean_decode.py) against megatron's own cached decode, and the
old log-prob recompute joined into larger forwards (--logprob-micro-batch-size).

Properties proved, per model family (Qwen2 with QKV bias, Qwen3 with q/k-norm, Llama 3 with its RoPE
scaling and tied embeddings), on prompts of different lengths (padding masked):
- greedy tokens of the lean decoder equal megatron's cached decode (`lean_decode=False`), and so do
  the tokens sampled with one seed at temperature 1 (the two draw from the generator alike);
- the lean decoder's log-probs equal megatron's within tests/float_bounds.py's rule (4× the
  megatron path's float32 rounding, measured against a float64 HF run of the same tokens);
- a model it does not cover decodes with megatron's path and says why (TP=2, PP=2: test_kv_cache.py);
- old log-probs from one joined forward of several micro-batches equal the per-micro-batch ones
  within the same rule; --logprob-micro-batch-size must be a multiple of --micro-batch-size.
"""
from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_on_ranks
from tests.float_bounds import assert_float32_equal, float32_bound
from tests.megatron import rl_step_fixtures as fx
from tests.rollout.test_embedded import PROMPTS

FAMILIES = ("qwen2", "qwen3", "llama3-tied")
MAX_NEW = 8


def _model(family: str):
    from megatron_rpg.megatron.models import build_gpt_model
    from megatron_rpg.megatron.optimizer_setup import setup_model_and_optimizer

    gpt = build_gpt_model(fx.hf_config(family))
    fx.load_full_weights(gpt, fx.full_megatron_weights(gpt.vocab_size, family))
    model, _ = setup_model_and_optimizer([gpt], lr=0.0)
    return model


def _body(rank, world_size):
    from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_rpg.rollout.embedded import EmbeddedEngine
    from megatron_rpg.rollout.engine import SamplingParams
    from megatron_rpg.training.rollouts import attach_old_logprobs

    torch.set_num_threads(1)
    out = {}
    for family in FAMILIES:
        initialize_parallel(1, 1, seed=3)
        model = _model(family)
        vocab = fx.hf_config(family).vocab_size
        for lean in (True, False):
            for name, sampling in (("greedy", dict(greedy=True)), ("sampled", {})):
                engine = EmbeddedEngine(model, vocab_size=vocab, seed=1, lean_decode=lean)
                out[family, lean, name] = engine.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW, **sampling))
            out[family, lean, "reason"] = engine.fallback_reason
        out[family, "hf64"], _ = fx.hf_logprobs(out[family, False, "sampled"].tokens, family, torch.float64)
        if family == "qwen2":
            batches = [dict(tokens=batch["tokens"]) for batch in fx.global_micro_batches(vocab, with_ref=False)]
            for rows in (None, 2 * fx.MICRO_BATCH_SIZE, 10 * fx.MICRO_BATCH_SIZE):
                copies = [dict(b, engine_logp=torch.zeros(b["tokens"].shape), loss_mask=torch.zeros(b["tokens"].shape))
                          for b in batches]
                attach_old_logprobs(model, copies, 1.0, rows_per_pass=rows)
                out["old_logp", rows] = torch.cat([b["old_logp"] for b in copies])
            out["old_logp_hf64"], _ = fx.hf_logprobs(torch.cat([b["tokens"] for b in batches]), family, torch.float64)
        destroy_parallel()
    return out


@pytest.fixture(scope="module")
def runs():
    return run_on_ranks(_body, world_size=1)[0]


@pytest.mark.distributed
@pytest.mark.parametrize("family", FAMILIES)
def test_lean_decode_gives_megatrons_tokens_and_log_probs(runs, family):
    assert runs[family, True, "reason"] is None and runs[family, False, "reason"] is None  # lean ran; megatron asked
    for name in ("greedy", "sampled"):
        lean, megatron = runs[family, True, name], runs[family, False, name]
        assert torch.equal(lean.tokens, megatron.tokens), name
        assert torch.equal(lean.loss_mask, megatron.loss_mask)
    assert not torch.equal(runs[family, True, "sampled"].tokens, runs[family, True, "greedy"].tokens)  # it sampled
    assert len({tuple(r) for r in runs[family, True, "greedy"].responses()}) > 1  # not one constant response
    mask = runs[family, False, "sampled"].loss_mask.bool()
    got, want = runs[family, True, "sampled"].engine_logp[mask], runs[family, False, "sampled"].engine_logp[mask]
    assert_float32_equal(got, want, float32_bound(want, runs[family, "hf64"][mask]), f"{family} lean vs megatron")


@pytest.mark.distributed
def test_joined_old_logprob_forwards_equal_the_per_micro_batch_ones(runs):
    want = runs["old_logp", None]
    bound = float32_bound(want, runs["old_logp_hf64"])
    for rows in (2 * fx.MICRO_BATCH_SIZE, 10 * fx.MICRO_BATCH_SIZE):  # two passes of two; one pass of all
        assert_float32_equal(runs["old_logp", rows], want, bound, f"rows_per_pass={rows}")


def test_logprob_micro_batch_size_must_be_a_multiple_of_the_micro_batch_size(capsys):
    from megatron_rpg.training.config import parse_train_config

    with pytest.raises(SystemExit) as exit_info:
        parse_train_config(["--model-preset", "tiny", "--logprob-micro-batch-size", "24"])
    assert exit_info.value.code == 2
    assert "--logprob-micro-batch-size=24 must be a positive multiple of --micro-batch-size 16" in capsys.readouterr().err
    assert parse_train_config(["--model-preset", "tiny", "--logprob-micro-batch-size", "64"]).training.logprob_micro_batch_size == 64
