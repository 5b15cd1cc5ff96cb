"""Checkpoints: Hugging Face GPT-2 round trips both ways, sharding, safe .bin loading, and
clear errors for damaged or mismatched directories."""
import json
import os

import pytest
import torch

from fastlm import GPT, GPTConfig
from fastlm.checkpoint import CheckpointError, atomic_write_bytes, load_state_dict

transformers = pytest.importorskip("transformers")


def _hf_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=40, n_embd=48, n_layer=2, n_head=4,
                                  bos_token_id=96, eos_token_id=96, **kw)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _logits_hf(model, idx):
    with torch.no_grad():
        return model(idx).logits


def test_hf_gpt2_loads_into_fastlm_with_matching_logits(tmp_path):
    hf = _hf_model()
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    m = GPT.from_pretrained(tmp_path)
    idx = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        assert (m(idx) - _logits_hf(hf, idx)).abs().max().item() <= 1e-4
    assert m.config.block_size == 40 and m.config.eos_token_id == 96


def test_fastlm_saves_what_transformers_loads_with_matching_logits(tmp_path):
    torch.manual_seed(1)
    m = GPT(GPTConfig(vocab_size=97, block_size=40, n_layer=2, n_head=4, n_embd=48)).eval()
    m.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "model.safetensors"]
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 97, (3, 17))
    with torch.no_grad():
        assert (m(idx) - _logits_hf(hf, idx)).abs().max().item() <= 1e-4


def test_sharded_and_prefixless_checkpoints(tmp_path):
    hf = _hf_model(seed=2)
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    from fastlm.checkpoint import save_tensors
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"a.safetensors": keys[:half], "b.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_tensors(tmp_path / name, {k: sd[k] for k in ks})
    index = {"weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    m = GPT.from_pretrained(tmp_path)
    idx = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert (m(idx) - _logits_hf(hf, idx)).abs().max().item() <= 1e-4


def test_save_pretrained_sharded_round_trip(tmp_path):
    torch.manual_seed(3)
    m = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)).eval()
    m.save_pretrained(tmp_path, max_shard_size=4000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    m2 = GPT.from_pretrained(tmp_path)
    idx = torch.randint(0, 50, (2, 7))
    assert torch.equal(m(idx), m2(idx))


def test_modern_variant_round_trip(tmp_path):
    torch.manual_seed(4)
    cfg = GPTConfig(vocab_size=61, block_size=24, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                    norm="rmsnorm", pos="rope", mlp="swiglu", bias=False)
    m = GPT(cfg).eval()
    m.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "fastlm"
    m2 = GPT.from_pretrained(tmp_path)
    assert m2.config == cfg
    idx = torch.randint(0, 61, (2, 11))
    assert torch.equal(m(idx), m2(idx))


def test_bin_checkpoint_is_read_with_weights_only(tmp_path):
    hf = _hf_model(seed=5)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    m = GPT.from_pretrained(tmp_path)
    idx = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        assert (m(idx) - _logits_hf(hf, idx)).abs().max().item() <= 1e-4


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_code_is_refused(tmp_path):
    torch.save({"x": _Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_state_dict(tmp_path)


def test_corrupted_safetensors_gives_clear_error(tmp_path):
    torch.manual_seed(6)
    GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8)).save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        GPT.from_pretrained(tmp_path)


def test_mismatched_checkpoint_names_the_tensors(tmp_path):
    hf = _hf_model(seed=7)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_layer"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing tensors: transformer\.h\.2\."):
        GPT.from_pretrained(tmp_path)
    cfg["n_layer"], cfg["n_embd"] = 2, 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="wrongly shaped tensors"):
        GPT.from_pretrained(tmp_path)
    cfg["n_embd"], cfg["n_layer"] = 48, 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: transformer\.h\.1\."):
        GPT.from_pretrained(tmp_path)


