"""One home for process-group set-up: the default process group, megatron's `parallel_state`, the
RNG seeding it needs, and the device every rank computes on (decided here, once).

    with default_process_group():                      # torchrun's, or a one-process gloo group
        device = initialize_parallel(tensor_model_parallel_size=2, pipeline_model_parallel_size=1, seed=1234)
        ...                                            # build models, train (collectives on `device`)
        destroy_parallel()

The device: the GPU of this rank's LOCAL_RANK when CUDA is available (NCCL), else the CPU (gloo, with
megatron's CUDA calls redirected: cpu_mode.py). `training_device()` returns it afterwards.

Everything else reads groups and ranks from `megatron.core.parallel_state` (it already has every
accessor: get_tensor_model_parallel_rank/world_size/group, get_pipeline_model_parallel_rank,
is_pipeline_first_stage/last_stage, get_data_parallel_rank/world_size/group, ...); nothing in this
package creates its own groups.

Data-parallel size is what remains: DP = world_size / (TP x PP).
"""
from __future__ import annotations

import contextlib
import os
import tempfile

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron_rpg.megatron.cpu_mode import enable_cpu_mode


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


_DEVICE: torch.device | None = None


@contextlib.contextmanager
def default_process_group():
    """The default process group: torchrun's (env://, NCCL on GPUs with this rank's LOCAL_RANK GPU
    selected) when launched by it, else a one-process gloo group through a file rendezvous (no port).
    Destroyed on exit only if created here."""
    if dist.is_initialized():
        yield
        return
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rendezvous = None
    else:
        rendezvous = tempfile.TemporaryDirectory(prefix="megatron_rpg_run_")
        dist.init_process_group("gloo", store=dist.FileStore(os.path.join(rendezvous.name, "store"), 1),
                                rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        if rendezvous is not None:
            rendezvous.cleanup()


def training_device() -> torch.device:
    """The device initialize_parallel decided (this rank's GPU, or the CPU)."""
    if _DEVICE is None:
        raise RuntimeError("training_device() is decided by initialize_parallel(); call it first")
    return _DEVICE


def initialize_parallel(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                        *, seed: int = 1234) -> torch.device:
    """Create megatron's TP/PP/DP groups on the initialised default process group and seed the RNGs.

    Seeding follows megatron: the default generator gets `seed` (same on every rank, so replicated
    weights initialise identically), the tensor-parallel tracker state gets `seed + 2718 + tp_rank`.
    Enables CPU mode first when CUDA is not available. Returns the device every computation and
    collective of this rank uses (training_device()).
    """
    _check_positive_int("tensor_model_parallel_size", tensor_model_parallel_size)
    _check_positive_int("pipeline_model_parallel_size", pipeline_model_parallel_size)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "initialize_parallel() needs torch.distributed initialised first: launch with torchrun "
            "(or call torch.distributed.init_process_group('gloo'/'nccl')) before it.")
    world_size = dist.get_world_size()
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size
    if world_size % model_parallel != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size "
            f"{tensor_model_parallel_size} x pipeline_model_parallel_size "
            f"{pipeline_model_parallel_size} = {model_parallel}; choose sizes whose product divides "
            f"the number of processes")
    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError("megatron parallel state is already initialised; call destroy_parallel() "
                           "before initialising it again")
    global _DEVICE
    _DEVICE = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if _DEVICE.type == "cpu":
        enable_cpu_mode()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
    )
    torch.manual_seed(seed)  # the CPU generator drives `use_cpu_initialization` weight init
    model_parallel_cuda_manual_seed(seed)
    return _DEVICE


def destroy_parallel() -> None:
    """Tear down megatron's groups (the default process group stays; its owner destroys it)."""
    parallel_state.destroy_model_parallel()
