"""megatron-core warns at import, from six modules, that Apex / Transformer Engine are absent (six
UserWarnings per process on a CPU machine, the same news each time). `collapse_fallback_warnings`,
called when megatron_rpg is imported (before any megatron import of ours), silences those and
warns once itself, naming what falls back. It reads no megatron module: importing it is free.
"""
from __future__ import annotations

import importlib.util
import warnings

# the messages of megatron-core 0.16.1 (optimizer/, models/backends.py, gpt_layer_specs.py, fsdp)
MEGATRON_FALLBACK_MESSAGES = r"(Transformer Engine and Apex are|Apex is) not installed"
SUMMARY = ("Transformer Engine and Apex are not installed: megatron-core uses its local PyTorch "
           "implementations (fused Adam, norms, multi-tensor ops); expected on CPU, slower on GPUs")


def collapse_fallback_warnings() -> None:
    """Ignore megatron-core's fallback warnings and warn once (per process) when Apex or TE is absent."""
    warnings.filterwarnings("ignore", message=MEGATRON_FALLBACK_MESSAGES, category=UserWarning,
                            module=r"megatron\.core")
    missing = [name for name in ("apex", "transformer_engine") if importlib.util.find_spec(name) is None]
    if missing:
        warnings.warn(SUMMARY, UserWarning, stacklevel=2)
