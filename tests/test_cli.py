"""The command line: fastlm --version, fastlm info, python -m fastlm."""
import json
import subprocess
import sys

import fastlm


def _run(*args):
    return subprocess.run([sys.executable, "-m", "fastlm", *args], capture_output=True, text=True, timeout=120)


def test_version():
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"fastlm {fastlm.__version__}"


def test_info_json():
    r = _run("info", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["fastlm"] == fastlm.__version__
    assert "cpu" in info["backends_usable"] and "reference" in info["backends_usable"]
    assert info["extension_cpu"]["cpu_isa"] == info["cpu_isa"] in ("baseline", "avx2", "avx512", "neon")
    assert info["cpu_isa"] in info["cpu_isas_supported"]
    assert set(info["cpu_native_ops"]) <= {"attention", "decode_attention", "layer_norm", "rms_norm", "gelu",
                                           "decode_linear", "linear_cross_entropy", "kv_cache_write"}
    assert info["threads"] >= 1


def test_info_text_and_help():
    r = _run("info")
    assert r.returncode == 0 and "backends_usable" in r.stdout
    r = _run()
    assert r.returncode == 0 and "info" in r.stdout
