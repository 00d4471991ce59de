"""Bad-input catalogue, part 2: start-up checks of the trainer (model source, layout, sequence
length, the machine), prompt files, the two converters and the verifier.

Each case runs the program's own entry point (megatron_rpg/train.py `main`, the tools' `main`) in one
spawned process and must exit 2 with a message naming the bad flag/file (and line) and what to do,
no traceback, before the expensive work: the trainer's model builder, the converters' output writer
and the verifier's worker spawn are replaced by functions that fail the case if they are reached.
Every file under the case's folder, the HF model folder and the converted checkpoint are byte-for-byte
what they were before the case ran (nothing on disk is lost).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil

import pytest
import torch

from tests.distributed.harness import run_on_ranks

pytestmark = pytest.mark.distributed
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _jsonl(*rows) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


GOOD = {"prompt": "t5 t6 t7", "answer": "3"}
TINY = ["--model-preset", "tiny", "--no-progress"]
MATH = ["--hf-config", "{math}", "--task", "math", "--no-progress", "--rollout-batch-size", "2",
        "--rollout-samples-per-prompt", "2", "--micro-batch-size", "2", "--num-mini-batches", "2",
        "--train-iters", "1"]
P = "{case}/prompts.jsonl"
GPT2 = json.dumps({"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 8, "vocab_size": 16}).encode()

# (id, program, argv, files to write into the case folder, substrings of the error message)
CASES = [
    # trainer start-up: model source, layout, sequence length, machine
    ("max-new-tokens-300", "train", TINY + ["--rollout-max-new-tokens", "300"], {},
     ["--rollout-max-new-tokens 300", "max_position_embeddings 256", "lower --rollout-max-new-tokens"]),
    ("capo-top-k-above-vocab", "train", TINY + ["--capo", "--loss", "grpo"], {},
     ["--capo-top-k 50", "vocabulary of 16 tokens", "at most 16"]),
    ("fp8-on-cpu", "train", TINY + ["--transformer-impl", "transformer_engine", "--fp8-format", "hybrid"], {},
     ["--transformer-impl transformer_engine --fp8-format hybrid", "needs a CUDA GPU", "drop them"]),
    ("transformer-engine-on-cpu", "train", TINY + ["--transformer-impl", "transformer_engine"], {},
     ["--transformer-impl transformer_engine", "needs a CUDA GPU", "drop them"]),
    ("hf-config-missing", "train", ["--hf-config", "{case}/nowhere.json", "--no-progress"], {},
     ["--hf-config {case}/nowhere.json", "no config.json there"]),
    ("hf-config-folder-without-config", "train", ["--hf-config", "{case}", "--no-progress"], {"notes.txt": b"x"},
     ["--hf-config {case}", "no config.json there"]),
    ("hf-config-not-json", "train", ["--hf-config", "{case}/config.json", "--no-progress"],
     {"config.json": b"{model_type: qwen2"}, ["--hf-config {case}/config.json", "is not valid JSON"]),
    ("hf-config-without-model-type", "train", ["--hf-config", "{case}/config.json", "--no-progress"],
     {"config.json": b'{"hidden_size": 64}'}, ["--hf-config {case}/config.json", "has no model_type"]),
    ("hf-config-unsupported-architecture", "train", ["--hf-config", "{case}/config.json", "--no-progress"],
     {"config.json": GPT2}, ["gpt2"]),
    ("tp-larger-than-world", "train", TINY + ["--tensor-model-parallel-size", "2"], {},
     ["1 processes cannot hold --tensor-model-parallel-size 2", "launch a multiple of 2"]),
    ("batch-does-not-split", "train", TINY + ["--micro-batch-size", "24"], {},
     ["--micro-batch-size 24", "must be a multiple of"]),
    ("svrpg-anchor-does-not-split", "train",
     TINY + ["--svrpg", "--num-mini-batches", "1", "--rpg-aggregation", "seq-mean-token-sum",
             "--svrpg-anchor-batch-size", "100"], {}, ["--svrpg-anchor-batch-size=100", "use a multiple of"]),
    # prompt files (--task math)
    ("prompt-file-missing", "train", MATH + ["--prompt-data", "{case}/nowhere.jsonl"], {},
     ["--prompt-data {case}/nowhere.jsonl", "does not exist"]),
    ("prompt-file-is-a-directory", "train", MATH + ["--prompt-data", "{case}"], {"x": b""},
     ["{case}", "is a directory"]),
    ("prompt-file-not-utf8", "train", MATH + ["--prompt-data", P],
     {"prompts.jsonl": _jsonl(GOOD) + b'{"prompt": "caf\xe9 t5", "answer": "1"}\n'},
     [P + ":2", "not UTF-8", "0xe9", "save the file as UTF-8"]),
    ("prompt-empty", "train", MATH + ["--prompt-data", P], {"prompts.jsonl": _jsonl(GOOD, {"prompt": "", "answer": "1"})},
     [P + ":2", "'prompt' is empty"]),
    ("prompt-blank", "train", MATH + ["--prompt-data", P], {"prompts.jsonl": _jsonl({"prompt": "  \t", "answer": "1"})},
     [P + ":1", "'prompt' is empty"]),
    ("prompt-empty-chat", "train", MATH + ["--prompt-data", P],
     {"prompts.jsonl": _jsonl({"prompt": [{"role": "user", "content": ""}], "answer": "1"})}, [P + ":1", "is empty"]),
    ("prompt-invalid-json", "train", MATH + ["--prompt-data", P], {"prompts.jsonl": _jsonl(GOOD) + b"{prompt: 1\n"},
     [P + ":2", "invalid JSON"]),
    ("prompt-missing-key", "train", MATH + ["--prompt-data", P], {"prompts.jsonl": _jsonl({"question": "t5", "answer": "1"})},
     [P + ":1", "missing key 'prompt'", "set --prompt-key"]),
    ("prompt-key-not-in-file", "train", MATH + ["--prompt-data", P, "--prompt-key", "problem"],
     {"prompts.jsonl": _jsonl(GOOD)}, [P + ":1", "missing key 'problem'", "set --prompt-key"]),
    ("prompt-file-empty", "train", MATH + ["--prompt-data", P], {"prompts.jsonl": b"\n\n"}, [P, "holds no records"]),
    ("prompt-answer-a-list", "train", MATH + ["--prompt-data", P], {"prompts.jsonl": _jsonl({"prompt": "t5", "answer": [1]})},
     [P + ":1", "must be a string or a number"]),
    ("prompt-line-not-an-object", "train", MATH + ["--prompt-data", P], {"prompts.jsonl": b"[1, 2]\n"},
     [P + ":1", "expected a JSON object"]),
    ("prompt-a-number", "train", MATH + ["--prompt-data", P], {"prompts.jsonl": _jsonl({"prompt": 7, "answer": "1"})},
     [P + ":1", "must be a string or a list of chat messages"]),
    ("prompt-of-a-million-characters", "train", MATH + ["--prompt-data", P],
     {"prompts.jsonl": _jsonl({"prompt": "t5 " * 333_334, "answer": "1"})},
     ["prompt tokens", "exceeds the model's max_position_embeddings 128", "--max-prompt-tokens"]),
    ("every-prompt-longer-than-max-prompt-tokens", "train", MATH + ["--prompt-data", P, "--max-prompt-tokens", "1"],
     {"prompts.jsonl": _jsonl(GOOD)}, [P, "all 1 prompts are longer", "--max-prompt-tokens"]),
    ("template-without-placeholder", "train", MATH + ["--prompt-data", P, "--prompt-template", "Solve it."],
     {"prompts.jsonl": _jsonl(GOOD)}, ["--prompt-template 'Solve it.' has no '{{prompt}}'"]),
    ("tokenizer-folder-without-tokenizer", "train",
     TINY + ["--task", "math", "--prompt-data", P, "--tokenizer", "{case}"], {"prompts.jsonl": _jsonl(GOOD)},
     ["none was found", "--tokenizer DIR"]),
    ("tokenizer-larger-than-the-vocabulary", "train", TINY + ["--task", "math", "--prompt-data", P, "--tokenizer", "{math}"],
     {"prompts.jsonl": _jsonl(GOOD)}, ["the tokenizer has", "tokens but the model's vocabulary is 16"]),
    ("prompt-parquet-not-parquet", "train", MATH + ["--prompt-data", "{case}/prompts.parquet"],
     {"prompts.parquet": b"not a parquet file"}, ["{case}/prompts.parquet", "not a readable Parquet file"]),
    # tools/convert_hf_to_megatron.py
    ("hf2meg-hf-dir-missing", "hf2meg", ["--hf-dir", "{case}/nowhere", "--output", "{case}/out"], {},
     ["--hf-dir '{case}/nowhere' is not a directory"]),
    ("hf2meg-hf-dir-without-config", "hf2meg", ["--hf-dir", "{case}", "--output", "{case}/out"], {"x.txt": b"x"},
     ["--hf-dir '{case}' has no config.json"]),
    ("hf2meg-config-not-json", "hf2meg", ["--hf-dir", "{case}", "--output", "{case}/out"], {"config.json": b"{oops"},
     ["cannot read {case}/config.json"]),
    ("hf2meg-unsupported-architecture", "hf2meg", ["--hf-dir", "{case}", "--output", "{case}/out"], {"config.json": GPT2},
     ["gpt2"]),
    ("hf2meg-tp-zero", "hf2meg", ["--hf-dir", "{hf}", "--output", "{case}/out", "--tensor-model-parallel-size", "0"], {},
     ["--tensor-model-parallel-size=0 must be a positive integer"]),
    ("hf2meg-tp-not-dividing-heads", "hf2meg",
     ["--hf-dir", "{hf}", "--output", "{case}/out", "--tensor-model-parallel-size", "3"], {},
     ["--tensor-model-parallel-size=3 must divide num_attention_heads=4"]),
    ("hf2meg-pp-not-dividing-layers", "hf2meg",
     ["--hf-dir", "{hf}", "--output", "{case}/out", "--pipeline-model-parallel-size", "3"], {},
     ["--pipeline-model-parallel-size=3 must divide num_hidden_layers=2"]),
    ("hf2meg-output-is-a-file", "hf2meg", ["--hf-dir", "{hf}", "--output", "{case}/out"], {"out": b"keep me"},
     ["--output '{case}/out' exists and is not a directory"]),
    ("hf2meg-output-not-empty", "hf2meg", ["--hf-dir", "{hf}", "--output", "{case}/out"], {"out/mine.txt": b"keep me"},
     ["--output '{case}/out' exists and is not empty", "--overwrite"]),
    ("hf2meg-no-weights", "hf2meg", ["--hf-dir", "{noweights}", "--output", "{case}/out"], {}, ["{noweights}"]),
    # tools/convert_megatron_to_hf.py
    ("meg2hf-input-missing", "meg2hf", ["--input", "{case}/nowhere", "--output", "{case}/out"], {},
     ["'{case}/nowhere' is not a megatron distributed checkpoint"]),
    ("meg2hf-input-is-an-hf-folder", "meg2hf", ["--input", "{hf}", "--output", "{case}/out"], {},
     ["'{hf}' is not a megatron distributed checkpoint"]),
    ("meg2hf-shard-size-zero", "meg2hf", ["--input", "{ckpt}", "--output", "{case}/out", "--max-shard-size-gb", "0"], {},
     ["--max-shard-size-gb=0.0 must be a positive number"]),
    ("meg2hf-shard-size-nan", "meg2hf", ["--input", "{ckpt}", "--output", "{case}/out", "--max-shard-size-gb", "nan"], {},
     ["--max-shard-size-gb=nan must be a positive number"]),
    ("meg2hf-output-not-empty", "meg2hf", ["--input", "{ckpt}", "--output", "{case}/out"], {"out/mine.txt": b"keep"},
     ["--output '{case}/out' exists and is not empty", "--overwrite"]),
    ("meg2hf-output-is-a-file", "meg2hf", ["--input", "{ckpt}", "--output", "{case}/out"], {"out": b"keep"},
     ["--output '{case}/out' exists and is not a directory"]),
    # tools/verify_conversion.py
    ("verify-tp-zero", "verify", ["--hf-dir", "{hf}", "--megatron-dir", "{ckpt}", "--tensor-model-parallel-size", "0"],
     {}, ["--tensor-model-parallel-size=0 must be >= 1"]),
    ("verify-pp-not-dividing-layers", "verify",
     ["--hf-dir", "{hf}", "--megatron-dir", "{ckpt}", "--pipeline-model-parallel-size", "3"], {},
     ["--pipeline-model-parallel-size=3 must divide num_hidden_layers=2"]),
    ("verify-hf-dir-missing", "verify", ["--hf-dir", "{case}/nowhere", "--megatron-dir", "{ckpt}"], {},
     ["--hf-dir '{case}/nowhere' is not a directory"]),
    ("verify-megatron-dir-missing", "verify", ["--hf-dir", "{hf}", "--megatron-dir", "{case}/nowhere"], {},
     ["--megatron-dir '{case}/nowhere' is not a directory"]),
    ("verify-megatron-dir-is-an-hf-folder", "verify", ["--hf-dir", "{hf}", "--megatron-dir", "{hf}"], {},
     ["'{hf}' is not a megatron distributed checkpoint"]),
    ("verify-another-architecture", "verify", ["--hf-dir", "{other}", "--megatron-dir", "{ckpt}"], {},
     ["describes another architecture", "compare a checkpoint with the model it was converted from"]),
    ("verify-hf-without-weights", "verify", ["--hf-dir", "{noweights}", "--megatron-dir", "{ckpt}"], {}, ["{noweights}"]),
    ("verify-tolerance-nan", "verify", ["--hf-dir", "{hf}", "--megatron-dir", "{ckpt}", "--tolerance", "nan"], {},
     ["--tolerance=nan must be a finite number >= 0"]),
    ("verify-tolerance-negative", "verify", ["--hf-dir", "{hf}", "--megatron-dir", "{ckpt}", "--tolerance", "-1"], {},
     ["--tolerance=-1.0 must be a finite number >= 0"]),
    ("verify-max-new-tokens-negative", "verify", ["--hf-dir", "{hf}", "--megatron-dir", "{ckpt}", "--max-new-tokens", "-2"],
     {}, ["--max-new-tokens=-2 must be >= 0"]),
]
TOOLS = {"hf2meg": "convert_hf_to_megatron.py", "meg2hf": "convert_megatron_to_hf.py", "verify": "verify_conversion.py"}


def _tool_main(program: str):
    if program == "train":
        from megatron_rpg.train import main
        return main
    spec = importlib.util.spec_from_file_location(program, os.path.join(REPO, "tools", TOOLS[program]))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _files(*roots) -> dict:
    """{path: sha256} of every file under the roots."""
    found = {}
    for root in roots:
        for folder, _, names in os.walk(root):
            for name in names:
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    found[path] = hashlib.sha256(f.read()).hexdigest()
    return found


def _refuse(what: str):
    def reached(*args, **kwargs):
        raise AssertionError(f"{what}: the bad input was not refused before the expensive work")
    return reached


def _prepare(root: str) -> dict:
    """The shared folders: a tiny Qwen2 HF model (+ tokenizer), its converted checkpoint, a Qwen3 one
    (another architecture), a copy of the Qwen2 folder without weights, and test_math_run's model
    config with a byte-level BPE tokenizer beside it (128 positions) for the prompt files."""
    from tests.checkpoint.tiny_hf_folders import save_tiny_hf_folder
    from tests.training.test_math_run import _model_folder

    places = {name: os.path.join(root, name) for name in ("hf", "ckpt", "other", "noweights")}
    places["math"] = _model_folder(root)
    save_tiny_hf_folder("qwen2", places["hf"], seed=1)
    save_tiny_hf_folder("qwen3", places["other"], seed=2, tokenizer=False)
    shutil.copytree(places["hf"], places["noweights"], ignore=shutil.ignore_patterns("*.safetensors*"))
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert _tool_main("hf2meg")(["--hf-dir", places["hf"], "--output", places["ckpt"], "--no-progress"]) == 0
    return places


def body(rank, world_size, root):
    import torch.multiprocessing

    from megatron_rpg.checkpoint import convert
    from megatron_rpg.training import loop

    torch.set_num_threads(1)
    places = _prepare(root)
    shared_before = _files(*places.values())
    loop.build_model_and_optimizer = _refuse("the trainer built the model")
    convert.staged_output_dir = _refuse("the converter started writing")
    torch.multiprocessing.get_context = _refuse("the verifier spawned its workers")
    results = {}
    for case_id, program, argv, files, _ in CASES:
        case = os.path.join(root, "cases", case_id)
        os.makedirs(case)
        for name, content in files.items():
            os.makedirs(os.path.dirname(os.path.join(case, name)), exist_ok=True)
            with open(os.path.join(case, name), "wb") as f:
                f.write(content)
        before = _files(case)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = _tool_main(program)([arg.format(case=case, **places) for arg in argv])
            except SystemExit as exit_info:
                code = exit_info.code
            except BaseException as error:  # noqa: BLE001 - reported as the case's result
                code = f"raised {type(error).__name__}: {error}"
        results[case_id] = dict(code=code, err=err.getvalue(), kept=_files(case) == before, places=places, case=case)
    results["shared_kept"] = _files(*places.values()) == shared_before
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_on_ranks(body, world_size=1, args=(str(tmp_path_factory.mktemp("bad_inputs")),))[0]


@pytest.mark.parametrize("case_id, expected", [(c[0], c[4]) for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_input_exits_2_before_the_expensive_work_naming_it_and_losing_nothing(results, case_id, expected):
    if case_id in ("fp8-on-cpu", "transformer-engine-on-cpu") and torch.cuda.is_available():
        pytest.skip("the CPU-only start-up error")
    result = results[case_id]
    assert result["code"] == 2, result
    assert "Traceback" not in result["err"], result["err"]
    for text in expected:
        assert text.format(case=result["case"], **result["places"]) in result["err"], result["err"]
    assert result["kept"], "a file in the case folder was changed or removed"


def test_the_model_folders_and_the_checkpoint_are_untouched_by_every_case(results):
    assert results["shared_kept"]
