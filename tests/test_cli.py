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
    assert info["extension_cpu"]["simd"] in ("AVX512", "AVX2", "NEON", "scalar")
    assert info["threads"] >= 1


def test_info_text_and_help():
    r = _run("info")
    assert r.returncode == 0 and "backends_usable" in r.stdout
    r = _run()
    assert r.returncode == 0 and "info" in r.stdout
