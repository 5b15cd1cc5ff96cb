"""The modded-nanogpt switches of GPTConfig: qk_norm, mlp="relu2", tie_word_embeddings=False,
zero_init_proj, logit_softcap. Each changes the forward as its definition says (checked against
a plain PyTorch computation), the incremental decode over the KV cache equals the full
forward with it, and it is saved to and loaded from config.json."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from fastlm import GPT, GPTConfig
from fastlm.generation import KVCache
from fastlm.models import decode
from fastlm.models.layers import apply_rope

BASE = dict(vocab_size=97, block_size=24, n_layer=2, n_head=2, n_embd=32, initializer_range=0.1)
SWITCHES = {
    "qk_norm": dict(qk_norm=True),
    "qk_norm_rope_rms": dict(qk_norm=True, pos="rope", norm="rmsnorm", bias=False),
    "relu2": dict(mlp="relu2"),
    "untied": dict(tie_word_embeddings=False),
    "zero_init_proj": dict(zero_init_proj=True, tie_word_embeddings=False),
    "softcap": dict(logit_softcap=2.0),
    "all": dict(qk_norm=True, pos="rope", norm="rmsnorm", bias=False, mlp="relu2", tie_word_embeddings=False,
                logit_softcap=3.0),
}


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**BASE, **kw})).eval()


def _randomise(model, seed=1):
    """Every parameter random (a zero-initialised projection would hide the switch under test)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    return model


def _rms(x, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def test_qk_norm_attention_matches_its_definition():
    for pos in ("learned", "rope"):
        model = _randomise(make(qk_norm=True, pos=pos))
        attn, cfg = model.transformer.h[0].attn, model.config
        x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(2))
        rope = model.rope_at(torch.arange(9))
        with torch.no_grad():
            got = attn(x, rope)
            qkv = x.double() @ attn.c_attn.weight.double().t() + attn.c_attn.bias.double()
            q, k, v = qkv.view(2, 9, 3, 2, 16).permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
            q, k = _rms(q, cfg.layer_norm_epsilon), _rms(k, cfg.layer_norm_epsilon)
            if rope is not None:
                q, k = apply_rope(q, rope[0].double(), rope[1].double()), apply_rope(k, rope[0].double(), rope[1].double())
            s = q @ k.transpose(-1, -2) / math.sqrt(16)
            s = s.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
            y = (s.softmax(-1) @ v).transpose(1, 2).reshape(2, 9, 32)
            want = y @ attn.c_proj.weight.double().t() + attn.c_proj.bias.double()
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
        # and the switch matters: the same weights without it give another output
        model.config.qk_norm = attn.qk_norm = False
        with torch.no_grad():
            assert (attn(x, rope) - got).abs().max() > 1e-2


def test_relu2_mlp_matches_its_definition():
    model = _randomise(make(mlp="relu2"))
    mlp = model.transformer.h[1].mlp
    assert mlp.c_fc.weight.shape == (4 * 32, 32)
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h = x.double() @ mlp.c_fc.weight.double().t() + mlp.c_fc.bias.double()
        want = h.clamp(min=0) ** 2 @ mlp.c_proj.weight.double().t() + mlp.c_proj.bias.double()
        torch.testing.assert_close(mlp(x).double(), want, rtol=1e-5, atol=1e-5)


def test_logit_softcap_in_forward_and_in_the_loss():
    capped = _randomise(make(logit_softcap=1.5))
    plain = make()
    plain.load_state_dict(capped.state_dict())
    idx = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        raw, got = plain(idx), capped(idx)
    assert raw.abs().max() > 3.0  # the cap bites
    torch.testing.assert_close(got, 1.5 * torch.tanh(raw / 1.5), rtol=1e-5, atol=1e-5)
    assert got.abs().max() <= 1.5
    # the loss (the fused output layer is bypassed) scores the capped logits, with gradients
    y = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(5))
    loss = capped.loss(idx, y)
    torch.testing.assert_close(loss, F.cross_entropy(got.reshape(-1, 97), y.reshape(-1)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(capped(idx, y)[1], loss)
    loss.backward()
    assert capped.lm_head.weight.grad is not None and capped.lm_head.weight.grad.abs().sum() > 0


def test_untied_head_and_zero_init():
    untied = make(tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.lm_head.weight.abs().sum() > 0
    z = make(zero_init_proj=True, tie_word_embeddings=False)
    for name, p in z.named_parameters():
        if name.endswith("c_proj.weight") or name == "lm_head.weight":
            assert torch.count_nonzero(p) == 0, name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight")):
            assert torch.count_nonzero(p) == p.numel(), name
    # every block is the identity at the start and the output layer predicts uniformly
    idx = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        assert torch.equal(z(idx), torch.zeros(1, 6, 97))
    # tied: the output layer is the embedding, which stays random
    tied = make(zero_init_proj=True)
    assert tied.lm_head.weight is tied.transformer.wte.weight and torch.count_nonzero(tied.lm_head.weight) > 0
    assert torch.count_nonzero(tied.transformer.h[0].mlp.c_proj.weight) == 0


@pytest.mark.parametrize("name", list(SWITCHES))
def test_incremental_decode_equals_full_forward(name):
    model = _randomise(make(**SWITCHES[name]))
    prompts = [[5, 17, 3, 60, 2], [9, 41]]
    new = [[11, 12, 13, 14], [7, 8, 9, 10]]
    cache = KVCache(model, batch_size=2, max_len=BASE["block_size"])
    got = [[row] for row in decode.prefill(model, cache, prompts, rows=[0, 1])]
    for t in range(4):
        positions = torch.tensor([len(p) + t for p in prompts])
        tokens = torch.tensor([new[0][t], new[1][t]])
        logits = decode.step(model, cache, tokens, positions, positions + 1)
        for b in range(2):
            got[b].append(logits[b])
    with torch.no_grad():
        for b in range(2):
            seq = prompts[b] + new[b]
            full = model(torch.tensor([seq]))[0, len(prompts[b]) - 1:]
            torch.testing.assert_close(torch.stack(got[b]), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("switches", [SWITCHES["all"], SWITCHES["untied"], dict(zero_init_proj=True)],
                         ids=["all", "untied", "zero_init_tied"])
def test_save_load_round_trip(switches, tmp_path):
    model = _randomise(make(**switches))
    model.save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    for k, v in switches.items():
        assert hf["fastlm"][k] == v
    # zero_init_proj alone (an initialisation) leaves a model transformers' GPT-2 holds
    assert hf["model_type"] == ("gpt2" if switches == dict(zero_init_proj=True) else "fastlm")
    if not model.config.tie_word_embeddings:
        assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    back = GPT.from_pretrained(tmp_path).eval()
    assert back.config == model.config
    idx = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(back(idx), model(idx))


def test_bad_switch_values():
    for bad, match in [(dict(mlp="relu3"), "mlp must be"), (dict(logit_softcap=0.0), "logit_softcap"),
                       (dict(logit_softcap=float("inf")), "logit_softcap"), (dict(logit_softcap="30"), "logit_softcap"),
                       (dict(qk_norm=1), "qk_norm"), (dict(zero_init_proj="yes"), "zero_init_proj")]:
        with pytest.raises(ValueError, match=match):
            GPTConfig(**{**BASE, **bad})
