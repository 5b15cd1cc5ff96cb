"""Print the markdown table of a results file written by the benches in bench/: the one table
script for bench/RESULTS.md and bench/HISTORY.md.

    python bench/tables.py bench/results/<subject>_<YYYY-MM-DD>_<tag>.json [more.json ...]

What a file holds decides its table:
- bench/test_cpu_ops.py (extra_info has "ratio" and "cpu_isa"; one JSON per SIMD level): one
  row per case, one column per level, each cell the median of the per-round ratios
  torch / fastlm and the two median times. Files of several levels given together share one
  table (a level's later file replaces an earlier one's cases).
- bench/test_attention.py (extra_info has "kind", impl "fastlm" and "torch_sdpa"): per shape
  the medians, the speed-up over SDPA, fastlm's GFLOP/s (GB/s for decode) and its fraction of
  the ceiling measured in the same run (matmul GFLOP/s; for decode, the time of only reading
  the same K and V once over fastlm's, else the copy bandwidth).
- bench/test_tokenizer.py (extra_info has "bytes" and "what"): per group MB/s from the median
  and fastlm's speed-up over each competitor (thread scaling for encode_batch).
- any other pytest-benchmark JSON: per group every implementation's median, the group's
  competitor's median over it, and what extra_info adds (tokens/s, GFLOP/s, page faults,
  peak extra memory, fraction of a copy ceiling, per-round ratios).
- a summary JSON without "benchmarks" (bench/equal_time.py's rows, bench/soak_serve.py's
  summary): its rows, or its keys and values.
Every ratio is competitor median / fastlm median, so above 1 means fastlm is faster.
"""
import json
import pathlib
import statistics
import sys

# Implementations that are the competitor of their group, first match wins.
COMPETITORS = ("torch_two_ops", "torch", "torch_unfused", "torch_sdpa", "transformers", "index_put", "F.linear",
               "plain", "tiktoken")
# Implementations that are bounds measured beside the others, not competitors.
FLOORS = ("copy", "copy_ceiling", "read_floor", "matmul_floor", "throughput_matmul_floor")


def load(path):
    with open(path) as f:
        return json.load(f)


def impl_of(b):
    """The implementation a benchmark entry timed: extra_info's or params' impl, params' path,
    else the test's name without its test_ prefix and parameters."""
    params = b.get("params") or {}
    for v in (b.get("extra_info", {}).get("impl"), params.get("impl"), params.get("path")):
        if v:
            return str(v)
    return b["name"].split("[")[0].removeprefix("test_")


def kind_of(data):
    """Which bench wrote this JSON, from the fields its entries carry."""
    if "benchmarks" not in data:
        return "summary"
    infos = [b.get("extra_info", {}) for b in data["benchmarks"]]
    if any("ratio" in e and "cpu_isa" in e for e in infos):
        return "cpu_ops"
    if any(e.get("impl") == "torch_sdpa" and "kind" in e for e in infos):
        return "attention"
    if any("what" in e and "bytes" in e for e in infos):
        return "tokenizer"
    return "generic"


def run_line(data):
    cpu = data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "")
    return f"Run {data.get('datetime', '')[:16]}, {cpu}".rstrip(", ")


# --- bench/test_cpu_ops.py --------------------------------------------------------------------

