"""One home for process-group set-up: megatron's `parallel_state` plus the RNG seeding it needs.

    dist.init_process_group(...)                       # torchrun / the test harness does this
    initialize_parallel(tensor_model_parallel_size=2, pipeline_model_parallel_size=1, seed=1234)
    ...                                                # build models, train
    destroy_parallel()

Everything else reads groups and ranks from `megatron.core.parallel_state` (it already has every
accessor: get_tensor_model_parallel_rank/world_size/group, get_pipeline_model_parallel_rank,
is_pipeline_first_stage/last_stage, get_data_parallel_rank/world_size/group, ...); nothing in this
package creates its own groups.

Data-parallel size is what remains: DP = world_size / (TP x PP).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron_rpg.megatron.cpu_mode import enable_cpu_mode


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def initialize_parallel(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                        *, seed: int = 1234) -> None:
    """Create megatron's TP/PP/DP groups on the initialised default process group and seed the RNGs.

    Seeding follows megatron: the default generator gets `seed` (same on every rank, so replicated
    weights initialise identically), the tensor-parallel tracker state gets `seed + 2718 + tp_rank`.
    Enables CPU mode first when CUDA is not available.
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
    if not torch.cuda.is_available():
        enable_cpu_mode()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
    )
    torch.manual_seed(seed)  # the CPU generator drives `use_cpu_initialization` weight init
    model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    """Tear down megatron's groups (the default process group stays; its owner destroys it)."""
    parallel_state.destroy_model_parallel()
