"""The CPU kernels at every SIMD level: which levels are built and chosen, switching them, the
dispatcher's table, and the torch-free kernel check (tests/cpu_kernels/check.cpp) run at
every level: natively, the AVX-512 forms through an emulation of their intrinsics where the
CPU lacks AVX-512 (SIMDe, Debian's libsimde-dev), and the NEON forms built with a cross
compiler and run under qemu (Debian's g++-aarch64-linux-gnu and qemu-user).

With FASTLM_REQUIRE_CPU_LEVELS=1 (set by .ci/run) a missing cross tool fails instead of
skipping, so CI never passes with a level unchecked."""
import concurrent.futures
import os
import pathlib
import platform
import shutil
import subprocess
import sys

import pytest
import torch

from fastlm import ops
from fastlm.ops import _cpu_choice, _native

ROOT = pathlib.Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "cpu_kernels"
REQUIRE = os.environ.get("FASTLM_REQUIRE_CPU_LEVELS") == "1"
X86 = platform.machine() in ("x86_64", "AMD64")

needs_ext = pytest.mark.skipif("cpu" not in ops.backends(), reason="fastlm._C is not built")


def _need(tool_or_path, what):
    ok = pathlib.Path(tool_or_path).exists() if "/" in tool_or_path else shutil.which(tool_or_path)
    if not ok:
        msg = f"{what}: {tool_or_path} is not installed"
        if REQUIRE:
            pytest.fail(msg)
        pytest.skip(msg)


# ----------------------------------------------------------------------------- levels
@needs_ext
def test_levels_built_and_the_best_one_chosen():
    names = [n for n, _ in _native.cpu_isa_levels()]
    if X86:
        assert names == ["baseline", "avx2", "avx512", "avx512_vnni"]
    elif platform.machine() == "aarch64":
        assert names == ["baseline", "neon"]
    supported = ops.cpu_isas()
    assert supported[0] == "baseline"
    if os.environ.get("FASTLM_CPU_ISA", "auto") in ("", "auto"):
        assert ops.cpu_isa() == supported[-1]
    # torch's own detection agrees on what the CPU has
    cap = torch.backends.cpu.get_cpu_capability()
    if X86 and cap in ("AVX2", "AVX512"):
        assert "avx2" in supported
    if X86 and cap == "AVX512":
        assert "avx512" in supported
    assert ops.build_info()["cpu_isa"] == ops.cpu_isa()


@needs_ext
def test_use_cpu_isa_switches_restores_and_agrees():
    before = ops.cpu_isa()
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(37, 203, generator=g), torch.randn(37, 203, generator=g)
    w, b = torch.randn(203, generator=g), torch.randn(203, generator=g)
    outs = {}
    for level in ops.cpu_isas():
        with ops.use_cpu_isa(level), ops.use_backend("cpu"):
            assert ops.cpu_isa() == level and ops.build_info()["cpu_isa"] == level
            outs[level] = ops.layer_norm(x, w, b, residual=r)[0]
        assert ops.cpu_isa() == before
    base = outs["baseline"]
    for level, out in outs.items():
        assert (out - base).abs().max().item() < 1e-5, level


@needs_ext
def test_unknown_or_unsupported_level_is_an_error():
    with pytest.raises(ValueError, match="unknown CPU SIMD level 'sse9'"):
        with ops.use_cpu_isa("sse9"):
            pass
    missing = [n for n, ok in _native.cpu_isa_levels() if not ok]
    for level in missing:
        with pytest.raises(RuntimeError, match="cannot run"):
            with ops.use_cpu_isa(level):
                pass
    code = "import fastlm.ops as o; print(o.cpu_isa())"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, FASTLM_CPU_ISA="baseline"),
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["baseline"]
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, FASTLM_CPU_ISA="bogus"),
                       capture_output=True, text=True)
    assert r.returncode != 0 and "FASTLM_CPU_ISA=bogus" in r.stderr


@needs_ext
def test_dispatcher_follows_the_table_at_every_level():
    x = torch.randn(4, 64)
    q = torch.randn(1, 2, 8, 16)
    probes = {"attention": q, "decode_attention": q, "layer_norm": x, "rms_norm": x, "gelu": x,
              "decode_linear": x, "decode_linear_q": x, "linear_cross_entropy": x, "kv_cache_write": x}
    assert set(probes) == set(_cpu_choice.NATIVE_WINS)
    for level in ops.cpu_isas():
        with ops.use_cpu_isa(level):
            for op, t in probes.items():
                least = _cpu_choice.MIN_NUMEL.get(op, {}).get(level, 0)
                want = "cpu" if level in _cpu_choice.NATIVE_WINS[op] and t.numel() >= least else "reference"
                assert ops.implementation(op, t) == want, (level, op)
                with ops.use_backend("cpu"):  # asked for explicitly, the kernel always serves
                    assert ops.implementation(op, t) == "cpu"


