"""CPU mode runs the real megatron-core (no stubs) over gloo: each test spawns ranks and checks that a
distributed megatron result equals the single-process one, or that a round trip is bit-exact.
"Equals" for float32 results is tests/float_bounds.py's bound: 4× the single-process result's own
float32 rounding, measured against the same single-process computation on the float64 copy of its
model (the same weights, cast exactly).

CPU mode is process-wide and permanent, so it is only ever enabled inside spawned worker processes,
never in the pytest process itself.
"""
from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed as dist

from tests.distributed.harness import run_on_ranks
from tests.float_bounds import assert_float32_equal, distance, float32_bound, norm

VOCAB, SEQ, BATCH = 96, 8, 2


# ---------------------------------------------------------------- helpers run inside the workers
def _tiny_gpt(seed: int, num_layers: int = 2, pre_process: bool = True, post_process: bool = True):
    """A tiny megatron GPTModel (local spec) for the current parallel state, weights fixed by `seed`."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=num_layers, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
        use_cpu_initialization=True, params_dtype=torch.float32, pipeline_dtype=torch.float32,
        hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size())
    torch.manual_seed(seed)  # use_cpu_initialization draws full master weights from this generator
    return GPTModel(config, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ,
                    pre_process=pre_process, post_process=post_process,
                    share_embeddings_and_output_weights=False)


def _tiny_gpt64(seed: int, num_layers: int = 2):
    """The single-process float64 reference: `_tiny_gpt(seed)`'s float32 weights cast exactly."""
    model = _tiny_gpt(seed, num_layers).double()
    model.config.params_dtype = model.config.pipeline_dtype = torch.float64
    return model


def _same_state(a, b) -> bool:
    """Bit-exact state-dict equality (local-spec state dicts also hold `_extra_state` entries)."""
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def _batch(seed: int):
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
    return tokens, torch.arange(SEQ).expand(BATCH, SEQ)


def _mean_loss(model, tokens, positions):
    return model(tokens, positions, None, labels=tokens).mean()


def _forward_step(tokens, positions):
    def step(data_iterator, model):
        out = model(tokens, positions, None, labels=tokens)  # per-token CE [b, s] on the last stage
        return out, lambda ce: (ce.mean(), {"loss": ce.mean().detach()})
    return step


# ---------------------------------------------------------------- worker bodies
def _body_basics(rank, world_size):
    import megatron_rpg.megatron.cpu_mode as cpu_mode
    enabled_on_import = cpu_mode.cpu_mode_enabled()
    cpu_mode.enable_cpu_mode()
    cpu_mode.enable_cpu_mode()  # idempotent
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    devices = [torch.zeros(2, device="cuda").device, torch.empty(1, device=torch.device("cuda", 0)).device,
               torch.ones(1, device=torch.cuda.current_device()).device, torch.ones(1).cuda().device,
               torch.ones(1).to("cuda").device, torch.ones(1).to(torch.cuda.current_device()).device,
               torch.nn.Linear(2, 2).cuda().weight.device]
    type_name = torch.ones(1).type()
    in_thread = []

    def other_thread():  # torch function modes are per thread: a new thread enables it again
        cpu_mode.enable_cpu_mode()
        in_thread.append(str(torch.zeros(1, device="cuda").device))
    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()

    from megatron_rpg.megatron.parallel import initialize_parallel
    try:
        initialize_parallel(tensor_model_parallel_size=2)  # world size 1
        indivisible_error = ""
    except ValueError as error:
        indivisible_error = str(error)
    ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(5)
    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():  # the tensor-parallel state, seeded with 5 + 2718 + tp_rank
        first = torch.rand(3)
    after = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        second = torch.rand(3)
    expected = torch.rand(6, generator=torch.Generator().manual_seed(5 + 2718))
    ps.destroy_model_parallel()
    return dict(enabled_on_import=enabled_on_import, enabled=cpu_mode.cpu_mode_enabled(),
                devices=[str(d) for d in devices] + in_thread, type_name=type_name,
                indivisible_error=indivisible_error,
                state_restored=torch.equal(before, after), forked=torch.cat([first, second]),
                expected=expected)


