"""Turn a pytest-benchmark JSON of bench/test_attention.py into the markdown table of
bench/RESULTS.md (medians; ratios against torch SDPA in the same run).

    python bench/report.py attn.json [more.json ...]
"""
import json
import sys


def _load(path):
    with open(path) as f:
        data = json.load(f)
    rows = {}
    for b in data["benchmarks"]:
        rows[(b["group"], b["extra_info"].get("impl", ""))] = (b["stats"]["median"], b["extra_info"])
    return data, rows


def report(path):
    data, rows = _load(path)
    mm = rows.get(("ceiling matmul", ""))
    cp = rows.get(("ceiling copy", ""))
    gf_ceiling = mm[1]["flops"] / mm[0] / 1e9 if mm else float("nan")
    bw_ceiling = cp[1]["bytes"] / cp[0] / 1e9 if cp else float("nan")
    out = [f"Run {data.get('datetime', '')[:16]}, {data['machine_info'].get('cpu', {}).get('brand_raw', '')}, "
           f"torch {torch_version(data)}; fp32 matmul ceiling {gf_ceiling:.0f} GFLOP/s, copy {bw_ceiling:.1f} GB/s. "
           "Decode's fraction: the time of only reading its K and V once (torch.sum, same run) over fastlm's.",
           "",
           "| op | shape (B, H, T, D) | fastlm ms | torch SDPA ms | reference ms | fastlm / SDPA speed-up | "
           "fastlm GFLOP/s (GB/s) | fraction of ceiling |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    groups = []
    for (g, _impl) in rows:
        if g not in groups and not g.startswith("ceiling"):
            groups.append(g)
    for g in groups:
        ours = rows.get((g, "fastlm"))
        sdpa = rows.get((g, "torch_sdpa"))
        ref = rows.get((g, "reference"))
        if not ours:
            continue
        info = ours[1]
        if info["kind"] == "decode":
            rate = info["bytes"] / ours[0] / 1e9
            floor = rows.get((g, "read_floor"))  # reading the same K/V once (torch.sum)
            frac = floor[0] / ours[0] if floor else rate / bw_ceiling
            rate_s = f"{rate:.1f} GB/s"
        else:
            rate = info["flops"] / ours[0] / 1e9
            frac = rate / gf_ceiling
            rate_s = f"{rate:.0f}"
        ms = lambda r: f"{r[0] * 1e3:.2f}" if r else "-"
        ratio = f"{sdpa[0] / ours[0]:.2f}x" if sdpa else "-"
        kind, shape = g.split(" ", 1)
        out.append(f"| {kind} | {shape} | {ms(ours)} | {ms(sdpa)} | {ms(ref)} | {ratio} | {rate_s} | {frac:.0%} |")
    return "\n".join(out)


def torch_version(data):
    for b in data["benchmarks"]:
        v = b.get("extra_info", {}).get("torch")
        if v:
            return v
    try:
        import torch

        return torch.__version__
    except Exception:
        return "?"


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(report(p))
        print()
