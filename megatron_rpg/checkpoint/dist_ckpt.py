"""Write and read megatron-core `torch_dist` checkpoints of a GPTModel without building the model.

A checkpoint stores every tensor under the key, global shape and offsets that
`GPTModel.sharded_state_dict()` (local spec, megatron-core 0.16.1) uses, so megatron reshards it on
load to any TP/PP:
- transformer layers share one key per kind with a leading global layer axis:
  `decoder.layers.{i}.mlp.linear_fc2.weight` -> key `decoder.layers.mlp.linear_fc2.weight`,
  global shape [num_layers, ...], offset i on axis 0 (`transformer_block.py` sharded_state_dict);
- layer norms are stored under the Transformer Engine names (the local spec's
  `sharded_state_dict_keys_map`: `input_layernorm.` -> `self_attention.linear_qkv.layer_norm_`,
  `pre_mlp_layernorm.` -> `mlp.linear_fc1.layer_norm_`), so TE and local models read the same file;
- SwiGLU fc1 [gate; up] is stored as two fragments of one global [2*ffn, h] tensor
  (`apply_swiglu_sharded_factory`), gate rows first, which is what TP re-slices on load.
Tensors are written full (TP=1 offsets); megatron's loader reads any sub-block of them, so one
checkpoint serves every TP/PP. Only the data layout is written: no arithmetic, bit-exact.

Both directions need a (possibly one-process) torch.distributed group: megatron's save/load call
collectives; `single_process_group()` provides one when none exists.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping

import torch
import torch.distributed as dist

from megatron_rpg.megatron.compat import local_spec_key_renames

LAYER_PREFIX = "decoder.layers."


def split_layer_name(megatron_name: str) -> tuple[int | None, str]:
    """`decoder.layers.3.mlp.linear_fc2.weight` -> (3, `mlp.linear_fc2.weight`); others -> (None, name)."""
    if not megatron_name.startswith(LAYER_PREFIX):
        return None, megatron_name
    index, _, rest = megatron_name[len(LAYER_PREFIX):].partition(".")
    return int(index), rest


def checkpoint_key(megatron_name: str, renames: Mapping[str, str] | None = None) -> str:
    """The ShardedTensor key a model tensor is stored under."""
    layer, rest = split_layer_name(megatron_name)
    if layer is None:
        return megatron_name
    for old, new in (renames if renames is not None else local_spec_key_renames()).items():
        if rest.startswith(old):
            rest = new + rest[len(old):]
            break
    return LAYER_PREFIX + rest


def sharded_tensors(megatron_name: str, tensor: torch.Tensor, num_layers: int,
                    renames: Mapping[str, str] | None = None) -> list:
    """ShardedTensor(s) holding one FULL (TP=1) model tensor, as GPTModel would describe it at TP=1.

    `replica_id=0`: this process is the one writer of every piece."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    layer, rest = split_layer_name(megatron_name)
    key = checkpoint_key(megatron_name, renames)
    if layer is None:
        # embedding/output rows may be padded differently by the loading TP: megatron zero-fills then
        return [ShardedTensor.from_rank_offsets(key, tensor, replica_id=0,
                                                allow_shape_mismatch=megatron_name.endswith("word_embeddings.weight")
                                                or megatron_name.startswith("output_layer."))]
    layer_axis = (0, layer, num_layers)
    if rest == "mlp.linear_fc1.weight":
        # separate storages: megatron's writer clones any tensor that is a view into a larger storage
        gate, up = (part.clone() for part in tensor.chunk(2, dim=0))
        return [ShardedTensor.from_rank_offsets(key, part, layer_axis, (1, i, 2), replica_id=0, prepend_axis_num=1)
                for i, part in enumerate((gate, up))]
    return [ShardedTensor.from_rank_offsets(key, tensor, layer_axis, replica_id=0, prepend_axis_num=1)]


# Linear layers whose (empty, for the local spec) `_extra_state` the model expects to find in a
# checkpoint; the Transformer Engine spec keeps FP8 scaling state there, which a fresh model re-creates.
_LINEARS_WITH_EXTRA_STATE = ("self_attention.linear_qkv", "self_attention.linear_proj",
                             "mlp.linear_fc1", "mlp.linear_fc2")