def _body_refusal_when_cuda_reports_available(rank, world_size):
    """torch.cuda.is_available() faked True (a CPU machine cannot have a real one): enable_cpu_mode
    must raise and leave torch.cuda, megatron's RNG hooks and the torch function modes untouched."""
    import megatron_rpg.megatron.cpu_mode as cpu_mode
    from megatron.core.tensor_parallel import random as mcore_random
    from torch.overrides import _get_current_function_mode_stack

    names = ("current_device", "synchronize", "device_count", "set_device", "get_rng_state",
             "set_rng_state", "manual_seed")
    before = {name: getattr(torch.cuda, name) for name in names}
    rng_before = (mcore_random._get_cuda_rng_state, mcore_random._set_cuda_rng_state)
    torch.cuda.is_available = lambda: True
    try:
        cpu_mode.enable_cpu_mode()
        error = "no error"
    except RuntimeError as raised:
        error = str(raised)
    return dict(error=error, enabled=cpu_mode.cpu_mode_enabled(),
                cuda_untouched=all(getattr(torch.cuda, n) is f for n, f in before.items()),
                rng_untouched=(mcore_random._get_cuda_rng_state,
                               mcore_random._set_cuda_rng_state) == rng_before,
                function_modes=len(_get_current_function_mode_stack()))


def _body_tensor_parallel_and_checkpoint(rank, world_size, ckpt_dir):
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel

    tokens, positions = _batch(seed=0)  # same batch on both ranks
    initialize_parallel(tensor_model_parallel_size=2)
    tp_model = _tiny_gpt(seed=1)
    tp_loss = _mean_loss(tp_model, tokens, positions)
    tp_loss.backward()
    tp_norm_grad = tp_model.decoder.final_layernorm.weight.grad.clone()
    tp_logits = gather_from_tensor_model_parallel_region(tp_model(tokens, positions, None)).detach()
    vocab_shard = tp_model.output_layer.weight.shape[0]

    # the async path: its writer runs in a separate process (the sync path runs in test_models)
    calls = AsyncCallsQueue()
    calls.schedule_async_request(
        dist_checkpointing.save(tp_model.sharded_state_dict(), ckpt_dir, async_sharded_save=True))
    calls.maybe_finalize_async_calls(blocking=True)
    calls.close()
    fresh = _tiny_gpt(seed=2)
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), ckpt_dir))
    tp_round_trip = _same_state(tp_model, fresh)
    destroy_parallel()

    initialize_parallel(tensor_model_parallel_size=1)
    full_model = _tiny_gpt(seed=1)  # same master weights as the TP=2 shards
    full_loss = _mean_loss(full_model, tokens, positions)
    full_loss.backward()
    full64 = _tiny_gpt64(seed=1)
    full_loss64 = _mean_loss(full64, tokens, positions)
    full_loss64.backward()
    resharded = _tiny_gpt(seed=3)  # the TP=2 checkpoint loaded into a TP=1 model
    resharded.load_state_dict(dist_checkpointing.load(resharded.sharded_state_dict(), ckpt_dir))
    reshard_exact = _same_state(full_model, resharded)
    result = dict(tp_loss=tp_loss.detach(), full_loss=full_loss.detach(), vocab_shard=vocab_shard,
                  tp_logits=tp_logits, full_logits=full_model(tokens, positions, None).detach(),
                  tp_norm_grad=tp_norm_grad, full_norm_grad=full_model.decoder.final_layernorm.weight.grad,
                  full_loss64=full_loss64.detach(), full_logits64=full64(tokens, positions, None).detach(),
                  full_norm_grad64=full64.decoder.final_layernorm.weight.grad,
                  tp_round_trip=tp_round_trip, reshard_exact=reshard_exact,
                  world=ps.get_data_parallel_world_size())
    destroy_parallel()
    return result


