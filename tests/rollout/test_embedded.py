"""The embedded rollout engine on real megatron-core (CPU, gloo).

Properties proved:
- next_token_logits at each row's last prefix position equals the HF float32 model's logits there
  (≤ 1e-5), with rows of different prefix lengths in one right-padded batch;
- the engine's per-token log-probs equal compute_logprobs of the sampled sequences (the trainer's
  own old log-probs: the train/inference mismatch is float rounding, ≤ 1e-5), at temperature 1 and 0.7;
- the same seed gives the same tokens; a stop token ends a row right after it (mask and lengths
  agree, the prefix up to it equals the unstopped run);
- TP=2 and PP=2 generate exactly the tokens of the single-process run; DP ranks sample differently,
  unless the call passes its own seed (SamplingParams.seed: the same tokens on every rank);
- temperature 0 is greedy: each token is the argmax of next_token_logits of its prefix, its
  engine_logp the trainer's temperature-1 log-prob; a seeded call leaves the engine's call counter
  (the training sampler's stream) untouched.
"""
from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_on_ranks
from tests.megatron import rl_step_fixtures as fx

pytestmark = pytest.mark.distributed

PROMPTS = [[5, 17, 42], [7], [99, 3], [11, 12, 13], [200], [31, 32]]
MAX_NEW = 6


def _model(tp: int, pp: int):
    from megatron_rpg.megatron.models import build_gpt_model
    from megatron_rpg.megatron.optimizer_setup import setup_model_and_optimizer
    from megatron_rpg.megatron.parallel import initialize_parallel

    torch.set_num_threads(1)
    initialize_parallel(tp, pp, seed=3)
    gpt = build_gpt_model(fx.hf_config())
    fx.load_full_weights(gpt, fx.full_megatron_weights(gpt.vocab_size))
    model, _ = setup_model_and_optimizer([gpt], lr=0.0)
    return model


def _generate(model, seed: int, **sampling):
    from megatron_rpg.rollout.embedded import EmbeddedEngine
    from megatron_rpg.rollout.engine import SamplingParams

    engine = EmbeddedEngine(model, vocab_size=fx.hf_config().vocab_size, seed=seed)
    return engine.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW, **sampling))


def single_process_body(rank, world_size):
    from megatron_rpg.megatron.forward_backward import compute_logprobs, next_token_logits
    from megatron_rpg.megatron.parallel import destroy_parallel
    from tests.tiny_models import tiny_hf_model

    model = _model(1, 1)
    out = {}
    tokens = torch.randint(0, fx.hf_config().vocab_size, (3, 7), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([7, 2, 4])
    hf = tiny_hf_model(fx.FAMILY, seed=0, num_hidden_layers=fx.NUM_LAYERS)
    with torch.no_grad():
        hf_logits = torch.stack([hf(tokens[i:i + 1, :n]).logits[0, -1] for i, n in enumerate(lengths.tolist())])
    out["logits_err"] = float((next_token_logits(model, tokens, lengths) - hf_logits).abs().max())
    for temperature in (1.0, 0.7):
        rollout = _generate(model, seed=1, temperature=temperature)
        (trainer_logp,) = compute_logprobs(model, [dict(tokens=rollout.tokens)], temperature=temperature)
        out[f"logp_err_{temperature}"] = float(((trainer_logp - rollout.engine_logp) * rollout.loss_mask).abs().max())
        out[f"logp_outside_mask_{temperature}"] = float((rollout.engine_logp * (1 - rollout.loss_mask)).abs().max())
    plain = _generate(model, seed=1)
    out["plain"] = plain
    out["again"] = _generate(model, seed=1)
    out["other_seed"] = _generate(model, seed=2)
    stop = int(torch.mode(torch.tensor([t for r in plain.responses() for t in r])).values)
    out["stop"], out["stopped"] = stop, _generate(model, seed=1, stop_token_ids=(stop,))
    # a second end id: the most frequent token other than the first
    second = int(torch.mode(torch.tensor([t for r in plain.responses() for t in r if t != stop])).values)
    out["stops"], out["stopped_either"] = (stop, second), _generate(model, seed=1, stop_token_ids=(stop, second))
    greedy = _generate(model, seed=1, temperature=0.0)
    (greedy_logp,) = compute_logprobs(model, [dict(tokens=greedy.tokens)], temperature=1.0)
    out["greedy_logp_err"] = float(((greedy_logp - greedy.engine_logp) * greedy.loss_mask).abs().max())
    prefix = greedy.tokens[:, :-1]
    argmax = torch.stack([next_token_logits(model, prefix, torch.full((len(PROMPTS),), n)).argmax(-1)
                          for n in range(1, prefix.shape[1] + 1)], dim=1)
    out["greedy_is_argmax"] = bool(((argmax == greedy.tokens[:, 1:]) | (greedy.loss_mask[:, 1:] == 0)).all())
    out["greedy_other_seed_same"] = torch.equal(greedy.tokens, _generate(model, seed=2, temperature=0.0).tokens)
    from megatron_rpg.rollout.embedded import EmbeddedEngine
    from megatron_rpg.rollout.engine import SamplingParams
    engine = EmbeddedEngine(model, vocab_size=fx.hf_config().vocab_size, seed=1)
    seeded = [engine.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW, seed=77)).tokens for _ in range(2)]
    out["seeded_repeats"], out["seeded_calls"] = torch.equal(*seeded), engine.calls
    destroy_parallel()
    return out


