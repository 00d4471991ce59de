"""The trainer's flags and YAML file: precedence, and errors that name the bad flag before anything
is built (no process group, no model)."""
from __future__ import annotations

import pytest

from megatron_rpg.training.config import loss_config_from_args, parse_train_args

TINY = ["--model-preset", "tiny"]


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_train_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_command_line_beats_yaml_beats_defaults(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model-preset: tiny\nlr: 0.003\nrpg_divergence: fkl\nrpg-clip: [0.1, 0.2, 4]\n"
                      "train-iters: 7\n")
    args = parse_train_args(["--config", str(config), "--train-iters", "9"])
    assert (args.lr, args.rpg_divergence, args.train_iters) == (0.003, "fkl", 9)
    assert args.rpg_clip == [0.1, 0.2, 4.0] and args.tensor_model_parallel_size == 1  # default kept
    loss = loss_config_from_args(args)
    assert loss.divergence == "fkl" and loss.clip.eps_high == 0.2 and loss.kl_in_advantage is True


def test_yaml_unknown_key_is_named_with_a_suggestion(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model-preset: tiny\nrollout-batch-sise: 8\n")
    err = _usage_error(["--config", str(config)], capsys)
    assert "unknown key 'rollout-batch-sise'" in err and "rollout-batch-size" in err


def test_yaml_value_outside_the_choices_is_named(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model-preset: tiny\nrpg-divergence: kl\n")
    err = _usage_error(["--config", str(config)], capsys)
    assert "rpg-divergence='kl'" in err and "urkl" in err


def test_unreadable_or_non_mapping_yaml_is_a_usage_error(tmp_path, capsys):
    assert "cannot read it" in _usage_error(["--config", str(tmp_path / "missing.yaml")], capsys)
    listing = tmp_path / "list.yaml"
    listing.write_text("- lr\n")
    assert "mapping of flag names" in _usage_error(["--config", str(listing)], capsys)


@pytest.mark.parametrize("argv, named", [
    ([], "no model"),
    (TINY + ["--rollout-batch-size", "0"], "--rollout-batch-size=0"),
    (TINY + ["--rollout-temperature", "0"], "--rollout-temperature=0"),
    (TINY + ["--lr", "-1"], "--lr=-1"),
    (TINY + ["--rpg-clip", "1.5", "0.2", "3"], "eps_low"),
    (TINY + ["--svrpg", "--num-mini-batches", "2"], "--num-mini-batches=2"),
    (TINY + ["--svrpg", "--svrpg-inner-steps", "0"], "--svrpg-inner-steps"),
    (TINY + ["--fp8-format", "hybrid"], "--transformer-impl transformer_engine"),
    (TINY + ["--task", "math"], "--task math needs --prompt-data"),
    (TINY + ["--loss", "grpo", "--svrpg", "--num-mini-batches", "1"], "--svrpg is defined for the RPG losses"),
    (TINY + ["--loss", "dapo", "--rpg-aggregation", "seq-mean-token-sum"], "--loss dapo is token-mean"),
    (TINY + ["--loss", "reinforce_pp"], "invalid choice"),
    (TINY + ["--loss", "grpo", "--rpg-no-clip"], "--rpg-no-clip applies to --loss rpg"),
    (TINY + ["--finetune"], "--finetune takes the weights of --load"),
    (TINY + ["--prompt-data", "x.jsonl"], "--prompt-data is read only with --task math"),
    (TINY + ["--save-interval", "5"], "--save-interval=5 needs --save"),
])
def test_bad_settings_exit_with_the_flag_named(argv, named, capsys):
    assert named in _usage_error(argv, capsys)


def test_no_clip_and_kl_outside_advantage_reach_the_loss_config():
    from megatron_rpg.losses import build_policy_loss

    args = parse_train_args(TINY + ["--rpg-no-clip", "--rpg-kl-outside-advantage"])
    loss = loss_config_from_args(args)
    assert loss.no_clip and loss.clip is None and loss.kl_in_advantage is False
    assert build_policy_loss(loss).clip is None


def test_baseline_losses_get_only_the_fields_they_read():
    from megatron_rpg.losses import build_policy_loss
    from megatron_rpg.losses.policy_loss import LOSS_FIELDS, LossConfig

    for name in ("rpg", "grpo", "grpo_is_kl", "dapo", "ppo_clip"):
        config = loss_config_from_args(parse_train_args(TINY + ["--loss", name, "--rpg-beta", "0.5"]))
        assert config.name == name
        set_fields = {f for f in LOSS_FIELDS[name] if getattr(config, f) != getattr(LossConfig(), f)}
        assert set_fields == ({"beta"} if "beta" in LOSS_FIELDS[name] else set()), name
        build_policy_loss(config)  # nothing the loss does not read


def test_a_baseline_keeps_its_own_clip_unless_one_is_given():
    from megatron_rpg.losses import RPGClip, build_policy_loss
    from megatron_rpg.losses.baselines import PPO_CLIP

    config = loss_config_from_args(parse_train_args(TINY + ["--loss", "ppo_clip"]))
    assert config.clip is None and build_policy_loss(config).clip == PPO_CLIP
    given = loss_config_from_args(parse_train_args(TINY + ["--loss", "ppo_clip", "--rpg-clip", "0.1", "0.1", "3"]))
    assert build_policy_loss(given).clip == RPGClip(0.1, 0.1, 3.0)
    rpg = loss_config_from_args(parse_train_args(TINY))
    assert build_policy_loss(rpg).clip == RPGClip(0.2, 0.28, 10.0)
