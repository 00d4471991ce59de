"""Every private or internal megatron-core name megatron_rpg relies on, behind one small function each.

megatron-core's public API (parallel_state accessors, GPTModel, get_megatron_optimizer,
dist_checkpointing.save/load, ...) is used where it is needed. What is not public — a leading
underscore, an instance field set in `__init__`, the layout of an internal dict — is reached only
through this module, written against megatron-core 0.16.1. `INTERNALS` lists each of those names;
`missing_internals()` resolves them one by one against the installed megatron-core and names every
one an upgrade removed (tests/megatron/test_compat.py), so an upgrade fails there, by name, instead
of deep inside a training step.

megatron is imported inside the functions: importing this module stays cheap, and the checkpoint
tools that never build a model do not load megatron's optimizer stack.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import logging
import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Internal:
    """One megatron-core name we rely on.

    kind "attribute": `module.name` resolves with getattr, one dotted part at a time;
    kind "field": `name` is "Class.field", an instance field megatron assigns in a method
      (`self.field` occurs in the source of Class or one of its bases), not visible on the class;
      or a dataclass field without a class-level default;
    kind "key": `name` is "Class.key", "key" a string key of an internal dict built in Class's source."""
    module: str
    name: str
    kind: str
    why: str


_OPT = "megatron.core.optimizer.optimizer"
_DIST_OPT = "megatron.core.optimizer.distrib_optimizer"
_GRAD_SCALER = "megatron.core.optimizer.grad_scaler"
_BUFFER = "megatron.core.distributed.param_and_grad_buffer"
_RANDOM = "megatron.core.tensor_parallel.random"
_STATIC_CONTEXT = "megatron.core.inference.contexts.static_context"

