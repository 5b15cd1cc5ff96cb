"""Wall time at equal steps: nanoGPT's own `train.py` against `fastlm train`, the same recipe (its
CPU recipe for character-level tiny Shakespeare: 4 layers x 4 heads x 128, block 64, batch 12,
no biases (nanoGPT's default), AdamW 1e-3, warm-up 100, cosine to the last step, dropout 0,
clipping at 1, no compile), whole processes from their start to their exit, rounds interleaved.

    python bench/equal_steps.py --nanogpt PATH/TO/nanoGPT [--steps 300] [--rounds 3] [--threads 2]
        [--level avx2] [--json bench/results/equal_steps_<YYYY-MM-DD>_<tag>.json]

Both evaluate at step 250 (and nanoGPT at step 0, as its loop does) over 20 batches; the two
validation losses at step 250 are printed beside the times (nats per character; fastlm reads the
text as bytes, nanoGPT as its 65 characters, both with 10% held out). nanoGPT's data comes from its
own `prepare.py` fed the shared copy of the text (nothing is downloaded). `--level` runs both
programs at that SIMD level (fastlm's kernels through FASTLM_CPU_ISA, torch's through the switches
bench/cpu_levels.py sets). The ratio is nanoGPT's time over fastlm's (> 1: fastlm faster).

Each round also times, in a process of its own at the same level, fastlm's step on this recipe
(`bench/test_train.py`'s shape a), the step's fp32 products alone (its "matmul floor") and the
same model's step on one token (shape c: the step's fixed cost, Python, dispatch, autograd and
the optimizer). "bound" is the ratio fastlm would reach with every step at floor + fixed cost
and the rest of its process (start, data, evaluations, checkpoints) as measured: the most a
step driven op by op from Python, as fastlm's is, can give on this recipe.

The same process also measures the ceilings those costs sit under: the products' rate in
GFLOP/s, torch's copy bandwidth from memory (64 MB) and within L2 (256 KB), and, once a run,
the CPU's peak multiply-add rate at the level (bench/fma_peak.c, compiled with the system's C
compiler; left out where there is none).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from time_to_quality import NANOGPT_EVAL, SIZE, nanogpt_command, prepare_fastlm, prepare_nanogpt  # noqa: E402


def fastlm_command(data: Path, out: Path, steps: int, config: Path) -> list[str]:
    """``config``: a TOML file with the model switches that have no flag (``bias = false``)."""
    s = SIZE
    return [sys.executable, "-m", "fastlm", "train", "--data", str(data), "--config", str(config),
            "--n-layer", str(s["n_layer"]),
            "--n-head", str(s["n_head"]), "--n-embd", str(s["n_embd"]), "--block-size", str(s["block_size"]),
            "--batch-size", str(s["batch_size"]), "--max-iters", str(steps), "--lr", "1e-3", "--min-lr", "1e-4",
            "--warmup-iters", "100", "--lr-decay-iters", str(steps), "--eval-interval", "250", "--eval-iters",
            "20", "--log-interval", "1", "--dropout", "0", "--grad-clip", "1.0", "--no-progress", "--out", str(out)]


def run(cmd: list[str], cwd: Path, env: dict, metrics: Path | None = None) -> dict:
    """Run cmd to its exit: wall seconds and the validation loss at step 250 (from nanoGPT's
    log, or from fastlm's metrics file: with --no-progress it prints no evaluation lines)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[1:4]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    if metrics is None:
        val = {int(m.group(1)): float(m.group(2)) for m in NANOGPT_EVAL.finditer(proc.stdout)}
    else:
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    return {"seconds": round(seconds, 2), "val_250": val.get(250)}


STEP_COSTS = """
import json, statistics, sys, tempfile, time
from pathlib import Path
import torch
sys.path.insert(0, {bench!r})
from test_train import MatmulFloor, Step
torch.set_num_threads({threads})
root = Path(tempfile.mkdtemp())
floor = MatmulFloor("a_shakespeare_char")
big, l2 = torch.empty(16 << 20), torch.empty(64 << 10)  # 64 MB and 256 KB of float32
big_src, l2_src = torch.randn(16 << 20), torch.randn(64 << 10)
fns = {{"step": Step("a_shakespeare_char", "fastlm", root), "floor": floor,
        "one_token": Step("c_one_token", "fastlm", root), "copy_mem": lambda: big.copy_(big_src),
        "copy_l2": lambda: l2.copy_(l2_src)}}
reps = {{"step": 3, "floor": 3, "one_token": 10, "copy_mem": 3, "copy_l2": 200}}
times = {{k: [] for k in fns}}
for r in range(13):
    for k, fn in fns.items():
        n = reps[k]
        t = time.perf_counter()
        for _ in range(n):
            fn()
        if r >= 3:
            times[k].append((time.perf_counter() - t) / n)
out = {{k: statistics.median(v) for k, v in times.items()}}
out["floor_gflops"] = floor.flops / out["floor"] / 1e9
# bytes read and written
out["copy_mem_gbs"] = 2 * big.numel() * 4 / out.pop("copy_mem") / 1e9
out["copy_l2_gbs"] = 2 * l2.numel() * 4 / out.pop("copy_l2") / 1e9
print(json.dumps(out))
"""


def fma_peak(level: str | None, threads: int, work: Path) -> float | None:
    """GFLOP/s of bench/fma_peak.c at ``level`` (avx2 or an avx512 level; None: the level
    fastlm's kernels run at), on ``threads`` threads; None without a C compiler or off x86-64."""
    if level is None:
        from fastlm import ops

        level = ops.cpu_isa()
    flags = {"avx2": ["-mavx2", "-mfma"]}.get(level) or (["-mavx512f"] if level and level.startswith("avx512") else None)
    cc = shutil.which("cc") or shutil.which("gcc")
    if flags is None or cc is None:
        return None
    exe = work / "fma_peak"
    src = Path(__file__).resolve().parent / "fma_peak.c"
    if subprocess.run([cc, "-O2", "-fopenmp", *flags, str(src), "-o", str(exe)], capture_output=True).returncode:
        return None
    out = subprocess.run([str(exe), str(threads)], capture_output=True, text=True, check=True).stdout.split()
    return float(out[2])


def step_costs(env: dict, threads: int) -> dict:
    """Seconds (medians, alternated) of fastlm's step on the recipe, its products alone and its
    step on one token, in a process of its own; with the products' GFLOP/s and torch's copy
    bandwidth (GB/s read and written) from memory and within L2, measured between them."""
    code = STEP_COSTS.format(bench=str(Path(__file__).resolve().parent), threads=threads)
    out = subprocess.run([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nanogpt", required=True, type=Path, help="a checkout of karpathy/nanoGPT")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--level", help="run both programs at this SIMD level (fastlm's and torch's), e.g. avx2")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)
    if args.steps < 251:
        ap.error("--steps must pass step 250, where both programs evaluate")

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if args.level:
        from cpu_levels import TORCH_AT  # torch's switches for each level

        env.update(FASTLM_CPU_ISA=args.level, **TORCH_AT[args.level])
    prepare_nanogpt(args.nanogpt)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = prepare_fastlm(root)
        config = root / "recipe.toml"
        config.write_text("bias = false  # nanoGPT's default: no biases in its linear layers and norms\n")
        peak = fma_peak(args.level, args.threads, root)
        if peak is not None:
            print(f"FMA peak at level {args.level or 'of the kernels'}, {args.threads} threads: {peak:.0f} GFLOP/s",
                  flush=True)
        for r in range(args.rounds):
            # its recipe's evaluation every 250 steps, over 20 batches as fastlm's
            ng = run(nanogpt_command(args.nanogpt, root / f"ng{r}", iters=args.steps, eval_interval=250,
                                     eval_iters=20) + ["--log_interval=1"], args.nanogpt, env)
            fl = run(fastlm_command(data, root / f"fl{r}", args.steps, config), Path.cwd(), env,
                     metrics=root / f"fl{r}" / "metrics.jsonl")
            c = step_costs(env, args.threads)
            # the process with every step at its products plus its fixed cost
            best = fl["seconds"] - args.steps * (c["step"] - c["floor"] - c["one_token"])
            ceil = {k: round(c.pop(k), 1) for k in ("floor_gflops", "copy_mem_gbs", "copy_l2_gbs")}
            rows.append({"round": r + 1, "nanogpt": ng, "fastlm": fl, "ratio": round(ng["seconds"] / fl["seconds"], 3),
                         "step_ms": {k: round(v * 1e3, 2) for k, v in c.items()}, "ceilings": ceil,
                         "bound": round(ng["seconds"] / best, 3)})
            print(f"round {r + 1}: nanoGPT {ng['seconds']:.1f} s (val {ng['val_250']}), fastlm {fl['seconds']:.1f} s "
                  f"(val {fl['val_250']}), ratio {rows[-1]['ratio']:.2f}x; fastlm's step {c['step'] * 1e3:.1f} ms = "
                  f"products {c['floor'] * 1e3:.1f} + fixed {c['one_token'] * 1e3:.1f} + other "
                  f"{(c['step'] - c['floor'] - c['one_token']) * 1e3:.1f} ms; bound {rows[-1]['bound']:.2f}x; products at "
                  f"{ceil['floor_gflops']:.0f} GFLOP/s"
                  + (f" ({ceil['floor_gflops'] / peak:.0%} of the FMA peak)" if peak else "")
                  + f", copy {ceil['copy_mem_gbs']:.1f} GB/s from memory, {ceil['copy_l2_gbs']:.0f} GB/s in L2", flush=True)
    med = statistics.median(row["ratio"] for row in rows)
    print(f"\n{args.steps} steps, level {args.level or 'best'}, {args.threads} threads: median ratio {med:.2f}x "
          f"(nanoGPT {statistics.median(r['nanogpt']['seconds'] for r in rows):.1f} s, "
          f"fastlm {statistics.median(r['fastlm']['seconds'] for r in rows):.1f} s); bound (steps at products + "
          f"fixed cost) {statistics.median(r['bound'] for r in rows):.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"bench": "equal_steps", "steps": args.steps, "level": args.level,
                                         "threads": args.threads, "fma_peak_gflops": peak, "rows": rows, "median_ratio": med,
                                         "median_bound": statistics.median(r["bound"] for r in rows)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
