"""Tiny policies whose sample space can be enumerated, for exact-gradient proofs in float64.

A `TabularPolicy` over sequences x = (x_0, …, x_{T−1}) with tokens in {0, …, V−1} is autoregressive:
    log π(x) = Σ_t log softmax(θ_t[prefix(x_<t)])[x_t],
with one free logit row per position and prefix (θ_t has shape [V**t, V]), so every distribution over
the V**T sequences is reachable and expectations are finite sums: E_π[f] = Σ_x π(x)·f(x).
With `length=1` it is a plain softmax over K = V outcomes.

Proof pattern (docs/algorithms.md, How a loss is proved): compute J(θ) in closed form from the enumerated distribution,
take ∇J by autograd, and compare with Σ_x π_old(x)·∇L(x) for a surrogate L.
"""
from __future__ import annotations

import torch

from megatron_rpg.losses.validation import check_range


def enumerate_sequences(vocab_size: int, length: int) -> torch.Tensor:
    """All vocab_size**length sequences in lexicographic order, as a LongTensor [N, length]."""
    check_range("vocab_size", vocab_size, 1)
    check_range("length", length, 1)
    n = vocab_size ** length
    index = torch.arange(n)
    # digit t (most significant first) of the base-V representation of the row index
    powers = vocab_size ** torch.arange(length - 1, -1, -1)
    return (index[:, None] // powers[None, :]) % vocab_size


def _prefix_index(sequences: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[N, length]: row of θ_t used at position t, i.e. the base-V integer of x_<t (0 for t = 0)."""
    n, length = sequences.shape
    prefix = torch.zeros(n, length, dtype=torch.long)
    for t in range(1, length):
        prefix[:, t] = prefix[:, t - 1] * vocab_size + sequences[:, t - 1]
    return prefix


class TabularPolicy:
    """Autoregressive policy with one logit table per position and prefix (see module docstring)."""

    def __init__(self, vocab_size: int, length: int, *, seed: int, scale: float = 1.0,
                 dtype: torch.dtype = torch.float64):
        check_range("vocab_size", vocab_size, 2)
        check_range("length", length, 1)
        self.vocab_size = vocab_size
        self.length = length
        self.dtype = dtype
        generator = torch.Generator().manual_seed(seed)
        self.params = [(scale * torch.randn(vocab_size ** t, vocab_size, generator=generator,
                                            dtype=dtype)).requires_grad_(True)
                       for t in range(length)]
        self.sequences = enumerate_sequences(vocab_size, length)
        self._prefix = _prefix_index(self.sequences, vocab_size)

    def token_logp(self, params: list[torch.Tensor] | None = None) -> torch.Tensor:
        """[N, length]: log π(x_t | x_<t) for every enumerated sequence x and position t."""
        params = self.params if params is None else params
        columns = []
        for t, table in enumerate(params):
            log_probs = torch.log_softmax(table, dim=-1)  # [V**t, V]
            columns.append(log_probs[self._prefix[:, t], self.sequences[:, t]])
        return torch.stack(columns, dim=1)

    def next_token_logp(self, params: list[torch.Tensor] | None = None) -> torch.Tensor:
        """[N, length, V]: the whole conditional log π(· | x_<t) at every position of every sequence
        (what per-position divergences D(π(·|x_<t), π_ref(·|x_<t)) are computed from)."""
        params = self.params if params is None else params
        return torch.stack([torch.log_softmax(table, dim=-1)[self._prefix[:, t]]
                            for t, table in enumerate(params)], dim=1)

    def sequence_logp(self, params: list[torch.Tensor] | None = None) -> torch.Tensor:
        """[N]: log π(x) = Σ_t log π(x_t | x_<t)."""
        return self.token_logp(params).sum(dim=1)

    def perturbed(self, scale: float, seed: int) -> "TabularPolicy":
        """A policy with the same shapes and params θ + scale·noise (fresh leaf tensors)."""
        other = TabularPolicy.__new__(TabularPolicy)
        other.vocab_size, other.length, other.dtype = self.vocab_size, self.length, self.dtype
        generator = torch.Generator().manual_seed(seed)
        other.params = [(p.detach() + scale * torch.randn(p.shape, generator=generator, dtype=p.dtype)
                         ).requires_grad_(True) for p in self.params]
        other.sequences = self.sequences
        other._prefix = self._prefix
        return other


def flat_grad(scalar: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """∇scalar w.r.t. params, concatenated into one vector (zeros for params it does not touch)."""
    grads = torch.autograd.grad(scalar, params, allow_unused=True, retain_graph=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / max(‖b‖, tiny): the agreement measure of every exactness proof."""
    tiny = torch.finfo(b.dtype).tiny if b.is_floating_point() else 1e-300
    return float((a - b).norm() / max(float(b.norm()), tiny))
