"""Input checks shared by the losses: each raises ValueError naming the argument, the bad value and
what is accepted, before any computation."""
from __future__ import annotations

from collections.abc import Collection

import torch


def check_choice(name: str, value, accepted: Collection) -> None:
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not supported; accepted values: {sorted(accepted)}")


def check_same_shape(name: str, tensor: torch.Tensor, reference_name: str, reference: torch.Tensor) -> None:
    if tensor.shape != reference.shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)} but {reference_name} has shape "
                         f"{tuple(reference.shape)}; they must match ([batch, seq] per-token values)")


def check_finite(name: str, tensor: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """NaN/inf where the mask is set (everywhere when mask is None) is an error; padding may hold anything."""
    values = tensor if mask is None else tensor[mask.bool()]
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        raise ValueError(f"{name} contains {int(bad.sum())} non-finite value(s) (NaN or inf) at response "
                         f"positions; recompute it or mask those tokens out")


def check_range(name: str, value: float, low: float | None = None, high: float | None = None,
                *, low_inclusive: bool = True, high_inclusive: bool = True) -> None:
    ok_low = low is None or (value >= low if low_inclusive else value > low)
    ok_high = high is None or (value <= high if high_inclusive else value < high)
    if not (ok_low and ok_high):
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = f"{'[' if low_inclusive else '('}{lo}, {hi}{']' if high_inclusive else ')'}"
        raise ValueError(f"{name}={value!r} is out of range; it must lie in {interval}")


def response_mask(mask: torch.Tensor | None, like: torch.Tensor, like_name: str = "logp") -> torch.Tensor:
    """The mask as a bool tensor shaped like `like` (None: every position is a response token)."""
    if mask is None:
        return torch.ones_like(like, dtype=torch.bool)
    check_same_shape("mask", mask, like_name, like)
    if mask.dtype != torch.bool:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("mask must hold only 0/1 (or bool) values marking response tokens")
        mask = mask != 0
    return mask


def check_policy_inputs(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor | None, ref_logp: torch.Tensor | None = None) -> torch.Tensor:
    """The checks every policy loss makes on its tensors: [batch, seq] log-probs of one shape,
    advantages [batch] or [batch, seq], finite values at response positions. Returns the bool mask."""
    if logp.dim() != 2:
        raise ValueError(f"logp must be per-token log-probs [batch, seq], got shape {tuple(logp.shape)}")
    check_same_shape("old_logp", old_logp, "logp", logp)
    if ref_logp is not None:
        check_same_shape("ref_logp", ref_logp, "logp", logp)
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}; it must be [batch] "
                         f"{tuple(logp.shape[:1])} or [batch, seq] {tuple(logp.shape)}")
    mask = response_mask(mask, logp)
    check_finite("logp", logp.detach(), mask)
    check_finite("old_logp", old_logp, mask)
    if ref_logp is not None:
        check_finite("ref_logp", ref_logp, mask)
    check_finite("advantages", advantages, mask if advantages.dim() == 2 else None)
    return mask