# ----------------------------------------------------------------------------- the kernel check
def _build(tmp, cxx, sources, flags, out):
    """Compile each source (a path, or (path, its own flags)) to an object, two at a time,
    then link; returns the program."""
    jobs = [(src, []) if not isinstance(src, tuple) else src for src in sources]
    objs = [tmp / f"{i}_{pathlib.Path(src).stem}.o" for i, (src, _) in enumerate(jobs)]

    def compile_one(i):
        src, own = jobs[i]
        return subprocess.run([cxx, *flags, *own, "-c", str(src), "-o", str(objs[i])], capture_output=True, text=True)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        for r in pool.map(compile_one, range(len(jobs))):
            assert r.returncode == 0, r.stderr[-4000:]
    exe = tmp / out
    r = subprocess.run([cxx, *flags, *map(str, objs), "-o", str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return exe


FLAGS = ["-O2", "-std=c++17", "-fopenmp", f"-I{ROOT / 'csrc'}"]
CORE = [ROOT / "csrc/cpu/dispatch.cpp", DRIVER / "check.cpp"]


def _run_check(cmd, expect_levels):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    out = r.stdout
    assert r.returncode == 0 and " 0 failed" in out.splitlines()[-1], out[-6000:] + r.stderr[-2000:]
    for level in expect_levels:
        assert f"level {level}: 0 checks failed" in out, out[-3000:]


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
def test_kernel_cores_at_every_native_level(tmp_path):
    isa = sorted((ROOT / "csrc/cpu/isa").glob("*.cpp"))
    exe = _build(tmp_path, "g++", isa + CORE, FLAGS, "check")
    levels = ops.cpu_isas() if "cpu" in ops.backends() else ["baseline"]
    _run_check([str(exe)], levels)


@pytest.mark.skipif(not X86, reason="the AVX-512 emulation is an x86-64 build")
def test_kernel_cores_avx512_emulated(tmp_path):
    levels = [lv for lv in ("avx512", "avx512_vnni") if lv not in ops.cpu_isas()]
    if not levels:
        pytest.skip("this CPU runs AVX-512 with VNNI: the native check covers those levels")
    _need("/usr/include/simde/x86/avx512.h", "the AVX-512 emulation needs SIMDe (apt-get install libsimde-dev)")
    if "avx2" not in ops.cpu_isas():
        pytest.skip("the AVX-512 emulation is built over AVX2, which this CPU lacks")
    emu = ["-mavx2", "-mfma", "-mf16c", "-Wno-psabi"]
    isa = [ROOT / "csrc/cpu/isa/baseline.cpp", ROOT / "csrc/cpu/isa/avx2.cpp",
           (DRIVER / "avx512_emulated.cpp", emu), (DRIVER / "avx512_emulated.cpp", emu + ["-DFASTLM_EMULATE_VNNI"])]
    exe = _build(tmp_path, "g++", isa + CORE, FLAGS, "check-avx512-emulated")
    _run_check([str(exe), *levels, "--emulated"], levels)


@pytest.mark.skipif(platform.machine() == "aarch64", reason="aarch64 runs NEON natively")
def test_kernel_cores_neon_under_qemu(tmp_path):
    _need("aarch64-linux-gnu-g++", "the NEON check needs a cross compiler (apt-get install g++-aarch64-linux-gnu)")
    _need("qemu-aarch64", "the NEON check needs qemu (apt-get install qemu-user)")
    isa = [ROOT / "csrc/cpu/isa/baseline.cpp", ROOT / "csrc/cpu/isa/neon.cpp"]
    exe = _build(tmp_path, "aarch64-linux-gnu-g++", isa + CORE, FLAGS, "check-neon")
    _run_check(["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", str(exe)], ["baseline", "neon"])


@pytest.mark.skipif(platform.machine() == "aarch64", reason="aarch64 runs NEON natively")
def test_neon_integer_dot_product_form_under_qemu(tmp_path):
    """The NEON level built for CPUs with the dot-product instructions (Armv8.2 +dotprod: a build
    with FASTLM_MARCH=armv8.2-a+dotprod) multiplies the quantized weights with sdot, a path of
    its own; qemu's default CPU has them."""
    _need("aarch64-linux-gnu-g++", "the NEON check needs a cross compiler (apt-get install g++-aarch64-linux-gnu)")
    _need("qemu-aarch64", "the NEON check needs qemu (apt-get install qemu-user)")
    isa = [ROOT / "csrc/cpu/isa/baseline.cpp", ROOT / "csrc/cpu/isa/neon.cpp"]
    exe = _build(tmp_path, "aarch64-linux-gnu-g++", isa + CORE, FLAGS + ["-march=armv8.2-a+dotprod"],
                 "check-neon-dotprod")
    _run_check(["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", str(exe), "neon"], ["neon"])