def cpu_ops_table(datas):
    """One row per (op, case, shape, competitor), one column per level (the levels in the
    order their files were given). Where a case timed a floor (plain copies of the bytes the
    op must move), its cell adds the ratio a kernel as fast as that copying would reach."""
    rows, levels, ceilings, caps = {}, [], {}, {}
    for data in datas:
        for b in data["benchmarks"]:
            e = b["extra_info"]
            level = e.get("cpu_isa", "?")
            if level not in levels:
                levels.append(level)
            caps.setdefault(level, e.get("torch_capability", "?"))
            if e.get("op") == "ceilings":
                ceilings[level] = f"{e['matmul_gflops']:.0f} GFLOP/s, {e['copy_gbs']:.1f} GB/s"
                continue
            key = (e["op"], e["kind"], tuple(e["shape"]), e["competitor"])
            rows.setdefault(key, {})[level] = (e["ratio"], e["fastlm_ms"], e["torch_ms"], e.get("ceiling_ratio"))
    head = "| op | case | shape | competitor | " + " | ".join(f"{lv}: ratio (fastlm / torch ms)" for lv in levels)
    lines = [head + " |", "|" + " --- |" * (4 + len(levels))]
    for (op, kind, shape, comp), per in rows.items():
        cells = [(f"{per[lv][0]:.2f}x ({per[lv][1]:.2f} / {per[lv][2]:.2f})"
                  + (f"; at the copy floor {per[lv][3]:.2f}x" if per[lv][3] is not None else "")) if lv in per else "-"
                 for lv in levels]
        lines.append(f"| {op} | {kind} | {shape} | {comp} | " + " | ".join(cells) + " |")
    lines.append("")
    note = "torch's capability per run: " + ", ".join(f"{lv}: {caps[lv]}" for lv in levels)
    if ceilings:
        note += "; ceilings (matmul, copy): " + ", ".join(f"{lv}: {c}" for lv, c in ceilings.items())
    lines.append(note)
    return "\n".join(lines)


# --- bench/test_attention.py ------------------------------------------------------------------