def extra_state_objects(layer: int, num_layers: int) -> dict:
    """The per-layer `_extra_state` ShardedObjects (data None) GPTModel.sharded_state_dict() lists."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return {f"{LAYER_PREFIX}{layer}.{linear}._extra_state":
            ShardedObject(f"{LAYER_PREFIX}{linear}._extra_state", None, (num_layers,), (layer,), replica_id=0)
            for linear in _LINEARS_WITH_EXTRA_STATE}


def load_model_weights(model, directory: str) -> None:
    """Load a GPTModel's weights from a torch_dist checkpoint at this rank's TP/PP (resharding on
    load): a converted checkpoint, or a trainer checkpoint, whose optimizer and trainer entries
    (merged into megatron's result from its common state) are left out."""
    from megatron.core import dist_checkpointing

    request = model.sharded_state_dict()
    loaded = dist_checkpointing.load(request, directory)
    model.load_state_dict({key: value for key, value in loaded.items() if key in request})


@contextlib.contextmanager
def single_process_group():
    """A world-size-1 gloo group (file rendezvous, no port) unless a group already exists."""
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as rendezvous:
        store = dist.FileStore(os.path.join(rendezvous, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def full_tensors_state(named_tensors: Iterable[tuple[str, torch.Tensor]], num_layers: int) -> dict:
    """The sharded state dict that `save_state` writes, from `(megatron_name, full tensor)` pairs
    (consumes them all: about one model's size in memory)."""
    renames = local_spec_key_renames()
    state = {name: sharded_tensors(name, tensor, num_layers, renames) for name, tensor in named_tensors}
    for layer in range(num_layers):
        state.update(extra_state_objects(layer, num_layers))
    return state


def save_state(state: dict, directory: str) -> None:
    """Writes a `full_tensors_state` as one torch_dist checkpoint into an existing empty `directory`."""
    from megatron.core import dist_checkpointing

    with single_process_group():
        dist_checkpointing.save(state, directory)


def checkpoint_shapes(directory: str) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Checkpoint key -> (global shape, dtype), read from the metadata only."""
    from megatron.core import dist_checkpointing

    with single_process_group():
        metadata = dist_checkpointing.load_tensors_metadata(directory)
    return {k: (torch.Size(v.global_shape), v.dtype) for k, v in metadata.items()}


class LazyCheckpointTensors(Mapping):
    """Read-only Mapping megatron_name -> FULL tensor over a torch_dist checkpoint.

    Reads one transformer layer (or one non-layer tensor) per megatron load call and keeps only that
    layer, so iterating layer by layer needs about one layer of memory.
    """

    def __init__(self, directory: str, megatron_names: Iterable[str], num_layers: int):
        self.directory = directory
        self.num_layers = num_layers
        self.names = list(megatron_names)
        self.renames = local_spec_key_renames()
        self.shapes = checkpoint_shapes(directory)
        self._cached_layer: int | None = None
        self._cache: dict[str, torch.Tensor] = {}

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name) -> bool:
        return name in self.names

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        layer, _ = split_layer_name(name)
        if layer is None:
            return self._load([name])[name]
        if self._cached_layer != layer:
            self._cache, self._cached_layer = {}, None
            in_layer = [n for n in self.names if split_layer_name(n)[0] == layer]
            self._cache, self._cached_layer = self._load(in_layer), layer
        return self._cache[name]

    def _read_request(self, name: str):
        """A buffer shaped like the stored tensor (one layer of it) and the ShardedTensor that fills it.

        The layer slice is described without `prepend_axis_num` (a [1, ...] block at offset i of the
        layer axis): megatron's prepend-axis path assumes every layer it does not request lives on
        another rank, which is false in a one-process read of a single layer."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        key = checkpoint_key(name, self.renames)
        if key not in self.shapes:
            raise KeyError(name)
        shape, dtype = self.shapes[key]
        layer, _ = split_layer_name(name)
        if layer is None:
            buffer = torch.empty(shape, dtype=dtype)
            return buffer, ShardedTensor.from_rank_offsets(key, buffer, replica_id=0)
        if shape[0] != self.num_layers:
            raise ValueError(f"checkpoint key {key!r} has {shape[0]} layers but the config says "
                             f"num_hidden_layers={self.num_layers}")
        buffer = torch.empty(shape[1:], dtype=dtype)
        return buffer, ShardedTensor.from_rank_offsets(key, buffer.unsqueeze(0), (0, layer, self.num_layers),
                                                       replica_id=0)

    def _load(self, names: list[str]) -> dict[str, torch.Tensor]:
        from megatron.core import dist_checkpointing

        buffers, request = {}, {}
        for name in names:
            buffers[name], request[name] = self._read_request(name)
        try:
            with single_process_group():
                dist_checkpointing.load(request, self.directory, validate_access_integrity=False)
        except (RuntimeError, OSError, EOFError) as error:  # torch/megatron report damaged files this way
            raise ValueError(f"megatron checkpoint {self.directory!r} cannot be read ({names[0]!r}...): "
                             f"{type(error).__name__}: {str(error)[:300]}") from error
        return buffers  # megatron copied the stored values into the buffers' views
