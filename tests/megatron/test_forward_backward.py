"""rl_forward_backward / compute_logprobs on one rank (real megatron-core on CPU, one gloo process).

Properties proved (all checks run in ONE spawned process; the test functions assert its results):
- compute_logprobs equals log_softmax of a float64 HF forward of the same weights (and the entropy);
- the loss over 4 micro-batches of unequal token counts equals `rpg_loss` on the concatenated batch
  (the global mean), for every aggregation, and the gradient equals the gradient of one
  micro-batch holding the whole batch; a per-micro-batch mean would differ (shown);
- num_global_tokens: two calls over halves of the batch with the global count sum to the gradient
  of one call over the whole batch;
- forward_only gives the same loss and leaves the gradient buffers untouched;
- bad inputs raise ValueError before any model work, and so does a model without the megatron
  settings the global mean relies on (per-token loss, SUM over DP, finalize_model_grads);
- at DP=2 (two gloo ranks, unequal token counts per rank and call) num_global_tokens gives the
  single-process global token-mean loss and gradient.
"""
from __future__ import annotations

import functools

import pytest
import torch

from tests.distributed.harness import run_on_ranks
from tests.megatron import rl_step_fixtures as fx

pytestmark = pytest.mark.distributed

LOSS_CONFIG = dict(divergence="urkl", style="differentiable", beta=0.1)  # RPGLoss fields, no clip
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def _main_grads(model) -> torch.Tensor:
    return torch.cat([p.main_grad.detach().flatten().clone() for p in model[0].module.parameters()])


def _bad_inputs(micro_batches):
    good = micro_batches[0]
    mask_at_zero = dict(good, loss_mask=good["loss_mask"].clone())
    mask_at_zero["loss_mask"][:, 0] = 1
    return {
        "mask_at_position_0": ([mask_at_zero], {}),
        "old_logp_shape": ([dict(good, old_logp=good["old_logp"][:, :-1])], {}),
        "advantages_shape": ([dict(good, advantages=good["advantages"][:1])], {}),
        "missing_key": ([{k: v for k, v in good.items() if k != "old_logp"}], {}),
        "empty_list": ([], {}),
        "engine_logp_shape": ([dict(good, engine_logp=good["old_logp"][:, :-1])], {}),
        "dict_as_loss": ([good], {"loss": dict(LOSS_CONFIG)}),  # the loss_config API before the objects
        "zero_global_tokens": ([good], {"num_global_tokens": 0}),
    }


