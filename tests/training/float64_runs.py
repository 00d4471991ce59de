"""Test-only: the trainer's run in float64, the reference tests/float_bounds.py bounds a float32 run by.

    with float64_trainer():                      # training/loop.train builds a float64 model
        history64 = train(config)
    with recorded_logprobs() as steps:           # each step's tokens, mask, engine and trainer log-probs
        history = train(config)

The float64 model starts from the float32 run's initial weights exactly: it is built in float32 (the
same random initialisation, the same --load) and upcast into a float64 GPTModel. Megatron-core 0.16.1
refuses float64 in three places, so the float64 run differs from `build_model_and_optimizer` there:
- grad clipping (clip_grads.py asserts float32 grads): clip-grad 0. A float32 run is then the same
  computation only while its gradient norm stays under --clip-grad (megatron scales by
  clip/(norm + 1e-6) only when that is < 1): `unclipped(history, config)` says whether it did;
- the distributed optimizer (float32 main shards): refused here, the plain optimizer runs;
- grad_reduce_in_fp32 (a float32 grad buffer would round the float64 gradients): off.
The gradient norm megatron reports is a float32 computation even of float64 gradients
(get_grad_norm_fp32), so a float64 run's grad_norm carries float32 rounding of the norm itself.
Everything else (rollouts, log-probs, losses, Adam) follows the model's dtype: forward-only outputs
are `output_dtype(model)` (megatron/forward_backward.py), float64 here. Advantages stay float32 (the
same values in both runs: they are computed from the same rewards).
"""
from __future__ import annotations

import contextlib

import torch


def float64_gpt(config, hf_config, weights=None):
    """A float64 GPTModel of the run's model (TP=1 or this rank's TP shard), with `weights` (a name ->
    tensor dict of the float32 model's parameters) upcast into it. Megatron's float64 build keeps the
    norm weights float32 (its torch-norm wrapper ignores params_dtype) and the RoPE inverse
    frequencies float32 (an attribute): both are upcast (the same values), so angles, cos and sin are
    float64 too. Without that the float64 engine (KV cache: padded prompts' positions shifted) and
    trainer differ by ~5e-11 in log-prob (measured, tests/training/test_math_run.py)."""
    from megatron.core import tensor_parallel

    from megatron_rpg.megatron.compat import rope_frequencies_to
    from megatron_rpg.megatron.models import build_gpt_model

    kwargs = config.model.gpt_kwargs()
    if kwargs["params_dtype"] != torch.float32:
        raise ValueError(f"the float64 trainer upcasts a float32 model; got params_dtype {kwargs['params_dtype']}")
    # building another model must not move the random streams the run continues with
    cpu_state, tracker_states = torch.get_rng_state(), tensor_parallel.get_cuda_rng_tracker().get_states()
    gpt = build_gpt_model(hf_config, **dict(kwargs, params_dtype=torch.float64, pipeline_dtype=torch.float64))
    torch.set_rng_state(cpu_state)
    tensor_parallel.get_cuda_rng_tracker().set_states(tracker_states)
    gpt.double()
    rope_frequencies_to(gpt, torch.float64)
    if weights is not None:
        copy_weights(gpt, weights)
    return gpt


def copy_weights(gpt, weights) -> None:
    with torch.no_grad():
        for name, param in gpt.named_parameters():
            param.copy_(weights[name])


def float64_model_and_optimizer(config, hf_config=None):
    """build_model_and_optimizer's (model, optimizer, hf_config) with a float64 model (module docstring)."""
    from megatron_rpg.checkpoint.dist_ckpt import load_model_weights
    from megatron_rpg.checkpoint.layout import latest_checkpoint
    from megatron_rpg.megatron.models import build_gpt_model
    from megatron_rpg.megatron.optimizer_setup import setup_model_and_optimizer
    from megatron_rpg.training.build import model_hf_config
    from megatron_rpg.training.checkpointing import resumes

    if config.parallel.use_distributed_optimizer:
        raise ValueError("the float64 trainer runs megatron's plain optimizer: drop --use-distributed-optimizer")
    if resumes(config.checkpoint) or config.checkpoint.save:
        raise ValueError("the float64 trainer neither resumes nor saves: use --load with --finetune, no --save")
    hf_config = hf_config if hf_config is not None else model_hf_config(config)
    gpt32 = build_gpt_model(hf_config, **config.model.gpt_kwargs())  # the float32 run's initial weights
    if config.checkpoint.load is not None:
        load_model_weights(gpt32, latest_checkpoint(config.checkpoint.load))
    gpt = float64_gpt(config, hf_config, dict(gpt32.named_parameters()))
    opt = config.optimizer
    model, optimizer = setup_model_and_optimizer(
        [gpt], lr=opt.lr, weight_decay=opt.weight_decay, adam_betas=(opt.adam_beta1, opt.adam_beta2),
        adam_eps=opt.adam_eps, clip_grad=0.0, min_lr=opt.schedule.min_lr if opt.schedule else 0.0,
        use_distributed_optimizer=False, grad_reduce_in_fp32=False)
    return model, optimizer, hf_config


@contextlib.contextmanager
def float64_trainer():
    """training/loop.train builds float64 models inside the block."""
    from megatron_rpg.training import loop

    original = loop.build_model_and_optimizer
    loop.build_model_and_optimizer = float64_model_and_optimizer
    try:
        yield
    finally:
        loop.build_model_and_optimizer = original


@contextlib.contextmanager
def recorded_logprobs(config=None):
    """Yields a list that gets, per training step inside the block, the step's response tokens as a
    dict of `tokens`, `loss_mask`, `engine_logp` and `old_logp` (the trainer's), each [rows, s] with the
    micro-batches' rows stacked (padded with 0 to the longest). With `config` (the run's TrainConfig, a
    float32 run at TP=1) also `logp64`: the trainer's log-probs of the same tokens recomputed in float64
    from the step's weights, the float64 reference of the very computation `old_logp` rounds."""
    from megatron_rpg.megatron.forward_backward import compute_logprobs
    from megatron_rpg.megatron.optimizer_setup import bare_model
    from megatron_rpg.training import loop
    from megatron_rpg.training.build import model_hf_config

    steps, original, twin = [], loop.attach_old_logprobs, []

    def recording(model, micro_batches, temperature, **options):
        mismatch = original(model, micro_batches, temperature, **options)
        width = max(mb["tokens"].shape[1] for mb in micro_batches)

        def stacked(tensors):
            return torch.cat([torch.nn.functional.pad(t.detach().cpu(), (0, width - t.shape[1])) for t in tensors])
        step = {key: stacked([mb[key] for mb in micro_batches])
                for key in ("tokens", "loss_mask", "engine_logp", "old_logp")}
        if config is not None:
            weights = dict(bare_model(model[0]).named_parameters())
            if not twin:
                twin.append(float64_gpt(config, model_hf_config(config)))
                twin[0].config.calculate_per_token_loss = True  # compute_logprobs' check (forward only)
            copy_weights(twin[0], weights)
            step["logp64"] = stacked(compute_logprobs([twin[0]], [{"tokens": mb["tokens"]} for mb in micro_batches],
                                                      temperature=temperature))
        steps.append(step)
        return mismatch

    loop.attach_old_logprobs = recording
    try:
        yield steps
    finally:
        loop.attach_old_logprobs = original


def unclipped(history, config) -> bool:
    """Whether no step of a float32 run was clipped (every grad norm under --clip-grad, or no clipping),
    i.e. whether its float64 run (clip-grad 0) is the same computation."""
    clip = config.optimizer.clip_grad
    return clip == 0 or all(step["grad_norm"] < clip for step in history)
