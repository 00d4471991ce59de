"""The megatron GPTModel built from an HF config computes the HF model's logits, and the config mapping
and error paths behave as documented.

Parity: tiny random HF models (tests/tiny_models.py; every family plus tied Llama 3 and Qwen3),
weights moved with the checkpoint table (`megatron_rpg.checkpoint.hf_mapping.hf_to_megatron`),
float32, at TP=1 and TP=2: megatron's logits equal HF's within tests/float_bounds.py's bound (4×
the HF float32 logits' rounding, measured against the same HF model in float64).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from filelock import FileLock

from megatron_rpg.megatron.models import (
    FP8_FORMATS,
    FP8_RECIPES,
    build_gpt_model,
    padded_vocab_size,
    rope_settings,
    transformer_config_from_hf,
)
from tests.distributed.harness import run_on_ranks
from tests.float_bounds import assert_float32_equal, float32_bound, ratio_to_bound_per_row
from tests.tiny_models import FAMILIES, TIED_VARIANTS, TINY_VOCAB_SIZE, tiny_hf_config, tiny_hf_model

PARITY_FAMILIES = FAMILIES + TIED_VARIANTS
SEQ = 24  # below max positions 64, above llama3's original_max_position_embeddings 32 / 2


def _tokens():
    tokens = torch.randint(0, TINY_VOCAB_SIZE, (2, SEQ), generator=torch.Generator().manual_seed(0))
    return tokens, torch.arange(SEQ).expand(2, SEQ)


def _load_hf_weights(model, hf_model):
    from megatron_rpg.checkpoint.hf_mapping import hf_to_megatron
    padded = padded_vocab_size(hf_model.config.vocab_size, 1)
    tensors = dict(hf_to_megatron(hf_model.config, hf_model.state_dict(), padded_vocab_size=padded))
    model.load_state_dict(tensors, strict=False)
    tensor_keys = {k for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    assert tensor_keys == set(tensors), "megatron state dict and hf_to_megatron names differ"


# ---------------------------------------------------------------- worker body
def _body_parity(rank, world_size, ckpt_root):
    """TP=1 (DP=2): HF weights -> megatron, logits vs HF; then via a dist checkpoint to TP=2."""
    import os

    from megatron.core import dist_checkpointing
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel

    tokens, positions = _tokens()
    tp1, tp2 = {}, {}
    initialize_parallel()
    for family in PARITY_FAMILIES:
        hf_model = tiny_hf_model(family)
        model = build_gpt_model(hf_model.config).eval()
        _load_hf_weights(model, hf_model)
        with torch.no_grad():
            logits = model(tokens, positions, None)
            expected = hf_model(tokens).logits
            inv_freq = hf_model.model.rotary_emb.inv_freq.clone()
            expected64 = hf_model.double()(tokens).logits  # the float32 reference's own rounding
        tp1[family] = dict(
            logits=logits[..., :TINY_VOCAB_SIZE], expected=expected, expected64=expected64,
            padded_width=logits.shape[-1],
            state_keys=[k for k in model.state_dict() if ".layers.1." not in k],
            inv_freq=model.rotary_pos_emb.inv_freq, hf_inv_freq=inv_freq,
            tied=model.share_embeddings_and_output_weights)
        os.makedirs(f"{ckpt_root}/{family}", exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), f"{ckpt_root}/{family}")
    destroy_parallel()

    initialize_parallel(tensor_model_parallel_size=2)
    for family in PARITY_FAMILIES:
        model = build_gpt_model(tiny_hf_config(family)).eval()
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), f"{ckpt_root}/{family}"))
        with torch.no_grad():
            shard = model(tokens, positions, None)
            logits = gather_from_tensor_model_parallel_region(shard)[..., :TINY_VOCAB_SIZE]
        tp2[family] = dict(shard_width=shard.shape[-1], logits=logits)
    destroy_parallel()
    return dict(tp1=tp1, tp2=tp2)


# ---------------------------------------------------------------- parity
@pytest.fixture(scope="module")
def parity(tmp_path_factory, worker_id):
    """Per-rank results of one 2-rank spawn; computed once per test run, also under pytest-xdist."""
    if worker_id == "master":  # not distributed over xdist workers
        return run_on_ranks(_body_parity, args=(str(tmp_path_factory.mktemp("ckpt")),))
    shared = tmp_path_factory.getbasetemp().parent  # fresh per run, shared by this run's workers
    results = shared / "megatron_models_parity.pt"
    with FileLock(str(results) + ".lock"):
        if not results.exists():
            ckpt_root = str(tmp_path_factory.mktemp("ckpt"))
            torch.save(run_on_ranks(_body_parity, args=(ckpt_root,)), results)
    return torch.load(results)


def _assert_logits_equal(got, want, want64, family):
    """tests/float_bounds.py's rule per token position (each position's vocabulary logits)."""
    ratio = ratio_to_bound_per_row(got, want, want64)
    print(f"{family}: largest ‖megatron − hf‖ / bound over positions {ratio:.3g}")
    assert ratio <= 1.0, f"{family}: logits differ by {ratio:.3g}× the float32 bound at some position"


@pytest.mark.distributed
@pytest.mark.parametrize("family", PARITY_FAMILIES)
def test_megatron_logits_equal_hf_logits_at_tp1(parity, family):
    r = parity[0]["tp1"][family]
    assert r["padded_width"] == 256  # 250 padded to a multiple of 128
    assert r["tied"] == family.endswith("-tied")
    _assert_logits_equal(r["logits"], r["expected"], r["expected64"], family)


@pytest.mark.distributed
@pytest.mark.parametrize("family", PARITY_FAMILIES)
def test_tensor_parallel_two_ranks_logits_equal_hf_logits(parity, family):
    expected = parity[0]["tp1"][family]["expected"]
    for rank_results in parity:
        r = rank_results["tp2"][family]
        assert r["shard_width"] == 128  # each rank holds half the padded vocabulary
        _assert_logits_equal(r["logits"], expected, parity[0]["tp1"][family]["expected64"], family)


@pytest.mark.distributed
def test_llama3_rope_scaling_uses_the_config_parameters_not_megatron_defaults(parity):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    r = parity[0]["tp1"]["llama3"]
    plain = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, use_cpu_initialization=True)
    # HF's float32 frequencies against the same llama3 formula in float64 (the tiny config's values)
    scaling = rope_settings(tiny_hf_config("llama3"))
    base64 = 1.0 / scaling["rotary_base"] ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    hf64 = plain._apply_scaling(base64, **scaling["scaling"])
    assert_float32_equal(r["inv_freq"], r["hf_inv_freq"], float32_bound(r["hf_inv_freq"], hf64),
                         "inv_freq")
    megatron_default = plain._apply_scaling(plain.inv_freq, factor=8.0)  # original_max 8192
    # the tiny config puts frequencies in all three bands: kept, smoothed and divided by `factor`
    assert r["inv_freq"][0] == plain.inv_freq[0]
    assert 1 / 8 < r["inv_freq"][1] / plain.inv_freq[1] < 1
    torch.testing.assert_close(r["inv_freq"][2:], plain.inv_freq[2:] / 8)
    assert not torch.allclose(r["inv_freq"], megatron_default)


@pytest.mark.distributed
def test_state_dict_names_per_family(parity):
    layer = "decoder.layers.0."
    for family, r in parity[0]["tp1"].items():
        names = {k for k in r["state_keys"] if not k.endswith("_extra_state")}
        assert (layer + "self_attention.linear_qkv.bias" in names) == family.startswith("qwen2")
        assert (layer + "self_attention.q_layernorm.weight" in names) == family.startswith("qwen3")
        assert ("output_layer.weight" in names) == (not family.endswith("-tied"))
        assert {"embedding.word_embeddings.weight", layer + "input_layernorm.weight",
                layer + "self_attention.linear_qkv.weight", layer + "self_attention.linear_proj.weight",
                layer + "pre_mlp_layernorm.weight", layer + "mlp.linear_fc1.weight",
                layer + "mlp.linear_fc2.weight", "decoder.final_layernorm.weight"} <= names


# ---------------------------------------------------------------- config mapping
@pytest.mark.parametrize("family", FAMILIES)
def test_transformer_config_maps_every_field(family):
    hf = tiny_hf_config(family)
    c = transformer_config_from_hf(hf)
    assert (c.num_layers, c.hidden_size, c.ffn_hidden_size) == (2, 64, 128)
    assert (c.num_attention_heads, c.num_query_groups, c.kv_channels) == (4, 2, 16)
    assert c.normalization == "RMSNorm" and c.layernorm_epsilon == hf.rms_norm_eps
    assert c.gated_linear_unit and c.activation_func is F.silu and not c.add_bias_linear
    assert c.add_qkv_bias == family.startswith("qwen2")
    assert c.qk_layernorm == (family == "qwen3")
    assert c.hidden_dropout == 0.0 and c.attention_dropout == 0.0
    assert c.init_method_std == hf.initializer_range
    assert c.params_dtype == c.pipeline_dtype == torch.float32 and not c.bf16
    assert c.use_cpu_initialization  # build_gpt_model sets it from the training device
    assert c.transformer_impl == "local" and c.fp8 is None
    assert c.tensor_model_parallel_size == 1 and not c.calculate_per_token_loss


def test_transformer_config_reads_head_dim_dtype_overrides_and_fp8_fields():
    c = transformer_config_from_hf(tiny_hf_config("qwen3", head_dim=32), params_dtype=torch.bfloat16,
                                   calculate_per_token_loss=True, tensor_model_parallel_size=2)
    assert c.kv_channels == 32 and c.bf16 and c.pipeline_dtype == torch.bfloat16
    assert c.calculate_per_token_loss and c.tensor_model_parallel_size == 2
    for fmt in FP8_FORMATS:
        for recipe in FP8_RECIPES:
            c = transformer_config_from_hf(tiny_hf_config("llama3"), fp8=fmt, fp8_recipe=recipe, use_te=True)
            assert (c.fp8, c.fp8_recipe, c.transformer_impl) == (fmt, recipe, "transformer_engine")
    assert transformer_config_from_hf(tiny_hf_config("llama3"), fp8="hybrid").fp8_recipe == "delayed"


def test_rope_settings_read_theta_and_llama3_scaling():
    assert rope_settings(tiny_hf_config("qwen3")) == {"rotary_base": 1e6, "scaling": None}
    scaling = rope_settings(tiny_hf_config("llama3"))["scaling"]
    assert scaling == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 32}
    legacy = {"model_type": "llama", "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **scaling}}
    assert rope_settings(legacy) == {"rotary_base": 5e5, "scaling": scaling}  # pre-5.0 config.json


def test_padded_vocab_size_is_the_smallest_aligned_size():
    for tp in (1, 2, 4, 8):
        for multiple in (1, 64, 128):
            for vocab in (1, 127, 128, 129, 250, 151_936, 151_643):
                padded = padded_vocab_size(vocab, tp, multiple)
                assert padded % (multiple * tp) == 0 and vocab <= padded < vocab + multiple * tp
    assert padded_vocab_size(TINY_VOCAB_SIZE, 2) == 256


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_padded_vocab_size_rejects_non_positive_integers(bad):
    with pytest.raises(ValueError, match="tensor_model_parallel_size must be a positive integer"):
        padded_vocab_size(250, bad)


def test_unsupported_architectures_and_options_are_rejected_by_name():
    with pytest.raises(ValueError, match=r"model_type='gpt2' is not supported; supported model types: "
                                         r"\['qwen2', 'llama', 'qwen3'\]"):
        transformer_config_from_hf({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="attention_bias=True"):
        transformer_config_from_hf(tiny_hf_config("llama3", attention_bias=True))
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        transformer_config_from_hf(tiny_hf_config("qwen2", rope_parameters={
            "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}))
    with pytest.raises(ValueError, match="unknown TransformerConfig fields in overrides: \\['hiden_size'\\]"):
        transformer_config_from_hf(tiny_hf_config("qwen2"), hiden_size=3)


@pytest.mark.parametrize("tp", [3, 4])
def test_tensor_parallel_size_must_divide_heads_and_kv_heads(tp):
    with pytest.raises(ValueError, match=f"tensor_model_parallel_size={tp} must divide "
                                         f"num_attention_heads=4 and num_key_value_heads=2"):
        transformer_config_from_hf(tiny_hf_config("llama3"), tensor_model_parallel_size=tp)


def test_fp8_values_are_checked_against_the_accepted_flags():
    with pytest.raises(ValueError, match="fp8='e5m2' is not supported"):
        transformer_config_from_hf(tiny_hf_config("qwen2"), fp8="e5m2")
    with pytest.raises(ValueError, match="fp8_recipe='custom' is not supported"):
        transformer_config_from_hf(tiny_hf_config("qwen2"), fp8="e4m3", fp8_recipe="custom")
    with pytest.raises(ValueError, match="fp8_recipe='mxfp8' was given without fp8"):
        transformer_config_from_hf(tiny_hf_config("qwen2"), fp8_recipe="mxfp8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")
@pytest.mark.parametrize("request_te", [dict(use_te=True), dict(use_te=True, fp8="hybrid"),
                                        dict(use_te=True, fp8="e4m3", fp8_recipe="blockwise")])
def test_transformer_engine_requests_fail_before_any_model_is_built_on_cpu(request_te):
    # No parallel state exists in this process: the TE/GPU check must fire before anything else.
    flag = "use_te=True" if "fp8" not in request_te else f"fp8={request_te['fp8']!r}"
    with pytest.raises(RuntimeError, match=rf"{flag}.*needs a CUDA GPU with Transformer Engine"):
        build_gpt_model(tiny_hf_config("llama3"), **request_te)


def test_fp8_without_transformer_engine_layers_is_rejected():
    with pytest.raises(ValueError, match="fp8='e4m3' .* needs use_te=True"):
        build_gpt_model(tiny_hf_config("qwen2"), fp8="e4m3")


# ---------------------------------------------------------------- GPU only (Transformer Engine)
# TE logits vs the float32 HF logits of the same weights. Sized from CPU runs of this tiny qwen3
# (64 positions): the model run in bf16 gives relative RMS error 0.018, max error 0.026 of the
# largest logit, argmax agreement 0.97; e4m3 GEMMs simulated (weights and inputs of every decoder
# linear quantised, per-tensor scale 1 or amax) 0.16-0.17, 0.28-0.34, 0.78-0.80; other-seed weights
# 1.41, 1.39-1.5, 0.0-0.02 (a decoder MLP zeroed: 0.77, 0.98, 0.30). Bounds leave ~2-3x headroom.
LOGIT_TOLERANCES = {"bf16": dict(rel_rms=0.06, max_rel=0.1, min_argmax_agreement=0.85),
                    "fp8": dict(rel_rms=0.4, max_rel=0.6, min_argmax_agreement=0.5)}


def logit_mismatches(logits: torch.Tensor, reference: torch.Tensor, *, rel_rms: float, max_rel: float,
                     min_argmax_agreement: float) -> list[str]:
    """Why `logits` [..., V] are not `reference`'s up to low-precision error ([] when they are):
    ‖Δ‖/‖ref‖ ≤ rel_rms, max|Δ|/max|ref| ≤ max_rel, argmax equal at ≥ min_argmax_agreement of the
    positions."""
    assert logits.shape == reference.shape, (logits.shape, reference.shape)
    logits, reference = logits.double(), reference.double()
    diff = logits - reference
    found = {"rel_rms": float(diff.norm() / reference.norm()),
             "max_rel": float(diff.abs().max() / reference.abs().max()),
             "argmax_agreement": float((logits.argmax(-1) == reference.argmax(-1)).double().mean())}
    reasons = [f"{name} {found[name]:.3g} > {bound}" for name, bound in
               (("rel_rms", rel_rms), ("max_rel", max_rel)) if not found[name] <= bound]
    if not found["argmax_agreement"] >= min_argmax_agreement:
        reasons.append(f"argmax_agreement {found['argmax_agreement']:.3g} < {min_argmax_agreement}")
    return reasons


def _te_tokens() -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB_SIZE, (2, 32), generator=torch.Generator().manual_seed(0))


def _te_model_logits(hf_model, fp8, fp8_recipe, tokens):
    """A TE GPTModel (bf16 params) with `hf_model`'s weights: (loaded-key report, logits [b, s, V]
    as float32 with grad, the model)."""
    from megatron_rpg.checkpoint.hf_mapping import hf_to_megatron
    model = build_gpt_model(hf_model.config, use_te=True, fp8=fp8, fp8_recipe=fp8_recipe,
                            params_dtype=torch.bfloat16).cuda()
    # TE fuses the pre-attention/pre-MLP norms into the following linear layer.
    renames = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
               "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
    tensors = {}
    for name, tensor in hf_to_megatron(hf_model.config, hf_model.state_dict(), padded_vocab_size=256):
        for local, te in renames.items():
            name = name.replace(local, te)
        tensors[name] = tensor.to(torch.bfloat16)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    positions = torch.arange(tokens.shape[1], device="cuda").expand_as(tokens)
    # padded vocab columns (250..255) hold logit 0, not -inf: slice them off
    logits = model(tokens, positions, None)[..., :TINY_VOCAB_SIZE].float()
    keys = dict(missing=[k for k in missing if not k.endswith("_extra_state")], unexpected=unexpected)
    return keys, logits, model


def _body_te_training_step(rank, world_size, fp8, fp8_recipe):
    from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel
    initialize_parallel()
    tokens = _te_tokens()
    hf_model = tiny_hf_model("qwen3", num_hidden_layers=2)
    keys, logits, model = _te_model_logits(hf_model, fp8, fp8_recipe, tokens.cuda())
    # one training step's backward: next-token cross-entropy (position t predicts token t + 1)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens.cuda()[:, 1:].flatten())
    loss.backward()
    grads_finite = all(torch.isfinite(p.grad).all().item() for p in model.parameters() if p.grad is not None)
    # negative control: other weights through the same TE path must fail the same logit check
    _, wrong_logits, _ = _te_model_logits(tiny_hf_model("qwen3", seed=1, num_hidden_layers=2), fp8,
                                          fp8_recipe, tokens.cuda())
    with torch.no_grad():
        hf_logits = hf_model(tokens).logits
    destroy_parallel()
    return dict(**keys, grads_finite=grads_finite, loss=loss.item(), logits=logits.detach().cpu(),
                wrong_logits=wrong_logits.detach().cpu(), hf_logits=hf_logits)


@pytest.mark.requires_gpu
@pytest.mark.parametrize("fp8, fp8_recipe", [(None, None), ("hybrid", "delayed"), ("e4m3", "tensorwise")])
def test_transformer_engine_model_trains_in_bf16_and_fp8_with_the_hf_logits(fp8, fp8_recipe):
    (r,) = run_on_ranks(_body_te_training_step, world_size=1, args=(fp8, fp8_recipe))
    assert r["missing"] == [] and r["unexpected"] == []
    assert r["grads_finite"] and torch.isfinite(torch.tensor(r["loss"]))
    tolerance = LOGIT_TOLERANCES["bf16" if fp8 is None else "fp8"]
    assert logit_mismatches(r["logits"], r["hf_logits"], **tolerance) == []
    assert logit_mismatches(r["wrong_logits"], r["hf_logits"], **tolerance) != []


def _fp8_quantised(x: torch.Tensor) -> torch.Tensor:
    """e4m3 round trip with a per-tensor amax scale (what an FP8 GEMM does to each operand)."""
    scale = 448.0 / x.abs().max().clamp_min(1e-12)
    return (x.float() * scale).to(torch.float8_e4m3fn).float().div(scale).to(x.dtype)


def _hf_logits_with_fp8_linears(tokens) -> torch.Tensor:
    """The tiny qwen3 in bf16 with every decoder linear's weight and input quantised to e4m3."""
    model = tiny_hf_model("qwen3", num_hidden_layers=2).to(torch.bfloat16)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                module.weight.copy_(_fp8_quantised(module.weight))
                module.register_forward_pre_hook(lambda _, args: (_fp8_quantised(args[0]),))
        return model(tokens).logits.float()


