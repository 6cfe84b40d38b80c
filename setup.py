"""pcr_fast: fused Triton kernels for PCR backdoor-defense fine-tuning of multimodal LLMs.

The Triton kernels live in the top-level ``kernels/`` folder of the repository but are
installed as ``pcr_fast.kernels`` (never as a top-level ``kernels`` module: that name
belongs to Hugging Face's ``kernels`` package, which transformers imports).
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# one version, written in pcr_fast/__init__.py
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "pcr_fast" / "__init__.py").read_text(), re.M).group(1)

PACKAGES = find_packages(include=["pcr_fast", "pcr_fast.*"]) + ["pcr_fast.kernels"]

setup(
    name="pcr_fast",
    version=VERSION,
    license="Apache-2.0",
    description="Fused Triton kernels and an HF integration for PCR backdoor-defense fine-tuning",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"pcr_fast.kernels": "kernels"},
    install_requires=[
        # torch: any 2.x >= 2.4 (tested: 2.13.0 CPU; no GPU run yet). On a CPU-only machine
        # install torch==2.13.0 first (the Makefile does) so pip does not pull a CUDA build.
        "torch>=2.4",
        "triton>=3.3",  # tested: 3.9.0 (CPU interpreter; GPU code compiled AOT for sm_80/86/90/100, never run)
        # transformers: tested range 5.17 .. 5.24 (the 5.x API is what pcr_fast.hf targets)
        "transformers>=5.0,<6",
        "peft>=0.17",
        "accelerate>=1.0",
        "tokenizers>=0.21",
        "numpy",
        "tqdm",
        "matplotlib",
        "scikit-learn",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "pytest-benchmark>=5"],
        "bench": ["matplotlib"],
        "peers": ["liger-kernel", "cut-cross-entropy", "kornia"],
        "trl": ["trl"],
        "gpu": ["flash-attn"],
    },
    entry_points={"console_scripts": ["pcr-fast=pcr_fast.cli:main"]},
)
