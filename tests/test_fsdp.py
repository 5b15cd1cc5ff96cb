"""Sharded training (FSDP2) under torchrun: 2 CPU processes (gloo, loopback) follow the loss
curve of 1 process with the same global batch, write whole checkpoints that the ordinary
loader reads, and resume from them."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from fastlm import GPT
from fastlm.data import prepare

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this torch build has no gloo backend")

MODEL = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--dropout", "0"]
TRAIN = ["--eval-interval", "3", "--eval-iters", "2", "--log-interval", "1", "--lr", "3e-3", "--warmup-iters", "2",
         "--threads", "1", "--no-progress", "--seed", "7", "--grad-accum", "2"]


def _train(data, out, nproc, batch, iters, resume=False, fsdp=True):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    cmd = launcher + ["-m", "fastlm", "train", "--data", str(data), "--out", str(out), *MODEL, *TRAIN,
                      "--batch-size", str(batch), "--max-iters", str(iters)]
    cmd += (["--resume"] if resume else []) + (["--fsdp"] if fsdp else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr[-6000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    for j in range(8):
        (root / f"doc{j}.py").write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n"
                                                 for i in range(j * 50, j * 50 + 50)))
    prepare([str(root)], root / "data", vocab_size=256, val_fraction=0.25)
    return root / "data"


def test_fsdp_two_processes_match_one_and_resume(data, tmp_path):
    one = _train(data, tmp_path / "one", nproc=1, batch=4, iters=6, fsdp=False)
    two = _train(data, tmp_path / "two", nproc=2, batch=2, iters=6)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [3, 6]
    for a, b in zip(one, two):
        for k in ("train_loss", "val_loss"):
            assert abs(a[k] - b[k]) <= 1e-4 * abs(a[k]), (k, a[k], b[k])
    # The checkpoint is whole: the ordinary loader reads it, and it holds the 1-process weights.
    ckpt = tmp_path / "two" / "checkpoints" / "step-0000006"
    m2, m1 = GPT.from_pretrained(ckpt), GPT.from_pretrained(tmp_path / "one" / "checkpoints" / "step-0000006")
    for (k, a), b in zip(m2.state_dict().items(), m1.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), k
    # Resuming the sharded run (the whole state read, then sharded again) keeps following the curve.
    two_more = _train(data, tmp_path / "two", nproc=2, batch=2, iters=9, resume=True)
    one_more = _train(data, tmp_path / "one", nproc=1, batch=4, iters=9, resume=True, fsdp=False)
    assert [r["step"] for r in two_more] == [3, 6, 9]
    for k in ("train_loss", "val_loss"):
        assert abs(two_more[-1][k] - one_more[-1][k]) <= 1e-4 * one_more[-1][k], k
