"""Hugging Face checkpoint folders on disk: lazy tensor reading, sharded safetensors writing, side files.

Reading never unpickles arbitrary objects: safetensors, or `torch.load(weights_only=True, mmap=True)`
for legacy `pytorch_model*.bin` files (which must hold only named tensors). Everything is checked
(files present and readable, every tensor the config implies present with its shape, no tensor it
does not describe) before any output is written.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# small files a model folder carries besides weights (config, generation config, tokenizer, template)
SIDE_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
WEIGHT_INDEX_FILES = (SAFETENSORS_INDEX, BIN_INDEX)


def read_hf_config(hf_dir: str):
    """The folder's config via transformers (no hub access); ValueError when missing or unreadable."""
    from transformers import AutoConfig

    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"--hf-dir {hf_dir!r} has no config.json; point it at a Hugging Face model folder")
    try:
        return AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from error


def _weight_files(hf_dir: str) -> dict[str, str]:
    """tensor name -> file name, from an index or the single-file layout."""
    for index_name, single in ((SAFETENSORS_INDEX, "model.safetensors"), (BIN_INDEX, "pytorch_model.bin")):
        index_path = os.path.join(hf_dir, index_name)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    return dict(json.load(f)["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{index_path} is not a valid weight index ({error})") from error
        if os.path.isfile(os.path.join(hf_dir, single)):
            return {name: single for name in _names_in_file(hf_dir, single)}
    raise ValueError(f"--hf-dir {hf_dir!r} holds no weights: expected model.safetensors, "
                     f"{SAFETENSORS_INDEX}, pytorch_model.bin or {BIN_INDEX}")


def _names_in_file(hf_dir: str, file_name: str) -> list[str]:
    return list(_open(hf_dir, file_name).keys())


def _open(hf_dir: str, file_name: str):
    path = os.path.join(hf_dir, file_name)
    if not os.path.isfile(path):
        raise ValueError(f"weight file {path!r} (named by the index) does not exist")
    try:
        if file_name.endswith(".safetensors"):
            return safe_open(path, framework="pt", device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        # torch's own message suggests weights_only=False, which would run the pickle's code: don't
        unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        raise ValueError(f"weight file {path!r} holds pickled objects other than tensors"
                         f"{f' ({unsupported.group(1)})' if unsupported else ''}, which weights-only "
                         f"loading refuses to unpickle; re-save the state dict as tensors only "
                         f"(e.g. safetensors)") from error
    except Exception as error:  # noqa: BLE001 - any parse failure means a damaged file; name it
        raise ValueError(f"weight file {path!r} is unreadable or corrupted ({type(error).__name__}: "
                         f"{error}); re-download or re-save it") from error
    if not isinstance(state, Mapping):
        raise ValueError(f"weight file {path!r} holds a {type(state).__name__}, not a state dict "
                         f"(tensor name -> tensor); re-save it with model.save_pretrained")
    not_tensors = sorted(str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(f"weight file {path!r} has entries that are not named tensors: "
                         f"{_listed(not_tensors)}; re-save the state dict as tensors only")
    return state


def _listed(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# transformers < 4.31 saved each layer's rotary inverse frequencies; they follow from the config
_RECOMPUTED_BUFFER = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _equal_stored(tensors: "LazyHFTensors", name: str, original: str) -> bool:
    return (original in tensors.weight_map and tensors.shape(name) == tensors.shape(original)
            and torch.equal(tensors[name], tensors[original]))


class LazyHFTensors(Mapping):
    """Read-only Mapping hf_name -> tensor over a model folder; a tensor is read when asked for."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        self.weight_map = _weight_files(hf_dir)
        self._handles: dict[str, object] = {}

    def _handle(self, file_name: str):
        if file_name not in self._handles:
            self._handles[file_name] = _open(self.hf_dir, file_name)
        return self._handles[file_name]

    def __getitem__(self, name: str) -> torch.Tensor:
        file_name = self.weight_map[name]
        handle = self._handle(file_name)
        try:
            return handle.get_tensor(name) if file_name.endswith(".safetensors") else handle[name]
        except Exception as error:  # noqa: BLE001 - a tensor whose bytes cannot be read: name it
            raise ValueError(f"tensor {name!r} in {os.path.join(self.hf_dir, file_name)!r} cannot be read "
                             f"({type(error).__name__}: {error}); the file is corrupted") from error

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape without reading the data."""
        file_name = self.weight_map[name]
        handle = self._handle(file_name)
        if file_name.endswith(".safetensors"):
            return tuple(handle.get_slice(name).get_shape())
        return tuple(handle[name].shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)

    def __len__(self) -> int:
        return len(self.weight_map)


def check_tensors_present(tensors: LazyHFTensors, expected: Mapping[str, tuple[int, ...]],
                          redundant_copies: Mapping[str, str] | None = None) -> None:
    """Every expected tensor exists in a readable file with the expected shape (headers only), and
    no other tensor is stored: nothing would be dropped silently. Allowed besides `expected`: old
    transformers' rotary `inv_freq` buffers (recomputed from the config) and `redundant_copies`
    (name -> original) that equal their original bit for bit (read to compare)."""
    for name, shape in expected.items():
        if name not in tensors.weight_map:
            raise ValueError(f"HF checkpoint {tensors.hf_dir!r} is missing tensor {name!r}, which its "
                             f"config.json implies")
        stored = tensors.shape(name)
        if tuple(stored) != tuple(shape):
            raise ValueError(f"HF tensor {name!r} has shape {tuple(stored)} but config.json implies "
                             f"{tuple(shape)}")
    copies = dict(redundant_copies or {})
    unexpected = sorted(name for name in tensors.weight_map
                        if name not in expected and not _RECOMPUTED_BUFFER.search(name)
                        and not (name in copies and _equal_stored(tensors, name, copies[name])))
    if unexpected:
        hint = ""
        if any(name in copies for name in unexpected):
            hint = (" (config.json has tie_word_embeddings=true but the stored lm_head.weight differs from "
                    "model.embed_tokens.weight: the model is untied, set tie_word_embeddings to false)")
        raise ValueError(f"HF checkpoint {tensors.hf_dir!r} stores tensors its config.json does not describe, "
                         f"which conversion would drop: {_listed(unexpected)}{hint}; check that config.json "
                         f"belongs to these weights")
    for file_name in sorted(set(tensors.weight_map.values())):
        path = os.path.join(tensors.hf_dir, file_name)
        if file_name.endswith(".safetensors"):
            _check_safetensors_size(path)


def _check_safetensors_size(path: str) -> None:
    """A truncated shard: the header promises more bytes than the file has."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    actual = os.path.getsize(path)
    if 8 + header_len + end != actual:
        raise ValueError(f"weight file {path!r} is corrupted: its header describes {8 + header_len + end} "
                         f"bytes but the file has {actual}; re-download or re-save it")


def side_files(hf_dir: str) -> list[str]:
    """Config, generation config and tokenizer files to carry along (not weights or weight indexes)."""
    return sorted(name for name in os.listdir(hf_dir)
                  if os.path.isfile(os.path.join(hf_dir, name)) and name.endswith(SIDE_FILE_SUFFIXES)
                  and name not in WEIGHT_INDEX_FILES)


def copy_side_files(source_dir: str, target_dir: str) -> list[str]:
    names = side_files(source_dir)
    os.makedirs(target_dir, exist_ok=True)
    for name in names:
        shutil.copy2(os.path.join(source_dir, name), os.path.join(target_dir, name))
    return names


def write_safetensors_shards(named_tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str,
                             max_shard_bytes: int = 5 * 2**30) -> dict:
    """Writes `model-0000i-of-0000N.safetensors` shards (each up to `max_shard_bytes`) and
    `model.safetensors.index.json`; holds at most one shard in memory. Returns the index."""
    shard, shard_bytes, written, weight_map, total = {}, 0, [], {}, 0

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            temporary = f"shard-{len(written):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, temporary), metadata={"format": "pt"})
            written.append((temporary, list(shard)))
        shard, shard_bytes = {}, 0

    for name, tensor in named_tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
        shard[name] = tensor.contiguous()  # safetensors stores dense row-major bytes
        shard_bytes += size
        total += size
    flush()
    for i, (temporary, names) in enumerate(written):
        final = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        os.rename(os.path.join(out_dir, temporary), os.path.join(out_dir, final))
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(out_dir, SAFETENSORS_INDEX), "w") as f:
        json.dump(index, f, indent=2)
    return index


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_tokenizer_fits(folder: str, vocab_size: int, what: str) -> None:
    """ValueError when the tokenizer in `folder` has more tokens than the model's vocabulary (its
    ids past the embedding would fail at training time); no tokenizer files: nothing to check."""
    if not any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES):
        return
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - transformers raises many kinds for a broken tokenizer
        raise ValueError(f"{what} {folder}: its tokenizer cannot be loaded ({type(error).__name__}: "
                         f"{str(error)[:200]})") from error
    if len(tokenizer) > vocab_size:
        raise ValueError(f"{what} {folder}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary "
                         f"(vocab_size in config.json) is {vocab_size}; use the tokenizer that belongs to the model")


def normalise_permissions(folder: str) -> None:
    """Folders 0755, files 0644 (temporary folders are created 0700)."""
    os.chmod(folder, 0o755)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
