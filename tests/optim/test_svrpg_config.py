"""`--svrpg-*` flags parse into SVRPGConfig, and bad values fail early with errors naming the flag."""
from __future__ import annotations

import argparse

import pytest

from megatron_rpg.losses.svrpg import RatioClip
from megatron_rpg.optim.svrpg_config import SVRPGConfig, add_svrpg_args


def _parse(argv):
    return SVRPGConfig.from_args(add_svrpg_args(argparse.ArgumentParser()).parse_args(argv))


def test_flags_round_trip_into_the_config_and_its_ratio_clip():
    config = _parse(["--svrpg", "--svrpg-inner-steps", "8", "--svrpg-anchor-batch-size", "512",
                     "--svrpg-rho-clip", "0.5", "2.0", "--svrpg-rho-cap", "1.5", "--svrpg-update-ref"])
    assert config == SVRPGConfig(enabled=True, inner_steps=8, anchor_batch_size=512,
                                 rho_clip=(0.5, 2.0), rho_cap=1.5, update_ref=True)
    assert config.ratio_clip == RatioClip(0.5, 2.0, 1.5) and config.ratio_clip.upper == 1.5


def test_defaults_leave_svrpg_off_and_the_ratio_unclipped():
    config = _parse([])
    assert not config.enabled and not config.ratio_clip.active


@pytest.mark.parametrize("argv, message", [
    (["--svrpg-inner-steps", "0"], "--svrpg-inner-steps"),
    (["--svrpg-anchor-batch-size", "-4"], "--svrpg-anchor-batch-size"),
    (["--svrpg-rho-clip", "2.0", "0.5"], "low"),
    (["--svrpg-rho-clip", "0", "2"], "low"),
    (["--svrpg-rho-clip", "0.5", "2", "--svrpg-rho-cap", "0.25"], "min"),
])
def test_bad_flags_raise_value_error_naming_the_flag(argv, message):
    with pytest.raises(ValueError, match=message):
        _parse(argv)
