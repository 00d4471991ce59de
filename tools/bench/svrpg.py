"""SVRPG benchmark: estimator variance vs plain RPG, step-time ratio, extra memory vs 8·P/DP.

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench/svrpg.py [--skip-megatron]

1. Variance, exact (float64, enumeration): a tabular autoregressive policy (vocabulary 4, length 4,
   256 sequences), REINFORCE-RKL per-sample gradients g(τ; θ) (β = 0.1, random rewards, fixed π_ref).
   θ_t = θ̃ + δ·u drifts from the snapshot along a fixed random direction u. Per-sample covariance
   traces are exact sums over all sequences, so a batch mean's variance is trace / B:
     plain RPG:  E‖ḡ − ∇J‖² = tr Cov_{π_θt}[g(τ; θ_t)] / B,  B = B_S + B_L/m samples per step;
     SVRPG:      tr Cov_{π_θt}[g(τ; θ_t) − ρ̄·g(τ; θ̃)] / B_S + tr Cov_{π_θ̃}[g(τ; θ̃)] / B_L + ‖bias‖²,
   the same samples per step (the anchor batch amortised over the m inner steps; B_S = 16, B_L = 64,
   m = 4, so B = 32). Reported as mean squared error relative to ‖∇J(θ_t)‖².
2. Step time and memory on real megatron-core (CPU, gloo, DP=2, distributed optimizer, GPTModel
   hidden 128, 4 layers): median wall time of an SVRPG inner step over a plain step (zero grads,
   forward-backward, optimizer step) on the same batch; the anchor phase's time per inner step
   (amortised over m); bytes SVRPG holds per rank vs 8·P/DP and the process RSS increase.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere in the checkout

from megatron_rpg.losses.exact import TabularPolicy  # noqa: E402
from megatron_rpg.losses.svrpg import NO_CLIP, RatioClip, snapshot_ratio  # noqa: E402

BETA, B_S, B_L, M = 0.1, 16, 64, 4


def _per_sample_grads(policy, reference, reward):
    """[N, P]: ∇ of L(τ; θ) = −sg(ψ)·log π_θ(τ), ψ = R − β(log π_θ/π_ref + 1), for every sequence."""
    seq_logp = policy.sequence_logp()
    psi = reward - BETA * (seq_logp.detach() - reference.sequence_logp().detach() + 1.0)
    losses = -psi * seq_logp
    rows = []
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[i], policy.params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows), seq_logp.detach().exp()


def _weighted_cov_trace(rows, weights):
    mean = weights @ rows
    return float((weights * (rows - mean).pow(2).sum(-1)).sum()), mean


def variance_table(drifts=(0.0, 0.05, 0.1, 0.2, 0.4, 0.8)):
    snapshot = TabularPolicy(4, 4, seed=0, scale=1.0)
    reference = TabularPolicy(4, 4, seed=2, scale=0.5)
    reward = torch.randn(snapshot.sequences.shape[0], generator=torch.Generator().manual_seed(3),
                         dtype=torch.float64)
    snap_grads, p_snap = _per_sample_grads(snapshot, reference, reward)
    anchor_var, mu = _weighted_cov_trace(snap_grads, p_snap)
    lines = ["| δ (drift) | KL(π_θt‖π_θ̃) | plain RPG rel. MSE | SVRPG rel. MSE (no clip) | ratio | "
             "SVRPG rel. MSE, clip [0.5, 2] (bias² share) |", "|---|---|---|---|---|---|"]
    for delta in drifts:
        current = snapshot.perturbed(scale=delta, seed=7)
        cur_grads, p_cur = _per_sample_grads(current, reference, reward)
        plain_var, true_grad = _weighted_cov_trace(cur_grads, p_cur)
        norm2 = float(true_grad.pow(2).sum())
        kl = float((p_cur * (p_cur.log() - p_snap.log())).sum())
        results = []
        for clip in (NO_CLIP, RatioClip(0.5, 2.0)):
            rho, _ = snapshot_ratio(snapshot.token_logp().detach(), current.token_logp().detach(),
                                    clip=clip)
            cv_var, cv_mean = _weighted_cov_trace(cur_grads - rho.unsqueeze(-1) * snap_grads, p_cur)
            bias2 = float((cv_mean + mu - true_grad).pow(2).sum())
            results.append(((cv_var / B_S + anchor_var / B_L + bias2) / norm2, bias2 / norm2))
        plain = plain_var / (B_S + B_L / M) / norm2
        (svrpg, _), (clipped, clip_bias) = results
        lines.append(f"| {delta:g} | {kl:.4f} | {plain:.4f} | {svrpg:.4f} | {svrpg / plain:.2f} | "
                     f"{clipped:.4f} ({clip_bias / max(clipped, 1e-300):.1%}) |")
    return "\n".join(lines)


def _timing_body(rank, world_size, hidden, layers, repeats):
    import psutil

    from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_rpg.optim.svrpg import SVRPGOptimizer
    from megatron_rpg.optim.svrpg_config import SVRPGConfig
    from tests.optim import svrpg_training as T

    initialize_parallel(seed=1234)
    try:
        config = SVRPGConfig(enabled=True, inner_steps=M, anchor_batch_size=T.ANCHOR_BATCH)
        ddp, optimizer, _ = T.build(True, config, lr=1e-4, hidden=hidden, layers=layers)
        grad_fn = T.make_grad_fn(ddp)
        def plain_step(batch):
            optimizer.zero_grad()
            ddp[0].zero_grad_buffer()
            grad_fn(batch, type("Pass", (), {"kind": "current"})())
            optimizer.step()

        for i in range(3):  # warm the allocator with plain steps, so RSS measures SVRPG's state
            plain_step(T.global_batch(i, T.ANCHOR_BATCH))
        process = psutil.Process()
        rss_before = process.memory_info().rss
        svrpg = SVRPGOptimizer(optimizer, config)
        svrpg.anchor(grad_fn, [T.global_batch(99, T.ANCHOR_BATCH)])
        svrpg.step(grad_fn, T.global_batch(98, T.GLOBAL_BATCH))
        rss_after = process.memory_info().rss

        def svrpg_step(batch):
            if svrpg.needs_anchor:
                svrpg.anchor(grad_fn, [T.global_batch(99, T.ANCHOR_BATCH)])
            svrpg.step(grad_fn, batch)

        timings = {"plain": [], "svrpg": [], "anchor": []}
        for i in range(repeats):
            for name, fn in (("plain", plain_step), ("svrpg", svrpg_step)):
                batch = T.global_batch(i, T.GLOBAL_BATCH)
                torch.distributed.barrier()
                start = time.perf_counter()
                fn(batch)
                timings[name].append(time.perf_counter() - start)
            torch.distributed.barrier()
            start = time.perf_counter()
            svrpg.anchor(grad_fn, [T.global_batch(99, T.ANCHOR_BATCH)])
            timings["anchor"].append(time.perf_counter() - start)
        local_params = sum(s.main.numel() for s in svrpg.slots)
        total_params = sum(p.numel() for p in ddp[0].module.parameters())
        return {k: statistics.median(v[2:]) for k, v in timings.items()} | {
            "extra_bytes": svrpg.extra_memory_bytes(), "local_params": local_params,
            "total_params": total_params, "rss_increase": rss_after - rss_before}
    finally:
        destroy_parallel()


def timing_table(hidden=128, layers=4, repeats=32):
    from tests.distributed.harness import run_on_ranks
    from tests.optim import svrpg_training as T

    results = run_on_ranks(_timing_body, world_size=2, args=(hidden, layers, repeats))
    r0 = results[0]
    ratio = r0["svrpg"] / r0["plain"]
    amortised = (r0["svrpg"] + r0["anchor"] / M) / r0["plain"]
    dp = len(results)
    lines = [f"GPTModel hidden {hidden}, {layers} layers, vocab {T.VOCAB}, P = {r0['total_params']:,}; "
             f"DP = {dp}, distributed optimizer; inner batch {T.GLOBAL_BATCH}×{T.SEQ} tokens, "
             f"anchor batch {T.ANCHOR_BATCH}, m = {M}; medians of {repeats - 2} steps (rank 0)", "",
             "| quantity | value |", "|---|---|",
             f"| plain step | {r0['plain'] * 1e3:.1f} ms |",
             f"| SVRPG inner step | {r0['svrpg'] * 1e3:.1f} ms ({ratio:.2f}× plain) |",
             f"| anchor phase | {r0['anchor'] * 1e3:.1f} ms (→ {amortised:.2f}× plain per step "
             f"amortised over m = {M}) |"]
    for rank, r in enumerate(results):
        expected = 8 * r["local_params"]
        lines.append(f"| rank {rank}: SVRPG tensors held | {r['extra_bytes']:,} B = "
                     f"{r['extra_bytes'] / expected:.3f} × 8·P_local (8·P/DP = "
                     f"{8 * r0['total_params'] // dp:,} B); process RSS after SVRPG's anchor + "
                     f"first step: +{r['rss_increase'] / 2**20:.2f} MiB |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-megatron", action="store_true", help="only the exact variance table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(variance_table())
    if not args.skip_megatron:
        print()
        print(timing_table())


if __name__ == "__main__":
    main()
