"""Builds the compiled extension part_fast._C (CPU kernels always, CUDA kernels when possible).

Environment:
  FORCE_CUDA=1            build the CUDA kernels even without a visible GPU (CI does, to prove they compile)
  TORCH_CUDA_ARCH_LIST    CUDA architectures, default "8.0;9.0"
  MAX_JOBS                parallel compile jobs (read by torch's ninja build)
  PART_FAST_NO_EXTENSION=1  skip the extension: the package then runs on the pure-PyTorch reference (and on
                          Triton for CUDA tensors where Triton is installed); tests needing part_fast._C skip
"""
import glob
import importlib.util
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


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


def _extensions():
    if os.environ.get("PART_FAST_NO_EXTENSION") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    with_cuda = CUDA_HOME is not None and (torch.cuda.is_available() or force_cuda)
    if force_cuda and CUDA_HOME is None:
        raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the toolkit folder")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    extra_link = ["-fopenmp"]
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("PART_FAST_WITH_CUDA", None))
        include_dirs += _nvidia_include_dirs()
        ext_cls = CUDAExtension
        # --fmad=false: device code rounds every * and + on its own, as the host code does with
        # -ffp-contract=off, so the CUDA kernels compute what the shared math header says (and the CPU tests check).
        extra = {"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "--fmad=false"]}
    else:
        ext_cls = CppExtension
        extra = {"cxx": cxx_flags}
    ext = ext_cls(
        name="part_fast._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=extra_link,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