INTERNALS = (
    Internal(_OPT, "ChainedOptimizer.chained_optimizers", "field", "sub_optimizers"),
    Internal(_OPT, "MixedPrecisionOptimizer.grad_scaler", "field", "dynamic_grad_scalers"),
    Internal(_GRAD_SCALER, "DynamicGradScaler", "attribute", "dynamic_grad_scalers"),
    Internal(_GRAD_SCALER, "DynamicGradScaler._hysteresis_tracker", "field", "back_off_loss_scale"),
    Internal(_GRAD_SCALER, "DynamicGradScaler.min_scale", "field", "loss_scale_at_minimum"),
    Internal(_OPT, "ChainedOptimizer.model_chunks", "field", "optimizer_model_chunks"),
    Internal(_DIST_OPT, "DistributedOptimizer.model_chunks", "field", "optimizer_model_chunks"),
    Internal(_DIST_OPT, "DistributedOptimizer.model_float16_groups", "field", "distributed_main_shards"),
    Internal(_DIST_OPT, "DistributedOptimizer.shard_fp32_from_float16_groups", "field",
             "distributed_main_shards"),
    Internal(_DIST_OPT, "DistributedOptimizer.model_fp32_groups", "field", "distributed_main_shards"),
    Internal(_DIST_OPT, "DistributedOptimizer.shard_fp32_groups", "field", "distributed_main_shards"),
    Internal(_DIST_OPT, "DistributedOptimizer._get_model_param_range_map", "attribute",
             "param_shard_range"),
    Internal(_OPT, "Float16OptimizerWithFloat16Params.float16_groups", "field", "float16_main_params"),
    Internal(_OPT, "Float16OptimizerWithFloat16Params.fp32_from_float16_groups", "field",
             "float16_main_params"),
    Internal(_OPT, "Float16OptimizerWithFloat16Params.fp32_from_fp32_groups", "field",
             "float16_main_params"),
    Internal(_OPT, "Float16OptimizerWithFloat16Params._copy_main_params_to_model_params", "attribute",
             "copy_main_params_to_model_params"),
    Internal(_DIST_OPT, "DistributedOptimizer._copy_main_params_to_model_params", "attribute",
             "copy_main_params_to_model_params"),
    Internal("megatron.core.optimizer.optimizer_config",
             "OptimizerConfig.use_precision_aware_optimizer_no_fp8_or_ds_fp8", "field",
             "uses_precision_aware_optimizer"),
    Internal(_DIST_OPT, "DistributedOptimizer.data_parallel_group", "field", "distributed_buckets"),
    Internal(_DIST_OPT, "DistributedOptimizer.data_parallel_group_idx", "field", "distributed_buckets"),
    Internal(_DIST_OPT, "DistributedOptimizer.distributed_optimizer_instance_id", "field",
             "distributed_buckets"),
    Internal(_DIST_OPT, "DistributedOptimizer.gbuf_ranges", "field", "distributed_buckets"),
    Internal(_DIST_OPT, "DistributedOptimizer.buffers", "field", "distributed_buckets"),
    Internal(_DIST_OPT, "DistributedOptimizer.param_map", "key", "distributed_buckets"),
    Internal(_DIST_OPT, "DistributedOptimizer.gbuf_local", "key", "distributed_buckets"),
    Internal(_BUFFER, "_ParamAndGradBuffer.buckets", "field", "distributed_buckets"),
    Internal(_BUFFER, "_ParamAndGradBucket.numel_unpadded", "field", "distributed_buckets"),
    Internal(_BUFFER, "_ParamAndGradBucket.grad_data", "field", "distributed_buckets"),
    Internal("megatron.core.dist_checkpointing.mapping", "ShardedTensor.flattened_range", "attribute",
             "flat_sharded_tensor"),
    Internal(_DIST_OPT, "DistributedOptimizer._init_optimizer_states_with_dummy_values", "attribute",
             "init_optimizer_states_for_loading"),
    Internal(_RANDOM, "_get_cuda_rng_state", "attribute", "set_tracker_rng_state_functions"),
    Internal(_RANDOM, "_set_cuda_rng_state", "attribute", "set_tracker_rng_state_functions"),
    Internal("megatron.core.models.common.embeddings.rotary_pos_embedding",
             "RotaryEmbedding._apply_scaling", "attribute", "scale_rope_frequencies"),
    Internal("megatron.core.models.gpt.gpt_model", "GPTModel.rotary_scaling", "field",
             "scale_rope_frequencies"),
    Internal("megatron.core.models.gpt.gpt_model", "GPTModel.rotary_pos_emb", "field",
             "rope_frequencies_to"),
    Internal("megatron.core.models.common.embeddings.rotary_pos_embedding", "RotaryEmbedding.inv_freq",
             "field", "rope_frequencies_to"),
    Internal("megatron.core.transformer.transformer_layer",
             "TransformerLayerSubmodules.sharded_state_dict_keys_map", "field",
             "local_spec_key_renames"),
    Internal(_STATIC_CONTEXT, "StaticInferenceContext.materialize_only_last_token_logits", "field",
             "static_kv_cache"),
    Internal(_STATIC_CONTEXT, "StaticInferenceContext.sequence_len_offset", "field", "advance_kv_cache"),
    Internal("megatron.core.models.gpt.gpt_model", "GPTModel.output_layer", "field",
             "output_layer_returns_hidden_states"),
    Internal("megatron.core.models.gpt.gpt_model", "GPTModel.post_process", "field",
             "output_layer_returns_hidden_states"),
)


def _source_of(cls) -> str:
    """The source of `cls` and its bases (fields are often assigned in a base's __init__)."""
    parts = []
    for klass in cls.__mro__:
        if klass is object or not klass.__module__.startswith("megatron."):
            continue
        try:
            parts.append(inspect.getsource(klass))
        except (OSError, TypeError):
            pass
    return "\n".join(parts)


def _missing(internal: Internal) -> str | None:
    """None when `internal` exists in the installed megatron-core, else what is missing."""
    where = f"{internal.module}: {internal.name} (used by megatron_rpg.megatron.compat.{internal.why})"
    try:
        target = importlib.import_module(internal.module)
    except ImportError as error:
        return f"{where}: module {internal.module} cannot be imported ({error})"
    if internal.kind == "attribute":
        for part in internal.name.split("."):
            if not hasattr(target, part):
                return f"{where}: {part!r} is not an attribute of {getattr(target, '__name__', target)}"
            target = getattr(target, part)
        return None
    class_name, _, member = internal.name.partition(".")
    cls = getattr(target, class_name, None)
    if not inspect.isclass(cls):
        return f"{where}: class {class_name} is gone"
    if internal.kind == "field":
        declared = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        if hasattr(cls, member) or member in declared \
                or re.search(rf"\bself\.{re.escape(member)}\b", _source_of(cls)):
            return None
        return f"{where}: no `self.{member}` in {class_name} or its megatron bases"
    if internal.kind == "key":
        if re.search(rf"[\"']{re.escape(member)}[\"']", _source_of(cls)):
            return None
        return f"{where}: the dict key {member!r} no longer occurs in {class_name}'s source"
    raise ValueError(f"Internal kind {internal.kind!r} for {internal.name}; use attribute, field or key")


