"""fastbridge setup.

Default: a fast, pure-Python install (``pip install -e .``). The Triton kernels live in the top-level
``kernels/`` folder of the repository and are installed as ``fastbridge.kernels`` -- never as a
top-level ``kernels`` module, which would shadow Hugging Face's ``kernels`` package that transformers
probes for.

This file never imports torch, so the build needs no torch and pip never pulls one into an isolated
build environment. The C++/CUDA extension (csrc/) is JIT-built on first use; its sources ship as
package data (``fastbridge.csrc``). ``FASTBRIDGE_BUILD_EXT=1 pip install -e . --no-build-isolation``
builds it ahead of time instead (csrc/aot_build.py -> CMakeLists.txt; only that mode imports torch).

Version floors (README "Tested versions"): transformers / peft / triton floors are the versions CI's
"oldest" lane installs and tests (.ci/run reads them from here); the torch floor is the GPU image's
torch (2.11), which CI does not run: CI tests the CPU wheel of torch 2.13.0.
"""
import os
import re
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def _version() -> str:
    text = (ROOT / "fastbridge" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


packages = [
    "fastbridge",
    "fastbridge.ops",
    "fastbridge.modules",
    "fastbridge.integrations",
    "fastbridge.data",
    "fastbridge.eval",
    "fastbridge.train",
    "fastbridge.kernels",
    "fastbridge.csrc",
]
package_dir = {"fastbridge": "fastbridge", "fastbridge.kernels": "kernels", "fastbridge.csrc": "csrc"}
package_data = {"fastbridge.csrc": ["*.cpp", "*.cu", "*.h", "*.txt"],
                "fastbridge.kernels": ["tuned/*.json"]}  # per-arch launch tables (kernels/_autotune.py)

aot = {}
if os.environ.get("FASTBRIDGE_BUILD_EXT", "").strip() == "1":  # ahead-of-time C++/CUDA extension
    sys.path.insert(0, str(ROOT / "csrc"))
    from aot_build import aot_setup_kwargs

    aot = aot_setup_kwargs(ROOT)

# The oldest tested versions (.ci/run installs exactly these in its second lane).
TORCH_MIN = "2.11"  # the GPU image's torch; CI runs 2.13.0 (CPU wheel) only
TRITON_MIN = "3.6.0"
TRANSFORMERS_MIN = "5.17.0"
PEFT_MIN = "0.18.0"

extras = {
    "test": [
        "pytest>=8",
        "pytest-benchmark>=4",
        f"transformers>={TRANSFORMERS_MIN}",
        f"peft>={PEFT_MIN}",
        "accelerate",
        "safetensors",
        "expecttest",
        "matplotlib",
        # the end-to-end pipeline (fastbridge demo / train) is tested too
        "datasets",
        "pycocoevalcap",
        "pillow",
        "tqdm",
    ],
    # fastbridge demo / train: data through datasets, scores through pycocoevalcap, plots, progress bars
    "eval": [f"transformers>={TRANSFORMERS_MIN}", "datasets", "pycocoevalcap", "pillow", "matplotlib", "tqdm"],
}
extras["all"] = sorted(set(extras["test"]) | set(extras["eval"]))

setup(
    name="fastbridge",
    version=_version(),
    description="Fused kernels for parameter-efficient vision-language bridges",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data=package_data,
    install_requires=[f"torch>={TORCH_MIN}", f"triton>={TRITON_MIN}", "numpy", "safetensors", "ninja"],
    extras_require=extras,
    entry_points={"console_scripts": ["fastbridge=fastbridge.cli:main"]},
    **aot,
)
