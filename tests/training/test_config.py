"""The trainer's flags and YAML file parse into one TrainConfig: precedence, the dataclass each flag
reaches, and errors that name the bad flag before anything is built (no process group, no model),
including flags that would have no effect with the other settings."""
from __future__ import annotations

import warnings

import pytest

from megatron_rpg.losses import RPGClip, build_policy_loss
from megatron_rpg.losses.policy_loss import LOSS_FIELDS
from megatron_rpg.optim.svrpg_config import SVRPGConfig
from megatron_rpg.training.config import parse_train_config

TINY = ["--model-preset", "tiny"]


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_train_config(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_command_line_beats_yaml_beats_defaults(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model-preset: tiny\nlr: 0.003\nrpg_divergence: fkl\nrpg-clip: [0.1, 0.2, 4]\n"
                      "train-iters: 7\n")
    run = parse_train_config(["--config", str(config), "--train-iters", "9"])
    assert (run.optimizer.lr, run.loss.divergence, run.training.train_iters) == (0.003, "fkl", 9)
    assert run.loss.clip == RPGClip(0.1, 0.2, 4.0) and run.parallel.tensor_model_parallel_size == 1  # default
    assert run.loss.kl_in_advantage is True and run.model.preset == "tiny"


def test_yaml_unknown_key_is_named_with_a_suggestion(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model-preset: tiny\nrollout-batch-sise: 8\n")
    err = _usage_error(["--config", str(config)], capsys)
    assert "unknown key 'rollout-batch-sise'" in err and "rollout-batch-size" in err


def test_yaml_value_outside_the_choices_is_named(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model-preset: tiny\nrpg-divergence: kl\n")
    err = _usage_error(["--config", str(config)], capsys)
    assert "rpg-divergence: 'kl'" in err and "urkl" in err


def test_unreadable_or_non_mapping_yaml_is_a_usage_error(tmp_path, capsys):
    assert "cannot read it" in _usage_error(["--config", str(tmp_path / "missing.yaml")], capsys)
    listing = tmp_path / "list.yaml"
    listing.write_text("- lr\n")
    assert "mapping of flag names" in _usage_error(["--config", str(listing)], capsys)


@pytest.mark.parametrize("argv, named", [
    ([], "no model"),
    (TINY + ["--rollout-batch-size", "0"], "--rollout-batch-size=0"),
    (TINY + ["--rollout-temperature", "0"], "--rollout-temperature=0"),
    (TINY + ["--rollout-micro-batch-size", "0"], "--rollout-micro-batch-size=0"),
    (TINY + ["--lr", "-1"], "--lr=-1"),
    (TINY + ["--rpg-clip", "1.5", "0.2", "3"], "eps_low"),
    (TINY + ["--svrpg", "--num-mini-batches", "2", "--rpg-aggregation", "seq-mean-token-sum"], "--num-mini-batches=2"),
    (TINY + ["--svrpg", "--num-mini-batches", "1"], "--svrpg with --rpg-aggregation token-mean is biased"),
    (TINY + ["--svrpg", "--svrpg-inner-steps", "0"], "--svrpg-inner-steps"),
    (TINY + ["--fp8-format", "hybrid"], "--transformer-impl transformer_engine"),
    (TINY + ["--task", "math"], "--task math needs --prompt-data"),
    (TINY + ["--loss", "grpo", "--svrpg", "--num-mini-batches", "1"], "--svrpg is defined for the RPG losses"),
    (TINY + ["--loss", "dapo", "--rpg-aggregation", "seq-mean-token-sum"], "--loss dapo is token-mean"),
    (TINY + ["--loss", "nope"], "invalid choice"),
    (TINY + ["--loss", "grpo", "--rpg-no-clip"], "--rpg-no-clip has no effect with --loss grpo"),
    (TINY + ["--finetune"], "--finetune takes the weights of --load"),
    (TINY + ["--prompt-data", "x.jsonl"], "--prompt-data is read only with --task math"),
    (TINY + ["--save-interval", "5"], "--save-interval=5 needs --save"),
])
def test_bad_settings_exit_with_the_flag_named(argv, named, capsys):
    assert named in _usage_error(argv, capsys)


def test_no_clip_kl_outside_advantage_and_temperature_reach_their_sections():
    run = parse_train_config(TINY + ["--rpg-no-clip", "--rpg-kl-outside-advantage", "--rollout-temperature", "0.5"])
    assert run.loss.no_clip and run.loss.clip is None and run.loss.kl_in_advantage is False
    assert build_policy_loss(run.loss).clip is None and run.rollout.temperature == 0.5


def test_rollout_micro_batch_size_reaches_the_rollout_config():
    assert parse_train_config(TINY + ["--rollout-micro-batch-size", "4"]).rollout.micro_batch_size == 4
    assert parse_train_config(TINY).rollout.micro_batch_size is None


def test_svrpg_flags_fill_the_svrpg_config():
    run = parse_train_config(TINY + ["--svrpg", "--num-mini-batches", "1", "--rpg-aggregation", "seq-mean-token-sum",
                                     "--svrpg-inner-steps", "8",
                                     "--svrpg-anchor-batch-size", "512", "--svrpg-rho-clip", "0.5", "2.0",
                                     "--svrpg-rho-cap", "1.5", "--svrpg-update-ref"])
    assert run.svrpg == SVRPGConfig(enabled=True, inner_steps=8, anchor_batch_size=512, rho_clip=(0.5, 2.0),
                                    rho_cap=1.5, update_ref=True)
    assert parse_train_config(TINY).svrpg == SVRPGConfig()


def test_baseline_losses_get_only_the_fields_they_read():
    for name in ("rpg", "grpo", "grpo_is_kl", "dapo", "ppo_clip"):
        loss = parse_train_config(TINY + ["--loss", name]).loss
        assert loss.name == name
        for field in ("divergence", "style", "is_level", "kl_in_advantage", "beta", "no_clip"):
            if field not in LOSS_FIELDS[name]:  # the dataclass default, not a flag's value
                assert getattr(loss, field) == getattr(type(loss)(), field), (name, field)
        build_policy_loss(loss)  # sets nothing the loss does not read


def test_a_baseline_keeps_its_own_clip_unless_one_is_given():
    from megatron_rpg.losses.baselines import PPO_CLIP

    assert build_policy_loss(parse_train_config(TINY + ["--loss", "ppo_clip"]).loss).clip == PPO_CLIP
    given = parse_train_config(TINY + ["--loss", "ppo_clip", "--rpg-clip", "0.1", "0.1", "3"]).loss
    assert build_policy_loss(given).clip == RPGClip(0.1, 0.1, 3.0)
    assert build_policy_loss(parse_train_config(TINY).loss).clip == RPGClip(0.2, 0.28, 10.0)


@pytest.mark.parametrize("argv, named", [
    (["--loss", "grpo", "--rpg-divergence", "fkl"], "--rpg-divergence has no effect with --loss grpo"),
    (["--loss", "ppo_clip", "--rpg-style", "reinforce"], "--rpg-style has no effect with --loss ppo_clip"),
    (["--loss", "dapo", "--rpg-is-level", "sequence"], "--rpg-is-level has no effect with --loss dapo"),
    (["--loss", "grpo", "--rpg-kl-outside-advantage"], "--rpg-kl-outside-advantage has no effect"),
    (["--loss", "dapo", "--rpg-beta", "0.01"], "--rpg-beta has no effect with --loss dapo"),
    (["--loss", "ppo_clip", "--rpg-beta", "0.01"], "--rpg-beta has no effect with --loss ppo_clip"),
    (["--svrpg-inner-steps", "3"], "--svrpg-inner-steps has no effect without --svrpg"),
    (["--svrpg-update-ref"], "--svrpg-update-ref has no effect without --svrpg"),
    (["--tokenizer", "/nonexistent"], "--tokenizer is read only with --task math"),
    (["--prompt-template", "Q: {prompt}"], "--prompt-template is read only with --task math"),
    (["--overlong-buffer", "4"], "--overlong-buffer is read only with --task math"),
    (["--rollout-max-sampling-passes", "5"], "--rollout-max-sampling-passes has no effect without"),
    (["--rpg-no-clip", "--rpg-clip", "0.2", "0.2", "3"], "contradict"),
])
def test_a_flag_without_effect_is_an_error_naming_it(argv, named, capsys):
    assert named in _usage_error(TINY + argv, capsys)


def test_a_flag_without_effect_is_refused_from_yaml_too(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model-preset: tiny\nloss: grpo\nrpg-divergence: urkl\n")  # the default value, set
    assert "--rpg-divergence has no effect with --loss grpo" in _usage_error(["--config", str(config)], capsys)


def test_flags_a_loss_reads_are_accepted():
    assert parse_train_config(TINY + ["--loss", "grpo", "--rpg-beta", "0.04"]).loss.beta == 0.04
    svrpg = TINY + ["--svrpg", "--num-mini-batches", "1", "--rpg-aggregation", "seq-mean-token-mean"]
    assert parse_train_config(svrpg + ["--svrpg-inner-steps", "3"]).svrpg.inner_steps == 3


def test_beta_without_expected_effect_warns_once_at_start_up():
    from megatron_rpg.training.config_checks import warn_if_beta_has_no_effect

    with pytest.warns(UserWarning, match="--rpg-beta 0.0001 can have no expected effect"):
        warn_if_beta_has_no_effect(parse_train_config(TINY + ["--num-mini-batches", "1"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_beta_has_no_effect(parse_train_config(TINY))  # 2 optimizer steps: θ moves from θ_old
        warn_if_beta_has_no_effect(parse_train_config(TINY + ["--num-mini-batches", "1", "--rpg-beta", "0"]))
        warn_if_beta_has_no_effect(parse_train_config(TINY + ["--num-mini-batches", "1", "--loss", "ppo_clip"]))


def test_sequences_longer_than_the_model_positions_are_refused():
    from megatron_rpg.training.config_checks import check_sequence_length

    run = parse_train_config(TINY + ["--rollout-max-new-tokens", "300"])
    with pytest.raises(ValueError, match="1 prompt tokens .* --rollout-max-new-tokens 300 = 301, exceeds the "
                                         "model's max_position_embeddings 256"):
        check_sequence_length(run, 1, 256)
    check_sequence_length(run, 1, 301)  # exactly fits


def test_a_yaml_value_a_command_line_choice_makes_ineffective_is_a_warning(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model-preset: tiny\nrpg-divergence: fkl\n")
    with pytest.warns(UserWarning, match="ignored from --config: --rpg-divergence has no effect with --loss grpo"):
        run = parse_train_config(["--config", str(config), "--loss", "grpo"])
    assert run.loss.name == "grpo"


def test_yaml_switches_set_to_false_set_nothing(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model-preset: tiny\nsvrpg: false\nsvrpg-update-ref: false\n")
    assert parse_train_config(["--config", str(config)]).svrpg == SVRPGConfig()


def test_command_line_no_clip_overrides_a_yaml_clip_with_a_warning(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model-preset: tiny\nrpg-clip: [0.2, 0.28, 10.0]\n")
    with pytest.warns(UserWarning, match="--rpg-no-clip on the command line overrides"):
        run = parse_train_config(["--config", str(config), "--rpg-no-clip"])
    assert run.loss.no_clip and run.loss.clip is None
    assert "contradict" in _usage_error(TINY + ["--rpg-no-clip", "--rpg-clip", "0.2", "0.2", "3"], capsys)


@pytest.mark.parametrize("argv, named", [
    (["--rpg-clip", "0.2", "0.28", "0.5"], "--rpg-clip EPS_LOW EPS_HIGH DUAL_CLIP: "),
    (["--svrpg", "--num-mini-batches", "1", "--rpg-aggregation", "seq-mean-token-sum", "--svrpg-rho-clip", "2", "1"],
     "--svrpg-rho-clip / --svrpg-rho-cap: "),
    (["--lr", "nan"], "--lr=nan must be a finite number"),
    (["--overlong-buffer", "8", "--task", "math", "--prompt-data", "x.jsonl"], "--overlong-buffer=8 must lie in [0, "),
    (["--max-prompt-tokens", "0", "--task", "math", "--prompt-data", "x.jsonl"], "--max-prompt-tokens=0"),
])
def test_library_value_errors_name_the_flag_before_anything_is_built(argv, named, capsys):
    assert named in _usage_error(TINY + argv, capsys)


def test_help_names_the_default_of_every_flag_that_takes_a_value():
    from megatron_rpg.training.flags import build_parser

    parser = build_parser()
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if action.option_strings and action.nargs != 0 and action.default is not None:
            assert "default" in action.help, action.option_strings
    assert "--lr LR learning rate, in (0, 1] (default: 1e-06)" in text and "--rollout-samples-per-prompt ROLLOUT_SAMPLES_PER_PROMPT (default: 8)" in text


def test_r2vpo_flags_fill_the_loss_configs_r2vpo_section():
    from megatron_rpg.losses import R2VPOConfig, R2VPOLoss

    run = parse_train_config(TINY + ["--loss", "r2vpo", "--r2vpo-level", "sequence", "--r2vpo-delta", "0.2",
                                     "--r2vpo-dual-lr", "3", "--r2vpo-lambda-init", "0.5", "--r2vpo-reuse-steps", "2",
                                     "--r2vpo-stale-clip", "4", "--rpg-aggregation", "seq-mean-token-sum"])
    assert run.loss.r2vpo == R2VPOConfig(level="sequence", delta=0.2, dual_lr=3.0, lambda_init=0.5, reuse_steps=2,
                                         stale_clip=4.0)
    loss = build_policy_loss(run.loss)
    assert isinstance(loss, R2VPOLoss) and loss.aggregation == "seq-mean-token-sum" and loss.multiplier == 0.5
    assert parse_train_config(TINY).loss.r2vpo == R2VPOConfig()  # other losses keep the default section


@pytest.mark.parametrize("argv, named", [
    (["--r2vpo-delta", "0.1"], "--r2vpo-delta has no effect without --loss r2vpo (got --loss rpg)"),
    (["--loss", "grpo", "--r2vpo-reuse-steps", "1"], "--r2vpo-reuse-steps has no effect without --loss r2vpo"),
    (["--loss", "r2vpo", "--rpg-beta", "0.1"], "--rpg-beta has no effect with --loss r2vpo"),
    (["--loss", "r2vpo", "--r2vpo-stale-clip", "2"], "--r2vpo-stale-clip=2.0 truncates reused samples, but "
                                                     "--r2vpo-reuse-steps=0"),
    (["--loss", "r2vpo", "--r2vpo-delta", "-1"], "--r2vpo-delta=-1.0 is out of range"),
    (["--loss", "r2vpo", "--r2vpo-dual-lr", "inf"], "--r2vpo-dual-lr=inf must be a finite number"),
    (["--loss", "r2vpo", "--r2vpo-reuse-steps", "-2"], "--r2vpo-reuse-steps=-2 must be an integer >= 0"),
    (["--loss", "r2vpo", "--r2vpo-reuse-steps", "1", "--r2vpo-stale-clip", "0"], "--r2vpo-stale-clip=0.0 is out"),
])
def test_bad_or_ineffective_r2vpo_flags_exit_with_the_flag_named(argv, named, capsys):
    assert named in _usage_error(TINY + argv, capsys)


def test_r2vpo_warns_when_its_constraint_cannot_act():
    with pytest.warns(UserWarning, match="variance term has no gradient and λ only decays"):
        parse_train_config(TINY + ["--loss", "r2vpo", "--num-mini-batches", "1"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_train_config(TINY + ["--loss", "r2vpo"])  # 2 optimizer steps: θ leaves θ_old
        parse_train_config(TINY + ["--loss", "r2vpo", "--num-mini-batches", "1", "--r2vpo-reuse-steps", "1"])
