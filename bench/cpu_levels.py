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

HERE = pathlib.Path(__file__).resolve().parent
TORCH_AT = {  # torch's own switches for each fastlm level
    "baseline": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "avx512": {},
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
    levels = list(results)
    rows, ceilings = {}, {}
    for level, data in results.items():
        for b in data["benchmarks"]:
            e = b["extra_info"]
            if e.get("op") == "ceilings":
                ceilings[level] = f"{e['matmul_gflops']:.0f} GFLOP/s, {e['copy_gbs']:.1f} GB/s"
                continue
            key = (e["op"], e["kind"], tuple(e["shape"]), e["competitor"])
            rows.setdefault(key, {})[level] = (e["ratio"], e["fastlm_ms"], e["torch_ms"], e["torch_capability"])
    head = "| op | case | shape | competitor | " + " | ".join(f"{lv}: ratio (fastlm / torch ms)" for lv in levels) + " |"
    lines = [head, "|" + " --- |" * (4 + len(levels))]
    for (op, kind, shape, comp), per in rows.items():
        cells = []
        for lv in levels:
            if lv in per:
                r, a, b, _ = per[lv]
                cells.append(f"{r:.2f}x ({a:.2f} / {b:.2f})")
            else:
                cells.append("-")
        lines.append(f"| {op} | {kind} | {shape} | {comp} | " + " | ".join(cells) + " |")
    caps = {lv: next((b["extra_info"].get("torch_capability") for b in d["benchmarks"] if "torch_capability"
                      in b["extra_info"]), "?") for lv, d in results.items()}
    lines.append("")
    lines.append("torch's capability per run: " + ", ".join(f"{lv}: {caps[lv]}" for lv in levels)
                 + "; ceilings (matmul, copy): " + ", ".join(f"{lv}: {c}" for lv, c in ceilings.items()))
    return "\n".join(lines)


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