def test_bad_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GPT.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 8,
                                                      "vocab_size": 10, "activation_function": "relu"}))
    with pytest.raises(CheckpointError, match="activation_function 'relu'"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 8,
                                                      "vocab_size": 10}))
    with pytest.raises(FileNotFoundError, match="no weights"):
        GPT.from_pretrained(tmp_path)


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def _tiny(seed, **kw):
    torch.manual_seed(seed)
    base = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)
    base.update(kw)
    return GPT(GPTConfig(**base)).eval()


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_config_checked_against_the_weights_before_allocating(tmp_path):
    _tiny(0).save_pretrained(tmp_path / "gpt2")
    _tiny(0, pos="rope", norm="rmsnorm").save_pretrained(tmp_path / "modern")
    cfg = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    modern = json.loads((tmp_path / "modern" / "config.json").read_text())
    cases = [
        ("gpt2", {**cfg, "vocab_size": 10**12}, "wrongly shaped"),
        ("gpt2", {**cfg, "n_embd": 2**40, "n_head": 1}, "wrongly shaped|buildable"),
        ("gpt2", {**cfg, "n_layer": 10**9}, "asks for 1000000000 layers"),
        ("gpt2", {**cfg, "n_positions": 10**12}, "wrongly shaped"),
        # no weight pins a rotary model's context: the tables it would need are bounded instead
        ("modern", {**modern, "fastlm": {**modern["fastlm"], "block_size": 10**10}}, "bytes of buffers"),
        ("modern", {**modern, "fastlm": {**modern["fastlm"], "n_layer": "2"}}, "bad fastlm config"),
        ("gpt2", {**cfg, "n_layer": [2]}, "bad GPT-2 config"),
    ]
    for folder, config, match in cases:
        (tmp_path / folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=match):
            GPT.from_pretrained(tmp_path / folder)
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps(cfg))
    assert _same_weights(GPT.from_pretrained(tmp_path / "gpt2"), _tiny(0))
    # a rotary model may still ask for a long context when its tables stay within the bound
    modern["fastlm"]["block_size"] = 4096
    (tmp_path / "modern" / "config.json").write_text(json.dumps(modern))
    assert GPT.from_pretrained(tmp_path / "modern").config.block_size == 4096


def test_resaving_sharded_never_mixes_old_and_new_shards(tmp_path, monkeypatch):
    from fastlm.models import checkpoint

    old, new = _tiny(1), _tiny(2)
    old.save_pretrained(tmp_path, max_shard_size=4000)
    old_shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(old_shards) >= 3
    (tmp_path / "tokenizer.json").write_text("{}")  # other files stay

    # A crash while the new shards are written: the folder still loads the old model.
    real = checkpoint.save_tensors
    calls = []

    def crash_on_third(path, tensors, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(path, tensors, metadata)

    monkeypatch.setattr(checkpoint, "save_tensors", crash_on_third)
    with pytest.raises(OSError, match="No space"):
        new.save_pretrained(tmp_path, max_shard_size=4000)
    monkeypatch.setattr(checkpoint, "save_tensors", real)
    assert _same_weights(GPT.from_pretrained(tmp_path), old)
    assert sorted(p.name for p in tmp_path.iterdir() if "safetensors" in p.name) == sorted(
        old_shards + ["model.safetensors.index.json"])

    # A crash after the switch, while the new shards get their usual names: the new model.
    real_link = checkpoint._link_or_copy
    monkeypatch.setattr(checkpoint, "_link_or_copy", lambda src, dst: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError, match="killed"):
        new.save_pretrained(tmp_path, max_shard_size=4000)
    monkeypatch.setattr(checkpoint, "_link_or_copy", real_link)
    assert _same_weights(GPT.from_pretrained(tmp_path), new)

    # The next save finishes the job: usual names, fewer shards, nothing stale left behind.
    new.save_pretrained(tmp_path, max_shard_size=8000)
    names = sorted(p.name for p in tmp_path.iterdir())
    shards = [n for n in names if n.startswith("model-")]
    assert shards and len(shards) < len(old_shards) and all(n.endswith(f"-of-{len(shards):05d}.safetensors")
                                                            for n in shards)
    assert not [n for n in names if n.startswith(".")]
    assert "tokenizer.json" in names
    assert _same_weights(GPT.from_pretrained(tmp_path), new)
    # Back to one file: the shards and the index go.
    old.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json",
                                                          "model.safetensors", "tokenizer.json"]
    assert _same_weights(GPT.from_pretrained(tmp_path), old)


def test_metadata_json_bounded(tmp_path, monkeypatch):
    from fastlm import _io

    _tiny(0).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="nested too deep"):
        GPT.from_pretrained(tmp_path)
    monkeypatch.setattr(_io, "MAX_JSON_BYTES", 1000)
    (tmp_path / "config.json").write_text(json.dumps({"pad": "x" * 2000}))
    with pytest.raises(CheckpointError, match="longer than a metadata file"):
        GPT.from_pretrained(tmp_path)


def test_bin_checkpoints_refused_where_torch_load_is_unsafe(tmp_path, monkeypatch):
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    assert torch.equal(load_state_dict(tmp_path)["w"], torch.ones(2))
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(CheckpointError, match="CVE-2025-32434"):
        load_state_dict(tmp_path)
