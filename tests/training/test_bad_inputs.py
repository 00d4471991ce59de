"""Bad-input catalogue, part 1: trainer flags and the --config YAML file.

Every case is refused by parse_train_config — before any process group, model or file write —
with exit status 2 and a message naming the flag as the user wrote it (`--lr`, or the key and the
YAML file) and the bad value, and saying what to do. (Part 2, test_bad_input_files.py: prompt
files, start-up checks, the converters and the verifier.)

Ranges the trainer states (training/config.py): --lr in (0, 1] and --lr × --weight-decay < 1;
--adam-beta1/2 in [0, 1); --adam-eps > 0; --rollout-temperature in [1e-3, 1e3]; --seed in
[0, 2**32 − 1]; --rpg-clip ε_low = ε_high = 0 refused (every ratio clipped to 1: constant loss).
"""
from __future__ import annotations

import pytest

from megatron_rpg.training.config import parse_train_config

TINY = ["--model-preset", "tiny"]
NAN, INF = "nan", "inf"

# (id, argv after TINY, substrings the message must hold: the flag and value, and what to do)
FLAG_CASES = [
    ("lr-nan", ["--lr", NAN], ["--lr=nan", "finite"]),
    ("lr-inf", ["--lr", INF], ["--lr=inf", "finite"]),
    ("lr-negative", ["--lr", "-1"], ["--lr=-1", "(0, 1]"]),
    ("lr-zero", ["--lr", "0"], ["--lr=0", "never changes the model"]),
    ("lr-above-1", ["--lr", "2"], ["--lr=2", "(0, 1]"]),
    ("lr-1e6", ["--lr", "1e6"], ["--lr=1000000", "(0, 1]"]),
    ("lr-not-a-number", ["--lr", "abc"], ["--lr", "invalid float value: 'abc'"]),
    ("weight-decay-nan", ["--weight-decay", NAN], ["--weight-decay=nan", "finite"]),
    ("weight-decay-negative", ["--weight-decay", "-0.1"], ["--weight-decay=-0.1", ">= 0"]),
    ("weight-decay-times-lr-1", ["--lr", "0.5", "--weight-decay", "2"], ["--lr 0.5 x --weight-decay 2", "< 1"]),
    ("clip-grad-nan", ["--clip-grad", NAN], ["--clip-grad=nan", "finite"]),
    ("clip-grad-negative", ["--clip-grad", "-1"], ["--clip-grad=-1", ">= 0"]),
    ("adam-eps-zero", ["--adam-eps", "0"], ["--adam-eps=0", "> 0"]),
    ("adam-eps-nan", ["--adam-eps", NAN], ["--adam-eps=nan", "> 0"]),
    ("adam-beta1-one", ["--adam-beta1", "1"], ["--adam-beta1=1", "[0, 1)"]),
    ("adam-beta2-negative", ["--adam-beta2", "-0.1"], ["--adam-beta2=-0.1", "[0, 1)"]),
    ("adam-beta1-nan", ["--adam-beta1", NAN], ["--adam-beta1=nan", "[0, 1)"]),
    ("rpg-beta-nan", ["--rpg-beta", NAN], ["--rpg-beta=nan", "finite"]),
    ("rpg-beta-negative", ["--rpg-beta", "-1"], ["--rpg-beta=-1", ">= 0"]),
    ("temperature-inf", ["--rollout-temperature", INF], ["--rollout-temperature=inf", "[0.001, 1000]"]),
    ("temperature-1e-30", ["--rollout-temperature", "1e-30"], ["--rollout-temperature=1e-30", "[0.001, 1000]"]),
    ("temperature-zero", ["--rollout-temperature", "0"], ["--rollout-temperature=0", "[0.001, 1000]"]),
    ("temperature-negative", ["--rollout-temperature", "-1"], ["--rollout-temperature=-1", "[0.001, 1000]"]),
    ("temperature-nan", ["--rollout-temperature", NAN], ["--rollout-temperature=nan", "[0.001, 1000]"]),
    ("temperature-1e4", ["--rollout-temperature", "1e4"], ["--rollout-temperature=10000", "[0.001, 1000]"]),
    ("seed-2**70", ["--seed", str(2**70)], ["--seed=1180591620717411303424", "[0, 4294967295]"]),
    ("seed-negative", ["--seed", "-5"], ["--seed=-5", "[0, 4294967295]"]),
    ("seed-not-an-integer", ["--seed", "1.5"], ["--seed", "invalid int value: '1.5'"]),
    ("train-iters-zero", ["--train-iters", "0"], ["--train-iters=0", "positive integer"]),
    ("micro-batch-size-zero", ["--micro-batch-size", "0"], ["--micro-batch-size=0", "positive integer"]),
    ("num-mini-batches-zero", ["--num-mini-batches", "0"], ["--num-mini-batches=0", "positive integer"]),
    ("rollout-batch-size-negative", ["--rollout-batch-size", "-3"], ["--rollout-batch-size=-3", "positive"]),
    ("samples-per-prompt-zero", ["--rollout-samples-per-prompt", "0"], ["--rollout-samples-per-prompt=0", "positive"]),
    ("max-new-tokens-zero", ["--rollout-max-new-tokens", "0"], ["--rollout-max-new-tokens=0", "positive"]),
    ("max-skipped-steps-zero", ["--max-skipped-steps", "0"], ["--max-skipped-steps=0", "positive"]),
    ("tp-zero", ["--tensor-model-parallel-size", "0"], ["--tensor-model-parallel-size=0", "positive"]),
    ("pp-negative", ["--pipeline-model-parallel-size", "-1"], ["--pipeline-model-parallel-size=-1", "positive"]),
    ("sampling-passes-zero", ["--rollout-dynamic-sampling", "--rollout-max-sampling-passes", "0"],
     ["--rollout-max-sampling-passes=0", "positive"]),
    ("save-interval-zero", ["--save", "/nonexistent/never-written", "--save-interval", "0"], ["--save-interval=0", ">= 1"]),
    ("rpg-clip-zero-zero", ["--rpg-clip", "0", "0", "3"], ["--rpg-clip", "eps_low = eps_high = 0", "--rpg-no-clip"]),
    ("rpg-clip-nan", ["--rpg-clip", NAN, "0.2", "3"], ["--rpg-clip", "eps_low"]),
    ("rpg-clip-low-one", ["--rpg-clip", "1", "0.2", "3"], ["--rpg-clip", "eps_low"]),
    ("rpg-clip-dual-below-one", ["--rpg-clip", "0.2", "0.28", "0.5"], ["--rpg-clip", "dual_clip"]),
    ("rpg-clip-two-values", ["--rpg-clip", "0.2", "0.28"], ["--rpg-clip", "expected 3 arguments"]),
    ("svrpg-rho-clip-reversed", ["--svrpg", "--num-mini-batches", "1", "--rpg-aggregation", "seq-mean-token-sum",
                                 "--svrpg-rho-clip", "2", "1"], ["--svrpg-rho-clip"]),
    ("svrpg-anchor-zero", ["--svrpg", "--num-mini-batches", "1", "--rpg-aggregation", "seq-mean-token-sum",
                           "--svrpg-anchor-batch-size", "0"], ["--svrpg-anchor-batch-size"]),
    ("bf16-and-fp16", ["--bf16", "--fp16"], ["--fp16", "not allowed with argument --bf16"]),
    ("preset-and-hf-config", ["--hf-config", "x.json"], ["--hf-config", "not allowed with argument --model-preset"]),
    ("fp8-without-te", ["--fp8-format", "hybrid"], ["--fp8-format hybrid", "--transformer-impl transformer_engine"]),
    ("fp8-recipe-without-format", ["--fp8-recipe", "delayed"], ["--fp8-recipe delayed", "--fp8-format"]),
    ("overlong-buffer-without-math", ["--overlong-buffer", "2"], ["--overlong-buffer", "--task math"]),
    ("svrpg-flag-without-svrpg", ["--svrpg-inner-steps", "4"], ["--svrpg-inner-steps", "add --svrpg"]),
]


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_train_config(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, named", [case[1:] for case in FLAG_CASES], ids=[case[0] for case in FLAG_CASES])
def test_a_bad_flag_is_refused_while_parsing_naming_the_flag_and_value(argv, named, capsys):
    err = _usage_error(TINY + argv, capsys)
    for text in named:
        assert text in err, err


# (id, YAML text after "model-preset: tiny", substrings the message must hold besides the file name)
YAML_CASES = [
    ("lr-string", "lr: 'abc'", ["`lr: 'abc'`", "not a valid number for --lr"]),
    ("lr-list", "lr: [1, 2]", ["`lr: [1, 2]`", "--lr takes one number"]),
    ("lr-bool", "lr: true", ["`lr: True`", "--lr takes one number"]),
    ("lr-null", "lr: null", ["`lr: None`", "gives --lr no value"]),
    ("lr-nan", "lr: .nan", ["--lr=nan", "lr: in --config"]),
    ("lr-too-large", "lr: 5.0", ["--lr=5.0", "(0, 1]", "lr: in --config"]),
    ("rpg-clip-scalar", "rpg-clip: 0.2", ["`rpg-clip: 0.2`", "list of 3 values", "EPS_LOW EPS_HIGH DUAL_CLIP"]),
    ("rpg-clip-two", "rpg-clip: [0.2, 0.3]", ["`rpg-clip: [0.2, 0.3]`", "list of 3 values"]),
    ("rpg-clip-string-item", "rpg-clip: [0.2, 'x', 3]", ["`rpg-clip: [0.2, 'x', 3]`", "not a valid number"]),
    ("train-iters-float", "train-iters: 2.9", ["`train-iters: 2.9`", "not an integer", "--train-iters"]),
    ("train-iters-string", "train-iters: 'ten'", ["`train-iters: 'ten'`", "not a valid integer"]),
    ("train-iters-bool", "train-iters: true", ["`train-iters: True`", "--train-iters takes one integer"]),
    ("seed-huge", f"seed: {2**70}", ["--seed=1180591620717411303424", "seed: in --config"]),
    ("no-progress-string-false", "no-progress: 'false'", ["`no-progress: 'false'`", "not a YAML boolean",
                                                           "true or false, unquoted"]),
    ("no-progress-int", "no-progress: 1", ["`no-progress: 1`", "not a YAML boolean"]),
    ("svrpg-switch-string", "svrpg: 'yes'", ["`svrpg: 'yes'`", "not a YAML boolean"]),
    ("divergence-choice", "rpg-divergence: kl", ["`rpg-divergence: 'kl'`", "is not one of", "urkl"]),
    ("loss-list", "loss: [rpg]", ["`loss: ['rpg']`", "--loss takes one string"]),
    ("save-mapping", "save: {dir: x}", ["`save: {'dir': 'x'}`", "--save takes one string"]),
    ("temperature-tiny", "rollout-temperature: 1.0e-30", ["--rollout-temperature=1e-30", "rollout-temperature: in --config"]),
    ("duplicate-key", "lr: 0.1\nlr: 0.2", ["key 'lr' is given twice"]),
    ("unknown-key", "learning-rate: 0.1", ["unknown key 'learning-rate'"]),
    ("not-a-mapping", None, ["must hold a mapping"]),
    ("invalid-yaml", "lr: [0.1", ["not valid YAML"]),
    ("rho-clip-scalar", "svrpg-rho-clip: 0.5", ["`svrpg-rho-clip: 0.5`", "list of 2 values", "LOW HIGH"]),
]


@pytest.mark.parametrize("body, named", [case[1:] for case in YAML_CASES], ids=[case[0] for case in YAML_CASES])
def test_a_bad_yaml_value_is_refused_naming_the_key_and_the_file(body, named, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("- lr\n" if body is None else "model-preset: tiny\n" + body + "\n")
    err = _usage_error(["--config", str(path)], capsys)
    assert f"--config {path}" in err, err
    for text in named:
        assert text in err, err


def test_a_missing_yaml_file_and_a_non_utf8_one_are_named(tmp_path, capsys):
    assert "cannot read it" in _usage_error(["--config", str(tmp_path / "missing.yaml")], capsys)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"model-preset: tiny\nprompt-template: 'caf\xe9 {prompt}'\n")
    assert "not UTF-8" in _usage_error(["--config", str(latin)], capsys)


def test_good_yaml_values_of_every_kind_still_parse(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model-preset: tiny\nlr: 1e-3\ntrain-iters: 3.0\nno-progress: true\nsvrpg: false\n"
                    "rpg-clip: [0.1, 0.2, 4]\nsave: 5\nseed: 4294967295\nrollout-temperature: 0.001\n")
    run = parse_train_config(["--config", str(path)])
    assert (run.optimizer.lr, run.training.train_iters, run.logging.progress) == (1e-3, 3, False)
    assert run.checkpoint.save == "5" and run.training.seed == 2**32 - 1 and run.rollout.temperature == 1e-3
    assert not run.svrpg.enabled and run.loss.clip.dual_clip == 4.0
