"""fastlm.data: reading, each cleaning rule, deterministic split, token files."""
import hashlib
import json

import numpy as np
import pytest
import torch

from fastlm.data import (CleanConfig, Document, TokenData, clean_documents, clean_text, prepare, read_documents,
                         split_documents, stdlib_corpus)

Tokenizer = pytest.importorskip("fastlm.tokenizer").Tokenizer


def docs(*texts):
    return [Document(t, f"doc{i}") for i, t in enumerate(texts)]


# ----------------------------------------------------------------------------- cleaning rules
def test_nfc():
    decomposed = "cafe\u0301"
    assert clean_text(decomposed, CleanConfig()) == "caf\u00e9"
    assert clean_text(decomposed, CleanConfig(nfc=False)) == decomposed


def test_newlines():
    assert clean_text("a\r\nb\rc\n", CleanConfig()) == "a\nb\nc\n"
    assert clean_text("a\r\nb", CleanConfig(newlines=False, control_chars=False)) == "a\r\nb"


def test_control_chars_removed_tabs_and_newlines_kept():
    assert clean_text("a\x00b\x07c\td\ne\x1b\x7f\x85", CleanConfig()) == "abc\td\ne"
    assert clean_text("a\x00b", CleanConfig(control_chars=False)) == "a\x00b"


def test_length_limits():
    out, report = clean_documents(docs("ab", "abcdef", "abcdefghijkl"), CleanConfig(min_chars=3, max_chars=8),
                                  progress=False)
    assert [d.text for d in out] == ["abcdef"]
    assert report.steps["length"] == {"documents": 2, "bytes": 2 + 12}


def test_dedup_exact_after_cleaning():
    out, report = clean_documents(docs("x = 1\r\n", "y = 2\n", "x = 1\n"), progress=False)
    assert [d.text for d in out] == ["x = 1\n", "y = 2\n"]
    assert report.steps["dedup"] == {"documents": 1, "bytes": 6}
    out, _ = clean_documents(docs("a", "a"), CleanConfig(dedup=False), progress=False)
    assert len(out) == 2


@pytest.mark.parametrize("text,expected", [
    ("write to jane.doe+x@example.co.uk today", "write to <EMAIL> today"),
    ("call +1 415-555-2671 now", "call <PHONE> now"),
    ("call (020) 7946 0958 now", "call <PHONE> now"),
    ("server 192.168.0.17 is up", "server <IP> is up"),
    ("card 4111 1111 1111 1111 expired", "card <CARD> expired"),
    ("card 4111-1111-1111-1111", "card <CARD>"),
])
def test_scrub_pii(text, expected):
    assert clean_text(text, CleanConfig(scrub_pii=True)) == expected
    assert clean_text(text, CleanConfig()) == text  # off by default


def test_scrub_pii_leaves_code_alone():
    code = "version = 3.11\nx = 1.5 + 2\nrange(10, 200)\n"
    assert clean_text(code, CleanConfig(scrub_pii=True)) == code


def test_report_counts_bytes_per_step():
    _, report = clean_documents(docs("a\r\nb", "\x00", "ok"), CleanConfig(), progress=False)
    assert report.documents_in == 3 and report.documents_out == 2
    assert report.steps["newlines"]["bytes"] == 1
    assert report.steps["control_chars"]["bytes"] == 1
    assert report.steps["length"]["documents"] == 1  # "\x00" became empty
    assert report.bytes_out == len("a\nb") + 2
    assert "removed" in str(report)


# ----------------------------------------------------------------------------- reading
def test_read_sources(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.md").write_text("beta")
    (sub / "c.bin").write_bytes(b"\x00\x01")
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "gamma"}) + "\n\n" + json.dumps({"body": "delta"}) + "\n")
    got, summary = read_documents([tmp_path / "a.txt"], extensions=(".txt",))
    assert [d.text for d in got] == ["alpha"]
    got, _ = read_documents([tmp_path], text_field="body")
    assert sorted(d.text for d in got) == ["alpha", "beta", "delta", "gamma"]
    got, _ = read_documents([str(tmp_path / "**" / "*.md")])
    assert [d.text for d in got] == ["beta"]
    got, summary = read_documents([tmp_path / "d.jsonl"], text_field="body")
    assert [d.text for d in got] == ["gamma", "delta"] and summary[0]["documents"] == 2
    with pytest.raises(ValueError, match="no 'text' field"):
        read_documents([tmp_path / "d.jsonl"])
    with pytest.raises(FileNotFoundError):
        read_documents([tmp_path / "missing.txt"])


def test_stdlib_corpus():
    corpus = stdlib_corpus(max_files=30)
    assert len(corpus) == 30
    assert all(d.source.startswith("stdlib:") and d.source.endswith(".py") for d in corpus)
    full = stdlib_corpus()
    assert len(full) > 100
    assert not any("/test/" in d.source or "site-packages" in d.source for d in full)


