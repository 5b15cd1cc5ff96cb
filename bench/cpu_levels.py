"""Run bench/test_cpu_ops.py at every SIMD level this machine has, each in its own process
with torch held to the same level, and print the table of median ratios (torch / fastlm:
above 1 means fastlm is faster) for bench/RESULTS.md.

    python bench/cpu_levels.py [--levels avx2 baseline] [--threads 2] [-k PATTERN] [--tag run1]

torch is held to a level through its own switches: ATEN_CPU_CAPABILITY (ATen's kernels),
MKL_ENABLE_INSTRUCTIONS (MKL's BLAS) and ONEDNN_MAX_CPU_ISA (oneDNN), so an AVX-512 machine
stands in fairly for an AVX2 one. glibc keeps freed memory for reuse (no fresh mappings), so
neither side pays page faults for its outputs. Each level's JSON is written to
bench/results/cpu_ops_<level>_<date>_<tag>.json (the one naming scheme of bench/results/:
<subject>_<YYYY-MM-DD>_<tag>.json).
"""
import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tables  # noqa: E402  (bench/tables.py: the one table script)

HERE = pathlib.Path(__file__).resolve().parent
TORCH_AT = {  # torch's own switches for each fastlm level
    "baseline": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "avx512": {},
    "avx512_vnni": {},
    "neon": {},
}
NO_FAULTS = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40), "MALLOC_TOP_PAD_": str(256 << 20)}


def run_level(level, threads, pattern, tag):
    out = HERE / "results" / f"cpu_ops_{level}_{datetime.date.today().isoformat()}_{tag}.json"
    env = dict(os.environ, FASTLM_CPU_ISA=level, FASTLM_BENCH_THREADS=str(threads), **TORCH_AT[level], **NO_FAULTS)
    cmd = [sys.executable, "-m", "pytest", "-q", str(HERE / "test_cpu_ops.py"), "--benchmark-only",
           f"--benchmark-json={out}", "-p", "no:cacheprovider"]
    if pattern:
        cmd += ["-k", pattern]
    subprocess.run(cmd, env=env, check=True)
    return json.loads(out.read_text())


def table(results):
    """The markdown table of {level: pytest-benchmark JSON}, one column per level."""
    return tables.cpu_ops_table(list(results.values()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--levels", nargs="*", help="default: every level this machine runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-k", dest="pattern", default="")
    ap.add_argument("--tag", default="run1", help="last part of the JSON's name, e.g. run2 or norms")
    ap.add_argument("--from-json", nargs="*", help="only print the table of earlier runs' JSON files")
    args = ap.parse_args()
    if args.from_json:
        results = {}
        for p in args.from_json:
            data = json.loads(pathlib.Path(p).read_text())
            lv = next(b["extra_info"]["cpu_isa"] for b in data["benchmarks"] if "cpu_isa" in b["extra_info"])
            results[lv] = data
    else:
        import fastlm.ops as ops

        levels = args.levels or list(reversed(ops.cpu_isas()))
        results = {lv: run_level(lv, args.threads, args.pattern, args.tag) for lv in levels}
    print(table(results))


if __name__ == "__main__":
    main()
