"""k-fold cross-validation by document: k trainings, disjoint val folds covering every document."""
import json
import math

import numpy as np
import pytest

from fastlm.data import TokenData, assign_folds, prepare, token_documents
from fastlm.train import TrainConfig, cross_validate


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cv")
    for j in range(7):
        (root / f"doc{j}.py").write_text("".join(f"def g{i}(x):\n    return x - {i}\n" for i in range(j * 9, j * 9 + 9)))
    prepare([str(root)], root / "data", vocab_size=256, val_fraction=0.3, progress=False, verbose=False)
    return root / "data"


def _doc_key(d):
    return bytes(np.asarray(d, dtype=np.int64).tobytes())


def test_cross_validate_returns_k_folds_with_distinct_val_sets(data, tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path / "cv"), batch_size=2, max_iters=2, eval_interval=2, eval_iters=1,
                      warmup_iters=0, progress=False, plot=False, tensorboard=False, threads=1, seed=3)
    res = cross_validate(cfg, data, folds=3, model={"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16})
    assert [r["fold"] for r in res["folds"]] == [0, 1, 2]
    losses = [r["val_loss"] for r in res["folds"]]
    assert all(math.isfinite(v) for v in losses)
    assert abs(res["val_loss_mean"] - np.mean(losses)) < 1e-9
    assert abs(res["val_loss_std"] - np.std(losses, ddof=1)) < 1e-9
    assert json.loads((tmp_path / "cv" / "cross_validation.json").read_text()) == res
    # The val sets are disjoint and together are every document of the data, train and val.
    every = sorted(_doc_key(d) for d in token_documents(TokenData(data)))
    seen = []
    for i, r in enumerate(res["folds"]):
        fold = TokenData(tmp_path / "cv" / "folds" / f"fold-{i}")
        val = [_doc_key(d) for d in _split_docs(fold, "val")]
        train = [_doc_key(d) for d in _split_docs(fold, "train")]
        assert len(val) == r["val_documents"] >= 2 and not set(val) & set(train)
        assert sorted(val + train) == every
        seen += val
        assert (tmp_path / "cv" / f"fold-{i}" / "best" / "model.safetensors").is_file()
    assert sorted(seen) == every


def _split_docs(td, split):
    ids = np.asarray(td.splits[split])
    ends = np.flatnonzero(ids == td.eot_token) + 1
    return [ids[s:e] for s, e in zip(np.concatenate([[0], ends[:-1]]), ends)]


def test_fold_assignment_is_deterministic_and_balanced():
    docs = [np.arange(i, i + 5) for i in range(11)]
    a = assign_folds(docs, 4)
    assert a == assign_folds(list(docs), 4) and sorted(set(a)) == [0, 1, 2, 3]
    assert max(a.count(f) for f in range(4)) - min(a.count(f) for f in range(4)) <= 1
    with pytest.raises(ValueError, match="at least 2 folds"):
        assign_folds(docs, 1)
    with pytest.raises(ValueError, match="need at least 12 documents"):
        assign_folds(docs, 12)