def test_hf_dataset_on_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["one doc", "two doc"], "n": [1, 2]})
    ds.save_to_disk(str(tmp_path / "ds"))
    got, _ = read_documents([tmp_path / "ds"])
    assert [d.text for d in got] == ["one doc", "two doc"]


# ----------------------------------------------------------------------------- split
def test_split_by_hash_is_deterministic_and_disjoint():
    texts = [f"document number {i}\n" for i in range(400)]
    train, val, method = split_documents(docs(*texts), 0.1)
    assert method == "hash"
    assert set(train).isdisjoint(val) and len(train) + len(val) == 400
    assert 15 < len(val) < 70
    again = split_documents(docs(*reversed(texts)), 0.1)
    assert set(again[1]) == set(val)  # membership depends on the text only


def test_split_single_document_takes_tail():
    text = "".join(f"line {i}\n" for i in range(100))
    train, val, method = split_documents(docs(text), 0.1)
    assert method == "tail"
    assert train[0] + val[0] == text and val[0].startswith("line ") and 0.05 < len(val[0]) / len(text) < 0.15


# ----------------------------------------------------------------------------- prepare
@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(stdlib_corpus(max_files=12)):
        (d / f"{i:02d}.py").write_text(doc.text)
    (d / "dup.py").write_text((d / "00.py").read_text())
    return d


def test_prepare_files_counts_and_determinism(corpus_dir, tmp_path):
    meta = prepare([corpus_dir], tmp_path / "a", vocab_size=300, val_fraction=0.2, progress=False, verbose=False)
    prepare([corpus_dir], tmp_path / "b", vocab_size=300, val_fraction=0.2, progress=False, verbose=False)
    for name in ("train.bin", "val.bin", "meta.json", "tokenizer/tokenizer.json"):
        a, b = (tmp_path / "a" / name).read_bytes(), (tmp_path / "b" / name).read_bytes()
        assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest(), name
    assert meta["dtype"] == "uint16"
    assert meta["cleaning"]["report"]["steps"]["dedup"]["documents"] >= 1  # dup.py at least
    data = TokenData(tmp_path / "a")
    tok = data.tokenizer()
    assert tok.n_vocab == meta["vocab_size"]
    # the token count is the sum of each document's tokens plus one end-of-text token each
    cleaned, _ = clean_documents(read_documents([corpus_dir])[0], progress=False)
    train, val, _ = split_documents(cleaned, 0.2)
    expect = [t for text in train for t in tok.encode_ordinary(text) + [tok.eot_token]]
    assert data.num_tokens("train") == len(expect) == meta["counts"]["train"]["tokens"]
    assert np.array_equal(np.asarray(data.splits["train"]), np.asarray(expect, dtype=np.uint16))
    assert data.num_tokens("val") == meta["counts"]["val"]["tokens"] > 0
    assert (np.asarray(data.splits["train"]) == tok.eot_token).sum() == len(train)


def test_prepare_with_given_tokenizer_and_uint32(tmp_path):
    text = "abc " * 50
    big = Tokenizer.train([text], 256, special_tokens=("<|endoftext|>",))
    big.save(str(tmp_path / "tok"))
    meta = prepare(None, tmp_path / "out", tokenizer=tmp_path / "tok", documents=docs(text, "xyz " * 40),
                   val_fraction=0.0, progress=False, verbose=False)
    assert meta["vocab_size"] == 257 and meta["counts"]["val"]["tokens"] == 0
    from fastlm.data import token_dtype

    assert token_dtype(70000) == np.uint32 and token_dtype(65536) == np.uint16


def test_prepare_needs_tokenizer_or_vocab(tmp_path):
    with pytest.raises(ValueError, match="vocab"):
        prepare(None, tmp_path, documents=docs("abc"), progress=False, verbose=False)
    with pytest.raises(ValueError, match="no documents"):
        prepare(None, tmp_path, documents=docs(""), vocab_size=256, progress=False, verbose=False)


def test_token_data_batches(corpus_dir, tmp_path):
    prepare([corpus_dir], tmp_path, vocab_size=256, progress=False, verbose=False)
    data = TokenData(tmp_path)
    x, y = data.batch("train", 5, 16, np.random.default_rng(0))
    assert x.shape == y.shape == (5, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = data.batch("train", 5, 16, np.random.default_rng(0))
    assert torch.equal(x, x2)
    with pytest.raises(ValueError, match="too few"):
        data.batch("train", 1, 10 ** 9, np.random.default_rng(0))
    with pytest.raises(FileNotFoundError, match="not a prepared"):
        TokenData(tmp_path / "nothing")


def test_cli_prepare(corpus_dir, tmp_path, capsys):
    from fastlm.cli import main

    assert main(["prepare", "--data", str(corpus_dir), "--out", str(tmp_path), "--vocab-size", "260",
                 "--no-dedup", "--val-fraction", "0.3"]) == 0
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["cleaning"]["config"]["dedup"] is False and meta["split"]["val_fraction"] == 0.3
    assert main(["prepare", "--data", str(corpus_dir), "--out", str(tmp_path)]) == 2
    assert "--vocab-size" in capsys.readouterr().err
