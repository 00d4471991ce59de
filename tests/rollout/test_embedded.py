"""The embedded rollout engine on real megatron-core (CPU, gloo).

Properties proved:
- next_token_logits at each row's last prefix position equals the HF float32 model's logits there,
  with rows of different prefix lengths in one right-padded batch;
- the engine's per-token log-probs equal compute_logprobs of the sampled sequences (the trainer's
  own old log-probs: the train/inference mismatch is float rounding), at temperature 1 and 0.7;
"equal" is tests/float_bounds.py's bound per row: 4× the float32 reference's (HF logits',
compute_logprobs') rounding, measured against the same computation on a float64 copy of the model;
- the same seed gives the same tokens; a stop token ends a row right after it (mask and lengths
  agree, the prefix up to it equals the unstopped run);
- TP=2 and PP=2 generate exactly the tokens of the single-process run; DP ranks sample differently,
  unless the call passes its own seed (SamplingParams.seed: the same tokens on every rank);
- temperature 0 is greedy: each token is the argmax of next_token_logits of its prefix, its
  engine_logp the trainer's temperature-1 log-prob; a seeded call leaves the engine's call counter
  (the training sampler's stream) untouched.
The spawned runs (fixtures `single`, `two_ranks`) are shared with test_kv_cache.py: tests/rollout/conftest.py.
"""
from __future__ import annotations

import pytest
import torch

from megatron_rpg.rollout.engine import SamplingParams
from tests.float_bounds import ratio_to_bound_per_row
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


def _engine(model, seed: int):
    from megatron_rpg.rollout.embedded import EmbeddedEngine

    return EmbeddedEngine(model, vocab_size=fx.hf_config().vocab_size, seed=seed)


def _generate(model, seed: int, **sampling):
    return _engine(model, seed).generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW, **sampling))


def single_process_results(model) -> dict:
    """What the single-process tests below check (run by spawned_runs.py with the TP=1 model)."""
    from megatron_rpg.megatron.forward_backward import compute_logprobs, next_token_logits
    from megatron_rpg.megatron.models import build_gpt_model
    from tests.tiny_models import tiny_hf_model

    out = {}
    tokens = torch.randint(0, fx.hf_config().vocab_size, (3, 7), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([7, 2, 4])
    hf = tiny_hf_model(fx.FAMILY, seed=0, num_hidden_layers=fx.NUM_LAYERS)

    def last_logits(hf_model):
        with torch.no_grad():
            return torch.stack([hf_model(tokens[i:i + 1, :n]).logits[0, -1] for i, n in enumerate(lengths.tolist())])
    out["logits_ratio"] = ratio_to_bound_per_row(next_token_logits(model, tokens, lengths), last_logits(hf),
                                                 last_logits(hf.double()))  # float64: the bound
    gpt64 = build_gpt_model(fx.hf_config(), params_dtype=torch.float64, pipeline_dtype=torch.float64)
    fx.load_full_weights(gpt64, {n: t.double() for n, t in fx.full_megatron_weights(gpt64.vocab_size).items()})
    for temperature in (1.0, 0.7):
        rollout = _generate(model, seed=1, temperature=temperature)
        (trainer_logp,) = compute_logprobs(model, [dict(tokens=rollout.tokens)], temperature=temperature)
        logp64 = fx.model_logprobs(gpt64, rollout.tokens, fx.hf_config().vocab_size, temperature)[0]
        mask = rollout.loss_mask
        out[f"logp_ratio_{temperature}"] = ratio_to_bound_per_row(rollout.engine_logp * mask, trainer_logp * mask,
                                                                  logp64 * mask)
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
    greedy64 = fx.model_logprobs(gpt64, greedy.tokens, fx.hf_config().vocab_size, 1.0)[0]
    mask = greedy.loss_mask
    out["greedy_logp_ratio"] = ratio_to_bound_per_row(greedy.engine_logp * mask, greedy_logp * mask, greedy64 * mask)
    prefix = greedy.tokens[:, :-1]
    argmax = torch.stack([next_token_logits(model, prefix, torch.full((len(PROMPTS),), n)).argmax(-1)
                          for n in range(1, prefix.shape[1] + 1)], dim=1)
    out["greedy_is_argmax"] = bool(((argmax == greedy.tokens[:, 1:]) | (greedy.loss_mask[:, 1:] == 0)).all())
    out["greedy_other_seed_same"] = torch.equal(greedy.tokens, _generate(model, seed=2, temperature=0.0).tokens)
    engine = _engine(model, seed=1)
    seeded = [engine.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW, seed=77)).tokens for _ in range(2)]
    out["seeded_repeats"], out["seeded_calls"] = torch.equal(*seeded), engine.calls
    return out


def layout_results(model, layout: str) -> dict:
    """What the two-rank tests check, per layout (tp2, pp2, dp2)."""
    out = {layout: _generate(model, seed=1).tokens}
    if layout == "dp2":  # a call with its own seed: the same tokens on both DP ranks
        out["dp2_seeded"] = _engine(model, seed=1).generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW,
                                                                                    seed=77)).tokens
    return out


def test_next_token_logits_equal_hf_logits_at_each_rows_last_position(single):
    assert single["logits_ratio"] <= 1.0, single["logits_ratio"]  # ‖Δ‖ / bound, the largest over rows


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_log_probs_equal_the_trainers_log_probs_of_the_samples(single, temperature):
    assert single[f"logp_ratio_{temperature}"] <= 1.0, single[f"logp_ratio_{temperature}"]
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
    assert single["greedy_logp_ratio"] <= 1.0, single["greedy_logp_ratio"]


@pytest.mark.parametrize("temperature", [-1.0, float("inf"), float("nan")])
def test_temperature_must_be_zero_or_finite_positive(temperature):
    from megatron_rpg.rollout.engine import SamplingParams
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(max_new_tokens=2, temperature=temperature)
