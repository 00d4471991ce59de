"""The RL forward-backward on megatron-core: policy loss with the exact global token mean at any
TP/PP/DP, and forward-only per-token log-probs.

    model, optimizer = setup_model_and_optimizer([gpt], lr=1e-6)          # optimizer_setup.py
    logp = compute_logprobs(model, micro_batches)                          # old / ref log-probs
    loss = build_policy_loss(LossConfig(name="rpg", aggregation="seq-mean-token-sum"))  # losses/
    loss_value, metrics = rl_forward_backward(model, micro_batches, loss, temperature=1.0)
    optimizer.step()

Micro-batch convention: a dict of `[b, s]` tensors
- `tokens` (long): prompt + response, right-padded;
- `loss_mask`: 1 where tokens[i, t] is a response token, else 0; always 0 at t = 0;
- `old_logp`, optional `ref_logp`: per-token log-probs aligned with `tokens`;
- `advantages`: `[b]` (one per sequence) or `[b, s]` (per token);
- optional `engine_logp`: the rollout engine's log-probs (handed to the loss in LossInputs);
- optional `staleness`: `[b]` steps since each row was sampled (R²VPO's reused batches; LossInputs);
- optional `rollout_is_weight`: `[b, s]` the rollout IS correction's weight (losses/rollout_is.py).
Per-token tensors are aligned with `tokens`: logp[i, t] = log π(tokens[i, t] | tokens[i, <t]),
computed from the logits at position t − 1; position 0 gets 0 and is never in the mask. Position
ids are 0..s−1 and attention is causal, so right padding (mask 0) never influences real tokens.
Every rank of a model-parallel group (all TP ranks, all PP stages) passes the same micro-batches;
DP ranks pass their own.

The loss is an object (losses/policy_loss.py): the RL step builds each micro-batch's LossInputs
(logp at the model's current parameters, the batch's old/ref/engine log-probs, advantages, mask),
calls it and hands its (loss_sum, count) to megatron; it knows nothing of any particular loss
(SVRPG's snapshot pass is a wrapper loss, losses/svrpg.py).

Exact global normalisation (megatron's per-token-loss contract; optimizer_setup.py sets it up): each
micro-batch's loss function returns `(loss_sum, count, reduced)` where loss_sum is the micro-batch's
contribution to the numerator, and megatron divides the summed gradients by Σ count over all
micro-batches and DP ranks (see optimizer_setup.py). Per aggregation, with l_it the per-token loss,
m_it the mask and T_i = Σ_t m_it:

    token-mean:           loss_sum = Σ_i Σ_t m_it·l_it,          count = Σ_i T_i
    seq-mean-token-mean:  loss_sum = Σ_i (Σ_t m_it·l_it) / T_i,  count = #{i : T_i > 0}
    seq-mean-token-sum:   loss_sum = Σ_i Σ_t m_it·l_it,          count = #{i : T_i > 0}

so the gradient is ∇[Σ_global loss_sum / Σ_global count], the aggregation over the whole global
batch, whatever the split into micro-batches, pipeline stages and DP ranks; a per-micro-batch mean
(the public RPG code) differs whenever micro-batches hold unequal counts. Sequences without response
tokens count for nothing (they are padding rows). With `num_global_tokens=N` the denominator is N
instead (for a global batch spread over several calls): the first micro-batch of DP rank 0 returns
N as its count and every other micro-batch 0, so megatron's Σ count is exactly N.
Exactness: equal to the single-process step up to float summation order (tested: TP=2, PP=2, DP=2
with the distributed optimizer, PP=2 with tied embeddings; ≤ 1e-6 relative in float32, ~1e-16 in
float64). Log-probs exclude megatron's padded vocab ids from the softmax (`vocab_size`). By default the
output layer runs inside the log-prob loop on the final hidden states (`output_layer="fused"`,
fused_output.py): no `[tokens, V/TP]` logits or logits gradient is made. Batching is
padding-based; thd sequence packing (TE, GPU) is not implemented and is refused with the reason.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_rpg.losses.policy_loss import METRIC_UNITS, LossInputs, PolicyLoss
from megatron_rpg.losses.validation import check_choice, check_range
from megatron_rpg.megatron.compat import output_layer_returns_hidden_states
from megatron_rpg.megatron.fused_output import check_output_layer, token_logprobs
from megatron_rpg.megatron.lean_forward import lean_forward_of
from megatron_rpg.megatron.micro_batches import check_micro_batches, check_packing
from megatron_rpg.megatron.optimizer_setup import bare_model, check_global_mean_setup, zero_grad_buffers
from megatron_rpg.megatron.parallel import training_device

def rl_forward_backward(model, micro_batches, loss: PolicyLoss, *, temperature: float = 1.0,
                        num_global_tokens: int | None = None, forward_only: bool = False,
                        vocab_size: int | None = None, packing: str = "padding",
                        output_layer: str = "fused") -> tuple[torch.Tensor, dict[str, float]]:
    """One forward-backward over `micro_batches` with the policy `loss`; returns `(loss, metrics)`.

    Gradients are left in the DDP grad buffers (zeroed at the start of the call), normalised as in
    the module docstring, ready for `optimizer.step()`. `loss` (float64 scalar) = Σ loss_sum / Σ count
    over all micro-batches and DP ranks; `metrics` are the loss's metrics as global means over its
    `metric_units` (response tokens or sequences; "*_max" metrics are global maxima), plus
    `num_tokens`, `num_sequences`, `normalizer`. Both are identical on every rank (all-reduced over
    DP, broadcast from the last pipeline stage). The model must come from `setup_model_and_optimizer`
    (or carry its settings): ValueError otherwise, naming the field.

    loss: a `PolicyLoss` (losses/policy_loss.py: `build_policy_loss(LossConfig(...))`, or a wrapper
      such as SVRPG's `SnapshotLoss`), called once per micro-batch with its `LossInputs`.
    temperature: the log-probs' softmax temperature (the sampler's).
    num_global_tokens: the global normaliser (response tokens for token-mean, non-empty sequences for
      the seq-mean modes) when one global batch spans several calls; the returned loss is then this
      call's share Σ loss_sum / num_global_tokens.
    forward_only: evaluate loss and metrics without gradients.
    vocab_size: the unpadded vocab (HF `vocab_size`); logits of megatron's padded ids are excluded
      from the softmax. None → the model's `unpadded_vocab_size` attribute if set, else no padding.
    packing: "padding" (right-padded [b, s] rows); "thd" sequence packing is not implemented.
    output_layer: "fused" computes the log-probs from the final hidden states tile by tile
      (fused_output.py: no [tokens, V/TP] logits or logits gradient; the same values and gradients
      up to rounding); "unfused" runs megatron's output layer and the log-probs on its logits.
    """
    check_packing(packing)
    _check_loss(loss)
    check_range("temperature", temperature, 0.0, low_inclusive=False)
    chunks = _model_chunks(model)
    check_global_mean_setup(chunks[0], forward_only=forward_only)
    fused = check_output_layer(output_layer, bare_model(chunks[0]))
    if getattr(loss, "needs_hidden_states", False) and not fused:
        raise ValueError(f"loss {loss.name!r} reads the final hidden states: use output_layer='fused' "
                         f"(got {output_layer!r})")
    batches = check_micro_batches(micro_batches, need_loss_inputs=True)
    vocab_size = _unpadded_vocab_size(chunks, vocab_size)
    if num_global_tokens is not None:
        if isinstance(num_global_tokens, bool) or not isinstance(num_global_tokens, int) \
                or num_global_tokens < 1:
            raise ValueError(f"num_global_tokens={num_global_tokens!r}; pass a positive integer (the "
                             f"global normaliser over all calls, DP ranks and micro-batches) or None")
    carries_global_count = (num_global_tokens is not None and
                            parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0)
    micro_batch_index = iter(range(len(batches)))

    def loss_func(micro_batch, output, output_weight=None):
        first = next(micro_batch_index) == 0
        logp, _ = token_logprobs(output, micro_batch["tokens"], temperature, False, vocab_size,
                                 output_weight)
        mask = micro_batch["loss_mask"]
        loss_sum, count, metrics = loss(LossInputs(
            logp=logp, old_logp=micro_batch["old_logp"], advantages=micro_batch["advantages"], mask=mask,
            ref_logp=micro_batch.get("ref_logp"), engine_logp=micro_batch.get("engine_logp"),
            staleness=micro_batch.get("staleness"), rollout_is_weight=micro_batch.get("rollout_is_weight"),
            **_hidden_state_inputs(loss, output, output_weight, micro_batch)))
        count = int(count)
        num_sequences = (mask.sum(-1) > 0).sum().double()
        # the metrics are means over the loss's units (tokens or sequences): weight by the unit
        # count so that the reduced value is the global mean; "_max" metrics reduce by max
        units = mask.sum().double() if loss.metric_units == "token" else num_sequences
        device = loss_sum.device  # one device for the reduction (NCCL needs CUDA tensors)
        reduced = {"sum/loss_sum": loss_sum.detach().double(),
                   "sum/count": torch.tensor(float(count), dtype=torch.float64, device=device),
                   "sum/units": units, "sum/num_tokens": mask.sum().double(),
                   "sum/num_sequences": num_sequences}
        for name, value in metrics.items():
            value = torch.as_tensor(value).detach().to(device, torch.float64).reshape(())
            if name.endswith("_max"):
                reduced["max/" + name] = value
            else:
                reduced["sum/" + name] = value * units
        if num_global_tokens is not None:
            count = num_global_tokens if (first and carries_global_count) else 0
        return loss_sum, torch.tensor(count, dtype=torch.int), reduced

    if not forward_only:
        zero_grad_buffers(chunks)
    store = _run_schedule(chunks, batches, loss_func, forward_only=forward_only, fused=fused)
    totals = _reduce_over_dp_and_broadcast_from_last_stage(store)
    normalizer = float(num_global_tokens) if num_global_tokens is not None else totals["count"]
    loss_value = torch.tensor(totals["loss_sum"] / max(normalizer, 1.0), dtype=torch.float64)
    metrics = {name: value / max(totals["units"], 1.0) for name, value in totals.items()
               if name not in ("loss_sum", "count", "units", "num_tokens", "num_sequences")
               and not name.endswith("_max")}
    metrics.update({name: value for name, value in totals.items() if name.endswith("_max")})
    metrics.update(num_tokens=totals["num_tokens"], num_sequences=totals["num_sequences"],
                   normalizer=normalizer)
    return loss_value, metrics


def _hidden_state_inputs(loss, output, output_weight, micro_batch) -> dict:
    """What a loss with `needs_hidden_states` (CAPO) reads besides the log-probs: the fused path's
    final hidden states (detached), the output weight and the tokens."""
    if not getattr(loss, "needs_hidden_states", False):
        return {}
    return dict(hidden=output.detach(), output_weight=output_weight, tokens=micro_batch["tokens"])


def _check_loss(loss) -> None:
    if not isinstance(loss, PolicyLoss):
        raise ValueError(f"loss must be a PolicyLoss (e.g. build_policy_loss(LossConfig(...)) or "
                         f"RPGLoss(...)), got {type(loss).__name__}")
    check_choice("loss.metric_units", loss.metric_units, METRIC_UNITS)


@torch.no_grad()
def compute_logprobs(model, micro_batches, *, temperature: float = 1.0, with_entropy: bool = False,
                     vocab_size: int | None = None, packing: str = "padding",
                     output_layer: str = "fused"):
    """Forward-only per-token log-probs: a list (one per micro-batch) of `[b, s]` tensors in
    `output_dtype(model)` (float32; float64 for a float64 model),
    logp[i, t] = log softmax(logits[i, t−1] / T)[tokens[i, t]] and 0 at t = 0; with
    `with_entropy`, returns `(logps, entropies)` (entropy of the same next-token distribution).
    Broadcast from the last pipeline stage, so every rank returns them. Dropout is off (eval mode).
    vocab_size, packing, output_layer: as in `rl_forward_backward`."""
    check_packing(packing)
    chunks = _model_chunks(model)
    fused = check_output_layer(output_layer, bare_model(chunks[0]))
    batches = check_micro_batches(micro_batches, need_loss_inputs=False)
    check_range("temperature", temperature, 0.0, low_inclusive=False)
    vocab_size = _unpadded_vocab_size(chunks, vocab_size)

    def collect(micro_batch, output, output_weight=None, non_loss_data=False):
        logp, entropy = token_logprobs(output, micro_batch["tokens"], temperature, with_entropy,
                                       vocab_size, output_weight)
        return {"logp": logp.to(dtype), "entropy": None if entropy is None else entropy.to(dtype)}

    dtype = output_dtype(chunks)
    store = _forward_only(chunks, batches, collect, fused=fused)
    logps, entropies = [], []
    for index, micro_batch in enumerate(batches):
        shape = tuple(micro_batch["tokens"].shape)
        logps.append(_broadcast_from_last_stage(store[index]["logp"] if store else None, shape, dtype))
        if with_entropy:
            entropies.append(_broadcast_from_last_stage(store[index]["entropy"] if store else None,
                                                        shape, dtype))
    return (logps, entropies) if with_entropy else logps


@torch.no_grad()
def forward_logits(model, tokens: torch.Tensor, *, vocab_size: int | None = None,
                   at: torch.Tensor | None = None) -> torch.Tensor:
    """Forward-only logits (`output_dtype(model)`) of `tokens` `[b, s]` through megatron's schedule
    (pipeline p2p when PP > 1), gathered over the TP group, megatron's padded ids dropped, broadcast from the
    last pipeline stage: every rank gets the same `[b, s, V]` tensor. With `at` (`[b]` positions)
    only row i's logits at position at[i] are kept, before the gather: `[b, V]`. Dropout is off
    (eval mode). vocab_size: as in `rl_forward_backward`."""
    chunks = _model_chunks(model)
    tokens = tokens.long()
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [b, s] token ids; got shape {tuple(tokens.shape)}")
    batch = {"tokens": tokens}
    if at is not None:
        batch["at"] = torch.as_tensor(at, dtype=torch.long)
        if batch["at"].shape != tokens.shape[:1] or bool((batch["at"] < 0).any()) \
                or bool((batch["at"] >= tokens.shape[1]).any()):
            raise ValueError(f"at must be [b] = [{tokens.shape[0]}] positions in [0, {tokens.shape[1]}); "
                             f"got {batch['at'].tolist()}")
    vocab_size = _unpadded_vocab_size(chunks, vocab_size)

    def collect(micro_batch, logits, non_loss_data=False):
        if "at" in micro_batch:
            rows = torch.arange(logits.shape[0], device=logits.device)
            logits = logits[rows, micro_batch["at"].to(logits.device)]  # [b, V/TP]
        full = tensor_parallel.gather_from_tensor_model_parallel_region(logits.to(dtype))
        return full[..., :vocab_size] if vocab_size is not None else full

    dtype = output_dtype(chunks)
    store = _forward_only(chunks, [batch], collect)
    width = vocab_size if vocab_size is not None else int(bare_model(chunks[0]).vocab_size)
    shape = tuple(tokens.shape[:1] if at is not None else tokens.shape) + (width,)
    return _broadcast_from_last_stage(store[0] if store else None, shape, dtype)


def next_token_logits(model, tokens: torch.Tensor, lengths: torch.Tensor, *,
                      vocab_size: int | None = None) -> torch.Tensor:
    """Forward-only logits of the token after each row's prefix: `[b, vocab_size]` (`output_dtype`),
    row i read at position lengths[i] − 1 of the right-padded `tokens` `[b, s]` (causal attention, so the
    padding after it changes nothing); `forward_logits(..., at=lengths − 1)`, the same on every
    rank. The embedded engine's recompute path (`kv_cache=False`: one full forward per token)."""
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    if tokens.dim() != 2 or lengths.shape != tokens.shape[:1]:
        raise ValueError(f"tokens must be [b, s] and lengths [b]; got {tuple(tokens.shape)} and "
                         f"{tuple(lengths.shape)}")
    if bool((lengths < 1).any()) or bool((lengths > tokens.shape[1]).any()):
        raise ValueError(f"lengths must lie in [1, {tokens.shape[1]}] (each row's prefix length); got "
                         f"{lengths.tolist()}")
    return forward_logits(model, tokens, vocab_size=vocab_size, at=lengths - 1)