def single_rank_body(rank, world_size):
    from megatron_rpg.losses import RPGLoss, rpg_loss
    from megatron_rpg.megatron import forward_backward
    from megatron_rpg.megatron.models import build_gpt_model
    from megatron_rpg.megatron.optimizer_setup import setup_model_and_optimizer
    from megatron_rpg.megatron.parallel import initialize_parallel

    torch.set_num_threads(1)
    initialize_parallel(1, 1, seed=7)
    gpt = build_gpt_model(fx.hf_config())
    fx.load_full_weights(gpt, fx.full_megatron_weights(gpt.vocab_size))
    model, _ = setup_model_and_optimizer([gpt], lr=1e-3)
    vocab_size = fx.hf_config().vocab_size  # 250; the model's vocab is padded to 256
    assert gpt.vocab_size > vocab_size
    # padded ids excluded from the softmax (the HF comparison below fails without it)
    compute_logprobs = functools.partial(forward_backward.compute_logprobs, vocab_size=vocab_size)
    rl_forward_backward = functools.partial(forward_backward.rl_forward_backward, vocab_size=vocab_size)
    micro_batches = fx.global_micro_batches(vocab_size)
    whole = fx.concatenate(micro_batches)
    out = {}

    logps, entropies = compute_logprobs(model, micro_batches, with_entropy=True)
    hf_logp, hf_entropy = fx.hf_float64_logprobs(whole["tokens"])
    out["logp_err"] = float((torch.cat(logps).double() - hf_logp).abs().max())
    out["entropy_err"] = float((torch.cat(entropies).double() - hf_entropy).abs().max())
    out["logp_spread"] = float(hf_logp[:, 1:].std())  # the comparison is not between constants

    # the model's `unpadded_vocab_size` is the default; counting the padded ids would be wrong
    out["default_vocab_equal"] = torch.equal(
        forward_backward.compute_logprobs(model, micro_batches[:1])[0], logps[0])
    with_padding = forward_backward.compute_logprobs(model, micro_batches, vocab_size=gpt.vocab_size)
    out["padded_vocab_logp_err"] = float((torch.cat(with_padding).double() - hf_logp).abs().max())
    try:
        compute_logprobs(model, micro_batches, packing="thd")
        out["thd"] = "no error"
    except NotImplementedError as error:
        out["thd"] = str(error)

    logp_whole = torch.cat(logps)
    for aggregation in AGGREGATIONS:
        config = dict(LOSS_CONFIG, aggregation=aggregation)
        loss, metrics = rl_forward_backward(model, micro_batches, RPGLoss(**config))
        split_grads = _main_grads(model)
        whole_loss, _ = rl_forward_backward(model, [whole], RPGLoss(**config))
        direct, _ = rpg_loss(logp_whole, whole["old_logp"], whole["advantages"],
                             ref_logp=whole["ref_logp"], mask=whole["loss_mask"], **config)
        per_micro_batch = [float(rl_forward_backward(model, [mb], RPGLoss(**config),
                                                     forward_only=True)[0]) for mb in micro_batches]
        out[aggregation] = dict(
            loss=float(loss), whole_loss=float(whole_loss), direct=float(direct),
            grad_rel=_relative(split_grads, _main_grads(model)),
            grad_norm=float(split_grads.norm()),
            mean_of_micro_batch_means=sum(per_micro_batch) / len(per_micro_batch),
            normalizer=metrics["normalizer"], num_tokens=metrics["num_tokens"])

    config = RPGLoss(**LOSS_CONFIG, aggregation="token-mean")
    rl_forward_backward(model, micro_batches, config)
    full_grads = _main_grads(model)
    total = int(whole["loss_mask"].sum())
    first, _ = rl_forward_backward(model, micro_batches[:1], config, num_global_tokens=total)
    first_grads = _main_grads(model)
    second, _ = rl_forward_backward(model, micro_batches[1:], config, num_global_tokens=total)
    out["global_tokens_grad_rel"] = _relative(first_grads + _main_grads(model), full_grads)
    out["full_grads"] = full_grads
    out["global_tokens_loss"] = float(first) + float(second)
    out["full_loss"] = out["token-mean"]["loss"]

    before = _main_grads(model)
    forward_loss, _ = rl_forward_backward(model, micro_batches, config, forward_only=True)
    out["forward_only_loss"] = float(forward_loss)
    out["forward_only_grads_untouched"] = bool(torch.equal(before, _main_grads(model)))

    out["errors"] = {}
    for name, (batches, overrides) in _bad_inputs(micro_batches).items():
        loss = overrides.pop("loss", config)
        try:
            rl_forward_backward(model, batches, loss, **overrides)
            out["errors"][name] = "no error"
        except ValueError as error:
            out["errors"][name] = "ValueError: " + str(error)
    out["setup_errors"] = _setup_errors(model, micro_batches, config, vocab_size)
    return out


