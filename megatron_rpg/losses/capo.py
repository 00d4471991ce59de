"""CAPO: curvature-aware token masking from a last-layer model (docs/algorithms.md, CAPO).

Per response token t (h = final hidden state [H], the input of the LM head W [V, H]; the top-K rows
ids_t of the logits z = W h, K the sampling top-k; π = softmax of the top-K logits; e_a the one-hot of
the sampled token over the top-K, all zero when it lies outside; v = e_a − π; A the advantage):

    objective   J_t(W) = A·π_a(W)/π_a(W_0)           (the ratio surrogate at W_0 = the rollout policy)
    gradient    G_t = A·(v ⊗ h)                     (the rows ids_t of ∇_W J_t; all other rows are 0)
    direction   D = G_eff: G (SGD) or Adam's prospective step m̂/(√v̂ + ε), per vocabulary row k,
                m̂ = (β₁m_k + (1−β₁)G_k)/(1−β₁^{s+1}), v̂ = (β₂v_k + (1−β₂)G_k²)/(1−β₂^{s+1}), s steps so far
    step        ΔW = η·D (ascent on J; η the current learning rate), so Δz = η·u with u = D[ids_t]·h
    m_H = η·A·(vᵀu) + ½η²·A·[(vᵀu)² − uᵀ(diag π − ππᵀ)u]     (η·A·vᵀu = η⟨G_t, D⟩)
    m_F = ½η²·(vᵀu)²

m_H is exactly the second-order Taylor change of J_t along ΔW (∇_z π_a/π_a = v, ∇²_z π_a/π_a =
vvᵀ − (diag π − ππᵀ)). m_F is exactly the second-order Taylor term of ½(log π_a(W+ΔW) − log π_a(W))²
(the sampled-token "k2" estimate of the KL), and for a direction that does not depend on the sampled
token its expectation over a ∼ π is ½ΔᵀFΔ, the exact second-order Taylor change of KL(π_W ‖ π_{W+ΔW})
(F = the softmax Fisher diag π − ππᵀ in logit space). Per token m_F is that unbiased one-sample
estimate, not the KL itself. Both are proven by autograd Hessian-vector products in
tests/losses/test_capo_exact.py.

Levels, applied in the order given, each on the tokens the previous ones kept:
- "token": D from G_t alone (the rows ids_t), one (m_H, m_F) per token;
- "sequence": Ḡ = per vocabulary row the mean of the kept tokens' G_t rows within the sequence
  (sum over the tokens whose top-K holds that row / their count); D = G_eff(Ḡ); each kept token's
  (m_H,t, m_F,t) with u_t = D[ids_t]·h_t, and the sequence's (m_H, m_F) = their mean over its kept
  tokens: the exact second-order change of the sequence's token-mean objective along η·D; a rejected
  sequence loses all its tokens;
- "batch": the same with Ḡ over the whole batch and every data-parallel rank, and (m_H, m_F) = the
  mean over sequences (with a kept token) of the sequence means; rejection drops the whole batch.
Keep iff m_F ≤ τ_F and |m_H| ≤ τ_H (hessian_symmetric) or 0 ≤ m_H ≤ τ_H (otherwise).
Differences from the public code (luckeciano/stable-pg-llm), stated: its group first-order term is
η⟨Ḡ, D⟩ with the per-row mean Ḡ, which is not the Taylor term of any mean objective; ours is the
exact one, η·mean_t A_t·(v_tᵀu_t). Its Adam model returns G (an SGD step) while it has no moments;
ours starts from m = v = 0, which is Adam's own first step.

Tensor parallelism: rows are identified by global vocabulary ids; a rank holds the rows
[vocab_start, vocab_start + V_local) of any per-row table (the moments, the batch level's sums), and
`tp_sum` adds the partial u of each rank's rows (identity without TP). `dp_sum` adds across
data-parallel ranks (batch level). Both are injected: this module imports no megatron.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_rpg.losses.validation import check_choice

CAPO_LEVELS = ("token", "sequence", "batch")
CAPO_OPTIMIZER_MODELS = ("sgd", "adam")
CAPO_PRESETS = {"capo": (1e-4, 0.01), "drcapo": (1e-3, 5e-4), "reincapo": (1e-5, 0.1)}  # (τ_F, τ_H)
Reduce = Callable[[torch.Tensor], torch.Tensor]
CHUNK_TOKENS = 128  # tokens per [chunk, K, H] gradient-rows tile (K = 50, H = 4096: 105 MB in float32)


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass(frozen=True)
class CAPOConfig:
    """preset: the (τ_F, τ_H) of a published recipe (capo, drcapo, reincapo); tau_f / tau_h override it.
    top_k: K, the sampling top-k the last-layer model's softmax spans. levels: applied in order.
    optimizer_model: "adam" (our per-row moment table, CAPOAdamMoments) or "sgd"."""

    enabled: bool = False
    preset: str = "capo"
    tau_f: float | None = None
    tau_h: float | None = None
    top_k: int = 50
    levels: tuple[str, ...] = ("token",)
    hessian_symmetric: bool = False
    optimizer_model: str = "adam"

    def __post_init__(self):  # messages name the trainer's flags (training/flags.py: --capo-*)
        check_choice("--capo-preset", self.preset, CAPO_PRESETS)
        check_choice("--capo-optimizer-model", self.optimizer_model, CAPO_OPTIMIZER_MODELS)
        for name in ("tau_f", "tau_h"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"--capo-{name.replace('_', '-')}={value!r} must be a finite number > 0")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 2:
            raise ValueError(f"--capo-top-k={self.top_k!r} must be an integer >= 2")
        if not self.levels or len(set(self.levels)) != len(self.levels):
            raise ValueError(f"--capo-levels={list(self.levels)} must name each level at most once, at least one")
        for level in self.levels:
            check_choice("--capo-levels", level, CAPO_LEVELS)

    @property
    def thresholds(self) -> tuple[float, float]:
        """(τ_F, τ_H): the preset's, overridden by tau_f / tau_h where given."""
        tau_f, tau_h = CAPO_PRESETS[self.preset]
        return (tau_f if self.tau_f is None else self.tau_f, tau_h if self.tau_h is None else self.tau_h)


