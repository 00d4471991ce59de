"""Test stand-in for the ``sgl_kernel`` package, NOT the real one.

SGLang imports a few names from ``sgl_kernel`` at import time; PyPI's build holds only GPU code and fails
to load without libcuda. On the CPU test path (torch_native attention) none of them is called. Every
attribute of this module is a function that raises NotImplementedError, so a call would fail loudly.
Put this folder first on PYTHONPATH of the SGLang server only (tests/rollout/test_sglang_engine.py does).
"""

__version__ = "0.0.0+stand-in"


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def _not_implemented(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name}: this is the CPU test stand-in; the kernel is not available")

    _not_implemented.__name__ = name
    return _not_implemented
