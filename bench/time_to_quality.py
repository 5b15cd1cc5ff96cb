"""Wall time to a validation loss: nanoGPT's own `train.py` against `fastlm train --recipe fast`,
as a user runs each (whole processes, from their start to the first evaluation at or below the
target), on character-level tiny Shakespeare, the same model size, rounds interleaved.

    python bench/time_to_quality.py --nanogpt PATH/TO/nanoGPT [--rounds 2] [--threads 2]
        [--target 1.88] [--level avx2] [--variant "FLAGS"]... [--json bench/results/time_to_quality_<YYYY-MM-DD>_<tag>.json]

nanoGPT: its CPU recipe for this data (`config/train_shakespeare_char.py` at 4 layers x 4 heads
x 128, block 64, batch 12, dropout 0, no compile), the cosine stretched to 3000 steps (its 2000
steps do not reach 1.88), evaluation every 100 steps over 50 batches. Its data comes from its own
`data/shakespeare_char/prepare.py`, fed the shared copy of the text (nothing is downloaded).
fastlm: the same text as bytes (vocabulary 256 + end-of-text, 10% held out as nanoGPT does), the
`fast` recipe at the same size (its own schedule and evaluation cadence), evaluations over 50
batches, `--target-val-loss`; each `--variant` is one more fastlm run per round with more flags
(another size, say), timed against the same nanoGPT run.
Both losses are nats per character of the same text. A process is stopped once it has reported
the target (nanoGPT would otherwise train on to its last step).

`--corpus stdlib`: the demo's data instead (the standard library's source with a 2048-token
byte-level BPE, 5% held out, the same token streams written for nanoGPT), nanoGPT's recipe for its
2000 steps at the same size, and fastlm's wall time to the validation loss (nats per token) that
nanoGPT ends at, against nanoGPT's time to its last evaluation.

Prints a markdown table (each round's seconds and the ratio fastlm / nanoGPT, then the medians);
`--json` keeps the rows (`python bench/tables.py FILE` prints them again).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
SIZE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12)
NANOGPT_EVAL = re.compile(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)")
FASTLM_EVAL = re.compile(r"step (\d+): train [\d.]+, val ([\d.]+)")


def nanogpt_command(nanogpt: Path, out: Path, dataset="shakespeare_char", iters=3000, eval_interval=100,
                    eval_iters=50) -> list[str]:
    s = SIZE
    return [sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
            f"--eval_iters={eval_iters}", f"--block_size={s['block_size']}", f"--batch_size={s['batch_size']}",
            f"--n_layer={s['n_layer']}", f"--n_head={s['n_head']}", f"--n_embd={s['n_embd']}", f"--max_iters={iters}",
            f"--lr_decay_iters={iters}", "--dropout=0.0", f"--eval_interval={eval_interval}", f"--out_dir={out}",
            "--always_save_checkpoint=False", f"--dataset={dataset}"]


def fastlm_command(data: Path, out: Path, target: float) -> list[str]:
    s = SIZE
    return [sys.executable, "-m", "fastlm", "train", "--data", str(data), "--recipe", "fast",
            "--n-layer", str(s["n_layer"]), "--n-head", str(s["n_head"]), "--n-embd", str(s["n_embd"]),
            "--block-size", str(s["block_size"]), "--batch-size", str(s["batch_size"]), "--eval-iters", "50",
            "--target-val-loss", str(target), "--out", str(out)]


def prepare_nanogpt(nanogpt: Path) -> None:
    folder = nanogpt / "data" / "shakespeare_char"
    if (folder / "train.bin").is_file() and (folder / "meta.pkl").is_file():
        return
    shutil.copyfile(SHAKESPEARE, folder / "input.txt")  # prepare.py downloads only when this is absent
    subprocess.run([sys.executable, "prepare.py"], cwd=folder, check=True, stdout=subprocess.DEVNULL)


def prepare_fastlm(root: Path) -> Path:
    from fastlm import Tokenizer
    from fastlm.data import prepare

    tok = Tokenizer.train([""], 256)  # plain bytes: one id a character of this ASCII text
    prepare([SHAKESPEARE], root / "shakespeare_char", tokenizer=tok, val_fraction=0.1, progress=False, verbose=False)
    return root / "shakespeare_char"


def prepare_stdlib(root: Path, nanogpt: Path, vocab_size: int = 2048) -> Path:
    """The demo's data (``fastlm demo``): the Python standard library's source, a vocab_size-token
    byte-level BPE, 5% held out, prepared for fastlm under root, and the same two token streams
    written for nanoGPT as data/fastlm_stdlib/{train,val}.bin with the meta.pkl its train.py reads
    the vocabulary size from."""
    import pickle

    import numpy as np

    from fastlm.data import TokenData
    from fastlm.demo import prepare_demo_data

    folder = root / "stdlib"
    prepare_demo_data(folder, vocab_size=vocab_size, progress=False, verbose=False)
    data = TokenData(folder)
    out = nanogpt / "data" / "fastlm_stdlib"
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        np.asarray(data.splits[split], dtype=np.uint16).tofile(out / f"{split}.bin")
    with open(out / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": data.vocab_size}, f)
    return folder


def time_to_target(cmd: list[str], cwd: Path, pattern: re.Pattern, target: float, env: dict,
                   limit_s: float, at_step: int | None = None) -> dict:
    """Run ``cmd``; the wall seconds from its start to the first evaluation <= target (with
    ``at_step``: to the evaluation at that step, whatever its loss)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    evals, reached = [], None
    try:
        for line in proc.stdout:
            m = pattern.search(line)
            if not m:
                continue
            step, val = int(m.group(1)), float(m.group(2))
            evals.append((step, val, round(time.perf_counter() - t0, 1)))
            if (val <= target) if at_step is None else step == at_step:
                reached = {"step": step, "val_loss": val, "seconds": round(time.perf_counter() - t0, 1)}
                break
            if time.perf_counter() - t0 > limit_s:
                break
    finally:
        proc.kill()
        proc.wait()
    return {"reached": reached, "evaluations": evals}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nanogpt", required=True, type=Path, help="a checkout of karpathy/nanoGPT")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target", type=float, default=1.88)
    ap.add_argument("--limit", type=float, default=900.0, help="give a run up after this many seconds")
    ap.add_argument("--fastlm-args", default="", help="more flags for fastlm train (one string), e.g. "
                                                    "'--muon-ns-dtype float32'")
    ap.add_argument("--variant", action="append", default=[], metavar="FLAGS",
                    help="another fastlm run in each round, its flags on top of the recipe's and --fastlm-args "
                         "(one string, repeatable), e.g. '--n-layer 2 --max-iters 420 --eval-interval 140': a "
                         "size of its own against the same nanoGPT run")
    ap.add_argument("--level", help="run both programs at this SIMD level: fastlm's kernels (FASTLM_CPU_ISA) and "
                                    "torch's (its own switches, as bench/cpu_levels.py sets them), e.g. avx2 on an "
                                    "AVX-512 machine; default: each at its best")
    ap.add_argument("--corpus", choices=("shakespeare", "stdlib"), default="shakespeare",
                    help="stdlib: the demo's data (the standard library's source, a 2048-token BPE), nanoGPT's "
                         "recipe for its 2000 steps, and the time fastlm takes to the validation loss nanoGPT "
                         "ends at (--target is then nanoGPT's)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.corpus == "shakespeare" and not SHAKESPEARE.is_file():
        sys.exit(f"{SHAKESPEARE} is absent")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    if args.level:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from cpu_levels import TORCH_AT  # noqa: E402  (torch's switches for each level)

        env.update(FASTLM_CPU_ISA=args.level, **TORCH_AT[args.level])
    stdlib = args.corpus == "stdlib"
    if not stdlib:
        prepare_nanogpt(args.nanogpt)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastlm-ttq-") as tmp:
        tmp = Path(tmp)
        data = prepare_stdlib(tmp, args.nanogpt) if stdlib else prepare_fastlm(tmp)
        for r in range(args.rounds):
            if stdlib:  # nanoGPT's recipe as its README runs it on a CPU: 2000 steps; its last loss is the target
                n = time_to_target(nanogpt_command(args.nanogpt, tmp / f"nano{r}", "fastlm_stdlib", 2000, 2000),
                                   args.nanogpt, NANOGPT_EVAL, 0.0, env, args.limit, at_step=2000)
                if n["reached"]:
                    args.target = n["reached"]["val_loss"]
            else:
                n = time_to_target(nanogpt_command(args.nanogpt, tmp / f"nano{r}"), args.nanogpt, NANOGPT_EVAL,
                                   args.target, env, args.limit)

            def fastlm_run(out, flags=""):
                """fastlm with the recipe, --fastlm-args and ``flags``, its ratio to this round's nanoGPT."""
                f = time_to_target(fastlm_command(data, tmp / out, args.target) + args.fastlm_args.split()
                                   + flags.split(), Path.cwd(), FASTLM_EVAL, args.target, env, args.limit)
                if n["reached"] and f["reached"]:
                    f["ratio"] = round(f["reached"]["seconds"] / n["reached"]["seconds"], 3)
                return f

            f = fastlm_run(f"fast{r}")
            row = {"round": r + 1, "nanogpt": n, "fastlm": f}
            if "ratio" in f:
                row["ratio"] = f.pop("ratio")
            for i, flags in enumerate(args.variant):
                row.setdefault("variants", []).append(dict(fastlm_run(f"variant{i}_{r}", flags), flags=flags))
            rows.append(row)
            print(json.dumps({k: (v["reached"] if isinstance(v, dict) else v) for k, v in row.items()}), flush=True)
    print(f"\n{args.corpus}: target val loss {args.target}, {args.threads} threads, {SIZE}, fastlm flags: "
          f"{args.fastlm_args!r}, level: {args.level or 'best'}")
    print("| round | nanoGPT train.py: step, val, s | fastlm --recipe fast: step, val, s | fastlm / nanoGPT |")
    print("| --- | --- | --- | --- |")

    def cell(x):
        return "not reached" if not x["reached"] else f"{x['reached']['step']}, {x['reached']['val_loss']:.4f}, " \
                                                       f"{x['reached']['seconds']:.1f}"
    for row in rows:
        print(f"| {row['round']} | {cell(row['nanogpt'])} | {cell(row['fastlm'])} | {row.get('ratio', '-')} |")
    ratios = [row["ratio"] for row in rows if "ratio" in row]
    if ratios:
        print(f"| median | | | {statistics.median(ratios):.3f} |")
    for i, flags in enumerate(args.variant):
        print(f"\nvariant {flags!r}:")
        print("| round | fastlm: step, val, s | fastlm / nanoGPT |")
        print("| --- | --- | --- |")
        vr = []
        for row in rows:
            v = row["variants"][i]
            print(f"| {row['round']} | {cell(v)} | {v.get('ratio', '-')} |")
            if "ratio" in v:
                vr.append(v["ratio"])
        if vr:
            print(f"| median | | {statistics.median(vr):.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"corpus": args.corpus, "target": args.target, "threads": args.threads, "size": SIZE,
                                         "level": args.level,
                                         "fastlm_args": args.fastlm_args,
                                         "rows": rows, "median_ratio": statistics.median(ratios) if ratios else None},
                                        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