def _body_data_parallel_step(rank, world_size):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel

    initialize_parallel()  # DP = 2
    local = _batch(seed=10 + rank)
    both = [torch.cat(parts) for parts in zip(_batch(seed=10), _batch(seed=11))]
    # eps well above gradient rounding (~1e-9) keeps the first Adam step, lr*g/(|g|+eps), well-conditioned.
    lr, eps = 1e-2, 1e-4
    # Single-process reference: Adam on the mean loss over both ranks' batches.
    before = torch.cat([p.detach().flatten() for p in _tiny_gpt(seed=4).parameters()])
    updates = {}
    for reference in (_tiny_gpt(seed=4), _tiny_gpt64(seed=4)):
        _mean_loss(reference, *both).backward()
        torch.optim.Adam(reference.parameters(), lr=lr, betas=(0.9, 0.999), eps=eps).step()
        updates[reference.config.params_dtype] = torch.cat([p.detach().flatten() for p in
                                                            reference.parameters()]) - before
    ref = before + updates[torch.float32]
    # the update's float32 rounding (a float32 step of float32 parameters: floor scale ‖after‖)
    bound = float32_bound(updates[torch.float32], updates[torch.float64], norm(ref))

    results = {}
    for distributed in (False, True):
        model = _tiny_gpt(seed=4)
        ddp = DistributedDataParallel(
            model.config, DistributedDataParallelConfig(use_distributed_optimizer=distributed), model)
        model.config.finalize_model_grads_func = finalize_model_grads
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=lr, adam_eps=eps, weight_decay=0.0, clip_grad=0.0,
                            use_distributed_optimizer=distributed), [ddp])
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(forward_step_func=_forward_step(*local), data_iterator=None,
                                    model=[ddp], num_microbatches=1, seq_length=SEQ,
                                    micro_batch_size=BATCH)
        ok, _, _ = optimizer.step()
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        results[distributed] = dict(ok=ok, params=after, reference=ref, bound=bound,
                                    moved=norm(updates[torch.float32]))
    destroy_parallel()
    return results


def _body_pipeline_schedule(rank, world_size):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel

    micro_batches = [_batch(seed=20 + i) for i in range(4)]
    initialize_parallel()  # single-stage reference on every rank
    reference = _tiny_gpt(seed=5, num_layers=4)
    reference_losses = [_mean_loss(reference, *mb) for mb in micro_batches]
    (sum(reference_losses) / len(micro_batches)).backward()
    reference64 = _tiny_gpt64(seed=5, num_layers=4)
    reference_losses64 = [_mean_loss(reference64, *mb) for mb in micro_batches]
    (sum(reference_losses64) / len(micro_batches)).backward()
    destroy_parallel()

    initialize_parallel(pipeline_model_parallel_size=2)
    stage = _tiny_gpt(seed=6, num_layers=4, pre_process=ps.is_pipeline_first_stage(),
                      post_process=ps.is_pipeline_last_stage())
    offset = 2 * ps.get_pipeline_model_parallel_rank()  # 2 layers per stage
    ref_state = reference.state_dict()

    def global_name(name):
        if not name.startswith("decoder.layers."):
            return name
        _, _, index, rest = name.split(".", 3)
        return f"decoder.layers.{int(index) + offset}.{rest}"

    stage.load_state_dict({k: ref_state[global_name(k)] for k in stage.state_dict()})
    ddp = DistributedDataParallel(stage.config, DistributedDataParallelConfig(), stage)
    stage.config.finalize_model_grads_func = finalize_model_grads
    batches = iter(micro_batches)

    def step(data_iterator, model):
        return _forward_step(*next(batches))(data_iterator, model)

    store = get_forward_backward_func()(forward_step_func=step, data_iterator=None, model=[ddp],
                                        num_microbatches=4, seq_length=SEQ, micro_batch_size=BATCH)
    ref_grads, ref_grads64 = dict(reference.named_parameters()), dict(reference64.named_parameters())
    grads = {global_name(n): (p.main_grad.clone(), ref_grads[global_name(n)].grad,
                              ref_grads64[global_name(n)].grad) for n, p in stage.named_parameters()}
    result = dict(losses=[d["loss"] for d in store], grads=grads,
                  reference_losses=[l.detach() for l in reference_losses],
                  reference_losses64=[l.detach() for l in reference_losses64],
                  stage=ps.get_pipeline_model_parallel_rank())
    destroy_parallel()
    return result


# ---------------------------------------------------------------- tests
@pytest.mark.distributed
def test_cpu_mode_redirects_cuda_requests_and_rng_tracker_forks_cpu_generator():
    (r,) = run_on_ranks(_body_basics, world_size=1)
    assert not r["enabled_on_import"] and r["enabled"]
    assert r["devices"] == ["cpu"] * 8
    assert "world size 1 is not divisible by tensor_model_parallel_size 2" in r["indivisible_error"]
    assert r["type_name"] == "torch.cuda.FloatTensor"  # what megatron's optimizers require
    assert r["state_restored"]  # the default generator is untouched by a fork
    assert torch.equal(r["forked"], r["expected"])  # successive forks continue the TP stream


