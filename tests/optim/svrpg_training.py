"""A tiny real-megatron SVRPG training run shared by the SVRPG distributed and resume tests.

GPTModel (local spec, 2 layers, hidden 32, vocab 64) wrapped by megatron DDP + the megatron Adam
optimizer (`setup_model_and_optimizer`), a sequence-level REINFORCE loss with per-sequence
normalisation (global over DP through megatron's per-token-loss path), and a grad_fn for SVRPG.
Batches are a deterministic function of the step index, so every layout sees the same global batch.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

from megatron_rpg.losses import RPGLoss
from megatron_rpg.losses.svrpg import weight_token_loss
from megatron_rpg.megatron.forward_backward import compute_logprobs
from megatron_rpg.megatron.logprobs import vocab_parallel_logprobs
from megatron_rpg.megatron.optimizer_setup import setup_model_and_optimizer
from megatron_rpg.optim.svrpg import SVRPGOptimizer
from megatron_rpg.optim.svrpg_config import SVRPGConfig
from tests.megatron import rl_step_fixtures as fx

VOCAB, SEQ, HIDDEN, LAYERS = 64, 8, 32, 2
GLOBAL_BATCH, ANCHOR_BATCH, MICRO_BATCHES = 8, 16, 2
# The trainer's RL step (rl_forward_backward) with β = 0 sequence-level REINFORCE: per-sequence loss
# linear in the advantage, so ρ·g(τ; θ̃) is the on-policy gradient with advantages ρ·A.
RL_LOSS = RPGLoss(divergence="rkl", style="reinforce", beta=0.0, is_level="sequence", clip=None,
                  aggregation="seq-mean-token-sum")


def build(use_distributed_optimizer: bool, config: SVRPGConfig, lr: float = 1e-2,
          hidden: int = HIDDEN, layers: int = LAYERS, bf16: bool = False, fp16: bool = False,
          clip_grad: float = 1.0, float64: bool = False):
    """(DDP chunks, megatron optimizer, SVRPGOptimizer); bf16/fp16: Float16Module, fp32 main shards
    (fp16: megatron's dynamic loss scaler, initial scale 2^32); float64: the float32 model's initial
    weights (same seed, cast exactly), grads reduced in float64 and no clipping (megatron clips
    float32 grads only): the float64 reference of a float32 run (tests/float_bounds.py)."""
    torch.manual_seed(1234)
    dtype = torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
    tconfig = TransformerConfig(bf16=bf16, fp16=fp16, params_dtype=dtype, num_layers=layers,
                                hidden_size=hidden, num_attention_heads=4,
                                ffn_hidden_size=2 * hidden, hidden_dropout=0.0, attention_dropout=0.0,
                                use_cpu_initialization=True, pipeline_dtype=dtype,
                                tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
                                calculate_per_token_loss=True)
    model = GPTModel(config=tconfig, transformer_layer_spec=get_gpt_layer_local_spec(),
                     vocab_size=VOCAB, max_sequence_length=SEQ, parallel_output=True,
                     share_embeddings_and_output_weights=False)
    if bf16 or fp16:  # megatron's mixed-precision wrapper: 16-bit params, fp32 logits
        model = Float16Module(tconfig, model)
    if float64:
        return _float64_build(model, tconfig, config, lr)
    # adam_eps 1e-3: the key bias has an exactly-zero true gradient (softmax is shift-invariant), so
    # its float-noise gradient would get full-size Adam steps whose sign differs between layouts.
    ddp, optimizer = setup_model_and_optimizer([model], lr=lr, clip_grad=clip_grad, adam_eps=1e-3,
                                               use_distributed_optimizer=use_distributed_optimizer)
    return ddp, optimizer, SVRPGOptimizer(optimizer, config)


def _float64_build(model, tconfig, config, lr):
    tconfig.params_dtype = tconfig.pipeline_dtype = torch.float64
    model = model.double()  # after the float32 initialisation: the same weights, exactly
    # megatron's distributed optimizer refuses float64 params; at DP=1 both optimizers step alike
    ddp, optimizer = setup_model_and_optimizer([model], lr=lr, clip_grad=0.0, adam_eps=1e-3,
                                               grad_reduce_in_fp32=False, use_distributed_optimizer=False)
    return ddp, optimizer, SVRPGOptimizer(optimizer, config)


def global_batch(step: int, size: int) -> dict:
    """Deterministic tokens/advantages for `step`; this DP rank's contiguous slice of them."""
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (size, SEQ + 1), generator=g)
    advantages = torch.randn(size, generator=g)
    mask = torch.ones(size, SEQ)
    mask[:, : 1 + step % 3] = 0  # prompt tokens carry no loss
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    local = slice(dp_rank * size // dp, (dp_rank + 1) * size // dp)
    return {"tokens": tokens[local, :-1], "targets": tokens[local, 1:],
            "advantages": advantages[local], "mask": mask[local]}


def rl_batch(ddp, seed: int) -> list[dict]:
    """rl_forward_backward micro-batches: 2 × 4 sequences, old log-probs from the model (the sampler)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(2):
        mask = torch.ones(4, SEQ)
        mask[:, :3] = 0  # prompt
        batches.append({"tokens": torch.randint(0, VOCAB, (4, SEQ), generator=g),
                        "loss_mask": mask, "advantages": torch.randn(4, generator=g)})
    for batch, logp in zip(batches, compute_logprobs(ddp, batches)):
        batch["old_logp"] = logp
    return batches


def load_weights(target, source) -> None:
    """target DDP model's parameters ← source's (same layout)."""
    with torch.no_grad():  # float32 → float64 is exact
        for t, s in zip(target[0].module.parameters(), source[0].module.parameters()):
            t.copy_(s)


def rho_weighted(snapshot_ddp, batch, float64=False) -> list[dict]:
    """The snapshot's on-policy micro-batches with advantages ρ·A, ρ = π_θ̃/π_θt (float64: the
    float64 model's own log-probs; compute_logprobs' are float32 by design)."""
    if float64:
        batch = fx.as_float64(batch)
        snap_logps = [fx.model_logprobs(snapshot_ddp[0].module, mb["tokens"], VOCAB)[0] for mb in batch]
    else:
        snap_logps = compute_logprobs(snapshot_ddp, batch)
    out = []
    for mb, snap_logp in zip(batch, snap_logps):
        rho = ((snap_logp - mb["old_logp"]) * mb["loss_mask"]).sum(-1).exp()
        out.append({**mb, "old_logp": snap_logp, "advantages": mb["advantages"] * rho})
    return out


def _micro_batches(batch: dict) -> list[dict]:
    n = batch["tokens"].shape[0] // MICRO_BATCHES
    return [{k: v[i * n:(i + 1) * n] for k, v in batch.items()} for i in range(MICRO_BATCHES)]


def make_grad_fn(ddp):
    """grad_fn(batch, svrpg_pass) for SVRPGOptimizer: REINFORCE loss −A·Σ_t mask·log π(x_t), mean over
    the global batch's sequences; the snapshot pass weights each sequence by ρ̄."""
    forward_backward = get_forward_backward_func()

    def grad_fn(batch, svrpg_pass):
        # The same micro-batch dicts in every pass: "current" stores θ_t's log-probs on them.
        micro_batches = batch.setdefault("micro_batches", _micro_batches(batch))

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            positions = torch.arange(SEQ).unsqueeze(0).expand_as(mb["tokens"])
            logits = model(mb["tokens"], positions, attention_mask=None)
            logp, _ = vocab_parallel_logprobs(logits, mb["targets"])

            def loss_func(token_logp):
                if svrpg_pass.kind == "current":
                    mb["old_logp"] = token_logp.detach()  # the sampler is θ_t (on-policy batch)
                token_loss = -mb["advantages"].unsqueeze(-1) * token_logp * mb["mask"]
                if svrpg_pass.kind == "snapshot":
                    rho = svrpg_pass.ratio(token_logp, mb["old_logp"], mb["mask"])
                    token_loss = weight_token_loss(token_loss, rho)
                loss = token_loss.sum()
                count = torch.tensor(mb["tokens"].shape[0], dtype=torch.int)
                return loss, count, {"loss": loss.detach()}

            return logp, loss_func

        forward_backward(forward_step_func=forward_step, data_iterator=iter(micro_batches),
                         model=ddp, num_microbatches=len(micro_batches), seq_length=SEQ,
                         micro_batch_size=micro_batches[0]["tokens"].shape[0], forward_only=False)
        # each call is normalised by its own sequences: weight = the global sequence count
        sequences = batch["tokens"].shape[0] * parallel_state.get_data_parallel_world_size()
        return {"num_sequences": sequences, "num_units": sequences}

    return grad_fn


def run_steps(svrpg, grad_fn, steps, metrics_out=None):
    """Inner steps `steps` (indices into the deterministic batch stream), anchoring when due;
    metrics_out gets each step's metrics plus "grad_norm", the wrapped optimizer's (pre-clip) norm."""
    for step in steps:
        if svrpg.needs_anchor:
            svrpg.anchor(grad_fn, [global_batch(10_000 + step, ANCHOR_BATCH)])
        ok, grad_norm, _, metrics = svrpg.step(grad_fn, global_batch(step, GLOBAL_BATCH))
        assert ok
        if metrics_out is not None:
            metrics_out.append({**metrics, "grad_norm": float(grad_norm)})


def full_params(ddp) -> dict:
    """Every parameter, gathered over TP along its partition dim (identical on all ranks), as numpy
    arrays (pickled by value: many tensors through the harness queue exhaust shared-memory fds)."""
    out = {}
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    for name, p in ddp[0].module.named_parameters():
        t = p.detach().clone()
        if tp > 1 and getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(t) for _ in range(tp)]
            torch.distributed.all_gather(parts, t.contiguous(), group=tp_group)
            t = torch.cat(parts, dim=p.partition_dim)
        out[name] = (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # numpy has no bf16
    return out
