"""One step's trainer metrics from the forward-backward calls and optimizer steps it made.

A step runs several `rl_forward_backward` calls (one per mini-batch), each reporting global means
over its loss units (response tokens, or sequences with --rpg-is-level sequence), maxima for
"*_max", and counts. The step reports them over all its units:

    mean_step = Σ_c units_c·mean_c / Σ_c units_c,   max_step = max_c max_c,   count_step = Σ_c count_c

and the gradient norm of each optimizer step as `grad_norm` (mean) and `grad_norm_max`.
"""
from __future__ import annotations

import math

COUNTS = ("num_tokens", "num_sequences", "normalizer")  # added up over the calls


def units_key(loss) -> str:
    """The count rl_forward_backward's means are taken over: sequences for a PolicyLoss whose metrics
    are per sequence (metric_units "sequence"), else response tokens."""
    return "num_sequences" if loss.metric_units == "sequence" else "num_tokens"


def combine_call_metrics(calls: list[dict], *, units: str) -> dict:
    """The metrics of the calls `calls` (rl_forward_backward's) as those of one batch; `units` names
    the count each call's means are over (units_key)."""
    if not calls:
        return {}
    total = sum(call[units] for call in calls)
    combined = {}
    for name in calls[0]:
        values = [call[name] for call in calls]
        if name in COUNTS:
            combined[name] = sum(values)
        elif name.endswith("_max"):
            combined[name] = max(values)
        else:
            combined[name] = sum(call[units] * call[name] for call in calls) / max(total, 1.0)
    return combined


def grad_norm_metrics(norms: list) -> dict:
    """grad_norm (mean over the step's optimizer steps) and grad_norm_max; NaN for a step megatron
    reported no norm for."""
    values = [float(norm) if norm is not None else math.nan for norm in norms]
    return {"grad_norm": sum(values) / len(values), "grad_norm_max": max(values)}
