"""Turn a pytest-benchmark JSON of bench/test_tokenizer.py into the markdown table of
bench/RESULTS.md: per group, MB/s from the median and the ratio of fastlm to each competitor.

    python bench/tokenizer_table.py tok.json
"""
import json
import sys
from collections import defaultdict


def main(path):
    data = json.load(open(path))
    groups = defaultdict(dict)
    for b in data["benchmarks"]:
        info = b["extra_info"]
        groups[b["group"]][info["impl"]] = (b["stats"]["median"], info["bytes"])
        if "cpu_s_median" in info:
            print(f"<!-- {b['group']} {info['impl']}: process CPU s (median) {info['cpu_s_median']:.3f} -->")
    print("| benchmark | implementation | median s | MB/s | fastlm speed-up |")
    print("| --- | --- | ---: | ---: | ---: |")
    for g in sorted(groups):
        impls = groups[g]
        base = impls.get("fastlm") or impls.get("fastlm-1t")
        for impl, (med, nbytes) in sorted(impls.items(), key=lambda kv: kv[1][0]):
            ratio = base[0] / med if base else float("nan")
            if impl.startswith("fastlm-") and impl.endswith("t"):
                cell = f"{base[0] / med:.2f}x vs 1 thread"
            elif impl.startswith("fastlm"):
                cell = "-" if impl == "fastlm" else f"{base[0] / med:.2f}x vs cold"
            else:
                cell = f"**{med / base[0]:.2f}x**"
            del ratio
            print(f"| {g} | {impl} | {med:.3f} | {nbytes / 1e6 / med:.1f} | {cell} |")


if __name__ == "__main__":
    main(sys.argv[1])
