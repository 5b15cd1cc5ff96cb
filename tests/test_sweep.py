"""``fastlm sweep``: a grid or random search, end to end on tiny settings."""
import csv
import json
import subprocess
import sys

import pytest

from fastlm.data import prepare
from fastlm.train import sweep_trials


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    for j in range(6):
        (root / f"doc{j}.py").write_text("".join(f"def h{i}(x):\n    return x + {i}\n" for i in range(j * 15, j * 15 + 15)))
    prepare([str(root)], root / "data", vocab_size=256, val_fraction=0.3, progress=False, verbose=False)
    return root / "data"


def _sweep(*args):
    return subprocess.run([sys.executable, "-m", "fastlm", "sweep", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


TINY = ["--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "2", "--eval-iters", "1",
        "--warmup-iters", "0", "--threads", "1", "--no-progress"]


def test_grid_sweep_end_to_end(data, tmp_path):
    out = tmp_path / "sw"
    r = _sweep("--data", data, "--out", out, "--grid", "lr=1e-3,1e-2", "n_layer=1,2", "--steps", 3, *TINY)
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads((out / "sweep.json").read_text())
    trials = report["trials"]
    assert report["grid"] == {"lr": [1e-3, 1e-2], "n_layer": [1, 2]} and len(trials) == 4
    assert [t["rank"] for t in trials] == [1, 2, 3, 4]
    losses = [t["best_val_loss"] for t in trials]
    assert losses == sorted(losses)
    assert sorted((t["lr"], t["n_layer"]) for t in trials) == [(1e-3, 1), (1e-3, 2), (1e-2, 1), (1e-2, 2)]
    for t in trials:  # each trial's run folder, with its own checkpoint of the trial's model
        cfg = json.loads((out / f"trial-{t['trial']:03d}" / "best" / "config.json").read_text())
        assert cfg["n_layer"] == t["n_layer"] and t["steps"] == 3
        state = json.loads((out / f"trial-{t['trial']:03d}" / "best" / "trainer_state.json").read_text())
        assert state["config"]["lr"] == t["lr"] and state["config"]["max_iters"] == 3
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [int(r["trial"]) for r in rows] == [t["trial"] for t in trials]
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    header = r.stdout.splitlines()[0].split()
    assert header[:4] == ["rank", "trial", "lr", "n_layer"] and "best_val_loss" in header


def test_random_search_and_bad_grids(data, tmp_path):
    r = _sweep("--data", data, "--out", tmp_path / "rs", "--grid", "lr=1e-3,2e-3,3e-3", "weight_decay=0,0.1",
               "--random", 2, "--steps", 2, "--n-layer", 1, *TINY)
    assert r.returncode == 0, r.stderr[-4000:]
    trials = json.loads((tmp_path / "rs" / "sweep.json").read_text())["trials"]
    assert len(trials) == 2 and len({(t["lr"], t["weight_decay"]) for t in trials}) == 2
    r = _sweep("--data", data, "--out", tmp_path / "bad", "--grid", "nonsense=1,2", "--steps", 1, *TINY)
    assert r.returncode == 2 and "unknown settings" in r.stderr
    r = _sweep("--data", data, "--out", tmp_path / "bad", "--grid", "lr", "--steps", 1, *TINY)
    assert r.returncode == 2 and "NAME=V1,V2" in r.stderr
    assert len(sweep_trials({"a": [1, 2, 3], "b": [4, 5]}, random=4, seed=1)) == 4
    assert sweep_trials({"a": [1, 2]}, random=5) == [{"a": 1}, {"a": 2}]
