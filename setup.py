"""megatron_rpg: KL-regularised policy-gradient RL for LLMs on megatron-core.

The CPU path is pinned in requirements-cpu.txt (torch==2.13.0, megatron-core==0.16.1) and installed
by tools/setup_cpu.sh; the ranges below also admit the newer stacks of GPU clusters (Python 3.12,
newer torch and megatron-core), whose extras are `gpu` (Transformer Engine) and `sglang`.
"""
from setuptools import find_packages, setup

setup(
    name="megatron_rpg",
    version="0.1.0",
    description="Regularized Policy Gradient (RPG) and SVRPG reinforcement learning on megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_rpg", "megatron_rpg.*"]),
    install_requires=[
        "torch>=2.6",
        "numpy",
        "megatron-core>=0.16.1",
        "safetensors>=0.4",
        "transformers>=4.51",
        "pyyaml>=6",
        "tqdm>=4.66",
        "psutil>=5.9",
    ],
    extras_require={
        # NVIDIA apex is not on the package registry (PyPI's `apex` is an unrelated project): its fused
        # kernels are used only when importable, Transformer Engine's otherwise.
        "gpu": ["transformer-engine[pytorch]>=2.3"],
        "sglang": ["sglang>=0.5"],
        "test": ["pytest>=8", "pytest-xdist>=3.5"],
    },
)
