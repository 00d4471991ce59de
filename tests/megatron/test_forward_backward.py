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
"Equals": losses are run a second time with a float64 model and compared there at 1e-12 of the
per-token terms' size; every float32 comparison is bounded by tests/float_bounds.py's float32_bound
(4× the float32 reference's own rounding, measured against the same reference in float64).
"""
from __future__ import annotations

import functools

import pytest
import torch

from tests.distributed.harness import run_on_ranks
from tests.float_bounds import EPS32, assert_float32_equal, distance, float32_bound, norm
from tests.megatron import rl_step_fixtures as fx

pytestmark = pytest.mark.distributed

LOSS_CONFIG = dict(divergence="urkl", style="differentiable", beta=0.1)  # RPGLoss fields, no clip
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


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


def _build(dtype: torch.dtype = torch.float32):
    """The tiny model with the shared weights in `dtype`, wrapped by setup_model_and_optimizer
    (float64: grads reduced in float64 and no clipping, which megatron allows on float32 grads only)."""
    from megatron_rpg.megatron.models import build_gpt_model
    from megatron_rpg.megatron.optimizer_setup import setup_model_and_optimizer
    gpt = build_gpt_model(fx.hf_config(), params_dtype=dtype, pipeline_dtype=dtype)
    full = fx.full_megatron_weights(gpt.vocab_size)
    fx.load_full_weights(gpt, {name: tensor.to(dtype) for name, tensor in full.items()})
    if dtype == torch.float64:
        model, _ = setup_model_and_optimizer([gpt], lr=1e-3, clip_grad=0.0, grad_reduce_in_fp32=False)
    else:
        model, _ = setup_model_and_optimizer([gpt], lr=1e-3)
    return gpt, model


def _token_scale(logp, batch, aggregation="token-mean") -> float:
    """The size of the per-token loss terms (the floor's scale in tests/float_bounds.py): the terms
    are ~ℓ·w·A through w = exp(ℓ − ℓ_old) (β·KL terms smaller), summed over up to 9 tokens per
    sequence for seq-mean-token-sum."""
    mask = batch["loss_mask"].bool()
    logp = logp.double()
    ratio_max = float((logp - batch["old_logp"].double())[mask].exp().max())
    size = max(float(logp[mask].abs().max()), float(batch["old_logp"][mask].abs().max()),
               float(batch["ref_logp"][mask].abs().max()))
    terms_per_value = int(batch["loss_mask"].sum(-1).max()) if aggregation == "seq-mean-token-sum" else 1
    return size * max(1.0, ratio_max) * max(1.0, float(batch["advantages"].abs().max())) * terms_per_value


def _compared_results(model, micro_batches, vocab_size, direct_logp=None) -> dict:
    """Every value the equality claims compare, from `model` in its own dtype: run in float32 (the
    claims) and in float64 (the same claims at float64 rounding, and the float32 bounds).
    direct_logp: the log-probs `rpg_loss` is evaluated on (default: compute_logprobs', which are
    float32 by design, so the float64 run passes `fx.model_logprobs`)."""
    from megatron_rpg.losses import RPGLoss, rpg_loss
    from megatron_rpg.megatron import forward_backward
    compute_logprobs = functools.partial(forward_backward.compute_logprobs, vocab_size=vocab_size)
    rl_forward_backward = functools.partial(forward_backward.rl_forward_backward, vocab_size=vocab_size)
    whole = fx.concatenate(micro_batches)
    logps, entropies = compute_logprobs(model, micro_batches, with_entropy=True)
    logp_whole = torch.cat(logps) if direct_logp is None else direct_logp
    out = dict(logp=torch.cat(logps), entropy=torch.cat(entropies))
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
            split_grads=split_grads, whole_grads=_main_grads(model),
            token_scale=_token_scale(logp_whole, whole, aggregation),
            mean_of_micro_batch_means=sum(per_micro_batch) / len(per_micro_batch),
            normalizer=metrics["normalizer"], num_tokens=metrics["num_tokens"])

    config = RPGLoss(**LOSS_CONFIG, aggregation="token-mean")
    rl_forward_backward(model, micro_batches, config)
    out["full_grads"] = _main_grads(model)
    total = int(whole["loss_mask"].sum())
    first, _ = rl_forward_backward(model, micro_batches[:1], config, num_global_tokens=total)
    first_grads = _main_grads(model)
    second, _ = rl_forward_backward(model, micro_batches[1:], config, num_global_tokens=total)
    out["global_tokens_grads"] = first_grads + _main_grads(model)
    out["global_tokens_loss"] = float(first) + float(second)
    out["full_loss"] = out["token-mean"]["loss"]

    before = _main_grads(model)
    forward_loss, _ = rl_forward_backward(model, micro_batches, config, forward_only=True)
    out["forward_only_loss"] = float(forward_loss)
    out["forward_only_grads_untouched"] = bool(torch.equal(before, _main_grads(model)))
    return out


def single_rank_body(rank, world_size):
    from megatron_rpg.losses import RPGLoss
    from megatron_rpg.megatron import forward_backward
    from megatron_rpg.megatron.parallel import initialize_parallel

    torch.set_num_threads(1)
    initialize_parallel(1, 1, seed=7)
    gpt, model = _build()
    vocab_size = fx.hf_config().vocab_size  # 250; the model's vocab is padded to 256
    assert gpt.vocab_size > vocab_size
    micro_batches = fx.global_micro_batches(vocab_size)
    whole = fx.concatenate(micro_batches)
    out = _compared_results(model, micro_batches, vocab_size)
    out["hf64"] = fx.hf_logprobs(whole["tokens"], dtype=torch.float64)
    gpt64, model64 = _build(torch.float64)
    out["model64"] = fx.model_logprobs(gpt64, whole["tokens"], vocab_size)
    out["float64"] = _compared_results(model64, fx.as_float64(micro_batches), vocab_size,
                                       direct_logp=out["model64"][0])
    out["hf32"] = fx.hf_logprobs(whole["tokens"], dtype=torch.float32)
    out["logp_spread"] = float(out["hf64"][0][:, 1:].std())  # the comparison is not between constants

    # padded ids excluded from the softmax (the HF comparison fails without it); the model's
    # `unpadded_vocab_size` is the default; counting the padded ids would be wrong
    logps = forward_backward.compute_logprobs(model, micro_batches, vocab_size=vocab_size)
    out["default_vocab_equal"] = torch.equal(
        forward_backward.compute_logprobs(model, micro_batches[:1])[0], logps[0])
    with_padding = forward_backward.compute_logprobs(model, micro_batches, vocab_size=gpt.vocab_size)
    out["padded_vocab_logp_err"] = float((torch.cat(with_padding).double() - out["hf64"][0]).abs().max())
    try:
        forward_backward.compute_logprobs(model, micro_batches, packing="thd", vocab_size=vocab_size)
        out["thd"] = "no error"
    except NotImplementedError as error:
        out["thd"] = str(error)

    config = RPGLoss(**LOSS_CONFIG, aggregation="token-mean")
    out["errors"] = {}
    for name, (batches, overrides) in _bad_inputs(micro_batches).items():
        loss = overrides.pop("loss", config)
        try:
            forward_backward.rl_forward_backward(model, batches, loss, vocab_size=vocab_size, **overrides)
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
    """DP=2: rank r holds micro-batches 2r and 2r+1; two calls, one micro-batch per rank each; in
    float32 (the claim) and in float64 (the same claim at float64 rounding)."""
    from megatron_rpg.losses import RPGLoss
    from megatron_rpg.megatron.forward_backward import rl_forward_backward
    from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel

    torch.set_num_threads(1)
    initialize_parallel(1, 1, seed=7)
    micro_batches = fx.global_micro_batches(fx.hf_config().vocab_size)
    total = int(fx.concatenate(micro_batches)["loss_mask"].sum())
    config = RPGLoss(**LOSS_CONFIG, aggregation="token-mean")
    results = {}
    for dtype in (torch.float32, torch.float64):
        _, model = _build(dtype)
        mine = micro_batches[2 * rank:2 * rank + 2]
        mine = fx.as_float64(mine) if dtype == torch.float64 else mine
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
        results[str(dtype)] = out
    destroy_parallel()
    return results


@pytest.fixture(scope="module")
def single_rank():
    return run_on_ranks(single_rank_body, world_size=1)[0]


@pytest.fixture(scope="module")
def data_parallel():
    return run_on_ranks(data_parallel_body, world_size=2)


# Float64 claims of exact equality (losses): float64 rounding of these sums is ~1e-16 relative; 1e-12
# leaves 10⁴× room while a float32-sized error (≥ 1e-8) or a wrong mean (≥ 1e-3) fails. Megatron's
# float64 gradients split vs whole differ by ~8e-9 relative (a float32 step inside megatron's backward
# or grad buffers, not located), so gradients are compared in float32 only, bounded by float32_bound.
FLOAT64_RELATIVE = 1e-12


def _assert_float64_equal(got, want, scale, name=""):
    assert distance(got, want) <= FLOAT64_RELATIVE * scale, (name, distance(got, want), scale)


def test_compute_logprobs_equals_hf_reference(single_rank):
    """float64 model: compute_logprobs (float32 by design) is the same model's plain float64
    log-softmax rounded to float32: within half a float32 ulp per entry, ‖·‖ ≤ EPS32/2·‖want‖;
    float32 model: megatron equals HF float32 within float32_bound of HF float32's own rounding
    (measured against HF float64)."""
    assert single_rank["logp_spread"] > 0.1
    for index, name in ((0, "logp"), (1, "entropy")):
        want32, want64 = single_rank["hf32"][index], single_rank["hf64"][index]
        plain64 = single_rank["model64"][index]
        assert distance(single_rank["float64"][name], plain64) <= (0.5 + 1e-6) * EPS32 * norm(plain64), name
        bound = float32_bound(want32, want64)
        print(f"{name}: float32 bound {bound:.3g}, ‖megatron − hf float32‖ "
              f"{distance(single_rank[name], want32):.3g}")
        assert_float32_equal(single_rank[name], want32, bound, name)


def test_padded_vocab_ids_are_excluded_from_the_softmax_by_default(single_rank):
    assert single_rank["default_vocab_equal"]
    assert single_rank["padded_vocab_logp_err"] > 1e-3  # 6 zero logits would leak probability mass


def test_thd_packing_is_refused_with_the_reason(single_rank):
    assert "Transformer Engine" in single_rank["thd"] and "padding" in single_rank["thd"]


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_loss_and_gradient_over_micro_batches_equal_the_global_mean(single_rank, aggregation):
    result, result64 = single_rank[aggregation], single_rank["float64"][aggregation]
    scale = result64["token_scale"]
    # exact equality, at float64 rounding
    _assert_float64_equal(result64["loss"], result64["direct"], scale, "loss vs rpg_loss")
    _assert_float64_equal(result64["loss"], result64["whole_loss"], scale, "loss vs one micro-batch")
    # float32: each reference's own rounding, measured against its float64 run
    assert_float32_equal(result["loss"], result["direct"],
                         float32_bound(result["direct"], result64["direct"], scale), "loss vs rpg_loss")
    assert_float32_equal(result["loss"], result["whole_loss"],
                         float32_bound(result["whole_loss"], result64["whole_loss"], scale),
                         "loss vs one micro-batch")
    grad_bound = float32_bound(result["whole_grads"], result64["whole_grads"])
    print(f"{aggregation}: grad bound {grad_bound:.3g}, "
          f"difference {distance(result['split_grads'], result['whole_grads']):.3g}")
    assert_float32_equal(result["split_grads"], result["whole_grads"], grad_bound, "gradient")
    assert norm(result["whole_grads"]) > 1e-4
    # the test data tells the exact global mean from the public code's per-micro-batch mean
    assert abs(result["mean_of_micro_batch_means"] - result["loss"]) > 1e-3 * abs(result["loss"])


def test_token_mean_normalizer_is_the_global_token_count(single_rank):
    expected = sum(sum(lengths) for lengths in fx.RESPONSE_LENGTHS)
    assert single_rank["token-mean"]["normalizer"] == expected == single_rank["token-mean"]["num_tokens"]
    non_empty = sum(length > 0 for lengths in fx.RESPONSE_LENGTHS for length in lengths)
    assert non_empty < fx.MICRO_BATCH_SIZE * fx.NUM_MICRO_BATCHES  # an all-padding row is not counted
    for aggregation in ("seq-mean-token-mean", "seq-mean-token-sum"):
        assert single_rank[aggregation]["normalizer"] == non_empty


def _full_loss_bound(single_rank) -> float:
    """float32_bound of the one-call token-mean loss (its float64 run measures its rounding)."""
    return float32_bound(single_rank["full_loss"], single_rank["float64"]["full_loss"],
                         single_rank["float64"]["token-mean"]["token_scale"])


def _full_grads_bound(single_rank) -> float:
    return float32_bound(single_rank["full_grads"], single_rank["float64"]["full_grads"])


def test_num_global_tokens_splits_one_global_batch_over_calls_exactly(single_rank):
    result64 = single_rank["float64"]
    _assert_float64_equal(result64["global_tokens_loss"], result64["full_loss"],
                          result64["token-mean"]["token_scale"])
    assert_float32_equal(single_rank["global_tokens_grads"], single_rank["full_grads"],
                         _full_grads_bound(single_rank), "gradient")
    assert_float32_equal(single_rank["global_tokens_loss"], single_rank["full_loss"],
                         _full_loss_bound(single_rank), "loss")


def test_forward_only_gives_the_loss_without_touching_gradients(single_rank):
    result64 = single_rank["float64"]
    _assert_float64_equal(result64["forward_only_loss"], result64["full_loss"],
                          result64["token-mean"]["token_scale"])
    assert_float32_equal(single_rank["forward_only_loss"], single_rank["full_loss"],
                         _full_loss_bound(single_rank), "loss")
    assert single_rank["forward_only_grads_untouched"]
    assert result64["forward_only_grads_untouched"]


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
    result64 = single_rank["float64"]
    total = sum(sum(lengths) for lengths in fx.RESPONSE_LENGTHS)
    loss_bound, grads_bound = _full_loss_bound(single_rank), _full_grads_bound(single_rank)
    for dtype, full_loss, full_grads in (
            (torch.float32, single_rank["full_loss"], single_rank["full_grads"]),
            (torch.float64, result64["full_loss"], result64["full_grads"])):
        ranks = [rank_results[str(dtype)] for rank_results in data_parallel]
        # the ranks' token counts differ per call (2 vs 15, 9 vs 15): a per-call mean is not the global one
        assert ranks[0]["local_tokens"] != ranks[1]["local_tokens"]
        for r in ranks:
            assert r["normalizers"] == [total, total]
            if dtype == torch.float64:
                _assert_float64_equal(r["loss"], full_loss, result64["token-mean"]["token_scale"])
            else:
                print(f"DP=2: loss bound {loss_bound:.3g} difference {abs(r['loss'] - full_loss):.3g}; "
                      f"grad bound {grads_bound:.3g} difference {distance(r['grads'], full_grads):.3g}")
                assert_float32_equal(r["loss"], full_loss, loss_bound, "loss")
                assert_float32_equal(r["grads"], full_grads, grads_bound, "gradient")
            # a per-call mean is far outside the bound
            assert distance(r["per_call_mean_grads"], full_grads) > 1e-2 * norm(full_grads)
        assert torch.equal(ranks[0]["grads"], ranks[1]["grads"])  # all-reduced over DP
    assert 100 * grads_bound < 1e-2 * norm(single_rank["full_grads"])


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