def missing_internals(internals=INTERNALS) -> list[str]:
    """One message per entry of `internals` the installed megatron-core lacks (module and name)."""
    return [message for message in map(_missing, internals) if message is not None]


# ---------------------------------------------------------------- optimizers


def sub_optimizers(optimizer) -> list:
    """The optimizers inside megatron's `ChainedOptimizer` (its `chained_optimizers` field), or
    [optimizer] for a single one: get_megatron_optimizer chains one per param-group kind."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def optimizer_model_chunks(optimizer) -> list:
    """The DDP model chunks an optimizer was built over (`model_chunks` field; [] when absent)."""
    return list(getattr(optimizer, "model_chunks", None) or [])


def dynamic_grad_scalers(optimizer) -> list:
    """The distinct `DynamicGradScaler`s (fp16 loss scaling) of the sub-optimizers' `grad_scaler`
    field; chained optimizers share one."""
    from megatron.core.optimizer.grad_scaler import DynamicGradScaler

    scalers = {id(s): s for s in (getattr(o, "grad_scaler", None) for o in sub_optimizers(optimizer))
               if isinstance(s, DynamicGradScaler)}
    return list(scalers.values())


def back_off_loss_scale(scaler) -> bool:
    """`scaler.update(found_inf=True)`, as megatron does after an overflowing step; True when that
    lowered the scale or counted down its hysteresis (`_hysteresis_tracker` > 0: a later overflow
    lowers it), False when nothing can change any more (at min_scale)."""
    before = float(scaler.scale)
    scaler.update(True)
    return float(scaler.scale) < before or scaler._hysteresis_tracker > 0


def loss_scale_at_minimum(optimizer) -> bool:
    """Whether every dynamic loss scaler (fp16) is down to its `min_scale` field: an overflow there is
    no longer the scale being searched but a non-finite gradient. False without a dynamic scaler."""
    scalers = dynamic_grad_scalers(optimizer)
    return bool(scalers) and all(float(s.scale) <= float(s.min_scale) for s in scalers)


def distributed_main_shards(opt) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(model param, its fp32 main shard on this rank) of a `DistributedOptimizer`: the pairs of
    `model_float16_groups`/`shard_fp32_from_float16_groups` then `model_fp32_groups`/`shard_fp32_groups`."""
    return [(model_param, main)
            for model_groups, main_groups in ((opt.model_float16_groups, opt.shard_fp32_from_float16_groups),
                                              (opt.model_fp32_groups, opt.shard_fp32_groups))
            for model_group, main_group in zip(model_groups, main_groups)
            for model_param, main in zip(model_group, main_group)]


def param_shard_range(opt, model_param) -> range:
    """The elements of `model_param` (flattened) this rank's `DistributedOptimizer` shard owns:
    the "param" range of the private `_get_model_param_range_map`."""
    found = opt._get_model_param_range_map(model_param)["param"]
    return range(found.start, found.end)


