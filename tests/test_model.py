"""The GPT model: shapes, loss, options, backends agreeing, compile."""
import pytest
import torch
import torch.nn.functional as F

import fastlm.ops as ops
from fastlm import GPT, GPTConfig

SMALL = dict(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=32)
VARIANTS = {
    "gpt2": {},
    "modern": dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, n_kv_head=2),
    "gqa-learned": dict(n_kv_head=1),
    "untied": dict(tie_word_embeddings=False),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_shapes_and_loss(variant):
    torch.manual_seed(0)
    m = GPT(GPTConfig(**SMALL, **VARIANTS[variant]))
    idx = torch.randint(0, 101, (3, 11))
    logits = m(idx)
    assert logits.shape == (3, 11, 101)
    tgt = torch.randint(0, 101, (3, 11))
    logits2, loss = m(idx, targets=tgt)
    assert torch.equal(logits, logits2)
    assert torch.allclose(loss, F.cross_entropy(logits.view(-1, 101), tgt.view(-1)), rtol=1e-6)
    # An untrained GPT-2-initialised model predicts roughly uniformly.
    assert abs(loss.item() - torch.log(torch.tensor(101.0)).item()) < 0.5
    fused = m.loss(idx, tgt)
    assert torch.allclose(fused, loss, rtol=1e-5)
    fused.backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_labels_are_shifted_inside_as_in_transformers(tmp_path):
    torch.manual_seed(2)
    m = GPT(GPTConfig(**SMALL)).eval()
    idx = torch.randint(0, 101, (3, 11))
    labels = idx.clone()
    labels[0, 4] = -100
    logits, loss = m(idx, labels=labels)
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, 101), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(loss, manual, rtol=1e-5)
    assert torch.allclose(m.loss(idx, labels=labels), loss, rtol=1e-5)
    # the loss transformers' GPT2LMHeadModel gives for the same weights and labels
    transformers = pytest.importorskip("transformers")
    m.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert abs(hf(idx, labels=labels).loss.item() - loss.item()) < 1e-4
    # targets= keeps its meaning (already shifted), and the shifted form gives the same loss
    _, same_position = m(idx, targets=idx)
    assert torch.allclose(same_position, F.cross_entropy(logits.reshape(-1, 101), idx.reshape(-1)), rtol=1e-5)
    _, shifted = m(idx[:, :-1], targets=idx[:, 1:])
    assert torch.allclose(shifted, m(idx, labels=idx)[1], rtol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        m(idx, targets=idx, labels=idx)
    with pytest.raises(ValueError, match="shaped like idx"):
        m(idx, labels=idx[:, 1:])
    with pytest.raises(TypeError, match="needs targets"):
        m.loss(idx)
    # the recurrent baselines take labels the same way
    from fastlm import build_model

    rnn = build_model(GPTConfig(arch="gru", vocab_size=101, n_layer=1, n_embd=16, n_head=1)).eval()
    logits, loss = rnn(idx, labels=idx)
    assert torch.allclose(loss, F.cross_entropy(logits[:, :-1].reshape(-1, 101), idx[:, 1:].reshape(-1)), rtol=1e-5)
    assert torch.allclose(rnn.loss(idx, labels=idx), loss, rtol=1e-5)


def test_causality_future_tokens_do_not_change_past_logits():
    torch.manual_seed(1)
    for variant in VARIANTS.values():
        m = GPT(GPTConfig(**SMALL, **variant)).eval()
        a = torch.randint(0, 101, (1, 12))
        b = a.clone()
        b[0, 8:] = (b[0, 8:] + 1) % 101
        assert torch.allclose(m(a)[:, :8], m(b)[:, :8], atol=1e-6)


def test_num_parameters_gpt2_small_matches_known_count():
    m = GPT(GPTConfig(n_layer=1, n_head=12, n_embd=768))
    per_block = 12 * 768 * 768 + 13 * 768
    assert m.num_parameters() == 50257 * 768 + 1024 * 768 + per_block + 2 * 768
    assert m.num_parameters(exclude_embeddings=True) == m.num_parameters() - 1024 * 768


def test_weights_are_tied_and_initialised_like_gpt2():
    torch.manual_seed(0)
    m = GPT(GPTConfig(**SMALL))
    assert m.lm_head.weight is m.transformer.wte.weight
    std = m.transformer.h[0].attn.c_attn.weight.std().item()
    assert 0.015 < std < 0.025
    proj = m.transformer.h[0].mlp.c_proj.weight.std().item()
    assert proj < std * 0.75  # residual projections are scaled down by 1/sqrt(2 * n_layer)


def test_kernel_and_reference_backends_agree():
    torch.manual_seed(2)
    for variant in VARIANTS.values():
        m = GPT(GPTConfig(**SMALL, **variant))
        idx = torch.randint(0, 101, (2, 13))
        with ops.use_backend("reference"):
            ref = m.loss(idx, idx)
            ref.backward()
        g_ref = [p.grad.clone() for p in m.parameters()]
        m.zero_grad()
        out = m.loss(idx, idx)
        out.backward()
        assert torch.allclose(out, ref, rtol=1e-5)
        for p, g in zip(m.parameters(), g_ref):
            assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6)


def test_bad_config_and_inputs_raise():
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=4, n_kv_head=3, n_embd=32)
    with pytest.raises(ValueError, match="norm"):
        GPTConfig(norm="batchnorm")
    m = GPT(GPTConfig(**SMALL))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        m(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        m(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="shape"):
        m(torch.zeros(3, dtype=torch.long))


def test_dropout_is_active_only_in_training():
    torch.manual_seed(3)
    m = GPT(GPTConfig(**SMALL, dropout=0.5))
    idx = torch.randint(0, 101, (2, 9))
    m.eval()
    assert torch.equal(m(idx), m(idx))
    m.train()
    assert not torch.equal(m(idx), m(idx))


def test_torch_compile_fullgraph_model():
    torch._dynamo.reset()
    torch.manual_seed(4)
    m = GPT(GPTConfig(**SMALL))
    idx = torch.randint(0, 101, (2, 10))
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(idx), m(idx), atol=1e-5)