def two_rank_body(rank, world_size):
    from megatron_rpg.megatron.parallel import destroy_parallel

    out = {}
    for name, (tp, pp) in {"tp2": (2, 1), "pp2": (1, 2), "dp2": (1, 1)}.items():
        model = _model(tp, pp)
        out[name] = _generate(model, seed=1).tokens
        if name == "dp2":  # a call with its own seed: the same tokens on both DP ranks
            from megatron_rpg.rollout.embedded import EmbeddedEngine
            from megatron_rpg.rollout.engine import SamplingParams
            engine = EmbeddedEngine(model, vocab_size=fx.hf_config().vocab_size, seed=1)
            out["dp2_seeded"] = engine.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW, seed=77)).tokens
        destroy_parallel()
    return out


@pytest.fixture(scope="module")
def single():
    return run_on_ranks(single_process_body, world_size=1)[0]


@pytest.fixture(scope="module")
def two_ranks():
    return run_on_ranks(two_rank_body, world_size=2)


def test_next_token_logits_equal_hf_logits_at_each_rows_last_position(single):
    assert single["logits_err"] <= 1e-5


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_log_probs_equal_the_trainers_log_probs_of_the_samples(single, temperature):
    assert single[f"logp_err_{temperature}"] <= 1e-5
    assert single[f"logp_outside_mask_{temperature}"] == 0.0


def test_rollout_layout_follows_the_micro_batch_convention(single):
    rollout = single["plain"]
    lengths = torch.tensor([len(p) for p in PROMPTS])
    assert torch.equal(rollout.prompt_lengths, lengths)
    assert torch.equal(rollout.response_lengths, torch.full((len(PROMPTS),), MAX_NEW))
    for row, prompt in enumerate(PROMPTS):
        assert rollout.tokens[row, :len(prompt)].tolist() == prompt
        assert rollout.loss_mask[row].tolist() == [0.0] * len(prompt) + [1.0] * MAX_NEW + \
            [0.0] * (rollout.tokens.shape[1] - len(prompt) - MAX_NEW)
    assert int(rollout.tokens.max()) < fx.hf_config().vocab_size  # never a padded vocab id


def test_same_seed_same_tokens_other_seed_other_tokens(single):
    assert torch.equal(single["plain"].tokens, single["again"].tokens)
    assert not torch.equal(single["plain"].tokens, single["other_seed"].tokens)


def test_any_of_several_stop_tokens_ends_its_row_right_after_the_first_of_them(single):
    plain, stopped, stops = single["plain"].responses(), single["stopped_either"], single["stops"]
    cut_by_second = 0
    for row, (full, cut) in enumerate(zip(plain, stopped.responses())):
        ends = [position for position, token in enumerate(full) if token in stops]
        expected = full[:ends[0] + 1] if ends else full
        cut_by_second += bool(ends) and full[ends[0]] == stops[1]
        assert cut == expected, row
        assert int(stopped.loss_mask[row].sum()) == len(expected) == int(stopped.response_lengths[row])
    assert cut_by_second > 0  # the second id did end a row


def test_stop_token_ids_must_be_a_tuple_of_ids():
    from megatron_rpg.rollout.engine import SamplingParams
    assert SamplingParams(max_new_tokens=2, stop_token_ids=[3, 4]).stop_token_ids == (3, 4)
    with pytest.raises(ValueError, match="stop_token_ids=5"):
        SamplingParams(max_new_tokens=2, stop_token_ids=5)


def test_a_stop_token_ends_its_row_right_after_it(single):
    plain, stopped, stop = single["plain"].responses(), single["stopped"], single["stop"]
    assert any(stop in response for response in plain)
    for row, (full, cut) in enumerate(zip(plain, stopped.responses())):
        expected = full[:full.index(stop) + 1] if stop in full else full
        assert cut == expected, row
        assert int(stopped.loss_mask[row].sum()) == len(expected) == int(stopped.response_lengths[row])


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_model_parallel_layouts_generate_the_single_process_tokens(single, two_ranks, layout):
    for rank in (0, 1):
        assert torch.equal(two_ranks[rank][layout], single["plain"].tokens)


def test_data_parallel_ranks_sample_their_own_tokens(single, two_ranks):
    assert torch.equal(two_ranks[0]["dp2"], single["plain"].tokens)
    assert not torch.equal(two_ranks[0]["dp2"], two_ranks[1]["dp2"])


def test_a_call_with_its_own_seed_samples_alike_on_every_rank_and_leaves_the_call_counter(single, two_ranks):
    assert torch.equal(two_ranks[0]["dp2_seeded"], two_ranks[1]["dp2_seeded"])
    assert single["seeded_repeats"] and single["seeded_calls"] == 0


def test_temperature_zero_is_greedy_with_temperature_one_log_probs(single):
    assert single["greedy_is_argmax"] and single["greedy_other_seed_same"]
    assert single["greedy_logp_err"] <= 1e-5


@pytest.mark.parametrize("temperature", [-1.0, float("inf"), float("nan")])
def test_temperature_must_be_zero_or_finite_positive(temperature):
    from megatron_rpg.rollout.engine import SamplingParams
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(max_new_tokens=2, temperature=temperature)
