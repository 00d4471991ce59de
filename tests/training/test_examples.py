"""The example configurations stay valid: each parses with the trainer's own parser (so a renamed
or removed flag breaks this test, not a cluster job), and the 7B layout splits its batch on the
GPU counts the scripts launch."""
from __future__ import annotations

import os
import re

import pytest

from megatron_rpg.training.config import parse_train_config
from megatron_rpg.training.config_checks import check_layout

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples")


@pytest.mark.parametrize("name", ["tiny_cpu.yaml", "rpg_7b.yaml", "cpu_math.yaml"])
def test_example_config_parses(name):
    assert parse_train_config(["--config", os.path.join(EXAMPLES, name)]).training.train_iters > 0


@pytest.mark.parametrize("world_size, data_parallel", [(8, 2), (16, 4)])  # train_rpg_7b.sh, the sbatch
def test_7b_layout_splits_its_batch_on_one_and_two_nodes(world_size, data_parallel):
    config = parse_train_config(["--config", os.path.join(EXAMPLES, "rpg_7b.yaml")])
    assert config.model.transformer_impl == "transformer_engine" and config.model.params_dtype == "bfloat16"
    assert config.data.task == "math" and check_layout(config, world_size) == data_parallel


def test_the_7b_script_runs_the_trainer_with_the_7b_config():
    text = open(os.path.join(EXAMPLES, "train_rpg_7b.sh")).read()
    assert re.search(r"torchrun .*-m megatron_rpg\.train --config examples/rpg_7b\.yaml \"\$@\"", text, re.S)


@pytest.mark.parametrize("script, config", [("slurm/train_rpg_7b.sbatch", "rpg_7b.yaml"),
                                            ("slurm/train_tiny_cpu.sbatch", "tiny_cpu.yaml")])
def test_the_sbatch_scripts_share_one_launcher_that_runs_the_trainer(script, config):
    text = open(os.path.join(EXAMPLES, script)).read()
    assert re.search(rf"exec bash examples/slurm/torchrun_on_slurm\.sh examples/{re.escape(config)}", text)
    assert "mkdir -p logs && exec sbatch" in text  # Slurm opens --output=logs/... before the job starts
    launcher = open(os.path.join(EXAMPLES, "slurm", "torchrun_on_slurm.sh")).read()
    assert re.search(r"torch\.distributed\.run .*-m megatron_rpg\.train --config \"\$config\" --save "
                     r"\"\$CHECKPOINT_DIR\" --load \"\$CHECKPOINT_DIR\" \"\$@\"", launcher, re.S)