def _setup_errors(model, micro_batches, config, vocab_size):
    """The ValueError of rl_forward_backward for each missing global-mean setting (the key), by
    breaking one field of the set-up model at a time, and for a model wrapped without the setup."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron_rpg.megatron.forward_backward import rl_forward_backward
    from megatron_rpg.megatron.models import build_gpt_model

    def error_of(chunk, **kwargs):
        try:
            rl_forward_backward([chunk], micro_batches[:1], config, **kwargs)
            return "no error"
        except ValueError as error:
            return str(error)

    errors = {}
    ddp = model[0]
    for name, holder, bad in (("calculate_per_token_loss", ddp.config, False),
                              ("average_in_collective", ddp.ddp_config, True),
                              ("finalize_model_grads_func", ddp.config, None)):
        good = getattr(holder, name)
        setattr(holder, name, bad)
        try:
            errors[name] = error_of(ddp)
        finally:
            setattr(holder, name, good)
    errors["after_restore"] = error_of(ddp)
    plain = build_gpt_model(fx.hf_config())  # wrapped by hand: megatron's defaults
    errors["plain_ddp"] = error_of(DistributedDataParallel(plain.config, DistributedDataParallelConfig(),
                                                           plain))
    errors["bare_model_forward_only"] = error_of(plain, forward_only=True)
    plain.config.calculate_per_token_loss = True
    errors["bare_model_per_token_forward_only"] = error_of(plain, forward_only=True, vocab_size=vocab_size)
    errors["bare_model"] = error_of(plain)
    return errors


def data_parallel_body(rank, world_size):
    """DP=2: rank r holds micro-batches 2r and 2r+1; two calls, one micro-batch per rank each."""
    from megatron_rpg.losses import RPGLoss
    from megatron_rpg.megatron.forward_backward import rl_forward_backward
    from megatron_rpg.megatron.models import build_gpt_model
    from megatron_rpg.megatron.optimizer_setup import setup_model_and_optimizer
    from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel

    torch.set_num_threads(1)
    initialize_parallel(1, 1, seed=7)
    gpt = build_gpt_model(fx.hf_config())
    fx.load_full_weights(gpt, fx.full_megatron_weights(gpt.vocab_size))
    model, _ = setup_model_and_optimizer([gpt], lr=1e-3)
    micro_batches = fx.global_micro_batches(fx.hf_config().vocab_size)
    mine = micro_batches[2 * rank:2 * rank + 2]
    total = int(fx.concatenate(micro_batches)["loss_mask"].sum())
    config = RPGLoss(**LOSS_CONFIG, aggregation="token-mean")
    out = dict(loss=0.0, grads=0.0, per_call_mean_grads=0.0, normalizers=[], local_tokens=[])
    for micro_batch in mine:
        loss, metrics = rl_forward_backward(model, [micro_batch], config,
                                            num_global_tokens=total)
        out["loss"] += float(loss)
        out["grads"] = out["grads"] + _main_grads(model)
        out["normalizers"].append(metrics["normalizer"])
        out["local_tokens"].append(int(micro_batch["loss_mask"].sum()))
        rl_forward_backward(model, [micro_batch], config)  # each call's own token mean
        out["per_call_mean_grads"] = out["per_call_mean_grads"] + _main_grads(model)
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def single_rank():
    return run_on_ranks(single_rank_body, world_size=1)[0]


@pytest.fixture(scope="module")
def data_parallel():
    return run_on_ranks(data_parallel_body, world_size=2)


def test_compute_logprobs_equals_float64_hf_reference(single_rank):
    assert single_rank["logp_spread"] > 0.1
    assert single_rank["logp_err"] < 2e-5
    assert single_rank["entropy_err"] < 2e-5


def test_padded_vocab_ids_are_excluded_from_the_softmax_by_default(single_rank):
    assert single_rank["default_vocab_equal"]
    assert single_rank["padded_vocab_logp_err"] > 1e-3  # 6 zero logits would leak probability mass


def test_thd_packing_is_refused_with_the_reason(single_rank):
    assert "Transformer Engine" in single_rank["thd"] and "padding" in single_rank["thd"]


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_loss_and_gradient_over_micro_batches_equal_the_global_mean(single_rank, aggregation):
    result = single_rank[aggregation]
    assert result["loss"] == pytest.approx(result["direct"], rel=1e-6, abs=1e-9)
    assert result["loss"] == pytest.approx(result["whole_loss"], rel=1e-6, abs=1e-9)
    assert result["grad_norm"] > 1e-4
    assert result["grad_rel"] < 1e-6
    # the test data tells the exact global mean from the public code's per-micro-batch mean
    assert abs(result["mean_of_micro_batch_means"] - result["loss"]) > 1e-3 * abs(result["loss"])


def test_token_mean_normalizer_is_the_global_token_count(single_rank):
    expected = sum(sum(lengths) for lengths in fx.RESPONSE_LENGTHS)
    assert single_rank["token-mean"]["normalizer"] == expected == single_rank["token-mean"]["num_tokens"]
    non_empty = sum(length > 0 for lengths in fx.RESPONSE_LENGTHS for length in lengths)
    assert non_empty < fx.MICRO_BATCH_SIZE * fx.NUM_MICRO_BATCHES  # an all-padding row is not counted
    for aggregation in ("seq-mean-token-mean", "seq-mean-token-sum"):
        assert single_rank[aggregation]["normalizer"] == non_empty


def test_num_global_tokens_splits_one_global_batch_over_calls_exactly(single_rank):
    assert single_rank["global_tokens_grad_rel"] < 1e-6
    assert single_rank["global_tokens_loss"] == pytest.approx(single_rank["full_loss"], rel=1e-6)


def test_forward_only_gives_the_loss_without_touching_gradients(single_rank):
    assert single_rank["forward_only_loss"] == pytest.approx(single_rank["full_loss"], rel=1e-6)
    assert single_rank["forward_only_grads_untouched"]


def test_bad_inputs_raise_value_errors_naming_the_problem(single_rank):
    errors = single_rank["errors"]
    assert all(message.startswith("ValueError") for message in errors.values()), errors
    assert "loss_mask" in errors["mask_at_position_0"]
    assert "old_logp" in errors["old_logp_shape"]
    assert "advantages" in errors["advantages_shape"]
    assert "old_logp" in errors["missing_key"]
    assert "engine_logp" in errors["engine_logp_shape"]
    assert "loss must be a PolicyLoss" in errors["dict_as_loss"]
    assert "num_global_tokens" in errors["zero_global_tokens"]


def test_num_global_tokens_at_data_parallel_two_equals_the_single_process_global_token_mean(
        single_rank, data_parallel):
    full_grads, full_loss = single_rank["full_grads"], single_rank["full_loss"]
    total = sum(sum(lengths) for lengths in fx.RESPONSE_LENGTHS)
    # the ranks' token counts differ per call (2 vs 15, 9 vs 15): a per-call mean is not the global one
    assert data_parallel[0]["local_tokens"] != data_parallel[1]["local_tokens"]
    for r in data_parallel:
        assert r["normalizers"] == [total, total]
        assert r["loss"] == pytest.approx(full_loss, rel=1e-6)
        assert _relative(r["grads"], full_grads) < 1e-6
        assert _relative(r["per_call_mean_grads"], full_grads) > 1e-2
    assert torch.equal(data_parallel[0]["grads"], data_parallel[1]["grads"])  # all-reduced over DP


def test_a_model_without_the_global_mean_settings_is_refused_naming_the_field(single_rank):
    errors = single_rank["setup_errors"]
    hint = "megatron_rpg.megatron.optimizer_setup.setup_model_and_optimizer"
    assert "calculate_per_token_loss=False" in errors["calculate_per_token_loss"]
    assert "average_in_collective=True" in errors["average_in_collective"]
    assert "finalize_model_grads_func=None" in errors["finalize_model_grads_func"]
    for name in ("calculate_per_token_loss", "average_in_collective", "finalize_model_grads_func"):
        assert hint in errors[name]
    assert errors["after_restore"] == "no error"
    assert "calculate_per_token_loss=False" in errors["plain_ddp"]  # megatron's default
    assert "calculate_per_token_loss=False" in errors["bare_model_forward_only"]
    assert errors["bare_model_per_token_forward_only"] == "no error"  # no gradients: no DDP needed
    assert "not wrapped in megatron's DistributedDataParallel" in errors["bare_model"]
