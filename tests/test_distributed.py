"""Data-parallel training under torchrun: 2 CPU processes (gloo, loopback) follow the loss
curve of 1 process with the same global batch, and resume from their checkpoint."""
import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from fastlm.data import prepare

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this torch build has no gloo backend")

MODEL = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--dropout", "0"]
TRAIN = ["--eval-interval", "3", "--eval-iters", "2", "--log-interval", "1", "--lr", "3e-3", "--warmup-iters", "2",
         "--threads", "1", "--no-progress", "--seed", "7"]


def _launch(data, out, nproc, batch, iters, resume=False, extra=(), timeout=300):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    cmd = launcher + ["-m", "fastlm", "train", "--data", str(data), "--out", str(out), *MODEL, *TRAIN,
                      "--batch-size", str(batch), "--max-iters", str(iters), *extra] + (["--resume"] if resume else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _train(data, out, nproc, batch, iters, resume=False, extra=()):
    r = _launch(data, out, nproc, batch, iters, resume=resume, extra=extra)
    assert r.returncode == 0, r.stdout + r.stderr
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _corpus(root):
    for j in range(8):  # a few documents, so the split by document hash has both sides
        (root / f"doc{j}.py").write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n"
                                                 for i in range(j * 50, j * 50 + 50)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    _corpus(root)
    prepare([str(root)], root / "data", vocab_size=256, val_fraction=0.25)
    return root / "data"


def test_two_processes_match_one_with_the_same_global_batch(data, tmp_path):
    one = _train(data, tmp_path / "one", nproc=1, batch=4, iters=6)
    two = _train(data, tmp_path / "two", nproc=2, batch=2, iters=6)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [3, 6]
    for a, b in zip(one, two):
        for k in ("train_loss", "val_loss"):
            assert abs(a[k] - b[k]) <= 1e-4 * abs(a[k]), (k, a[k], b[k])
    assert (tmp_path / "two" / "best" / "model.safetensors").is_file()
    # The 2-process run resumes from its own checkpoint and keeps following the 1-process curve.
    two_more = _train(data, tmp_path / "two", nproc=2, batch=2, iters=9, resume=True)
    one_more = _train(data, tmp_path / "one", nproc=1, batch=4, iters=9, resume=True)
    assert [r["step"] for r in two_more] == [3, 6, 9]
    assert abs(two_more[-1]["val_loss"] - one_more[-1]["val_loss"]) <= 1e-4 * one_more[-1]["val_loss"]


def test_raw_text_under_torchrun_prepared_by_rank_0(tmp_path):
    """`fastlm train --data corpus/` works under torchrun as in one process: rank 0 prepares
    OUT/data while the other rank waits, then both train on it."""
    raw = tmp_path / "raw"
    raw.mkdir()
    _corpus(raw)
    out = tmp_path / "run"
    rows = _train(raw, out, nproc=2, batch=2, iters=3, extra=["--vocab-size", "256", "--val-fraction", "0.25"])
    assert [r["step"] for r in rows] == [3]
    # the folder is the one a single process prepares from the same sources
    prepare([str(raw)], tmp_path / "ref", vocab_size=256, val_fraction=0.25, progress=False, verbose=False)
    for name in ("train.bin", "val.bin", "tokenizer/tokenizer.json"):
        assert (out / "data" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    # when rank 0 cannot prepare, every rank stops with an error instead of waiting
    r = _launch(tmp_path / "missing", tmp_path / "run2", nproc=2, batch=2, iters=3, extra=["--vocab-size", "256"],
                timeout=120)
    assert r.returncode != 0
    assert "rank 0 failed" in r.stdout + r.stderr and "missing" in r.stdout + r.stderr
