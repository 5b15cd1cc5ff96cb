"""``fastlm eval``: several checkpoints side by side on the same text (table, JSON, PNG)."""
import json
import subprocess
import sys

import pytest
import torch

from fastlm import GPT, GPTConfig, Tokenizer
from fastlm.data import prepare
from fastlm.evaluate import compare_checkpoints, perplexity

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(80))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tok = Tokenizer.train([TEXT], 280)
    dirs = []
    for i, (n_layer, ctx) in enumerate([(1, 32), (2, 24)]):
        torch.manual_seed(i)
        m = GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=ctx, n_layer=n_layer, n_head=2, n_embd=16))
        d = root / f"run{i}" / "best"
        m.save_pretrained(d)
        tok.save(d)
        dirs.append(d)
    (root / "text.txt").write_text(TEXT[:1500])
    return root, tok, dirs


def _eval(*args):
    return subprocess.run([sys.executable, "-m", "fastlm", "eval", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_eval_compares_checkpoints_side_by_side(checkpoints, tmp_path):
    root, tok, dirs = checkpoints
    r = _eval(*dirs, "--data", root / "text.txt", "--max-length", 16, "--stride", 8, "--json", tmp_path / "r.json",
              "--png", tmp_path / "r.png")
    assert r.returncode == 0, r.stderr
    header, rule, *lines = r.stdout.strip().splitlines()
    assert header.split() == ["model", "perplexity", "nll", "bits_per_byte", "tokens"] and len(lines) == 2
    assert lines[0].startswith(str(dirs[0])) and lines[1].startswith(str(dirs[1]))
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["task"] == "lm" and report["max_length"] == 16 and report["stride"] == 8
    for d, row in zip(dirs, report["results"]):
        want = perplexity(GPT.from_pretrained(d), (root / "text.txt").read_text(), tokenizer=tok, max_length=16,
                          stride=8)
        assert row["model"] == str(d) and row["tokens"] == want["tokens"]
        assert abs(row["perplexity"] - want["perplexity"]) <= 1e-6 * want["perplexity"]
        assert abs(row["bits_per_byte"] - want["bits_per_byte"]) <= 1e-6 * want["bits_per_byte"]
        assert f"{row['perplexity']:.4f}" in r.stdout
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_on_a_prepared_folder_uses_its_val_documents(checkpoints, tmp_path):
    root, tok, dirs = checkpoints
    docs = root / "docs"
    docs.mkdir(exist_ok=True)
    for j in range(6):
        (docs / f"d{j}.py").write_text(TEXT[j * 200:(j + 1) * 200])
    prepare([str(docs)], tmp_path / "data", tokenizer=tok, val_fraction=0.5, progress=False, verbose=False)
    rows = compare_checkpoints(dirs[:1], tmp_path / "data", max_length=16)
    assert rows[0]["tokens"] > 0 and rows[0]["perplexity"] > 1


def test_task_eval_of_a_language_model_is_a_clear_error(checkpoints, tmp_path):
    root, _, dirs = checkpoints
    data = tmp_path / "labeled.jsonl"
    data.write_text('{"text": "a fine day", "label": "pos"}\n')
    r = _eval(dirs[0], "--data", data, "--task", "classification")
    assert r.returncode == 2 and "not a classification model" in r.stderr, r.stderr