def attention_table(data):
    rows = {}
    for b in data["benchmarks"]:
        rows[(b["group"], b["extra_info"].get("impl", ""))] = (b["stats"]["median"], b["extra_info"])
    mm = rows.get(("ceiling matmul", ""))
    cp = rows.get(("ceiling copy", ""))
    gf_ceiling = mm[1]["flops"] / mm[0] / 1e9 if mm else float("nan")
    bw_ceiling = cp[1]["bytes"] / cp[0] / 1e9 if cp else float("nan")
    gf_s = f"{gf_ceiling:.0f} GFLOP/s" if mm else "not in this run"
    bw_s = f"{bw_ceiling:.1f} GB/s" if cp else "not in this run"
    out = [f"{run_line(data)}; fp32 matmul ceiling {gf_s}, copy {bw_s}. "
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
        if not ours:
            continue
        sdpa, ref = rows.get((g, "torch_sdpa")), rows.get((g, "reference"))
        info = ours[1]
        if info["kind"] == "decode":
            rate = info["bytes"] / ours[0] / 1e9
            floor = rows.get((g, "read_floor"))
            frac = floor[0] / ours[0] if floor else rate / bw_ceiling
            rate_s = f"{rate:.1f} GB/s"
        else:
            rate = info["flops"] / ours[0] / 1e9
            frac = rate / gf_ceiling
            rate_s = f"{rate:.0f}"
        ms = lambda r: f"{r[0] * 1e3:.2f}" if r else "-"
        ratio = f"{sdpa[0] / ours[0]:.2f}x" if sdpa else "-"
        kind, _, shape = g.partition(" ")
        out.append(f"| {kind} | {shape} | {ms(ours)} | {ms(sdpa)} | {ms(ref)} | {ratio} | {rate_s} | {frac:.0%} |")
    return "\n".join(out)


# --- bench/test_tokenizer.py ------------------------------------------------------------------

def tokenizer_table(data):
    """MB/s of every implementation; fastlm's (cold cache) speed-up over each competitor,
    the warm cache against the cold, and 2 threads against 1 for encode_batch."""
    groups = {}
    for b in data["benchmarks"]:
        info = b["extra_info"]
        groups.setdefault(b["group"], {})[info["impl"]] = (b["stats"]["median"], info["bytes"],
                                                          info.get("cpu_s_median"))
    lines = [run_line(data), "",
             "| benchmark | implementation | median s | MB/s | CPU s (median) | fastlm speed-up |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for g in sorted(groups):
        impls = groups[g]
        base = impls.get("fastlm") or impls.get("fastlm-1t")
        for impl, (med, nbytes, cpu_s) in sorted(impls.items(), key=lambda kv: kv[1][0]):
            if base is None:
                cell = "-"
            elif impl.startswith("fastlm-") and impl.endswith("t"):
                cell = f"{base[0] / med:.2f}x vs 1 thread"
            elif impl.startswith("fastlm"):
                cell = "-" if impl == "fastlm" else f"{base[0] / med:.2f}x vs cold"
            else:
                cell = f"**{med / base[0]:.2f}x**"
            cpu = f"{cpu_s:.3f}" if cpu_s is not None else "-"
            lines.append(f"| {g} | {impl} | {med:.3f} | {nbytes / 1e6 / med:.1f} | {cpu} | {cell} |")
    return "\n".join(lines)


# --- every other pytest-benchmark JSON --------------------------------------------------------

def _extras(b, rows):
    """What extra_info adds to a row, as short 'name value' cells."""
    e, med, out = b.get("extra_info", {}), b["stats"]["median"], []
    if e.get("tokens", 0) > 1 and med > 0:  # a time to first token counts 1: no rate
        out.append(f"{e['tokens'] / med:.1f} tokens/s")
    if e.get("gflop") and med > 0:
        out.append(f"{e['gflop'] / med:.0f} GFLOP/s")
    if "faults_per_call" in e:
        out.append(f"faults/call {e['faults_per_call']:.0f}")
    if "peak_extra_mb" in e:
        out.append(f"peak extra {e['peak_extra_mb']:.0f} MB")
    copy = rows.get("copy_ceiling")
    if copy is not None and b is not copy and med > 0:
        out.append(f"fraction of copy bandwidth {copy['stats']['median'] / med:.2f}")
    if e.get("ratios"):
        r = e["ratios"]
        out.append(f"per-round ratio median {statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})")
    for k, v in e.items():  # nested results (time to quality): their scalar members
        if isinstance(v, dict):
            scal = ", ".join(f"{kk} {vv:.4g}" if isinstance(vv, float) else f"{kk} {vv}"
                             for kk, vv in v.items() if not isinstance(vv, (list, dict)))
            out.append(f"{k}: {scal}")
            curve = v.get("curve")
            if curve:
                out.append(f"{k} last point {curve[-1]}")
    return "; ".join(out)


def generic_table(data):
    groups = {}
    for b in data["benchmarks"]:
        groups.setdefault(b["group"], {})[impl_of(b)] = b
    lines = [run_line(data), "",
             "| group | implementation | median ms | vs competitor | notes |",
             "| --- | --- | ---: | --- | --- |"]
    for g, rows in groups.items():
        comp_name = next((c for c in COMPETITORS if c in rows), None)
        comp = rows.get(comp_name)
        for impl, b in rows.items():
            med = b["stats"]["median"]
            if comp is None or b is comp or med <= 0:
                vs = "-"
            elif impl in FLOORS:
                vs = f"{comp['stats']['median'] / med:.2f}x (the most any could reach)"
            else:
                vs = f"**{comp['stats']['median'] / med:.2f}x** vs {comp_name}"
            ms = f"{med * 1e3:.2f}" if med >= 1e-3 else f"{med * 1e3:.4f}"
            lines.append(f"| {g} | {impl} | {ms} | {vs} | {_extras(b, rows)} |")
    return "\n".join(lines)


# --- summaries without pytest-benchmark entries -----------------------------------------------

def summary_table(data):
    if isinstance(data.get("rows"), list) and data["rows"]:
        cols = list(data["rows"][0])
        head = ", ".join(f"{k} {v}" for k, v in data.items() if k != "rows")
        lines = [head, "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
        lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in data["rows"]]
        return "\n".join(lines)
    lines = ["| what | figure |", "| --- | --- |"]

    def walk(prefix, v):
        if isinstance(v, dict) and v:
            for k, vv in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), vv)
        else:
            lines.append(f"| {prefix} | {v} |")

    walk("", data)
    return "\n".join(lines)


def tables(paths):
    """The markdown of every file, in the order given; test_cpu_ops files share one table."""
    out, cpu = [], []
    for p in paths:
        data = load(p)
        kind = kind_of(data)
        if kind == "cpu_ops":
            cpu.append(data)
            continue
        render = {"summary": summary_table, "attention": attention_table, "tokenizer": tokenizer_table,
                  "generic": generic_table}[kind]
        out.append(f"<!-- {pathlib.Path(p).name} -->\n{render(data)}")
    if cpu:
        out.append(cpu_ops_table(cpu))
    return "\n\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(tables(sys.argv[1:]))