def test_logit_check_accepts_bf16_and_fp8_sized_errors_and_rejects_other_weights():
    """The GPU test's check, on CPU: bf16-rounded logits, the model run in bf16 and simulated FP8
    GEMMs pass their tolerance; another seed's logits fail both, naming every metric."""
    tokens = _te_tokens()
    with torch.no_grad():
        reference = tiny_hf_model("qwen3", num_hidden_layers=2)(tokens).logits
        in_bf16 = tiny_hf_model("qwen3", num_hidden_layers=2).to(torch.bfloat16)(tokens).logits.float()
        other_seed = tiny_hf_model("qwen3", seed=1, num_hidden_layers=2)(tokens).logits
    in_fp8 = _hf_logits_with_fp8_linears(tokens)
    bf16, fp8 = LOGIT_TOLERANCES["bf16"], LOGIT_TOLERANCES["fp8"]
    assert logit_mismatches(reference.bfloat16().float(), reference, **bf16) == []
    assert logit_mismatches(in_bf16, reference, **bf16) == []
    assert logit_mismatches(in_fp8, reference, **fp8) == []
    assert logit_mismatches(in_fp8, reference, **bf16) != []  # the bf16 bound is tighter than FP8 error
    for tolerance in (bf16, fp8):
        reasons = logit_mismatches(other_seed, reference, **tolerance)
        assert [r.split()[0] for r in reasons] == ["rel_rms", "max_rel", "argmax_agreement"], reasons
