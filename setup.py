"""Build script for fastlm.

Extensions:
  fastlm._C          C++ CPU kernels, registered as torch custom ops (always built).
  fastlm._C_cuda     CUDA kernels + torch glue (built when torch has CUDA and nvcc is found;
                     FASTLM_CUDA=0/1 forces it off/on).
  fastlm._tokenizer  the byte-level BPE tokenizer (pure C++17 + pybind11, no torch headers).
  fastlm._features   term counting, TF-IDF weighting and Word2Vec training for fastlm.features
                     (C++17 + pybind11).

Environment knobs:
  MAX_JOBS               parallel compile jobs (ninja), honoured by torch's BuildExtension.
  FASTLM_MARCH           -march value for all C++ code (default: none, the architecture's
                         baseline). The CPU kernels need none: they are compiled once per SIMD
                         level (csrc/cpu/isa/: baseline, AVX2, AVX-512 on x86-64; baseline, NEON
                         on aarch64) and the level is chosen at import from what the CPU
                         reports, so a wheel built on any machine runs on every other of its
                         architecture. FASTLM_MARCH=native ties the whole build to this CPU.
  FASTLM_CUDA=0|1        force the CUDA extension off / on.
  TORCH_CUDA_ARCH_LIST   CUDA architectures (torch's convention).
  FASTLM_DEBUG=1         -O0 -g builds.
"""
import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _cpu_flags():
    debug = os.environ.get("FASTLM_DEBUG") == "1"
    flags = ["-std=c++17", "-fopenmp"] + (["-O0", "-g"] if debug else ["-O3"])
    march = os.environ.get("FASTLM_MARCH", "").strip()
    if march:
        flags.append("-march=" + march)
    return flags


def _want_cuda(torch):
    from torch.utils.cpp_extension import CUDA_HOME

    forced = os.environ.get("FASTLM_CUDA")
    if forced == "0":
        return False
    available = torch.version.cuda is not None and (CUDA_HOME is not None or shutil.which("nvcc"))
    if forced == "1" and not available:
        raise RuntimeError("FASTLM_CUDA=1 but torch has no CUDA or nvcc was not found")
    return bool(available)


def extensions():
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension, include_paths

    cxx = _cpu_flags()
    exts = [
        CppExtension(
            "fastlm._C",
            # the glue, dispatch and pool (baseline), and one kernel build per SIMD level
            sources=["csrc/ops.cpp"] + _rel("csrc/cpu/*.cpp") + _rel("csrc/cpu/isa/*.cpp"),
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]
    tokenizer_sources = _rel("csrc/tokenizer/*.cpp")
    if tokenizer_sources:
        from setuptools import Extension

        exts.append(
            Extension(
                "fastlm._tokenizer",
                sources=tokenizer_sources,
                # torch ships pybind11's headers; the tokenizer itself includes no torch header.
                include_dirs=[os.path.join(ROOT, "csrc")] + include_paths()[:1],
                extra_compile_args=cxx + ["-fvisibility=hidden"],
                extra_link_args=["-fopenmp"],
                language="c++",
            )
        )
    features_sources = _rel("csrc/features/*.cpp")
    if features_sources:
        from setuptools import Extension

        exts.append(
            Extension(
                "fastlm._features",
                sources=features_sources,
                # Term counting and Word2Vec for fastlm.features: pure C++17 + pybind11 (torch's copy), no torch header.
                include_dirs=[os.path.join(ROOT, "csrc")] + include_paths()[:1],
                extra_compile_args=cxx + ["-fvisibility=hidden"],
                extra_link_args=["-fopenmp"],
                language="c++",
            )
        )
    if _want_cuda(torch):
        exts.append(
            CUDAExtension(
                "fastlm._C_cuda",
                sources=_rel("csrc/cuda/*.cu") + _rel("csrc/cuda/*.cpp"),
                include_dirs=[os.path.join(ROOT, "csrc")],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]},
            )
        )
    return exts


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    packages=["fastlm", "fastlm.ops", "fastlm.kernels", "fastlm.models", "fastlm.generation", "fastlm.serve",
              "fastlm.train", "fastlm.evaluation", "fastlm.cli", "fastlm.data", "fastlm.features",
              "fastlm.tokenizer", "fastlm.serve.static"],
    package_dir={"fastlm": "fastlm", "fastlm.kernels": "kernels"},
    # the web playground's page, script, style and icon (fastlm/serve/playground.py): data, not modules
    package_data={"fastlm.serve.static": ["*.html", "*.js", "*.css", "*.svg"]},
    ext_modules=extensions(),
    cmdclass=_cmdclass(),
    zip_safe=False,
)
