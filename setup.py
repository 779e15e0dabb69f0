"""Builds the optional CUDA extension ``fastgen._C`` from csrc/; everything else is pyproject.toml.

The extension is built when torch with CUDA and nvcc are present in the build environment, or
when FASTGEN_BUILD_CUDA=1 (then a missing toolchain is an error). FASTGEN_SKIP_CUDA_BUILD=1
skips it. Otherwise it is skipped with one line saying why; fastgen works without it (Triton and
PyTorch paths). pip's isolated builds cannot see the installed torch: build the extension with
``pip install --no-build-isolation .``. Targets sm_80, sm_89 and sm_90 unless
TORCH_CUDA_ARCH_LIST says otherwise.
"""

import os
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent


def _skip(reason: str, forced: bool):
    if forced:
        raise RuntimeError(f"FASTGEN_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    print(f"fastgen: not building the CUDA extension (csrc/): {reason}")
    return {}


def cuda_build() -> dict:
    forced = os.environ.get("FASTGEN_BUILD_CUDA") == "1"
    if os.environ.get("FASTGEN_SKIP_CUDA_BUILD") == "1":
        return _skip("FASTGEN_SKIP_CUDA_BUILD=1", forced=False)
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return _skip("torch is not importable here (an isolated build?); use pip install --no-build-isolation", forced)
    if torch.version.cuda is None:
        return _skip(f"torch {torch.__version__} is a CPU build", forced)
    if CUDA_HOME is None:
        return _skip("nvcc / CUDA_HOME not found", forced)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.9;9.0")
    # Each nvcc job can take a few GB; size the parallelism from memory, as flash-attention does.
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        os.environ.setdefault("MAX_JOBS", str(max(1, min(os.cpu_count() or 1, int(mem_gb // 4)))))
    except (ValueError, OSError):
        pass
    ext = CUDAExtension(
        name="fastgen._C",
        sources=["csrc/binding.cpp", "csrc/qk_norm_rope.cu", "csrc/quantize_fp8.cu"],
        include_dirs=[str(HERE / "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17"]},
    )
    print(f"fastgen: building the CUDA extension for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**cuda_build())
