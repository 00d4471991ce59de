"""megatron-core warns at import, from six modules, that Apex / Transformer Engine are absent (six
UserWarnings per process on a CPU machine, the same news each time). `collapse_fallback_warnings`,
called when megatron_rpg is imported (before any megatron import of ours), silences those;
`warn_if_falling_back`, called by the trainer, warns once itself, naming what falls back. Neither
reads a megatron module: importing this is free (the plot tool never sees the warning).
"""
from __future__ import annotations

import importlib.util
import warnings

# the messages of megatron-core 0.16.1 (optimizer/, models/backends.py, gpt_layer_specs.py, fsdp)
MEGATRON_FALLBACK_MESSAGES = r"(Transformer Engine and Apex are|Apex is) not installed"
SUMMARY = ("{missing} not installed: megatron-core uses its local PyTorch implementations (fused "
           "Adam, norms, multi-tensor ops); expected on CPU, slower on GPUs")
_PACKAGES = {"transformer_engine": "Transformer Engine", "apex": "Apex"}


def collapse_fallback_warnings() -> None:
    """Ignore megatron-core's fallback warnings (megatron_rpg/__init__.py calls this on import)."""
    warnings.filterwarnings("ignore", message=MEGATRON_FALLBACK_MESSAGES, category=UserWarning,
                            module=r"megatron\.core")


def warn_if_falling_back() -> None:
    """The one warning instead, when Apex or Transformer Engine is absent (the trainer calls this at
    start-up; Python shows it once per process)."""
    missing = [name for package, name in _PACKAGES.items() if importlib.util.find_spec(package) is None]
    if missing:
        verb = "are" if len(missing) == 2 else "is"
        warnings.warn(SUMMARY.format(missing=f"{' and '.join(missing)} {verb}"), UserWarning, stacklevel=2)
