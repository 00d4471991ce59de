"""HF folder <-> megatron-core torch_dist checkpoint, tensor by tensor, never half-writing the output.

    hf_to_megatron_checkpoint(hf_dir, out_dir, tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    megatron_to_hf_checkpoint(out_dir, hf_out_dir)

A megatron checkpoint written here is a torch_dist checkpoint (see `dist_ckpt`) that megatron
reshards on load to any TP/PP, plus:
- `megatron_rpg_conversion.json`: architecture, the HF config, vocab size and padding, the TP/PP it
  was validated for, dtypes;
- `hf/`: the source folder's config, generation config and tokenizer files, restored on the way back.
Round trip HF -> megatron -> HF is bit-exact (only concatenation, slicing and zero padding).

Every check (config supported, TP/PP valid, files readable and complete, shapes as the config implies,
output not already populated) runs before anything is written. Output goes to a temporary folder next
to the target and is renamed into place only when complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

from megatron_rpg.checkpoint import dist_ckpt, hf_files, hf_mapping, integrity, layout

METADATA_FILE = "megatron_rpg_conversion.json"
HF_SIDE_DIR = "hf"
FORMAT_VERSION = 1


def check_parallel_sizes(shape: hf_mapping.ModelShape, tensor_model_parallel_size: int,
                         pipeline_model_parallel_size: int) -> None:
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    for name, value in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if shape.num_heads % tp or shape.num_kv_heads % tp:
        raise ValueError(f"--tensor-model-parallel-size={tp} must divide num_attention_heads="
                         f"{shape.num_heads} and num_key_value_heads={shape.num_kv_heads}")
    if shape.num_layers % pp:
        raise ValueError(f"--pipeline-model-parallel-size={pp} must divide num_hidden_layers={shape.num_layers}")


def check_output_dir(output: str, overwrite: bool) -> None:
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"--output {output!r} exists and is not a directory")
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise ValueError(f"--output {output!r} exists and is not empty; choose a new folder or pass --overwrite")


@contextlib.contextmanager
def staged_output_dir(output: str, overwrite: bool):
    """Yields a temporary folder next to `output`; on success it replaces `output` by rename, on
    error (also in that final rename) it is deleted and `output` is left as it was."""
    check_output_dir(output, overwrite)
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(output))}.partial-", dir=parent)
    try:
        yield staging
        hf_files.normalise_permissions(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if os.path.exists(output):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(output))}.old-", dir=parent)
        os.rename(output, os.path.join(old, "previous"))  # moved aside whole, deleted once the new one is in
    try:
        os.rename(staging, output)
    except BaseException:
        if old is not None:  # put the previous folder back where it was
            os.rename(os.path.join(old, "previous"), output)
            shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _is_hf_model_folder(directory: str) -> bool:
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return "config.json" in names and any(name.endswith((".safetensors", ".bin")) for name in names)


def read_conversion_metadata(directory: str) -> dict:
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.isfile(os.path.join(directory, "metadata.json")):
        if _is_hf_model_folder(directory):
            raise ValueError(f"{directory!r} is not a megatron distributed checkpoint (no metadata.json): it is a "
                             f"Hugging Face model folder; convert it first, `python tools/convert_hf_to_megatron.py "
                             f"--hf-dir {directory} --output ckpt/NAME`, then pass --load ckpt/NAME")
        raise ValueError(f"{directory!r} is not a megatron distributed checkpoint (no metadata.json)")
    if not os.path.isfile(path):
        raise ValueError(f"{directory!r} has no {METADATA_FILE}; it was not written by "
                         f"tools/convert_hf_to_megatron.py (the HF config is needed to map names back)")
    with open(path) as f:
        return json.load(f)


def hf_to_megatron_checkpoint(hf_dir: str, output: str, *, tensor_model_parallel_size: int = 1,
                              pipeline_model_parallel_size: int = 1, overwrite: bool = False,
                              progress: bool = True) -> dict:
    """Converts an HF folder to a reshardable torch_dist checkpoint; returns the written metadata."""
    from megatron_rpg.megatron.models import padded_vocab_size

    if not os.path.isdir(hf_dir):
        raise ValueError(f"--hf-dir {hf_dir!r} is not a directory")
    config = hf_files.read_hf_config(hf_dir)
    shape = hf_mapping.model_shape(config)
    check_parallel_sizes(shape, tensor_model_parallel_size, pipeline_model_parallel_size)
    check_output_dir(output, overwrite)
    tensors = hf_files.LazyHFTensors(hf_dir)
    padded = padded_vocab_size(shape.vocab_size, tensor_model_parallel_size)
    hf_files.check_tensors_present(tensors, hf_mapping.hf_shapes(config),
                                   redundant_copies=hf_mapping.redundant_hf_copies(config))
    hf_files.check_tokenizer_fits(hf_dir, shape.vocab_size, "--hf-dir")

    rules = hf_mapping.tensor_rules(config)
    converted = hf_mapping.hf_to_megatron(config, tensors, padded_vocab_size=padded)
    dtypes = {}

    def tracked():
        for name, tensor in _progress(converted, len(rules), "HF -> megatron (reading)", progress):
            dtypes[str(tensor.dtype)] = dtypes.get(str(tensor.dtype), 0) + 1
            yield name, tensor

    with staged_output_dir(output, overwrite) as staging:
        state = dist_ckpt.full_tensors_state(tracked(), shape.num_layers)
        with _phase(f"writing torch_dist checkpoint {output}", progress):  # the slow part: megatron's writer
            dist_ckpt.save_state(state, staging)
        metadata = describe_checkpoint(staging, config, padded_vocab_size=padded,
                                       tensor_model_parallel_size=tensor_model_parallel_size,
                                       pipeline_model_parallel_size=pipeline_model_parallel_size,
                                       hf_dir=hf_dir, dtypes=dtypes)
        integrity.write_manifest(staging, integrity.file_entries(staging, integrity.checkpoint_files(staging)))
    return metadata


def describe_checkpoint(directory: str, hf_config, *, padded_vocab_size: int, tensor_model_parallel_size: int,
                        pipeline_model_parallel_size: int, hf_dir: str | None = None,
                        dtypes: dict | None = None, tokenizer_dir: str | None = None) -> dict:
    """Writes `megatron_rpg_conversion.json` and `hf/` (config, plus tokenizer files from `hf_dir`, or
    `hf_config` with the tokenizer files of `tokenizer_dir`)
    next to a torch_dist checkpoint of this model, which is what `megatron_to_hf_checkpoint` needs;
    the trainer can call it for its own checkpoints (same ShardedTensor keys)."""
    shape = hf_mapping.model_shape(hf_config)
    side_dir = os.path.join(directory, HF_SIDE_DIR)
    if hf_dir is not None:
        side = hf_files.copy_side_files(hf_dir, side_dir)
    else:
        hf_config.save_pretrained(side_dir)
        if tokenizer_dir is not None:  # the tokenizer files only: the config is this model's
            for name in hf_files.side_files(tokenizer_dir):
                if name not in ("config.json", "generation_config.json"):
                    shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(side_dir, name))
        side = sorted(os.listdir(side_dir))
    metadata = dict(format_version=FORMAT_VERSION, model_type=shape.model_type,
                    architectures=list(getattr(hf_config, "architectures", None) or []),
                    hf_config=hf_config.to_dict(), vocab_size=shape.vocab_size, padded_vocab_size=padded_vocab_size,
                    num_layers=shape.num_layers, tied_embeddings=shape.tied_embeddings,
                    tensor_model_parallel_size=tensor_model_parallel_size,
                    pipeline_model_parallel_size=pipeline_model_parallel_size,
                    reshardable=True, dtypes=dtypes or {}, hf_side_files=side)
    with open(os.path.join(directory, METADATA_FILE), "w") as f:
        json.dump(metadata, f, indent=2, default=str)
    return metadata


def hf_config_of(checkpoint_dir: str):
    """The HF config stored with a converted checkpoint, as a transformers config object."""
    from transformers import AutoConfig

    side_dir = os.path.join(checkpoint_dir, HF_SIDE_DIR)
    if os.path.isfile(os.path.join(side_dir, "config.json")):
        return AutoConfig.from_pretrained(side_dir, local_files_only=True)
    stored = dict(read_conversion_metadata(checkpoint_dir)["hf_config"])
    return AutoConfig.for_model(stored.pop("model_type"), **stored)


def megatron_to_hf_checkpoint(input_dir: str, output: str, *, overwrite: bool = False,
                              max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> dict:
    """Writes HF safetensors shards + index + config/tokenizer files; vocab padding removed.
    `input_dir` is a checkpoint folder, or a --save folder of the trainer (its latest iter_).
    Returns the safetensors index."""
    input_dir = layout.latest_checkpoint(input_dir)
    metadata = read_conversion_metadata(input_dir)
    config = hf_config_of(input_dir)
    shape = hf_mapping.model_shape(config)
    check_output_dir(output, overwrite)
    side_dir = os.path.join(input_dir, HF_SIDE_DIR)
    if os.path.isdir(side_dir):
        hf_files.check_tokenizer_fits(side_dir, shape.vocab_size, "the checkpoint's tokenizer in")
    integrity.verify_checkpoint(input_dir)  # before any tensor is read: a damaged file is named, nothing written
    tensors = dist_ckpt.LazyCheckpointTensors(input_dir, hf_mapping.megatron_names(config), shape.num_layers)
    _check_checkpoint_shapes(tensors, config, metadata["padded_vocab_size"])

    rules = hf_mapping.tensor_rules(config)
    with staged_output_dir(output, overwrite) as staging:
        named = _progress(hf_mapping.megatron_to_hf(config, tensors), sum(len(r.hf_names) for r in rules),
                          "megatron -> HF", progress)
        index = hf_files.write_safetensors_shards(named, staging, max_shard_bytes)
        if os.path.isdir(side_dir):
            hf_files.copy_side_files(side_dir, staging)
        else:
            config.save_pretrained(staging)
        if not os.path.isfile(os.path.join(staging, "generation_config.json")):
            _write_generation_config(config, staging)
    return index


def _write_generation_config(config, folder: str) -> None:
    """The generation config transformers derives from the model config (its bos/eos/pad ids), so
    `generate()` and serving stacks stop where the model does."""
    from transformers import GenerationConfig

    GenerationConfig.from_model_config(config).save_pretrained(folder)


def _check_checkpoint_shapes(tensors: dist_ckpt.LazyCheckpointTensors, config, padded_vocab: int) -> None:
    """Every megatron tensor the config implies is stored with the implied (full) shape."""
    expected = hf_mapping.megatron_shapes(config, padded_vocab)
    for name, shape in expected.items():
        key = dist_ckpt.checkpoint_key(name, tensors.renames)
        if key not in tensors.shapes:
            raise ValueError(f"megatron checkpoint {tensors.directory!r} lacks {key!r} (for {name!r})")
        stored = tuple(tensors.shapes[key][0])
        layer, _ = dist_ckpt.split_layer_name(name)
        implied = (shape if layer is None else (tensors.num_layers, *shape))
        if stored != tuple(implied):
            raise ValueError(f"megatron checkpoint key {key!r} has shape {stored} but the stored HF config "
                             f"implies {tuple(implied)}")


def _progress(iterable, total: int, description: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=description, unit="tensor")


@contextlib.contextmanager
def _phase(description: str, enabled: bool):
    """A one-step tqdm bar around a step with no progress of its own: shown while it runs, then
    completed with its duration."""
    if not enabled:
        yield
        return
    from tqdm import tqdm

    with tqdm(total=1, desc=description, bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}]") as bar:
        bar.refresh()
        yield
        bar.update(1)