@pytest.mark.distributed
def test_tensor_parallel_two_ranks_equals_single_rank_and_checkpoint_round_trips(tmp_path):
    r0, r1 = run_on_ranks(_body_tensor_parallel_and_checkpoint, args=(str(tmp_path),))
    assert r0["vocab_shard"] == VOCAB // 2  # logits really are split over the vocabulary
    assert torch.equal(r0["tp_loss"], r1["tp_loss"])
    for r in (r0, r1):
        for name in ("loss", "logits", "norm_grad"):
            bound = float32_bound(r[f"full_{name}"], r[f"full_{name}64"])
            print(f"{name}: ‖TP=2 − TP=1‖ {distance(r[f'tp_{name}'], r[f'full_{name}']):.3g}, bound {bound:.3g}")
            assert_float32_equal(r[f"tp_{name}"], r[f"full_{name}"], bound, name)
        assert r["tp_round_trip"], "dist_checkpointing save/load at TP=2 is not bit-exact"
        assert r["reshard_exact"], "TP=2 checkpoint loaded at TP=1 differs from the TP=1 weights"


@pytest.mark.distributed
def test_data_parallel_adam_step_equals_single_process_step_with_and_without_distributed_optimizer():
    r0, r1 = run_on_ranks(_body_data_parallel_step)
    for distributed in (False, True):
        assert r0[distributed]["ok"] and r1[distributed]["ok"]
        assert torch.equal(r0[distributed]["params"], r1[distributed]["params"])
        result = r0[distributed]
        print(f"distributed optimizer {distributed}: ‖DP=2 − reference‖ "
              f"{distance(result['params'], result['reference']):.3g}, bound {result['bound']:.3g}")
        assert_float32_equal(result["params"], result["reference"], result["bound"], "parameters")
        assert result["moved"] > 100 * result["bound"]  # the step moved them far beyond the bound


@pytest.mark.distributed
def test_pipeline_two_stages_schedule_equals_single_stage():
    r0, r1 = run_on_ranks(_body_pipeline_schedule)
    first, last = sorted((r0, r1), key=lambda r: r["stage"])
    assert first["losses"] == []  # only the last stage computes losses
    for loss, want, want64 in zip(last["losses"], last["reference_losses"], last["reference_losses64"]):
        assert_float32_equal(loss, want, float32_bound(want, want64), "micro-batch loss")
    for r in (first, last):
        for name, (grad, want, want64) in r["grads"].items():
            assert_float32_equal(grad, want, float32_bound(want, want64), name)


def test_initialize_parallel_rejects_missing_process_group_and_bad_sizes():
    from megatron_rpg.megatron.parallel import initialize_parallel
    assert not dist.is_initialized()  # CPU mode and process groups live only in spawned workers
    with pytest.raises(RuntimeError, match="torch.distributed initialised first"):
        initialize_parallel()
    with pytest.raises(ValueError, match="tensor_model_parallel_size must be a positive integer, got 0"):
        initialize_parallel(tensor_model_parallel_size=0)
    with pytest.raises(ValueError, match="pipeline_model_parallel_size .* got 1.5"):
        initialize_parallel(pipeline_model_parallel_size=1.5)


@pytest.mark.distributed
def test_enable_cpu_mode_refuses_when_cuda_reports_available_and_patches_nothing():
    (r,) = run_on_ranks(_body_refusal_when_cuda_reports_available, world_size=1)
    assert "enable_cpu_mode() refused: a CUDA GPU is available" in r["error"]
    assert not r["enabled"]
    assert r["cuda_untouched"] and r["rng_untouched"]
    assert r["function_modes"] == 0  # no device-rewriting mode was entered


@pytest.mark.requires_gpu
def test_enable_cpu_mode_refuses_when_cuda_is_available():
    from megatron_rpg.megatron.cpu_mode import cpu_mode_enabled, enable_cpu_mode
    with pytest.raises(RuntimeError, match="CUDA GPU is available"):
        enable_cpu_mode()
    assert not cpu_mode_enabled()
