"""pip build of anee_fast. The Triton kernels ship as `anee_fast.kernels` from kernels/.

The C++ extension `anee_fast._C` (csrc/) is built with torch.utils.cpp_extension: the CPU
sources always, the CUDA sources (csrc/cuda/*.cu) only when torch has CUDA and nvcc is found
(for the architectures in TORCH_CUDA_ARCH_LIST, default "8.0;9.0").
It uses only <torch/library.h> and ATen (no pybind11), which keeps the build short.

ANEE_FAST_BUILD_NATIVE: "auto" (default) builds the extension and, if that fails, installs the
pure-Python package with a loud warning (backend "native" then reports itself unavailable);
"1" makes a failed build an error; "0" skips the extension. Needs torch importable at build time
(`pip install --no-build-isolation`); without it the package installs without the extension.
"""
import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
SUBPACKAGES = ("ops", "model", "control", "engine", "serving", "training", "eval", "compat")
BUILD_NATIVE = os.environ.get("ANEE_FAST_BUILD_NATIVE", "auto").lower()


def _warn(msg):
    bar = "!" * 78
    print(f"\n{bar}\nanee_fast: {msg}\n{bar}\n", file=sys.stderr, flush=True)


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _native_build():
    """(ext_modules, cmdclass) for anee_fast._C, or ([], {}) when it is not to be built."""
    if BUILD_NATIVE in ("0", "no", "false", "off"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        if BUILD_NATIVE == "1":
            raise
        _warn(f"torch is not importable at build time ({e}): installing without the C++ extension "
              "anee_fast._C (use pip install --no-build-isolation to build it)")
        return [], {}

    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cxx_flags = ["-O3", "-g0", "-fopenmp"]      # OpenMP: at::parallel_for runs in parallel
    extra = {"cxx": cxx_flags}
    ext_cls = cpp_extension.CppExtension
    include_dirs = []
    cuda_sources = _sources("csrc/cuda/*.cu")
    if cuda_sources and torch.version.cuda and cpp_extension.CUDA_HOME is not None:
        sources += cuda_sources
        ext_cls = cpp_extension.CUDAExtension
        # Without a GPU at build time torch cannot detect the architecture: Ampere and Hopper
        # (A100, H100) unless the user chose. No --use_fast_math: RoPE's cos/sin of large
        # angles and the softmax's exp keep their full float32 accuracy.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        extra["nvcc"] = ["-O3", "-DANEE_FAST_WITH_CUDA"]
        cxx_flags.append("-DANEE_FAST_WITH_CUDA")
        # pip's CUDA wheels keep some headers torch includes (cusparse.h, ...) under
        # site-packages/nvidia/*/include, not in CUDA_HOME.
        nvidia = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")
        include_dirs += sorted(glob.glob(os.path.join(nvidia, "*", "include")))
    elif cuda_sources:
        why = "torch has no CUDA" if not torch.version.cuda else "nvcc / CUDA_HOME not found"
        print(f"anee_fast: building the CPU ops only ({why})", file=sys.stderr)

    ext = ext_cls("anee_fast._C", sources, include_dirs=include_dirs, extra_compile_args=extra,
                  extra_link_args=["-fopenmp"])

    class BuildExt(cpp_extension.BuildExtension):
        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as e:      # compile or link error
                if BUILD_NATIVE == "1":
                    raise
                self.extensions.remove(extension)    # nothing to copy into the package
                for stale in glob.glob(os.path.join(HERE, "anee_fast", "_C.*")):
                    os.remove(stale)                 # an old in-place build would mislead
                _warn(f"building the C++ extension {extension.name} FAILED ({type(e).__name__}: {e}); "
                      "installing without it: backend 'native' will be unavailable. "
                      "Set ANEE_FAST_BUILD_NATIVE=1 to make this an error.")

    return [ext], {"build_ext": BuildExt.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _native_build()

setup(
    name="anee_fast",
    version="0.1.0",
    description="Adaptive-depth transformer decoding (PROCESS/SKIP/EXIT per token and layer) "
                "on a paged KV cache",
    python_requires=">=3.10",
    packages=["anee_fast", *(f"anee_fast.{p}" for p in SUBPACKAGES), "anee_fast.kernels"],
    package_dir={"anee_fast.kernels": "kernels"},
    package_data={"anee_fast": ["data/controllers/*", "data/adapters/*"]},   # shipped for the embedded model
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.6", "transformers>=4.56", "safetensors", "tqdm", "platformdirs",
                      "matplotlib", "numpy"],
    extras_require={"gguf": ["gguf", "accelerate"], "serve": ["fastapi", "uvicorn", "httpx"],
                    # serve --replicas N: Ray Serve >= 2.60 (DeploymentHandle.broadcast,
                    # serve.ingress() building the app in the replica)
                    "ray": ["ray[serve]>=2.60", "fastapi", "uvicorn", "httpx"]},
    entry_points={"console_scripts": ["anee-fast = anee_fast.cli:main"]},
)