@dataclass
class CAPOTokens:
    """The flattened response tokens [T] (padding included, marked by mask). hidden [T, H]; topk_logits
    and topk_ids [T, K] (global vocabulary ids, over the whole vocabulary even with TP); sampled [T];
    advantages [T]; mask [T] (bool); sequence [T] (the row each token belongs to, 0..B−1)."""

    hidden: torch.Tensor
    topk_logits: torch.Tensor
    topk_ids: torch.Tensor
    sampled: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    sequence: torch.Tensor

    def take(self, rows: slice) -> "CAPOTokens":
        return CAPOTokens(*(getattr(self, f.name)[rows] for f in dataclasses.fields(self)))

    @property
    def probs(self) -> torch.Tensor:
        return torch.softmax(self.topk_logits.to(self.hidden.dtype), dim=-1)

    @property
    def score(self) -> torch.Tensor:
        """v = e_a − π [T, K] (e_a all zero when the sampled token is outside the top-K)."""
        return (self.topk_ids == self.sampled[:, None]).to(self.hidden.dtype) - self.probs


class SGDModel:
    """G_eff = G."""

    def effective(self, grad_rows: torch.Tensor, local_rows: torch.Tensor) -> torch.Tensor:
        return grad_rows


@dataclass
class CAPOAdamMoments:
    """Our own Adam moments of the LM-head rows (not megatron's): m, v [V_local, H] for the global rows
    [vocab_start, vocab_start + V_local), step s = the number of updates so far; β₁, β₂, ε the trainer's
    Adam settings. `accumulate` collects the kept tokens' row sums of each micro-batch; `finish_step`,
    once per optimizer step, moves only the rows that step's masked gradient touched, from its per-row
    mean (an untouched row keeps its moments: the sparse-gradient convention)."""

    m: torch.Tensor
    v: torch.Tensor
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    step: int = 0
    _pending: tuple | None = None

    @classmethod
    def zeros(cls, local_vocab: int, hidden: int, *, dtype=torch.float32, **settings) -> "CAPOAdamMoments":
        return cls(torch.zeros(local_vocab, hidden, dtype=dtype), torch.zeros(local_vocab, hidden, dtype=dtype),
                   **settings)

    def effective(self, grad_rows: torch.Tensor, local_rows: torch.Tensor) -> torch.Tensor:
        """m̂/(√v̂ + ε) of the prospective step s+1 for grad_rows [N, H] at local_rows [N]; no state change."""
        m = self.beta1 * self.m[local_rows].to(grad_rows.dtype) + (1 - self.beta1) * grad_rows
        v = self.beta2 * self.v[local_rows].to(grad_rows.dtype) + (1 - self.beta2) * grad_rows ** 2
        m_hat = m / (1 - self.beta1 ** (self.step + 1))
        v_hat = v / (1 - self.beta2 ** (self.step + 1))
        return m_hat / (v_hat.sqrt() + self.eps)

    def accumulate(self, local_rows: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """Add one micro-batch's kept-token row sums [U, H] and counts [U] (already summed over DP) to this
        optimizer step's pending gradient."""
        if self._pending is None:
            self._pending = (torch.zeros_like(self.m, dtype=sums.dtype), torch.zeros(len(self.m), dtype=sums.dtype))
        self._pending[0].index_add_(0, local_rows, sums)
        self._pending[1].index_add_(0, local_rows, counts)

    def finish_step(self, applied: bool = True) -> None:
        """One Adam moment update from the step's per-row mean gradient at the rows it touched (none if the
        step was skipped, as the optimizer's own state was not moved)."""
        pending, self._pending = self._pending, None
        if not applied or pending is None:
            return
        touched = pending[1] > 0
        g = (pending[0][touched] / pending[1][touched, None]).to(self.m.dtype)
        self.m[touched] = self.beta1 * self.m[touched] + (1 - self.beta1) * g
        self.v[touched] = self.beta2 * self.v[touched] + (1 - self.beta2) * g ** 2
        self.step += 1

    def state_dict(self) -> dict:
        return {"m": self.m, "v": self.v, "step": self.step}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """m, v copied in (same shapes), the step count set; no pending step."""
        for name in ("m", "v"):
            if tuple(state[name].shape) != tuple(getattr(self, name).shape):
                raise ValueError(f"the CAPO moment table's {name} is {tuple(state[name].shape)}, this run's is "
                                 f"{tuple(getattr(self, name).shape)}: the model or its vocabulary split changed")
            getattr(self, name).copy_(state[name])
        self.step, self._pending = int(state["step"]), None


def curvature_terms(probs: torch.Tensor, score: torch.Tensor, u: torch.Tensor, advantages: torch.Tensor,
                    lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(m_H, m_F) [T] from π, v [T, K], u = D[ids]·h [T, K], A [T] and η (the formulas above)."""
    vu = (score * u).sum(-1)
    u_fisher_u = (probs * u * u).sum(-1) - (probs * u).sum(-1) ** 2  # uᵀ(diag π − ππᵀ)u
    m_h = lr * advantages * vu + 0.5 * lr ** 2 * advantages * (vu ** 2 - u_fisher_u)
    m_f = 0.5 * lr ** 2 * vu ** 2
    return m_h, m_f


def token_gradient_rows(tokens: CAPOTokens) -> torch.Tensor:
    """G_t rows [T, K, H]: A·v_k·h for each top-K row k."""
    return tokens.advantages[:, None, None] * tokens.score[:, :, None] * tokens.hidden[:, None, :]


def _local(tokens: CAPOTokens, vocab_start: int, local_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(is the row on this rank [T, K], its local index clamped into range [T, K])."""
    local = tokens.topk_ids - vocab_start
    on_rank = (local >= 0) & (local < local_vocab)
    return on_rank, local.clamp(0, local_vocab - 1)


def _chunks(count: int, size: int):
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


def token_level_terms(tokens: CAPOTokens, model, lr: float, *, vocab_start: int = 0, local_vocab: int | None = None,
                      tp_sum: Reduce = _identity, chunk: int = CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (m_H, m_F) [T] with each token's own direction G_eff(G_t); the [T, K, H] rows are made
    `chunk` tokens at a time."""
    local_vocab = _vocab(tokens, local_vocab)
    on_rank, local = _local(tokens, vocab_start, local_vocab)
    parts = [torch.zeros(0, tokens.topk_ids.shape[1], dtype=tokens.hidden.dtype)]
    for rows in _chunks(len(tokens.sampled), chunk):
        grad = token_gradient_rows(tokens.take(rows))
        shape = grad.shape
        direction = model.effective(grad.reshape(-1, shape[-1]), local[rows].reshape(-1)).reshape(shape)
        parts.append(torch.einsum("tkh,th->tk", direction, tokens.hidden[rows]) * on_rank[rows])
    u = tp_sum(torch.cat(parts))  # u = D[ids]·h: each rank its own rows, summed over TP
    return curvature_terms(tokens.probs, tokens.score, u, tokens.advantages, lr)


def row_mean_gradient(tokens: CAPOTokens, keep: torch.Tensor, group: torch.Tensor, *, vocab_start: int = 0,
                      local_vocab: int | None = None, dp_sum: Reduce | None = None, chunk: int = CHUNK_TOKENS
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keys [U], Ḡ [U, H], counts [U]): per (group, local row) key = group·V_local + row, the mean of the
    kept tokens' G_t rows (the sum over the group's kept tokens whose top-K holds that row / how many).
    Sparse over the keys present; with dp_sum (the batch level, one group) the sums and counts go
    through a dense [V_local, H] table summed over the data-parallel ranks."""
    local_vocab = _vocab(tokens, local_vocab)
    on_rank, local = _local(tokens, vocab_start, local_vocab)
    chosen = on_rank & keep.bool()[:, None]
    keys = (group[:, None] * local_vocab + local)[chosen]
    if dp_sum is None:
        uniq, inverse = torch.unique(keys, return_inverse=True)
    else:
        uniq, inverse = torch.arange(local_vocab), keys
    slot = torch.full(chosen.shape, -1, dtype=torch.long)
    slot[chosen] = inverse  # each chosen (token, row) entry's place in uniq
    sums = torch.zeros(len(uniq), tokens.hidden.shape[-1], dtype=tokens.hidden.dtype)
    for rows in _chunks(len(tokens.sampled), chunk):
        picked = chosen[rows]
        sums.index_add_(0, slot[rows][picked], token_gradient_rows(tokens.take(rows))[picked])
    counts = torch.zeros(len(uniq), dtype=sums.dtype).index_add_(0, inverse, torch.ones_like(keys, dtype=sums.dtype))
    if dp_sum is not None:
        sums, counts = dp_sum(sums), dp_sum(counts)
        touched = counts > 0
        uniq, sums, counts = uniq[touched], sums[touched], counts[touched]
    return uniq, sums / counts[:, None], counts


def group_level_terms(tokens: CAPOTokens, keep: torch.Tensor, group: torch.Tensor, model, lr: float, *,
                      vocab_start: int = 0, local_vocab: int | None = None, tp_sum: Reduce = _identity,
                      dp_sum: Reduce | None = None, chunk: int = CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (m_H,t, m_F,t) [T] along its group's direction η·G_eff(Ḡ_group) (0 where not kept)."""
    local_vocab = _vocab(tokens, local_vocab)
    keys, mean, _ = row_mean_gradient(tokens, keep, group, vocab_start=vocab_start, local_vocab=local_vocab,
                                      dp_sum=dp_sum, chunk=chunk)
    direction = model.effective(mean, keys % local_vocab)
    on_rank, local = _local(tokens, vocab_start, local_vocab)
    token_keys = group[:, None] * local_vocab + local
    u = torch.zeros(token_keys.shape, dtype=tokens.hidden.dtype)
    if len(keys):  # no early return without rows: tp_sum is a collective every TP rank must join
        at = torch.searchsorted(keys, token_keys).clamp(max=len(keys) - 1)
        found = on_rank & keep.bool()[:, None] & (keys[at] == token_keys)
        for rows in _chunks(len(tokens.sampled), chunk):
            u[rows] = torch.einsum("tkh,th->tk", direction[at[rows]], tokens.hidden[rows]) * found[rows]
    u = tp_sum(u)
    m_h, m_f = curvature_terms(tokens.probs, tokens.score, u, tokens.advantages, lr)
    kept = keep.to(m_h.dtype)
    return m_h * kept, m_f * kept


def accept(m_h: torch.Tensor, m_f: torch.Tensor, tau_f: float, tau_h: float, hessian_symmetric: bool) -> torch.Tensor:
    """m_F ≤ τ_F and (|m_H| ≤ τ_H, or 0 ≤ m_H ≤ τ_H)."""
    low = -tau_h if hessian_symmetric else 0.0
    return (m_f <= tau_f) & (m_h >= low) & (m_h <= tau_h)


def _vocab(tokens: CAPOTokens, local_vocab: int | None) -> int:
    return int(tokens.topk_ids.max()) + 1 if local_vocab is None else local_vocab


@dataclass
class CAPOMasks:
    """keep [T] bool: the final mask; rejected: per level, tokens (of the valid ones) that level removed;
    valid: the number of valid tokens; terms: per level, the (m_H, m_F) it judged (token level [T],
    sequence [B], batch [1])."""

    keep: torch.Tensor
    rejected: dict
    valid: int
    terms: dict


def capo_masks(tokens: CAPOTokens, config: CAPOConfig, model, lr: float, *, num_sequences: int,
               vocab_start: int = 0, local_vocab: int | None = None, tp_sum: Reduce = _identity,
               dp_sum: Reduce = _identity) -> CAPOMasks:
    """The levels of `config` in order on this rank's tokens; an Adam model then accumulates the kept
    tokens' row sums (over all DP ranks) for its next finish_step."""
    tau_f, tau_h = config.thresholds
    keep = tokens.mask.bool().clone()
    valid = int(keep.sum())
    rejected, terms = {}, {}
    kwargs = dict(vocab_start=vocab_start, local_vocab=local_vocab, tp_sum=tp_sum)
    for level in config.levels:
        before = keep.clone()
        if level == "token":
            m_h, m_f = token_level_terms(tokens, model, lr, **kwargs)
            keep = keep & accept(m_h, m_f, tau_f, tau_h, config.hessian_symmetric)
        else:
            m_h, m_f = _group_means(tokens, keep, level, num_sequences, model, lr, dp_sum, kwargs)
            ok = accept(m_h, m_f, tau_f, tau_h, config.hessian_symmetric)
            keep = keep & (ok[tokens.sequence] if level == "sequence" else ok.expand_as(keep))
        terms[level] = (m_h, m_f)
        rejected[level] = int((before & ~keep).sum())
    if isinstance(model, CAPOAdamMoments):
        rows, mean, counts = row_mean_gradient(tokens, keep, torch.zeros_like(tokens.sequence),
                                               vocab_start=vocab_start, local_vocab=local_vocab, dp_sum=dp_sum)
        model.accumulate(rows, mean * counts[:, None], counts)
    return CAPOMasks(keep=keep, rejected=rejected, valid=valid, terms=terms)


def _group_means(tokens, keep, level, num_sequences, model, lr, dp_sum, kwargs):
    """(m_H, m_F) per sequence [B] or for the batch [1]: token means within a sequence, then the mean over
    the sequences with a kept token (over all DP ranks) for the batch."""
    group = tokens.sequence if level == "sequence" else torch.zeros_like(tokens.sequence)
    m_h, m_f = group_level_terms(tokens, keep, group, model, lr, dp_sum=None if level == "sequence" else dp_sum,
                                 **kwargs)
    kept = keep.to(m_h.dtype)
    count = torch.zeros(num_sequences, dtype=m_h.dtype).index_add_(0, tokens.sequence, kept)
    seq_h = torch.zeros_like(count).index_add_(0, tokens.sequence, m_h) / count.clamp(min=1)
    seq_f = torch.zeros_like(count).index_add_(0, tokens.sequence, m_f) / count.clamp(min=1)
    if level == "sequence":
        return seq_h, seq_f
    totals = dp_sum(torch.stack([seq_h.sum(), seq_f.sum(), (count > 0).to(m_h.dtype).sum()]))
    n = totals[2].clamp(min=1)
    return (totals[0] / n).reshape(1), (totals[1] / n).reshape(1)
