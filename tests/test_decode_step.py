"""The fused decode step (``ops.gpt_decode_step``, csrc/cpu/decode_step.cpp) against its
specification, the Python step of ``fastlm.models.decode`` run on the same kernels: equal
logits and equal cache contents, at every SIMD level this machine runs, on models of odd
sizes; the models it does not cover take the Python step; bad arguments raise."""
import pytest
import torch

from conftest import CPU_LEVEL_BACKENDS, on_backend
from fastlm import GPT, GPTConfig, ops
from fastlm.generation import KVCache
from fastlm.models import decode
from fastlm.ops import decode_step as fused_ops

pytestmark = pytest.mark.skipif(not fused_ops.available(), reason="needs fastlm's CPU extension")

CONFIGS = [
    dict(vocab_size=61, n_layer=3, n_head=4, n_embd=64),  # layernorm with biases
    dict(vocab_size=97, n_layer=2, n_head=6, n_kv_head=2, n_embd=48, bias=False),  # grouped-query, no biases
    dict(vocab_size=50, n_layer=2, n_head=5, n_embd=40, norm="rmsnorm", n_inner=70),  # head size 8, odd widths
    dict(vocab_size=33, n_layer=1, n_head=1, n_embd=16, layer_norm_epsilon=1e-3),
    dict(vocab_size=20, n_layer=0, n_head=2, n_embd=8),  # no blocks: embeddings, final norm, head
]


def _model(cfg, seed):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=40, **cfg)).eval()
    with torch.no_grad():  # biases and gains away from their initial 0 and 1
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _valid(cache, b, n):
    return [t[b, :, :n] for pair in cache.layers for t in pair]


def _steps_agree(model, cfg, backend):
    gen = torch.Generator().manual_seed(cfg["vocab_size"])
    with on_backend(backend):
        run = decode._Run(model)
        assert run.fused is not None
        prompts = [[int(t) for t in torch.randint(0, cfg["vocab_size"], (n,), generator=gen)] for n in (1, 7, 3)]
        B = len(prompts)
        caches = [KVCache(model, B, 40), KVCache(model, B, 40)]
        for c in caches:
            c.kv.normal_(generator=torch.Generator().manual_seed(5))  # the same stale contents past each row
            c.prefill(prompts)
        tok = torch.randint(0, cfg["vocab_size"], (B,), generator=gen)
        for s in range(6):
            pos = torch.tensor(caches[0].lens)
            lens = pos + 1
            got = decode.step(model, caches[0], tok, pos, lens, run)
            fused, run.fused = run.fused, None
            want = decode.step(model, caches[1], tok, pos, lens, run)
            run.fused = fused
            # the same kernels on the same operands in the same order: equal, not merely close
            assert torch.equal(got, want), f"step {s}: max difference {(got - want).abs().max().item()}"
            for b in range(B):
                n = int(lens[b])
                for x, y in zip(_valid(caches[0], b, n), _valid(caches[1], b, n)):
                    assert torch.equal(x, y)
            for c in caches:
                c.lens = [n + 1 for n in c.lens]
            tok = got.argmax(-1)


@pytest.mark.parametrize("backend", CPU_LEVEL_BACKENDS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"L{c['n_layer']}C{c['n_embd']}H{c['n_head']}")
def test_fused_step_equals_the_python_step(backend, cfg):
    _steps_agree(_model(cfg, seed=len(cfg) + cfg["n_embd"]), cfg, backend)


@pytest.mark.parametrize("backend", CPU_LEVEL_BACKENDS)
@pytest.mark.parametrize("weights,keep_head", [("int8", False), ("int4", False), ("bf16", True), ("fp16", False)])
def test_fused_step_with_quantized_weights(backend, weights, keep_head):
    cfg = dict(CONFIGS[0], n_embd=64, n_head=4)  # K = 64 and 256: whole blocks of 32
    model = _model(cfg, seed=11).quantize(weights, keep_head=keep_head)
    _steps_agree(model, cfg, backend)


def test_generate_uses_it_and_matches_the_full_forward():
    model = _model(CONFIGS[0], seed=3)
    assert decode.decoder(model).fused is not None
    x = torch.randint(0, 61, (1, 5), generator=torch.Generator().manual_seed(0))
    out = model.generate(x, max_new_tokens=12)
    # greedy: each new token is the argmax of the full forward over everything before it
    with torch.no_grad():
        logits = model(out[:, :-1])
    assert torch.equal(logits[0, 4:].argmax(-1), out[0, 5:])


@pytest.mark.parametrize("change", [dict(pos="rope"), dict(mlp="swiglu"), dict(mlp="relu2"), dict(qk_norm=True),
                                    dict(logit_softcap=5.0)])
def test_other_architectures_take_the_python_step(change):
    model = _model({**CONFIGS[0], **change}, seed=1)
    run = decode._Run(model)
    assert run.fused is None
    x = torch.randint(0, 61, (2, 4), generator=torch.Generator().manual_seed(1))
    out = model.generate(x, max_new_tokens=4)
    assert out.shape == (2, 8)


def test_python_step_under_the_reference_backend():
    model = _model(CONFIGS[0], seed=2)
    with ops.use_backend("reference"):
        assert decode._Run(model).fused is None


def test_a_view_over_part_of_a_cache_takes_the_python_step():
    model = _model(CONFIGS[0], seed=4)
    big = KVCache(model, 2, 40)
    view = big.rows(2, 20)  # fewer positions than the storage: not contiguous
    assert decode._fused_caches(view) is None and decode._fused_caches(big) is not None


def _args(model, B=1, L=8):
    run = decode._Run(model)
    cache = KVCache(model, B, L)
    kv = [t for pair in cache.layers for t in pair]
    return run.fused, kv


def test_bad_arguments_raise():
    model = _model(CONFIGS[0], seed=5)
    f, kv = _args(model)
    one = torch.tensor([0])
    call = fused_ops.gpt_decode_step
    with pytest.raises(ValueError, match="outside the vocabulary"):
        call(torch.tensor([61]), one, one + 1, kv=kv, **f)
    with pytest.raises(ValueError, match="outside the cache"):
        call(one, torch.tensor([8]), torch.tensor([8]), kv=kv, **f)
    with pytest.raises(ValueError, match="attend_lens"):
        call(one, torch.tensor([3]), torch.tensor([3]), kv=kv, **f)
    with pytest.raises(ValueError, match="weights per layer"):
        call(one, one, one + 1, kv=kv[:-2], **f)
    with pytest.raises(ValueError, match="contiguous float32"):
        call(one, one, one + 1, kv=[t.transpose(2, 3) for t in kv], **f)
    with pytest.raises(ValueError, match="weight format"):
        call(one, one, one + 1, kv=kv, **{**f, "weight_format": "q3"})
    bad = list(f["weights"])
    bad[2] = bad[2][:, :-1]
    with pytest.raises(ValueError, match="packed float32"):
        call(one, one, one + 1, kv=kv, **{**f, "weights": bad})
