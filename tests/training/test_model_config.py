"""The model flags parse into ModelConfig, whose `build_gpt_model` keyword arguments give the intended
TransformerConfig; bad combinations fail at parse time (or at start-up, for the machine)."""
from __future__ import annotations

import pytest
import torch

from megatron_rpg.training.config import ModelConfig, parse_train_config
from megatron_rpg.megatron.models import FP8_FORMATS, FP8_RECIPES, transformer_config_from_hf
from tests.tiny_models import tiny_hf_config


def _parse(argv) -> ModelConfig:
    return parse_train_config(["--model-preset", "tiny"] + argv).model


def test_defaults_are_local_layers_float32_and_no_fp8():
    assert _parse([]).gpt_kwargs() == dict(use_te=False, fp8=None, fp8_recipe=None,
                                                      params_dtype=torch.float32)


@pytest.mark.parametrize("flag, dtype", [("--bf16", torch.bfloat16), ("--fp16", torch.float16)])
def test_precision_flags_set_params_dtype(flag, dtype):
    kwargs = _parse([flag]).gpt_kwargs()
    assert kwargs["params_dtype"] == dtype
    config = transformer_config_from_hf(tiny_hf_config("qwen2"), **kwargs)
    assert config.params_dtype == dtype and config.bf16 == (dtype == torch.bfloat16)
    assert config.fp16 == (dtype == torch.float16)


@pytest.mark.parametrize("fp8_format", FP8_FORMATS)
@pytest.mark.parametrize("fp8_recipe", FP8_RECIPES + (None,))
def test_every_fp8_format_and_recipe_maps_to_the_transformer_config(fp8_format, fp8_recipe):
    argv = ["--transformer-impl", "transformer_engine", "--fp8-format", fp8_format, "--bf16"]
    argv += ["--fp8-recipe", fp8_recipe] if fp8_recipe else []
    kwargs = _parse(argv).gpt_kwargs()
    assert kwargs == dict(use_te=True, fp8=fp8_format, fp8_recipe=fp8_recipe, params_dtype=torch.bfloat16)
    config = transformer_config_from_hf(tiny_hf_config("llama3"), **kwargs)
    assert (config.transformer_impl, config.fp8) == ("transformer_engine", fp8_format)
    assert config.fp8_recipe == (fp8_recipe or "delayed")


def test_transformer_engine_without_fp8_maps_to_te_layers():
    kwargs = _parse(["--transformer-impl", "transformer_engine"]).gpt_kwargs()
    assert kwargs["use_te"] and kwargs["fp8"] is None


@pytest.mark.parametrize("argv, message", [
    (["--fp8-format", "e4m3"], "--fp8-format e4m3 needs --transformer-impl transformer_engine"),
    (["--transformer-impl", "transformer_engine", "--fp8-recipe", "mxfp8"],
     "--fp8-recipe mxfp8 was given without --fp8-format"),
    (["--bf16", "--fp16"], "not allowed with argument"),
    (["--fp8-format", "e5m2"], "invalid choice: 'e5m2'"),
    (["--transformer-impl", "te"], "invalid choice: 'te'"),
])
def test_bad_flag_combinations_fail_at_parse_time_naming_the_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(argv)
    assert exit_info.value.code == 2  # argparse's usage-error status
    assert message in capsys.readouterr().err


def test_a_hand_made_model_config_gets_the_same_errors():
    with pytest.raises(ValueError, match="--fp8-format hybrid needs --transformer-impl transformer_engine"):
        ModelConfig(preset="tiny", fp8_format="hybrid")
    with pytest.raises(ValueError, match="params_dtype='fp64'"):
        ModelConfig(preset="tiny", params_dtype="fp64")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only start-up error")
@pytest.mark.parametrize("argv", [["--transformer-impl", "transformer_engine"],
                                  ["--transformer-impl", "transformer_engine", "--fp8-format", "hybrid"]])
def test_start_up_check_refuses_transformer_engine_on_a_machine_without_cuda(argv):
    with pytest.raises(ValueError, match="--transformer-impl transformer_engine.*needs a CUDA GPU with Transformer "
                                         "Engine.*on this machine drop them"):
        _parse(argv).check_machine()


def test_start_up_check_accepts_local_layers_anywhere():
    assert _parse(["--bf16"]).check_machine() is None


def test_load_of_an_hf_folder_says_to_convert_it_first(tmp_path):
    from megatron_rpg.training.build import model_hf_config
    from tests.checkpoint.tiny_hf_folders import save_tiny_hf_folder

    hf_dir = str(tmp_path / "qwen2-hf")
    save_tiny_hf_folder("qwen2", hf_dir)
    with pytest.raises(ValueError, match=r"is not a megatron distributed checkpoint .*: it is a Hugging Face model "
                                         r"folder; convert it first, `python tools/convert_hf_to_megatron.py --hf-dir .*qwen2-hf "
                                         r"--output ckpt/NAME`, then pass --load ckpt/NAME"):
        model_hf_config(parse_train_config(["--load", hf_dir]))
