"""HF -> megatron torch_dist -> HF conversion: bit-exact round trips, loadable output, and bad input
rejected before anything is written (the output folder is never half-overwritten)."""
import filecmp
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_rpg.checkpoint import convert
from tests.checkpoint.tiny_hf_folders import save_tiny_hf_folder
from tests.distributed.harness import run_on_ranks
from tests.tiny_models import FAMILIES


def _hf_tensors(directory):
    tensors = {}
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(directory, name)))
    return tensors


def round_trip_every_family(rank, world_size, root):
    """Runs in a fresh (one-rank gloo) process: megatron's writer needs CPU mode, which is process-wide."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from megatron_rpg.megatron.cpu_mode import enable_cpu_mode

    enable_cpu_mode()
    for family in FAMILIES:
        hf_dir, megatron_dir, back_dir = (os.path.join(root, family, n) for n in ("hf", "megatron", "back"))
        save_tiny_hf_folder(family, hf_dir, seed=1)
        os.makedirs(back_dir)
        with open(os.path.join(back_dir, "stale.txt"), "w") as f:  # --overwrite must replace it whole
            f.write("old")
        metadata = convert.hf_to_megatron_checkpoint(hf_dir, megatron_dir, tensor_model_parallel_size=2,
                                                     pipeline_model_parallel_size=2, progress=False)
        assert (metadata["tensor_model_parallel_size"], metadata["pipeline_model_parallel_size"]) == (2, 2)
        assert (metadata["vocab_size"], metadata["padded_vocab_size"]) == (250, 256)
        # a small shard limit forces several shards, so the index is exercised
        index = convert.megatron_to_hf_checkpoint(megatron_dir, back_dir, overwrite=True,
                                                  max_shard_bytes=64 * 1024, progress=False)
        assert len(set(index["weight_map"].values())) > 1
        assert not os.path.exists(os.path.join(back_dir, "stale.txt"))

        original, restored = _hf_tensors(hf_dir), _hf_tensors(back_dir)
        assert set(restored) == set(original), (family, set(restored) ^ set(original))
        for name, tensor in original.items():
            assert restored[name].dtype == tensor.dtype and torch.equal(restored[name], tensor), (family, name)
        for side_file in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            assert filecmp.cmp(os.path.join(hf_dir, side_file), os.path.join(back_dir, side_file), shallow=False)

        model, info = AutoModelForCausalLM.from_pretrained(back_dir, output_loading_info=True)
        assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), (family, info)
        assert info["mismatched_keys"] == set() and not info["error_msgs"], (family, info)
        assert PreTrainedTokenizerFast.from_pretrained(back_dir)("t5 t7")["input_ids"] == [5, 7]

    # a truncated .distcp file is named before anything is written
    import shutil
    damaged = shutil.copytree(megatron_dir, os.path.join(root, "damaged"))
    distcp = sorted(n for n in os.listdir(damaged) if n.endswith(".distcp"))[0]
    with open(os.path.join(damaged, distcp), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(damaged, distcp)) - 1000)
    try:
        convert.megatron_to_hf_checkpoint(damaged, os.path.join(root, "damaged_out"), progress=False)
        raise AssertionError("a truncated checkpoint was converted")
    except ValueError as error:
        assert f"file {distcp} is truncated" in str(error), error
    assert not [n for n in os.listdir(root) if n.startswith(("damaged_out", ".damaged_out"))]
    return True


@pytest.mark.distributed
def test_hf_to_megatron_to_hf_round_trip_is_bit_exact_and_loadable_for_every_family(tmp_path):
    assert run_on_ranks(round_trip_every_family, world_size=1, args=(str(tmp_path),)) == [True]


# ---- bad input: a clear ValueError naming the bad value, and nothing written -------------------------

@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("qwen2") / "hf")
    save_tiny_hf_folder("qwen2", directory, tokenizer=False)
    return directory


def _assert_nothing_written(parent, output):
    assert not os.path.exists(output)
    assert not [n for n in os.listdir(parent) if ".partial-" in n or ".old-" in n]


@pytest.mark.parametrize("tp, pp, message", [
    (3, 1, r"--tensor-model-parallel-size=3 must divide num_attention_heads=4 and num_key_value_heads=2"),
    (4, 1, r"--tensor-model-parallel-size=4 must divide .* num_key_value_heads=2"),
    (1, 3, r"--pipeline-model-parallel-size=3 must divide num_hidden_layers=2"),
    (0, 1, r"--tensor-model-parallel-size=0 must be a positive integer"),
])
def test_parallel_sizes_that_do_not_divide_the_model_are_rejected_before_writing(qwen2_folder, tmp_path, tp, pp, message):
    output = str(tmp_path / "out")
    with pytest.raises(ValueError, match=message):
        convert.hf_to_megatron_checkpoint(qwen2_folder, output, tensor_model_parallel_size=tp,
                                          pipeline_model_parallel_size=pp, progress=False)
    _assert_nothing_written(str(tmp_path), output)


def test_unsupported_architecture_is_named_with_the_supported_ones(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    hf_dir = str(tmp_path / "mistral")
    MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2)).save_pretrained(hf_dir)
    with pytest.raises(ValueError, match=r"model_type='mistral' is not supported.*'qwen2', 'llama', 'qwen3'"):
        convert.hf_to_megatron_checkpoint(hf_dir, str(tmp_path / "out"), progress=False)
    _assert_nothing_written(str(tmp_path), str(tmp_path / "out"))


def _copy_folder(source, target):
    import shutil

    shutil.copytree(source, target)
    return target


def test_missing_weights_missing_tensor_and_truncated_shard_are_named(qwen2_folder, tmp_path):
    output = str(tmp_path / "out")
    no_weights = _copy_folder(qwen2_folder, str(tmp_path / "no_weights"))
    os.remove(os.path.join(no_weights, "model.safetensors"))
    with pytest.raises(ValueError, match=r"holds no weights: expected model.safetensors"):
        convert.hf_to_megatron_checkpoint(no_weights, output, progress=False)

    missing = _copy_folder(qwen2_folder, str(tmp_path / "missing"))
    tensors = load_file(os.path.join(missing, "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, os.path.join(missing, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor 'model.layers.1.mlp.down_proj.weight'"):
        convert.hf_to_megatron_checkpoint(missing, output, progress=False)

    truncated = _copy_folder(qwen2_folder, str(tmp_path / "truncated"))
    path = os.path.join(truncated, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(ValueError, match=r"model.safetensors' is (corrupted|unreadable or corrupted)"):
        convert.hf_to_megatron_checkpoint(truncated, output, progress=False)

    with pytest.raises(ValueError, match=r"--hf-dir .* is not a directory"):
        convert.hf_to_megatron_checkpoint(str(tmp_path / "nowhere"), output, progress=False)
    _assert_nothing_written(str(tmp_path), output)


def test_non_empty_output_is_refused_without_overwrite_and_kept_intact_when_conversion_fails(qwen2_folder, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match=r"--output .* exists and is not empty; .* --overwrite"):
        convert.hf_to_megatron_checkpoint(qwen2_folder, str(output), progress=False)
    # with --overwrite, a conversion that fails (bad TP) leaves the old content untouched
    with pytest.raises(ValueError, match="--tensor-model-parallel-size=3"):
        convert.hf_to_megatron_checkpoint(qwen2_folder, str(output), tensor_model_parallel_size=3,
                                          overwrite=True, progress=False)
    assert os.listdir(output) == ["keep.txt"] and (output / "keep.txt").read_text() == "precious"


def test_staged_output_replaces_the_old_folder_only_when_writing_completes(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    with pytest.raises(RuntimeError, match="disk full"):
        with convert.staged_output_dir(str(output), overwrite=True) as staging:
            with open(os.path.join(staging, "half.bin"), "w") as f:
                f.write("partial")
            raise RuntimeError("disk full")
    assert os.listdir(output) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the staging folder was removed
    with convert.staged_output_dir(str(output), overwrite=True) as staging:
        with open(os.path.join(staging, "new.bin"), "w") as f:
            f.write("complete")
    assert os.listdir(output) == ["new.bin"] and sorted(os.listdir(tmp_path)) == ["out"]


def test_a_failed_final_rename_puts_the_old_folder_back_and_removes_the_staging_folder(tmp_path,
                                                                                    monkeypatch):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    real_rename = os.rename

    def rename(source, target):  # the old folder moves aside, then the staged one cannot move in
        if ".partial-" in os.path.basename(source):
            raise OSError(f"simulated failure renaming {source} -> {target}")
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated failure"):
        with convert.staged_output_dir(str(output), overwrite=True) as staging:
            with open(os.path.join(staging, "new.bin"), "w") as f:
                f.write("complete")
    assert os.listdir(output) == ["keep.txt"] and (output / "keep.txt").read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no .out.old-* or .out.partial-* left behind


def test_a_folder_that_is_not_a_converted_checkpoint_is_rejected(tmp_path, qwen2_folder):
    with pytest.raises(ValueError, match=r"is not a megatron distributed checkpoint \(no metadata.json\)"):
        convert.megatron_to_hf_checkpoint(qwen2_folder, str(tmp_path / "out"), progress=False)
    _assert_nothing_written(str(tmp_path), str(tmp_path / "out"))


# ---- configs the model builder rejects: the converter rejects them too, both ways, same message ----

def _builder_rejection(config) -> str:
    from megatron_rpg.megatron.models import transformer_config_from_hf

    with pytest.raises(ValueError) as error:
        transformer_config_from_hf(config, tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    return str(error.value)


def _edit_config(path, **changes):
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


UNBUILDABLE = {
    "yarn": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                  "original_max_position_embeddings": 32}),
    "partial_rotary_factor=0.5": dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                       "partial_rotary_factor": 0.5}),
}


@pytest.mark.parametrize("change", sorted(UNBUILDABLE))
def test_hf_config_the_model_builder_rejects_is_rejected_before_writing_with_its_message(qwen2_folder, tmp_path, change):
    from megatron_rpg.checkpoint.hf_files import read_hf_config

    hf_dir = _copy_folder(qwen2_folder, str(tmp_path / "hf"))
    _edit_config(os.path.join(hf_dir, "config.json"), **UNBUILDABLE[change])
    message = _builder_rejection(read_hf_config(hf_dir))
    output = str(tmp_path / "out")
    with pytest.raises(ValueError) as error:
        convert.hf_to_megatron_checkpoint(hf_dir, output, progress=False)
    assert str(error.value) == message
    _assert_nothing_written(str(tmp_path), output)
    # an existing output stays as it was, even with --overwrite
    os.makedirs(output)
    with open(os.path.join(output, "keep.txt"), "w") as f:
        f.write("precious")
    with pytest.raises(ValueError, match="is not supported"):
        convert.hf_to_megatron_checkpoint(hf_dir, output, overwrite=True, progress=False)
    assert os.listdir(output) == ["keep.txt"]


@pytest.mark.parametrize("change", sorted(UNBUILDABLE))
def test_stored_config_the_model_builder_rejects_is_rejected_before_writing_hf(qwen2_folder, tmp_path, change):
    """The megatron -> HF direction reads the HF config stored with the checkpoint (hf/config.json),
    which is all it looks at before writing; a checkpoint folder with only those files stands in."""
    checkpoint = tmp_path / "megatron"
    (checkpoint / "hf").mkdir(parents=True)
    (checkpoint / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    (checkpoint / convert.METADATA_FILE).write_text(json.dumps({"format_version": convert.FORMAT_VERSION}))
    config_path = os.path.join(checkpoint, "hf", "config.json")
    with open(os.path.join(qwen2_folder, "config.json")) as f, open(config_path, "w") as g:
        g.write(f.read())
    _edit_config(config_path, **UNBUILDABLE[change])
    message = _builder_rejection(convert.hf_config_of(str(checkpoint)))
    output = str(tmp_path / "out")
    with pytest.raises(ValueError) as error:
        convert.megatron_to_hf_checkpoint(str(checkpoint), output, progress=False)
    assert str(error.value) == message
    _assert_nothing_written(str(tmp_path), output)


# ---- tensors the config does not describe are not dropped silently -------------------------------

def _add_tensors(hf_dir, **extra):
    path = os.path.join(hf_dir, "model.safetensors")
    tensors = load_file(path)
    tensors.update({name.replace("__", "."): make(tensors) for name, make in extra.items()})
    save_file(tensors, path, metadata={"format": "pt"})


def test_unexpected_hf_tensors_are_listed_before_writing(qwen2_folder, tmp_path):
    hf_dir = _copy_folder(qwen2_folder, str(tmp_path / "hf"))
    _add_tensors(hf_dir, model__layers__0__mlp__extra_proj__weight=lambda t: torch.ones(4, 4),
                 model__layers__1__self_attn__o_proj__bias=lambda t: torch.ones(64))
    output = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"stores tensors its config.json does not describe, which conversion "
                                         r"would drop: 'model.layers.0.mlp.extra_proj.weight', "
                                         r"'model.layers.1.self_attn.o_proj.bias'"):
        convert.hf_to_megatron_checkpoint(hf_dir, output, progress=False)
    _assert_nothing_written(str(tmp_path), output)


def test_a_tied_model_storing_a_different_lm_head_is_rejected_and_an_identical_copy_is_accepted(tmp_path):
    from megatron_rpg.checkpoint import hf_files, hf_mapping

    hf_dir = str(tmp_path / "tied")
    save_tiny_hf_folder("qwen2-tied", hf_dir, tokenizer=False)
    config = hf_files.read_hf_config(hf_dir)

    def check():
        hf_files.check_tensors_present(hf_files.LazyHFTensors(hf_dir), hf_mapping.hf_shapes(config),
                                       redundant_copies=hf_mapping.redundant_hf_copies(config))

    check()  # as saved: no lm_head.weight
    _add_tensors(hf_dir, lm_head__weight=lambda t: t["model.embed_tokens.weight"].clone())
    check()  # an exact copy of the embedding is what HF re-ties anyway
    _add_tensors(hf_dir, lm_head__weight=lambda t: t["model.embed_tokens.weight"] + 1)
    with pytest.raises(ValueError, match=r"would drop: 'lm_head.weight' \(config.json has tie_word_embeddings=true "
                                         r"but the stored lm_head.weight differs"):
        check()
    with pytest.raises(ValueError, match=r"'lm_head.weight'"):
        convert.hf_to_megatron_checkpoint(hf_dir, str(tmp_path / "out"), progress=False)
    _assert_nothing_written(str(tmp_path), str(tmp_path / "out"))


def test_old_rotary_inv_freq_buffers_are_not_counted_as_unexpected(qwen2_folder, tmp_path):
    from megatron_rpg.checkpoint import hf_files, hf_mapping

    hf_dir = _copy_folder(qwen2_folder, str(tmp_path / "hf"))
    _add_tensors(hf_dir, model__layers__0__self_attn__rotary_emb__inv_freq=lambda t: torch.ones(8))
    config = hf_files.read_hf_config(hf_dir)
    hf_files.check_tensors_present(hf_files.LazyHFTensors(hf_dir), hf_mapping.hf_shapes(config))


# ---- damaged weight files: a ValueError naming the file, nothing written --------------------------

class NotATensor:
    """Pickled by reference; weights-only loading must refuse it."""


def _as_bin_folder(qwen2_folder, directory, state_change):
    hf_dir = _copy_folder(qwen2_folder, directory)
    state = load_file(os.path.join(hf_dir, "model.safetensors"))
    os.remove(os.path.join(hf_dir, "model.safetensors"))
    state_change(state)
    torch.save(state, os.path.join(hf_dir, "pytorch_model.bin"))
    return hf_dir


def test_a_safetensors_file_with_a_garbage_header_is_named(qwen2_folder, tmp_path):
    hf_dir = _copy_folder(qwen2_folder, str(tmp_path / "hf"))
    path = os.path.join(hf_dir, "model.safetensors")
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage{]" * 8)
    output = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"weight file '.*/hf/model.safetensors' is unreadable or corrupted"):
        convert.hf_to_megatron_checkpoint(hf_dir, output, progress=False)
    _assert_nothing_written(str(tmp_path), output)


def test_a_pytorch_model_bin_with_a_pickled_object_is_refused_without_unpickling_it(qwen2_folder, tmp_path):
    hf_dir = _as_bin_folder(qwen2_folder, str(tmp_path / "hf"),
                            lambda state: state.update({"model.norm.weight": NotATensor()}))
    output = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"weight file '.*/hf/pytorch_model.bin' holds pickled objects other than "
                                         r"tensors \(tests.checkpoint.test_convert.NotATensor\)"):
        convert.hf_to_megatron_checkpoint(hf_dir, output, progress=False)
    _assert_nothing_written(str(tmp_path), output)


def test_a_pytorch_model_bin_with_a_non_tensor_entry_is_named(qwen2_folder, tmp_path):
    # plain ints and lists pass weights-only loading; they are still not weights
    hf_dir = _as_bin_folder(qwen2_folder, str(tmp_path / "hf"),
                            lambda state: state.update({"model.norm.weight": [1.0, 2.0]}))
    output = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"weight file '.*/hf/pytorch_model.bin' has entries that are not named "
                                         r"tensors: 'model.norm.weight'"):
        convert.hf_to_megatron_checkpoint(hf_dir, output, progress=False)
    _assert_nothing_written(str(tmp_path), output)


def test_a_valid_pytorch_model_bin_passes_every_check(qwen2_folder, tmp_path):
    from megatron_rpg.checkpoint import hf_files, hf_mapping

    hf_dir = _as_bin_folder(qwen2_folder, str(tmp_path / "hf"), lambda state: None)
    config = hf_files.read_hf_config(hf_dir)
    tensors = hf_files.LazyHFTensors(hf_dir)
    hf_files.check_tensors_present(tensors, hf_mapping.hf_shapes(config))
    assert torch.equal(tensors["model.norm.weight"], load_file(os.path.join(qwen2_folder, "model.safetensors"))[
        "model.norm.weight"])
