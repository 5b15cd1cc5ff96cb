"""Hugging Face repo ids resolved as transformers resolves them (fastlm.hub): a local directory
first, then the hub cache in its standard layout, then the hub client (offline here: its error
is reported). The reference example runs verbatim against a cache holding a small random GPT-2."""
import hashlib
import os
import sys

import pytest
import torch

import fastlm
from fastlm import GPT, GPTConfig
from fastlm.cli import main
from fastlm.hub import HubNotFoundError, hub_cache_dir, is_repo_id, resolve_pretrained

TEXT = ("自然语言处理是人工智能的一个分支，研究计算机如何理解和生成人类语言。"
        "Natural language processing lets computers read text. 什么是机器学习? ") * 3


def _fake_commit(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()


def _cache_repo(cache, repo_id, files_from, revision="main", commit=None):
    """Write ``files_from``'s files into ``cache`` as huggingface_hub does: blobs named by
    content hash, a snapshot of symlinks into them, and refs/<revision> naming the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = commit or _fake_commit(repo_id + revision)
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in files_from.iterdir():
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snap


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-gpt2")
    tok = fastlm.Tokenizer.train([TEXT], vocab_size=300)
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=128, n_layer=2, n_head=2, n_embd=32,
                  eos_token_id=tok.eot_token)).save_pretrained(d)
    tok.save(d)
    return d


@pytest.fixture
def cache(tmp_path, monkeypatch, gpt2_dir):
    c = tmp_path / "hub"
    _cache_repo(c, "gpt2", gpt2_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(c))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no local folder named gpt2
    return c


def test_reference_example_verbatim(cache):
    from fastlm import pipeline
    with pytest.warns(UserWarning, match="'gpt2'"):
        generator = pipeline("text-generation", model="gpt-2")
    out = generator("什么是自然语言处理?", max_length=50, num_return_sequences=1)
    assert len(out) == 1 and out[0]["generated_text"].startswith("什么是自然语言处理?")
    n_prompt = len(generator.tokenizer.encode("什么是自然语言处理?"))
    n_out = len(generator.tokenizer.encode(out[0]["generated_text"]))
    assert n_prompt < n_out  # something was generated
    # max_length counts prompt + new tokens, as in transformers (text may re-tokenize shorter)
    ids = generator.model.generate(generator.tokenizer.encode("什么是自然语言处理?"), max_length=50)
    assert len(ids) <= 50


def test_entry_points_resolve_repo_ids(cache, gpt2_dir, capsys):
    snap = resolve_pretrained("gpt2")
    assert snap.parent.parent.name == "models--gpt2" and (snap / "config.json").is_file()
    ref = GPT.from_pretrained(gpt2_dir)
    for name in ("gpt2", "openai-community/gpt2"):  # the moved name finds the legacy entry
        m = GPT.from_pretrained(name)
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
        assert fastlm.Tokenizer.load(name).encode(TEXT) == fastlm.Tokenizer.load(gpt2_dir).encode(TEXT)
    assert main(["generate", "--model", "gpt2", "--prompt", "什么", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("什么")
    # a local directory comes first, whatever the cache holds
    local = cache.parent / "gpt2"
    local.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained("gpt2")


def test_revisions(cache, gpt2_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    torch.manual_seed(1)
    GPT(GPTConfig(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_embd=16)).save_pretrained(other)
    commit = _fake_commit("v2")
    _cache_repo(cache, "gpt2", other, revision="v2", commit=commit)
    assert GPT.from_pretrained("gpt2", revision="v2").config.n_layer == 1
    assert GPT.from_pretrained("gpt2", revision=commit).config.n_layer == 1
    assert GPT.from_pretrained("gpt2").config.n_layer == 2
    assert fastlm.pipeline("text-generation", model="gpt2", revision="main").model.config.n_layer == 2
    for bad in ("../main", "/etc", "a//b", "x" * 300):
        with pytest.raises(ValueError, match="invalid revision"):
            GPT.from_pretrained("gpt2", revision=bad)


def test_repo_ids_are_validated_and_confined(cache, tmp_path):
    for name in ("a/b", "gpt2", "openai-community/gpt2", "x.y_z-1"):
        assert is_repo_id(name)
    for name in ("../x", "a/../b", "a/b/c", "-a", "a--b", "a..b", "", "a/", "/abs", "a b", "x" * 97):
        assert not is_repo_id(name)
        with pytest.raises(FileNotFoundError):
            GPT.from_pretrained(name)
    # a refs file holding a path, a snapshot whose files link outside the repo's folder
    repo = cache / "models--evil--refs"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("../../../../etc")
    with pytest.raises(ValueError, match="commit hash"):
        GPT.from_pretrained("evil/refs")
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    repo = cache / "models--evil--link"
    snap = repo / "snapshots" / _fake_commit("x")
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(_fake_commit("x"))
    os.symlink(secret, snap / "config.json")
    with pytest.raises(ValueError, match="outside"):
        GPT.from_pretrained("evil/link")


def test_missing_repo_offline_and_without_the_hub_client(cache, monkeypatch):
    # HF_HUB_OFFLINE=1: the hub client is asked in its offline mode, and its error is reported
    with pytest.raises(HubNotFoundError, match=r"(?s)'nobody/missing'.*HF_HUB_OFFLINE.*LocalEntryNotFoundError"):
        GPT.from_pretrained("nobody/missing")
    with pytest.raises(FileNotFoundError, match="no tokenizer at nobody/missing"):
        fastlm.Tokenizer.load("nobody/missing")
    assert main(["generate", "--model", "nobody/missing", "--prompt", "x"]) != 0
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(HubNotFoundError, match="pip install huggingface_hub"):
        fastlm.pipeline("text-generation", model="nobody/missing")


def test_cache_location_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub_cache_dir() == tmp_path / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hub_cache_dir() == tmp_path / "c"


def test_cli_serve_resolves_the_repo_id(cache, monkeypatch):
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    pytest.importorskip("prometheus_client")
    import fastlm.serve

    served = {}
    monkeypatch.setattr(fastlm.serve, "serve", lambda model_dir, **kw: served.update(dir=model_dir, **kw))
    assert main(["serve", "--model", "openai-community/gpt2", "--revision", "main"]) == 0
    assert served["dir"] == resolve_pretrained("gpt2") and served["config"].model_name == "gpt2"
    model, tok, _ = fastlm.serve.server.load("gpt2")
    assert tok.encode(TEXT) == fastlm.Tokenizer.load(served["dir"]).encode(TEXT)
