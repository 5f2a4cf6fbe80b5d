"""Builds part_fast's compiled kernels: part_fast._C (the op schemas and the CPU kernels, always) and
part_fast._C_cuda (the CUDA kernels, when a CUDA toolkit is found), both on the LibTorch stable ABI
(torch >= 2.10) and the limited Python API, so one cp310-abi3 wheel serves every torch from 2.10 on and
every CPython from 3.10 on. The kernels include only stable headers: TORCH_TARGET_VERSION makes any
ATen / c10 include a compile error.

Environment:
  FORCE_CUDA=1            build the CUDA kernels even without a visible GPU (CI does, to prove they compile)
  TORCH_CUDA_ARCH_LIST    CUDA architectures, default "8.0;9.0+PTX" (machine code for A100 and H100, PTX that
                          newer GPUs compile at load)
  MAX_JOBS                parallel compile jobs (read by torch's ninja build)
  PART_FAST_NO_EXTENSION=1  skip the extension: the package then runs on the pure-PyTorch reference (and on
                          Triton for CUDA tensors where Triton is installed); tests needing part_fast._C skip
"""
import glob
import importlib.util
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# The stable ABI version the kernels target: the oldest torch that can load them (part_fast/ops.py checks
# torch's version against the same floor before it loads anything).
TORCH_FLOOR = (2, 10)
TARGET_VERSION = f"-DTORCH_TARGET_VERSION=0x{TORCH_FLOOR[0]:02x}{TORCH_FLOOR[1]:02x}000000000000"


def _nvidia_include_dirs():
    # torch's CUDA headers include cusparse.h / cublas*.h, which a bare toolkit may lack; the nvidia
    # wheels that torch installs ship them under nvidia/cu13/include (or cu12).
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for base in spec.submodule_search_locations:
        dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
    return dirs


def _import_torch():
    """torch, or a one-line exit saying what to run (a build frontend that skipped pyproject's build
    requirements, e.g. `--no-build-isolation` in an environment without torch)."""
    try:
        import torch
    except ModuleNotFoundError:
        sys.exit(
            "part_fast: building the kernels needs torch>=2.10 in the build environment: install torch first, or "
            "let pip install it for the build (drop --no-build-isolation), or set PART_FAST_NO_EXTENSION=1 for a "
            "pure-Python install"
        )
    return torch


def _extensions():
    if os.environ.get("PART_FAST_NO_EXTENSION") == "1":
        return [], {}
    torch = _import_torch()
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if version < TORCH_FLOOR:
        sys.exit(f"part_fast: building the kernels needs torch>={TORCH_FLOOR[0]}.{TORCH_FLOOR[1]} (the LibTorch stable "
                 f"ABI), found {torch.__version__}")
    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    with_cuda = CUDA_HOME is not None and (torch.cuda.is_available() or force_cuda)
    if force_cuda and CUDA_HOME is None:
        raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the toolkit folder")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

    include_dirs = [os.path.join(ROOT, "csrc")]
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off", TARGET_VERSION]
    extensions = [CppExtension(
        name="part_fast._C",
        sources=sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp"))),
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )]
    if with_cuda:
        extensions.append(CUDAExtension(
            name="part_fast._C_cuda",
            sources=sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + [os.path.join("csrc", "cuda", "module.cpp")]),
            include_dirs=include_dirs + _nvidia_include_dirs(),
            # USE_CUDA declares the stable C shim's CUDA entry points (the current stream).
            # --fmad=false: device code rounds every * and + on its own, as the host code does with
            # -ffp-contract=off, so the CUDA kernels compute what the shared math header says (and the CPU tests
            # check).
            extra_compile_args={
                "cxx": ["-O3", TARGET_VERSION, "-DUSE_CUDA"],
                "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "--fmad=false", TARGET_VERSION, "-DUSE_CUDA"],
            },
            py_limited_api=True,
        ))
    return extensions, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
# The wheel is tagged cp310-abi3: the libraries use only the limited Python API (Py_LIMITED_API, set by
# py_limited_api=True above) and torch's stable ABI.
setup(ext_modules=ext_modules, cmdclass=cmdclass, options={"bdist_wheel": {"py_limited_api": "cp310"}})
