"""The FP8 / Transformer Engine start-up checks (`check_transformer_engine_ready`) on a faked GPU:
a missing or too old Transformer Engine and a GPU below the recipe's compute capability are refused
with messages naming what is needed and what was found."""
from __future__ import annotations

import re
import sys
import types

import pytest
import torch

from megatron_rpg.megatron.models import FP8_RECIPES, check_transformer_engine_ready


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda.is_available() True and an importable (empty) transformer_engine module."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    return monkeypatch


def _fake_te_version(monkeypatch, installed: str, asked: list):
    import megatron.core.utils
    from packaging.version import Version

    def is_te_min_version(version, check_equality=True):
        asked.append(version)
        return Version(installed) >= Version(version)
    monkeypatch.setattr(megatron.core.utils, "is_te_min_version", is_te_min_version)


@pytest.mark.parametrize("request_te", [dict(use_te=True), dict(use_te=True, fp8="hybrid")])
def test_transformer_engine_not_importable_on_a_gpu_is_refused_naming_the_package(fake_gpu, request_te):
    fake_gpu.setitem(sys.modules, "transformer_engine", None)  # `import transformer_engine` raises
    with pytest.raises(RuntimeError, match=r"needs Transformer Engine \(pip install "
                                           r"transformer-engine\[pytorch\]\) but it cannot be imported"):
        check_transformer_engine_ready(**request_te)


@pytest.mark.parametrize("recipe, needed, found", [
    ("delayed", (8, 9), (8, 6)), ("tensorwise", (8, 9), (8, 0)), ("blockwise", (9, 0), (8, 9)),
    ("mxfp8", (10, 0), (9, 0)), (None, (8, 9), (7, 5))])
def test_gpu_below_the_recipe_compute_capability_is_refused_naming_both(fake_gpu, recipe, needed, found):
    fake_gpu.setattr(torch.cuda, "get_device_capability", lambda device=None: found)
    message = (f"fp8='e4m3' (--fp8-format) with fp8_recipe='{recipe or 'delayed'}' needs a GPU of compute "
               f"capability >= {needed[0]}.{needed[1]}; this GPU is {found[0]}.{found[1]}")
    with pytest.raises(RuntimeError, match=re.escape(message)):
        check_transformer_engine_ready(use_te=True, fp8="e4m3", fp8_recipe=recipe)


@pytest.mark.parametrize("recipe, needed", [("tensorwise", "2.2.0.dev0"), ("blockwise", "2.3.0.dev0")])
def test_transformer_engine_older_than_the_recipe_needs_is_refused_naming_the_version(fake_gpu, recipe,
                                                                                       needed):
    fake_gpu.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    asked = []
    _fake_te_version(fake_gpu, "2.1.0", asked)
    with pytest.raises(RuntimeError, match=re.escape(f"fp8_recipe={recipe!r} needs Transformer "
                                                     f"Engine >= {needed}")):
        check_transformer_engine_ready(use_te=True, fp8="hybrid", fp8_recipe=recipe)
    assert asked == [needed]


def test_fp8_start_up_check_passes_on_a_capable_gpu_with_a_recent_transformer_engine(fake_gpu):
    fake_gpu.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    asked = []
    _fake_te_version(fake_gpu, "2.3.0", asked)
    for recipe in FP8_RECIPES + (None,):
        assert check_transformer_engine_ready(use_te=True, fp8="e4m3", fp8_recipe=recipe) is None
    assert check_transformer_engine_ready(use_te=True) is None  # TE layers without FP8
    assert asked == ["2.1.0", "2.2.0.dev0", "2.3.0.dev0", "2.1.0", "2.1.0"]
