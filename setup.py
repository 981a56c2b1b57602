"""Builds kcl_ext._C, the kcl operator library (torch.ops.kcl.*).

Default: the CPU kernels. The CUDA kernels (csrc/cuda/*.cu) are compiled too when a GPU is visible
or FORCE_CUDA=1 (then TORCH_CUDA_ARCH_LIST picks the architectures). The build prints what it
builds. CMakeLists.txt builds the same library for C++ users.
"""
from __future__ import annotations

import glob
import os
import shutil
import site
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _is_cuda_toolkit(path) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h")) and \
        os.path.exists(os.path.join(path, "bin", "nvcc"))


def locate_cuda_toolkit():
    """Points CUDA_HOME at a complete toolkit before torch.utils.cpp_extension reads it.

    torch guesses CUDA_HOME from the `nvcc` on PATH; when that nvcc is a wrapper script (say
    /usr/local/bin/nvcc) the guess (/usr/local) has no CUDA headers or libraries
    (include/cuda_runtime.h, lib64/libcudart.so). An explicit, valid CUDA_HOME or CUDA_PATH is
    always kept.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_cuda_toolkit(os.environ.get(var)):
            return
    nvcc = shutil.which("nvcc")
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    if nvcc:
        candidates.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for path in candidates:
        if _is_cuda_toolkit(path):
            os.environ["CUDA_HOME"] = path
            return


locate_cuda_toolkit()

import torch  # noqa: E402  (after CUDA_HOME is settled)
from torch.utils.cpp_extension import (CUDA_HOME, BuildExtension, CppExtension,  # noqa: E402
                                       CUDAExtension)


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def nvidia_wheel_include_dirs() -> list[str]:
    """Headers that the nvidia-* wheels install (cusparse.h and friends), which torch's CUDA
    headers include; a toolkit without them cannot compile a CUDAExtension otherwise."""
    roots = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
    found = []
    for root in roots:
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            for path in sorted(glob.glob(os.path.join(root, pattern))):
                if os.path.isdir(path) and path not in found:
                    found.append(path)
    return found


def build_config():
    cpu_sources = _rel([os.path.join(ROOT, "csrc", "ops.cpp")] +
                       glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) +
                        glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    want_cuda = force_cuda or torch.cuda.is_available()
    with_cuda = bool(want_cuda and CUDA_HOME and cuda_sources)
    debug = os.environ.get("KCL_DEBUG", "0") == "1"

    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags += openmp_flags()
    extra = {"cxx": cxx_flags}
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = []
    sources = list(cpu_sources)
    extension = CppExtension
    if with_cuda:
        extension = CUDAExtension
        sources += cuda_sources
        include_dirs += nvidia_wheel_include_dirs()
        define_macros.append(("KCL_WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
        if os.environ.get("KCL_PTXAS_VERBOSE", "0") == "1":
            extra["nvcc"].append("-Xptxas=-v")

    gpu_note = ""
    if want_cuda and not with_cuda:
        gpu_note = (" (CUDA requested but not built: " +
                    ("CUDA_HOME not found" if not CUDA_HOME else "no CUDA sources in csrc/cuda") + ")")
    triton = "found" if _has_triton() else "not found"
    print("=" * 72)
    print("kcl_ext build configuration")
    print(f"  torch          {torch.__version__} (CUDA build: {torch.version.cuda})")
    print(f"  kernels        CPU{' + CUDA' if with_cuda else ' only'}{gpu_note}")
    if with_cuda:
        print(f"  CUDA_HOME      {CUDA_HOME}")
        print(f"  CUDA archs     {os.environ.get('TORCH_CUDA_ARCH_LIST', '(torch default: visible GPU)')}")
    print(f"  Triton         {triton} (Triton kernels are JIT-compiled at run time)")
    print(f"  build type     {'debug' if debug else 'release'}")
    print(f"  sources        {' '.join(sources)}")
    print("=" * 72)
    return extension(
        name="kcl_ext._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
    )


def openmp_flags() -> list[str]:
    """-fopenmp where torch runs its threads on OpenMP (Linux builds): at::parallel_for is a header
    template whose OpenMP region is only compiled in with it; without it the CPU kernels run on
    one thread. Nothing is linked: the OpenMP runtime is the one libtorch_cpu already loads."""
    if sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info():
        return ["-fopenmp"]
    return []


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


setup(
    license="MIT",  # here rather than in pyproject.toml: see its comment on `dynamic`
    # The loss and what it needs at run time; the recipe (references/), the experiments and the
    # tools stay in the repository.
    packages=find_packages(include=["kcl_ext", "kcl_ext.*"]),
    # py.typed: the package's annotations are for type checkers (PEP 561). LICENSE reaches the
    # wheel's metadata by setuptools' default license_files.
    package_data={"kcl_ext": ["py.typed"]},
    ext_modules=[build_config()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
