"""The math task stops generation on every end id of the model and its tokenizer."""
import json
import os

from tests.training.test_math_run import _model_folder


def _args(*flags):
    from megatron_rpg.training.config import parse_train_config
    return parse_train_config([str(flag) for flag in flags])


def test_the_math_task_stops_on_the_end_ids_of_tokenizer_config_and_generation_config(tmp_path):
    from megatron_rpg.training.tasks import build_task

    folder = _model_folder(str(tmp_path))
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    config["eos_token_id"] = 7
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:  # Llama 3 style: a list
        json.dump({"eos_token_id": [5, 9, config["vocab_size"] + 3]}, f)  # the last is no id of this model
    data = tmp_path / "math.jsonl"
    data.write_text(json.dumps({"prompt": "What is 2 + 2?", "answer": "4"}) + "\n")
    task = build_task(_args("--hf-config", folder, "--task", "math", "--prompt-data", data), config["vocab_size"],
                      dp_rank=0, dp_size=1)
    assert task.stop_token_ids == tuple(sorted({task.tokenizer.eos_token_id, 5, 7, 9}))


def test_a_checkpoints_end_ids_come_from_its_hf_folder(tmp_path):
    from megatron_rpg.training.tasks import model_hf_dir

    assert model_hf_dir(_args("--load", tmp_path)) == os.path.join(str(tmp_path), "hf")
    assert model_hf_dir(_args("--model-preset", "tiny")) is None
