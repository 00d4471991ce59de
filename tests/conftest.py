import warnings

import pytest
import torch

# megatron-core warns on import that TE/Apex are absent: expected on CPU, noise in every test report.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


def gpu_skip_reason() -> str | None:
    """Why a GPU-only test cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (CPU-only machine); run on a GPU node, see docs/benchmarks.md"
    return None


def pytest_collection_modifyitems(config, items):
    reason = gpu_skip_reason()
    if reason is None:
        return
    for item in items:
        if "requires_gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))