def _unpadded_vocab_size(chunks, vocab_size):
    if vocab_size is not None:
        check_range("vocab_size", vocab_size, 1)
        return int(vocab_size)
    return getattr(bare_model(chunks[0]), "unpadded_vocab_size", None)


def _run_schedule(chunks, batches, loss_func, *, forward_only, collect_non_loss_data=False,
                  model_kwargs=None, fused=False):
    """megatron's schedule; `loss_func(micro_batch, output)` on the last stage (output: the logits),
    or with `fused` `loss_func(micro_batch, hidden_states, output_weight=the output layer's weight)`.
    `model_kwargs`: extra keyword arguments of every model call (the KV cache's inference_context);
    a micro-batch may carry its own `position_ids` and boolean `attention_mask` (True = masked).
    With `fused`, no `model_kwargs` and the lean forward selected for the chunk
    (lean_forward.select_model_forward), the chunk's forward is LeanForward's (the same outputs)."""
    tokens_shape = batches[0]["tokens"].shape

    def forward_step(data_iterator, model_chunk):
        device = next(model_chunk.parameters()).device
        micro_batch = {key: value.to(device, non_blocking=True)
                       for key, value in next(data_iterator).items()}
        tokens = micro_batch["tokens"]
        positions = micro_batch.get("position_ids")
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        # attention_mask None: the local spec's causal softmax builds the causal mask itself
        def call():
            return model_chunk(tokens, positions, micro_batch.get("attention_mask"), **(model_kwargs or {}))
        if not fused:
            return call(), functools.partial(loss_func, micro_batch)
        lean = lean_forward_of(model_chunk) if not model_kwargs else None
        if lean is not None:  # lean_forward.py: megatron's hidden states and output weight, functionally
            output, output_weight = lean.forward(tokens, micro_batch.get("attention_mask"))
            return output, functools.partial(loss_func, micro_batch, output_weight=output_weight)
        with output_layer_returns_hidden_states(bare_model(model_chunk)) as output_weights:
            output = call()
        output_weight = output_weights[0] if output_weights else None  # None off the last stage
        return output, functools.partial(loss_func, micro_batch, output_weight=output_weight)

    schedule = get_forward_backward_func()
    # megatron's forward_only does not disable autograd: without no_grad every micro-batch's graph
    # (and the log-prob function's saved logits) would be kept until the call returns
    with torch.no_grad() if forward_only else contextlib.nullcontext():
        return schedule(forward_step_func=forward_step, data_iterator=iter(batches), model=chunks,
                        num_microbatches=len(batches), seq_length=tokens_shape[1],
                        micro_batch_size=tokens_shape[0], forward_only=forward_only,
                        collect_non_loss_data=collect_non_loss_data)


