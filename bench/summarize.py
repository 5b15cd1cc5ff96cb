"""Print median ratios from a pytest-benchmark JSON file: for each group, every
implementation's median time, its speed relative to the group's competitor, and page faults.

    python bench/summarize.py norms.json [more.json ...]
"""
import json
import sys
from collections import defaultdict

COMPETITORS = ("torch_two_ops", "torch", "torch_unfused")


def main(paths):
    groups = defaultdict(dict)
    for p in paths:
        for b in json.load(open(p))["benchmarks"]:
            impl = b["params"].get("impl", b["name"])
            groups[b["group"]][impl] = b
    for g in sorted(groups):
        rows = groups[g]
        comp = next((rows[c] for c in COMPETITORS if c in rows), None)
        print(f"## {g}")
        for impl, b in rows.items():
            med = b["stats"]["median"]
            line = f"  {impl:16s} median {med * 1e3:9.2f} ms"
            if comp is not None:
                line += f"  speed vs {comp['params']['impl']}: {comp['stats']['median'] / med:5.2f}x"
            if "copy_ceiling" in rows and impl != "copy_ceiling":
                line += f"  fraction of copy bandwidth: {rows['copy_ceiling']['stats']['median'] / med:5.2f}"
            ex = b.get("extra_info", {})
            if "faults_per_call" in ex:
                line += f"  faults/call {ex['faults_per_call']:.0f}"
            if "peak_extra_mb" in ex:
                line += f"  peak extra {ex['peak_extra_mb']:.0f} MB"
            print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