def float16_main_params(opt) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(model param, fp32 main param) of a `Float16OptimizerWithFloat16Params`: `float16_groups`
    with `fp32_from_float16_groups`, then the fp32 params (`fp32_from_fp32_groups`) as their own main."""
    pairs = [(model_param, main)
             for model_group, main_group in zip(opt.float16_groups, opt.fp32_from_float16_groups)
             for model_param, main in zip(model_group, main_group)]
    return pairs + [(p, p.data) for group in opt.fp32_from_fp32_groups for p in group]


def copy_main_params_to_model_params(opt) -> None:
    """Model params ← fp32 main params (cast to bf16/fp16, FP8 quantised), megatron's private
    `_copy_main_params_to_model_params`, which its step() runs after the update."""
    opt._copy_main_params_to_model_params()


def uses_precision_aware_optimizer(opt) -> bool:
    """Whether the main params live in the optimizer states instead of the shard groups
    (OptimizerConfig's derived `use_precision_aware_optimizer_no_fp8_or_ds_fp8`)."""
    return bool(opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)


def optimizer_tp_group(opt):
    """The tensor-parallel group an optimizer counts duplicates over: megatron reads an optional
    `tp_group` field the same way (getattr, None → its global TP group; 0.16.1 sets none)."""
    return getattr(opt, "tp_group", None)


@dataclass(frozen=True)
class BucketShard:
    """This rank's share of one grad-buffer bucket of a DistributedOptimizer (dp_reshardable layout)."""
    gbuf_index: int
    dtype: object  # the (param dtype, grad dtype) key of megatron's gbuf_ranges
    bucket_index: int
    numel_unpadded: int  # the bucket's length without DP padding
    local_numel: int  # elements each DP rank owns
    param_ranges: tuple  # ((start, end, model param), ...) in this rank's local range


@dataclass(frozen=True)
class DistributedLayout:
    dp_rank: int
    dp_size: int
    dp_group_index: int  # `data_parallel_group_idx`, part of megatron's checkpoint keys
    instance_id: int  # `distributed_optimizer_instance_id`, megatron's replica id of the shards
    buckets: tuple  # BucketShard, in megatron's order


def distributed_buckets(opt) -> DistributedLayout:
    """How a DistributedOptimizer splits its grad buffers over DP, read from `gbuf_ranges` (per
    buffer, per dtype, per bucket: a "param_map" of param → {"gbuf_local": range, ...}) and
    `buffers[i].buckets[j]` (`numel_unpadded`, `grad_data`): the layout megatron's own
    `sharded_param_state_dp_reshardable` writes."""
    dp_size = opt.data_parallel_group.size()
    buckets = []
    for gbuf_index, gbuf_range_maps in enumerate(opt.gbuf_ranges):
        for dtype, bucket_maps in gbuf_range_maps.items():
            for bucket_index, bucket_map in enumerate(bucket_maps):
                bucket = opt.buffers[gbuf_index].buckets[bucket_index]
                ranges = tuple((r["gbuf_local"].start, r["gbuf_local"].end, p)
                               for p, r in bucket_map["param_map"].items())
                buckets.append(BucketShard(gbuf_index, dtype, bucket_index, int(bucket.numel_unpadded),
                                           bucket.grad_data.numel() // dp_size, ranges))
    return DistributedLayout(opt.data_parallel_group.rank(), dp_size, opt.data_parallel_group_idx,
                             opt.distributed_optimizer_instance_id, tuple(buckets))


def init_optimizer_states_for_loading(optimizer) -> None:
    """A fresh Adam has no state tensors to load into: megatron's private
    `_init_optimizer_states_with_dummy_values` (DistributedOptimizer only) creates them, as
    megatron-LM does before loading a checkpoint."""
    for opt in sub_optimizers(optimizer):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            opt._init_optimizer_states_with_dummy_values()


def restore_adam_steps(optimizer, loaded) -> None:
    """Work around megatron-core 0.16.1 with torch Adam: `DistributedOptimizer.load_state_dict`
    gives every parameter the SAME "step" tensor (torch Adam then increments it once per parameter
    per step), and `dp_reshardable` writes the pre-load per-parameter step back over it (a
    LocalNonpersistentObject). Each parameter gets its own tensor holding the saved step
    (`loaded["optimizer"]["param_groups"]` carry it; a chained optimizer's state is indexed by
    sub-optimizer), so a resumed run's bias correction equals the uninterrupted run's."""
    subs = sub_optimizers(optimizer)
    states = [loaded] if len(subs) == 1 else [loaded[i] for i in range(len(subs))]
    for opt, state in zip(subs, states):
        groups = state.get("optimizer", {}).get("param_groups", []) if isinstance(state, dict) else []
        steps = {g["step"] for g in groups if g.get("step") is not None}
        if len(steps) != 1:
            continue
        (step,) = steps
        for param_state in opt.optimizer.state.values():
            old = param_state.get("step")
            if isinstance(old, torch.Tensor):
                param_state["step"] = torch.full_like(old, float(step))


# ---------------------------------------------------------------- checkpoints


def flat_sharded_tensor(key: str, data: torch.Tensor, global_numel: int, global_offset: int, replica_id):
    """A ShardedTensor for a flat piece of a 1-D global tensor, built with the dataclass's own
    fields (`flattened_range=None`, no axis fragmentation), as megatron's dp_reshardable code does."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return ShardedTensor(key, data, data.dtype, tuple(data.shape), (global_numel,), (global_offset,),
                         axis_fragmentations=None, flattened_range=None, allow_shape_mismatch=False,
                         replica_id=replica_id)


def local_spec_key_renames() -> dict[str, str]:
    """The local layer spec's map from module names to the checkpoint (Transformer Engine) names:
    `TransformerLayerSubmodules.sharded_state_dict_keys_map` of `get_gpt_layer_local_spec()`."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return dict(get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map)


# ---------------------------------------------------------------- models and RNG

RNG_FORK_WARNING = "CPU RNG state changed within GPU RNG context"  # tensor_parallel/random.py's text


def set_tracker_rng_state_functions(get_state, set_state) -> None:
    """Replace the private `_get_cuda_rng_state(device, clone, graph_safe)` and
    `_set_cuda_rng_state(state, device, graph_safe)` of megatron.core.tensor_parallel.random, which
    its RNG tracker's fork calls; and drop the tracker's RNG_FORK_WARNING (logged by that module)."""
    from megatron.core.tensor_parallel import random as tracker_random

    tracker_random._get_cuda_rng_state = get_state
    tracker_random._set_cuda_rng_state = set_state
    logging.getLogger(tracker_random.__name__).addFilter(
        lambda record: RNG_FORK_WARNING not in record.getMessage())


def scale_rope_frequencies(model, *, factor: float, low_freq_factor: float, high_freq_factor: float,
                           original_max_position_embeddings: int) -> None:
    """llama3 RoPE scaling of a GPTModel's inverse frequencies through `RotaryEmbedding._apply_scaling`
    with every parameter (GPTModel(rope_scaling=True) fixes all but the factor), and
    `model.rotary_scaling = True`, the flag GPTModel keeps for exporters."""
    rotary = model.rotary_pos_emb
    rotary.inv_freq = rotary._apply_scaling(
        rotary.inv_freq, factor=factor, low_freq_factor=low_freq_factor, high_freq_factor=high_freq_factor,
        original_max_position_embeddings=original_max_position_embeddings)
    model.rotary_scaling = True


def rope_frequencies_to(model, dtype: torch.dtype) -> None:
    """Casts a GPTModel's RoPE inverse frequencies (`rotary_pos_emb.inv_freq`, a float32 attribute,
    not a buffer: model.double() leaves it) to `dtype`; the angles, cos and sin are computed in its
    dtype. Call before the first forward (RotaryEmbedding.forward caches its results)."""
    rotary = model.rotary_pos_emb
    rotary.inv_freq = rotary.inv_freq.to(dtype)


# ---------------------------------------------------------------- inference (KV cache)


def static_kv_cache(max_batch_size: int, max_sequence_length: int):
    """megatron's `StaticInferenceContext`: GPTModel.forward(..., inference_context=it) in eval mode
    writes each layer's keys/values at `sequence_len_offset` into per-layer buffers
    `[max_sequence_length, max_batch_size, groups, head dim]` (allocated on the first forward, on
    `torch.cuda.current_device()`, which CPU mode maps to the CPU) and attends to everything cached
    so far; with `materialize_only_last_token_logits` the output layer runs on the last position only."""
    from megatron.core.inference.contexts import StaticInferenceContext

    context = StaticInferenceContext(max_batch_size, max_sequence_length)
    if not context.materialize_only_last_token_logits:
        raise RuntimeError("megatron's StaticInferenceContext no longer keeps only the last position's "
                           "logits; the KV-cache decoder relies on [b, 1, V] logits")
    return context


def advance_kv_cache(context, tokens: int) -> None:
    """After a forward of `tokens` positions: the next forward writes after them (megatron's own
    generation loop moves `sequence_len_offset` the same way)."""
    context.sequence_len_offset += int(tokens)


# ---------------------------------------------------------------- output layer


@contextlib.contextmanager
def output_layer_returns_hidden_states(gpt_model):
    """Within the block, `gpt_model`'s output layer returns its input: GPTModel.forward then yields
    the final (layer-normed) hidden states `[b, s, H]` instead of the logits. Yields a list that
    receives, per forward, the output weight `[V/TP, H]` the layer would have used — the embedding
    weight when tied on a stage that holds it (GPTModel._postprocess passes it as `weight=`), else
    the layer's own — so that a gradient computed from it lands in the same parameter as today.
    On a stage without the output layer (not post_process) nothing is replaced."""
    used = []
    if not gpt_model.post_process:
        yield used
        return
    layer = gpt_model.output_layer

    def forward(hidden_states, weight=None, runtime_gather_output=None):
        used.append(layer.weight if weight is None else weight)
        return hidden_states, None  # (output, bias): ColumnParallelLinear's return convention

    layer.forward = forward  # an instance attribute shadows the class's forward for this block
    try:
        yield used
    finally:
        del layer.forward
