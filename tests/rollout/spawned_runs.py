"""The bodies of the rollout tests' spawned runs (tests/rollout/conftest.py): each test module's
`single_process_results(model)` and `layout_results(model, layout)`, merged into one dict per rank."""
from __future__ import annotations

LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2), "dp2": (1, 1)}


def _modules():
    from tests.rollout import test_embedded, test_kv_cache, test_lean_forward, test_sglang_collective
    return test_embedded, test_kv_cache, test_lean_forward, test_sglang_collective


def _merged(parts: list[dict]) -> dict:
    out = {}
    for part in parts:
        if set(part) & set(out):
            raise KeyError(f"result names {sorted(set(part) & set(out))} used by two rollout test modules")
        out.update(part)
    return out


def single_process_body(rank, world_size):
    from megatron_rpg.megatron.parallel import destroy_parallel
    from tests.rollout.test_embedded import _model

    model = _model(1, 1)
    out = _merged([module.single_process_results(model) for module in _modules()])
    destroy_parallel()
    return out


def two_rank_body(rank, world_size):
    from megatron_rpg.megatron.parallel import destroy_parallel
    from tests.rollout.test_embedded import _model

    parts = []
    for layout, (tp, pp) in LAYOUTS.items():
        model = _model(tp, pp)
        parts += [module.layout_results(model, layout) for module in _modules()]
        destroy_parallel()
    return _merged(parts)
