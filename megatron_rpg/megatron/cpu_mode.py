"""CPU mode: run the real megatron-core 0.16.1 on a machine without a GPU (processes talk over gloo).

    from megatron_rpg.megatron.cpu_mode import enable_cpu_mode
    enable_cpu_mode()   # before building any megatron model; raises if CUDA is available

megatron-core hard-codes the CUDA device in 70+ places. Rather than stubbing megatron, this module
makes CUDA *requests* land on the CPU:
- a `TorchFunctionMode` rewrites every `device` argument that names CUDA (a "cuda" string, a cuda
  `torch.device`, or the integer that `torch.cuda.current_device()` returns) to "cpu", makes
  `Tensor.cuda()` a no-op, and reports `Tensor.type()` under its `torch.cuda.*` name (the
  optimizers accept only CUDA parameter types);
- the few `torch.cuda.*` functions megatron calls on its CPU-reachable paths get CPU equivalents;
- the "CUDA" RNG state that megatron's RNG tracker forks is the CPU generator's state, because on
  CPU that is the generator dropout and initialisation actually draw from.

Exactness claim: all arithmetic is unchanged; only device placement and bookkeeping are redirected,
so every megatron code path computes what it computes on GPU (up to CPU vs GPU kernel rounding).
It is activated explicitly (never on import), never when CUDA is available, and it is permanent once
enabled (megatron caches devices in module state, so switching off is unsafe).
"""
from __future__ import annotations

import threading

import torch
from torch.overrides import TorchFunctionMode

from megatron_rpg.megatron.compat import set_tracker_rng_state_functions

_enabled = False
_lock = threading.Lock()
_thread_state = threading.local()  # torch function modes are per thread

# Tensor.type() names the optimizers compare against (distrib_optimizer.py:361/420, optimizer.py:671).
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
}


# the Tensor methods __torch_function__ treats specially even without keyword arguments
_SPECIAL_FUNCS = frozenset((torch.Tensor.cuda, torch.Tensor.to, torch.Tensor.type))


def _is_cuda_device(device) -> bool:
    """True for "cuda", "cuda:0", torch.device("cuda", i) and a bare int (torch.cuda.current_device())."""
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to the CPU for every torch function and Tensor method."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not kwargs:  # most calls: no keyword to rewrite and none of the special methods (one set look-up)
            if func not in _SPECIAL_FUNCS:
                return func(*args)
            kwargs = {}
        elif _is_cuda_device(kwargs.get("device")) or kwargs.get("pin_memory"):
            kwargs = dict(kwargs)  # never mutate the caller's dict
            if _is_cuda_device(kwargs.get("device")):
                kwargs["device"] = "cpu"
            if kwargs.get("pin_memory"):
                kwargs["pin_memory"] = False  # pinning needs a CUDA driver; pinned vs pageable is moot on CPU
        if func is torch.Tensor.cuda:
            return args[0]  # `.cuda()` on a CPU tensor: it already lives where CUDA tensors live here
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])  # `t.to("cuda")` / `t.to(current_device())`
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)  # optimizers accept only CUDA parameter types
        return func(*args, **kwargs)


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0  # used as `device=` (123 places); the mode maps the int 0 to "cpu"
    cuda.synchronize = lambda device=None: None  # dist_checkpointing saves call it; CPU ops are synchronous
    # dist_checkpointing's async worker does set_device(rank % device_count()): avoid a modulo by 0.
    cuda.device_count = lambda: 1
    cuda.set_device = lambda device: None
    # The device generator on CPU is the CPU generator (CPU-only torch would raise, or for
    # manual_seed silently do nothing, leaving megatron's data-parallel seed unset).
    cuda.get_rng_state = cuda.random.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = cuda.random.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    cuda.manual_seed = cuda.random.manual_seed = lambda seed: torch.manual_seed(seed)


def _patch_megatron_rng() -> None:
    # The originals index torch.cuda.default_generators and defer via torch.cuda._lazy_call, which
    # on CPU-only torch never runs: the tracker's fork would silently not switch states. The fork's
    # warning that the CPU generator moved inside a "GPU" fork is dropped: here the device
    # generator IS the CPU generator, so it would fire on every dropout/init by design.
    set_tracker_rng_state_functions(
        lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state(),  # a fresh copy: `clone` holds
        lambda state, device=-1, graph_safe=False: torch.set_rng_state(state))


def cpu_mode_enabled() -> bool:
    """Whether `enable_cpu_mode()` has run in this process."""
    return _enabled


def _enter_mode_in_this_thread() -> None:
    if not getattr(_thread_state, "entered", False):
        # Entered and never exited: the mode must cover every later call made by this thread.
        _CudaToCpuMode().__enter__()
        _thread_state.entered = True


def enable_cpu_mode() -> None:
    """Make megatron-core's CUDA requests run on the CPU for the rest of this process (idempotent).

    The `torch.cuda` replacements are process-wide; the device-rewriting torch function mode is
    per thread (a PyTorch rule), so a thread other than the first that runs megatron code calls
    this again (megatron-core itself starts no threads on these paths; autograd on CPU runs in
    the calling thread). Raises RuntimeError when CUDA is available: there the real GPU paths
    must run, unpatched.
    """
    global _enabled
    with _lock:
        if _enabled:
            _enter_mode_in_this_thread()
            return
        if torch.cuda.is_available():
            raise RuntimeError(
                "enable_cpu_mode() refused: a CUDA GPU is available, and CPU mode would silently move "
                "megatron's GPU work to the CPU. Run without CPU mode on GPU machines.")
        _patch_torch_cuda()
        _patch_megatron_rng()
        _enter_mode_in_this_thread()
        _enabled = True
