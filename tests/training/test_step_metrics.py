"""A step's metrics over several calls equal the metrics computed over all their units at once."""
import math

import torch

from megatron_rpg.training.step_metrics import combine_call_metrics, grad_norm_metrics, units_key


def _call(values: torch.Tensor, sequences: int) -> dict:
    """What one call reports for per-token values: mean over its tokens, max, counts."""
    return {"kl_k3": float(values.mean()), "kl_k3_max": float(values.max()), "num_tokens": float(values.numel()),
            "num_sequences": float(sequences), "normalizer": float(values.numel())}


def test_a_steps_means_maxima_and_counts_are_those_of_all_its_tokens():
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(11, generator=generator, dtype=torch.float64)
    for split in (1, 3, 10):  # unequal calls: a mean of the call means would differ
        first, second = values[:split], values[split:]
        combined = combine_call_metrics([_call(first, 1), _call(second, 2)], units="num_tokens")
        assert math.isclose(combined["kl_k3"], float(values.mean()), rel_tol=1e-15)
        assert combined["kl_k3_max"] == float(values.max())
        assert (combined["num_tokens"], combined["num_sequences"], combined["normalizer"]) == (11, 3, 11)


def test_sequence_level_means_are_weighted_by_sequences():
    from megatron_rpg.losses import RPGLoss

    assert units_key(RPGLoss(is_level="sequence")) == "num_sequences"
    assert units_key(RPGLoss()) == "num_tokens"
    calls = [{"ratio_mean": 1.0, "num_sequences": 1.0}, {"ratio_mean": 4.0, "num_sequences": 3.0}]
    assert combine_call_metrics(calls, units="num_sequences")["ratio_mean"] == (1.0 + 12.0) / 4


def test_grad_norm_is_reported_per_optimizer_step_as_mean_and_max():
    assert grad_norm_metrics([1.0, 3.0]) == {"grad_norm": 2.0, "grad_norm_max": 3.0}
    assert math.isnan(grad_norm_metrics([None])["grad_norm"])