def _forward_only(chunks, batches, collect, model_kwargs=None, fused=False) -> list:
    """megatron's schedule forward-only in eval mode (dropout off; the chunks' modes restored):
    `collect(micro_batch, logits)` per micro-batch on the last stage, [] on the other stages."""
    was_training = [chunk.training for chunk in chunks]
    for chunk in chunks:
        chunk.eval()
    try:
        return _run_schedule(chunks, batches, collect, forward_only=True, collect_non_loss_data=True,
                             model_kwargs=model_kwargs, fused=fused)
    finally:
        for chunk, training in zip(chunks, was_training):
            chunk.train(training)


def _reduce_over_dp_and_broadcast_from_last_stage(store) -> dict[str, float]:
    """Reduce the micro-batches' "sum/…" entries by sum and "max/…" entries by max, on the last
    stage and then over DP×CP; every pipeline stage gets the last stage's result."""
    totals = None
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        totals = {}
        for prefix, op in (("sum/", dist.ReduceOp.SUM), ("max/", dist.ReduceOp.MAX)):
            names = sorted(name for name in store[0] if name.startswith(prefix))
            if not names:
                continue
            values = torch.stack([torch.stack([entry[name].double().reshape(()) for name in names])
                                  for entry in store])
            values = values.sum(0) if prefix == "sum/" else values.amax(0)
            if dist.get_world_size(group=group) > 1:
                dist.all_reduce(values, op=op, group=group)
            totals.update((name[len(prefix):], value) for name, value in zip(names, values.tolist()))
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        holder = [totals]
        dist.broadcast_object_list(holder, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                   group=parallel_state.get_pipeline_model_parallel_group())
        totals = holder[0]
    return totals


def output_dtype(model) -> torch.dtype:
    """The dtype of the forward-only outputs (log-probs, entropies, logits): float32 for float32,
    bf16 and fp16 models, float64 for a float64 one (the float64 references of tests/float_bounds.py)."""
    params_dtype = bare_model(_model_chunks(model)[0]).config.params_dtype
    return torch.promote_types(params_dtype, torch.float32)


def _broadcast_from_last_stage(tensor, shape, dtype: torch.dtype):
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return tensor
    if tensor is None:
        tensor = torch.empty(shape, dtype=dtype, device=training_device())
    else:
        tensor = tensor.contiguous()  # a strided view would broadcast its underlying storage
    dist.broadcast(tensor, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return tensor


def _model_chunks(model) -> list:
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    if len(chunks) != 1:
        raise NotImplementedError(
            f"got {len(chunks)} model chunks; the virtual (interleaved) pipeline schedule is not "
            f"supported yet: pass one model chunk per rank")
    return chunks
