"""SVRPGConfig: its ratio clip, and bad values fail early with errors naming the flag (the trainer's
--svrpg-* flags fill it: tests/training/test_config.py)."""
from __future__ import annotations

import pytest

from megatron_rpg.losses.svrpg import RatioClip
from megatron_rpg.optim.svrpg_config import SVRPGConfig


def test_the_ratio_clip_combines_rho_clip_and_cap():
    config = SVRPGConfig(enabled=True, inner_steps=8, anchor_batch_size=512, rho_clip=(0.5, 2.0), rho_cap=1.5)
    assert config.ratio_clip == RatioClip(0.5, 2.0, 1.5) and config.ratio_clip.upper == 1.5


def test_defaults_leave_svrpg_off_and_the_ratio_unclipped():
    config = SVRPGConfig()
    assert not config.enabled and not config.ratio_clip.active


@pytest.mark.parametrize("kwargs, message", [
    (dict(inner_steps=0), "--svrpg-inner-steps"),
    (dict(anchor_batch_size=-4), "--svrpg-anchor-batch-size"),
    (dict(inner_steps=True), "--svrpg-inner-steps"),
    (dict(rho_clip=(2.0, 0.5)), "low"),
    (dict(rho_clip=(0.0, 2.0)), "low"),
    (dict(rho_clip=(0.5, 2.0), rho_cap=0.25), "min"),
    (dict(rho_clip=(0.5,)), "two numbers"),
])
def test_bad_values_raise_value_error_naming_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SVRPGConfig(enabled=True, **kwargs)
