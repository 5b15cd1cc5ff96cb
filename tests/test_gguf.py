"""GGUF in and out (fastlm.models.gguf): round trips at every type, the tokenizer inside the
file, the quantized blocks equal to fastlm's own llama.cpp-format quantizers, and hostile or
foreign files rejected with clear errors. (llama.cpp itself runs fastlm's files in
bench/test_generate.py, a benchmark-only dependency.)"""
import pathlib

import numpy as np
import pytest
import torch

from fastlm import GPT, GPTConfig, Tokenizer, reference
from fastlm._io import CheckpointError
from fastlm.models import gguf as G

gguf = pytest.importorskip("gguf")

TEXT = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. "
        "You are all resolved rather to die than to famish? Resolved. resolved. ") * 40


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT], 300)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=310, block_size=48, n_layer=2, n_head=4, n_embd=64)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def test_f32_round_trip_is_exact(tmp_path, tok):
    m = _model()
    p = m.save_gguf(tmp_path / "m.gguf", "f32", tok)
    back = GPT.from_pretrained(p)
    assert back.config.n_layer == 2 and back.config.n_embd == 64 and back.config.vocab_size == 310
    assert back.config.tie_word_embeddings
    for (k, a), (k2, b) in zip(m.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    x = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(m.generate(x, max_new_tokens=12), back.generate(x, max_new_tokens=12))


@pytest.mark.parametrize("dtype", ["f16", "q8_0", "q4_0"])
def test_reduced_types_match_fastlm_quantizers(tmp_path, tok, dtype):
    m = _model(seed=2)
    back = GPT.from_pretrained(m.save_gguf(tmp_path / f"m-{dtype}.gguf", dtype, tok))
    for key, w in m.state_dict().items():
        got = back.state_dict()[key]
        if w.dim() == 2 and key != "transformer.wpe.weight":
            if dtype == "f16":
                want = w.half().float()
            else:
                q, s = (reference.quantize_q8_0 if dtype == "q8_0" else reference.quantize_q4_0)(w)
                vals = q.float() if dtype == "q8_0" else q.float() - 8
                want = (vals.view(w.shape[0], -1, reference.QUANT_BLOCK) * s.float().unsqueeze(-1)).view(w.shape[0], -1)
                want = want[:, :w.shape[1]]
            # llama.cpp's blocks (written by the gguf package) are fastlm's own, value for value
            assert torch.equal(got, want), (key, (got - want).abs().max().item())
        else:  # norms, biases, positions stay float32
            assert torch.equal(got, w), key


def test_untied_head_and_tokenizer_inside(tmp_path, tok):
    m = _model(seed=3, tie_word_embeddings=False)
    p = m.save_gguf(tmp_path / "u.gguf", "f32", tok)
    back = GPT.from_pretrained(p)
    assert not back.config.tie_word_embeddings
    assert torch.equal(back.lm_head.weight, m.lm_head.weight)
    t2 = Tokenizer.load(p)
    for s in (TEXT[:200], "Speak, speak! <|endoftext|> famish?", "naïve ünïcödé"):
        assert t2.encode(s, allowed_special="all") == tok.encode(s, allowed_special="all")
    assert t2.special_tokens == tok.special_tokens
    rd = gguf.GGUFReader(p)
    types = [int(rd.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in rd.fields["tokenizer.ggml.token_type"].data]
    assert len(types) == 310 and types[305] == int(gguf.TokenType.UNUSED)  # ids past the tokenizer's 300
    assert bytes(rd.fields["general.architecture"].parts[-1]).decode() == "gpt2"


def test_only_gpt2_architectures_export(tmp_path, tok):
    for change in (dict(pos="rope"), dict(norm="rmsnorm"), dict(mlp="swiglu"), dict(bias=False),
                   dict(n_kv_head=2), dict(qk_norm=True), dict(mlp="relu2"), dict(logit_softcap=5.0)):
        with pytest.raises(ValueError, match="GPT-2 architecture"):
            _model(**change).save_gguf(tmp_path / "x.gguf", "f32", tok)
    with pytest.raises(ValueError, match="tokenizer"):
        _model().save_gguf(tmp_path / "x.gguf", "f32")
    with pytest.raises(ValueError, match="dtype"):
        _model().save_gguf(tmp_path / "x.gguf", "q3_k", tok)
    assert not (tmp_path / "x.gguf").exists()


def _write(path, arch="gpt2", n_layer=1, tensors=None, ctx=48, n_embd=16, head=2):
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(ctx)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(4 * n_embd)
    w.add_block_count(n_layer)
    w.add_head_count(head)
    w.add_layer_norm_eps(1e-5)
    for name, a in (tensors or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_hostile_and_foreign_files(tmp_path, tok):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        GPT.from_pretrained(junk)
    good = _model().save_gguf(tmp_path / "good.gguf", "f32", tok)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:5000])  # the header promises tensors that are not there
    with pytest.raises(CheckpointError):
        GPT.from_pretrained(cut)
    llama = _write(tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(CheckpointError, match="architecture"):
        GPT.from_pretrained(llama)
    emb = np.zeros((20, 16), np.float32)
    wrong = _write(tmp_path / "wrong.gguf", tensors={"token_embd.weight": emb, "position_embd.weight": np.zeros((48, 15), np.float32)})
    with pytest.raises(CheckpointError, match="shape"):
        GPT.from_pretrained(wrong)
    missing = _write(tmp_path / "missing.gguf", tensors={"token_embd.weight": emb})
    with pytest.raises(CheckpointError, match="missing tensors"):
        GPT.from_pretrained(missing)
    alien = _write(tmp_path / "alien.gguf", tensors={"token_embd.weight": emb, "blk.7.attn_qkv.weight": emb})
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        GPT.from_pretrained(alien)
    # a header declaring a model of about 200 GB beside a few bytes of weights: refused before
    # anything is allocated for the model (it is built on the meta device first)
    wide = _write(tmp_path / "wide.gguf", n_layer=64, n_embd=8192, head=64,
                  tensors={"token_embd.weight": np.zeros((2, 8192), np.float32)})
    with pytest.raises(CheckpointError, match="missing tensors"):
        GPT.from_pretrained(wide)
    huge = _write(tmp_path / "huge.gguf", n_layer=10 ** 6, tensors={"token_embd.weight": emb})
    with pytest.raises(CheckpointError, match="block_count"):
        GPT.from_pretrained(huge)
    with pytest.raises(ValueError):  # no tokenizer inside
        Tokenizer.load(llama)
    with pytest.raises(ValueError, match="overrides"):
        GPT.from_pretrained(good, n_layer=3)
    assert pathlib.Path(good).is_file()
