"""GPT.quantize: the model with its linear layers' weights in bf16, fp16, int8 (q8_0) or int4
(q4_0). Its logits, from the full forward, the prefill and the decode steps, against the same
model in float64 with every weight replaced by its dequantized value (the product the kernels
must compute), and generation end to end with each format."""
import copy

import pytest
import torch
import torch.nn as nn

from fastlm import GPT, GPTConfig, ops
from fastlm import reference as R
from fastlm.generation import KVCache
from fastlm.models.quant import WEIGHT_FORMATS, QuantLinear

from conftest import rel_error

FORMATS = list(WEIGHT_FORMATS)  # int8, int4, bf16, fp16
GPT2_LIKE = dict()
MODERN = dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, n_kv_head=1)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=211, block_size=64, n_layer=2, n_head=2, n_embd=64, initializer_range=0.1)
    return GPT(GPTConfig(**{**cfg, **kw})).eval()


class _RoundedInput(nn.Module):
    """A float linear layer fed its input rounded to q8_0, as the int8 and int4 kernels round it."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(R.quantize_activations_q8_0(x).to(x.dtype))


def _dequantized_float64(fp32, quantized):
    """``fp32`` in float64 with each linear layer's weight replaced by what the quantized
    model's packed weight stands for, and its input rounded to q8_0 where the format rounds it
    (float layers of the quantized model kept as they are)."""
    ref = copy.deepcopy(fp32).double()
    qmods = dict(quantized.named_modules())
    with torch.no_grad():
        for name, m in list(ref.named_modules()):
            q = qmods.get(name)
            if isinstance(m, nn.Linear) and isinstance(q, QuantLinear):
                m.weight = nn.Parameter(R.unpack_decode_weight_q(q.weight_q, q.format, q.out_features,
                                                                 q.in_features).double())
                if q.format in ("q8_0", "q4_0"):
                    parent = ref.get_submodule(name.rpartition(".")[0]) if "." in name else ref
                    setattr(parent, name.rpartition(".")[2], _RoundedInput(m))
    return ref


def _decode_logits(model, prompt, steps):
    """Logits of the prefill's last prompt token and of ``steps`` greedy decode steps, (steps + 1, V)."""
    cache = KVCache(model, 1, len(prompt) + steps)
    out = [cache.prefill([prompt])[0]]
    for _ in range(steps):
        out.append(cache.decode(out[-1].argmax().view(1), [True])[0])
    return torch.stack(out)


@pytest.mark.parametrize("arch", [GPT2_LIKE, MODERN], ids=["gpt2", "modern"])
@pytest.mark.parametrize("weights", FORMATS)
def test_quantized_logits_match_the_dequantized_float64_model(weights, arch):
    fp32 = _model(**arch)
    model = copy.deepcopy(fp32).quantize(weights)
    assert model.quantization == {"weights": weights, "keep_head": False}
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, QuantLinear))]
    assert linears and all(isinstance(m, QuantLinear) and m.weights == weights for m in linears)
    assert isinstance(model.lm_head, QuantLinear)  # the tied output layer too
    ref = _dequantized_float64(fp32, model)
    prompt = torch.randint(0, 211, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    steps = 6
    got = _decode_logits(model, prompt, steps)
    seq = prompt + got[:-1].argmax(-1).tolist()
    with ops.use_backend("reference"), torch.no_grad():
        want = ref(torch.tensor([seq]))[0, len(prompt) - 1:]
        full = model(torch.tensor([seq]))[0, len(prompt) - 1:]  # the quantized full forward
    assert got.dtype == torch.float32
    # int8 / int4 round each linear layer's input to 8 bits; an input that float32 (the kernels)
    # and float64 (the reference) put on either side of a rounding boundary moves the logits by
    # one step of that rounding (about 1e-4 here), which happens on some CPUs and not others
    tol = 2e-3 if weights in ("int8", "int4") else 2e-5
    assert rel_error(got, want) < tol
    assert rel_error(full, want) < tol
    # and quantization changed the logits by about the format's own error, no more (random
    # Gaussian weights: q4_0 rounds each by ~10% of its block's range, and that compounds
    # through the layers; int8 rounds the weights and the layers' inputs to 8 bits; the
    # quality on a trained model is test_quantize_quality.py's)
    with torch.no_grad():
        base = fp32(torch.tensor([seq]))[0, len(prompt) - 1:]
    err = rel_error(got, base)
    assert err < {"int8": 4e-2, "int4": 0.5, "bf16": 1e-2, "fp16": 2e-3}[weights]
    if weights == "int4":
        assert err > 1e-3  # the 4-bit weights are in use, not the float ones


def test_keep_head_keeps_the_tied_output_layer_in_float():
    fp32 = _model()
    model = copy.deepcopy(fp32).quantize("int8", keep_head=True)
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.transformer.wte.weight
    assert isinstance(model.transformer.h[0].mlp.c_fc, QuantLinear)
    ref = _dequantized_float64(fp32, model)
    prompt = [5, 17, 42, 8]
    got = _decode_logits(model, prompt, 3)
    seq = prompt + got[:-1].argmax(-1).tolist()
    with ops.use_backend("reference"), torch.no_grad():
        want = ref(torch.tensor([seq]))[0, len(prompt) - 1:]
    assert rel_error(got, want) < 2e-5


@pytest.mark.parametrize("weights", FORMATS)
def test_generation_end_to_end(weights):
    fp32 = _model(seed=1)
    model = copy.deepcopy(fp32).quantize(weights)
    ref = _dequantized_float64(fp32, model)
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    out = model.generate(torch.tensor([prompts[0]]), max_new_tokens=12)
    assert out.shape == (1, 17) and out[0, :5].tolist() == prompts[0]
    # each greedy token is the most likely one of the dequantized float64 model, up to
    # float32 rounding (a near tie may go either way)
    with ops.use_backend("reference"), torch.no_grad():
        lg = ref(out)[0, 4:-1]
    chosen = lg.gather(-1, out[0, 5:].view(-1, 1)).squeeze(-1)
    assert bool((chosen >= lg.max(-1).values - 1e-4 * lg.abs().max()).all())
    # sampling and a batch of prompts of different lengths run too
    from fastlm.generation.generate import generate

    res = generate(model, prompts, max_new_tokens=5, do_sample=True, temperature=0.8, seed=0)
    assert [len(r) for r in res] == [10, 8]


def test_loss_and_dtype_moves_keep_the_packed_weights():
    fp32 = _model()
    model = copy.deepcopy(fp32).quantize("bf16")
    idx = torch.randint(0, 211, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits, loss = model(idx, labels=idx)
        assert torch.allclose(model.loss(idx, labels=idx), loss)
    wq = model.transformer.h[0].attn.c_attn.weight_q
    assert wq.dtype == torch.bfloat16
    model.to(torch.float64)  # the compute dtype changes; the packed format does not
    assert model.transformer.h[0].attn.c_attn.weight_q.dtype == torch.bfloat16
    assert model.transformer.h[0].attn.c_attn.bias.dtype == torch.float64
    with torch.no_grad():
        assert rel_error(model(idx), logits) < 1e-5
    # the packed weights are buffers: not parameters, no gradients
    assert all(not n.endswith("weight_q") for n, _ in model.named_parameters())


def test_bad_requests_are_refused():
    model = _model()
    with pytest.raises(ValueError, match="weights must be one of"):
        model.quantize("int3")
    with pytest.raises(ValueError, match="weights must be one of"):
        model.quantize("q8_0")  # the packed format's name is not a model format
    with pytest.raises(TypeError, match="keep_head must be a bool"):
        model.quantize("int8", keep_head="yes")
    assert model.quantization is None
    model.quantize("int8")
    with pytest.raises(ValueError, match="already quantized"):
        model.quantize("int4")


# ----------------------------------------------------------------------------- quantized checkpoints
@pytest.mark.parametrize("weights,keep_head", [("int8", False), ("int4", True), ("bf16", False), ("fp16", False)])
def test_saved_quantized_checkpoint_loads_back_quantized(tmp_path, weights, keep_head):
    import json

    from fastlm import load_model
    from fastlm._io import load_tensors

    model = _model().quantize(weights, keep_head=keep_head)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "fastlm", "weights": weights, "keep_head": keep_head,
                                          "layout": 2}
    stored = load_tensors(tmp_path / "model.safetensors")
    wq = model.transformer.h[0].mlp.c_fc.weight_q
    assert torch.equal(stored["transformer.h.0.mlp.c_fc.weight_q"], wq)  # the packed blocks, as they are
    assert not any(k.endswith("c_fc.weight") for k in stored)
    assert ("lm_head.weight_q" in stored) != keep_head
    for loaded in (GPT.from_pretrained(tmp_path), load_model(tmp_path), GPT.from_pretrained(tmp_path, weights=weights)):
        assert loaded.quantization == {"weights": weights, "keep_head": keep_head}
        assert isinstance(loaded.lm_head, nn.Linear if keep_head else QuantLinear)
        sd, want = loaded.state_dict(), model.state_dict()
        assert sd.keys() == want.keys() and all(torch.equal(sd[k], want[k]) for k in sd)
        ids = [4, 8, 15, 16, 23, 42]
        assert loaded.generate(torch.tensor([ids]), max_new_tokens=6).tolist() == \
            model.generate(torch.tensor([ids]), max_new_tokens=6).tolist()
    with pytest.raises(ValueError, match="cannot be loaded as"):
        GPT.from_pretrained(tmp_path, weights="fp32")
    with pytest.raises(ValueError, match="cannot be loaded as"):
        GPT.from_pretrained(tmp_path, weights="int4" if weights != "int4" else "int8")


def test_float_checkpoint_quantized_on_load_and_bad_configs(tmp_path):
    import json

    from fastlm.models import CheckpointError

    fp32 = _model()
    fp32.save_pretrained(tmp_path / "f")
    model = GPT.from_pretrained(tmp_path / "f", weights="int8")
    want = copy.deepcopy(fp32).quantize("int8")
    assert model.quantization == want.quantization
    assert torch.equal(model.transformer.h[1].attn.c_proj.weight_q, want.transformer.h[1].attn.c_proj.weight_q)
    assert GPT.from_pretrained(tmp_path / "f", weights="fp32").quantization is None
    with pytest.raises(ValueError, match="weights must be fp32 or one of"):
        GPT.from_pretrained(tmp_path / "f", weights="q8_0")
    # a config.json that claims a format its tensors do not have, or a foreign quantizer
    want.save_pretrained(tmp_path / "q")
    cfg_path = tmp_path / "q" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for bad, match in [({"quant_method": "fastlm", "weights": "int4", "keep_head": False}, "wrongly shaped"),
                       ({"quant_method": "fastlm", "weights": "int8", "keep_head": True}, "unexpected tensors: lm_head.weight_q"),
                       ({"quant_method": "gptq", "bits": 4}, "not fastlm's"),
                       ({"quant_method": "fastlm", "weights": "int2"}, "needs weights in"),
                       ({"quant_method": "fastlm", "weights": "int8", "keep_head": False, "layout": 3}, "layout 3"),
                       ("int8", "not fastlm's")]:
        cfg_path.write_text(json.dumps({**cfg, "quantization_config": bad}))
        with pytest.raises(CheckpointError, match=match):
            GPT.from_pretrained(tmp_path / "q")


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_checkpoint_in_the_first_packed_layout_loads(tmp_path, weights):
    """A quantized checkpoint written before the packed blocks were grouped by 4 along K (its
    config states no layout, its bytes are each block's rows) loads as the same model."""
    import json

    from fastlm._io import load_tensors, save_tensors

    model = _model().quantize(weights)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["quantization_config"]["layout"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    W = R.DECODE_PANEL
    rows = R.QUANT_BLOCK if weights == "int8" else R.QUANT_BLOCK // 2
    old = {}
    for k, v in load_tensors(tmp_path / "model.safetensors").items():
        if k.endswith(".weight_q"):  # byte [g][c][t] back to byte [4 g + t][c]
            P, nb, _ = v.shape
            vals = v[..., : rows * W].reshape(P, nb, rows // 4, W, 4).transpose(3, 4).reshape(P, nb, rows * W)
            v = torch.cat([vals, v[..., rows * W:]], dim=-1).contiguous()
            assert not torch.equal(v, model.state_dict()[k])
        old[k] = v
    save_tensors(tmp_path / "model.safetensors", old)
    loaded = GPT.from_pretrained(tmp_path)
    sd, want = loaded.state_dict(), model.state_dict()
    assert all(torch.equal(sd[k], want[k]) for k in want)


# ----------------------------------------------------------------------------- the CLI: --weights
def test_cli_generate_and_serve_take_weights(tmp_path, capsys, monkeypatch):
    import fastlm
    import fastlm.serve
    from fastlm.cli import main

    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer " * 4
    tok = fastlm.Tokenizer.train([text], vocab_size=300)
    torch.manual_seed(0)
    fp32 = GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=64, n_layer=2, n_head=4, n_embd=32,
                         initializer_range=0.3, eos_token_id=tok.eot_token)).eval()
    fp32.save_pretrained(tmp_path / "f")
    tok.save(tmp_path / "f")
    args = ["--prompt", "whether", "--max-new-tokens", "8"]
    for weights in ("int8", "int4", "bf16", "fp16", "fp32"):
        assert main(["generate", "--model", str(tmp_path / "f"), "--weights", weights, *args]) == 0
        printed = capsys.readouterr().out
        model = copy.deepcopy(fp32) if weights == "fp32" else copy.deepcopy(fp32).quantize(weights)
        pipe = fastlm.pipeline("text-generation", model=model, tokenizer=tok)
        assert printed == pipe("whether", max_new_tokens=8)[0]["generated_text"] + "\n"
    with pytest.raises(ValueError, match="model.quantize"):
        fastlm.pipeline("text-generation", model=fp32, tokenizer=tok, weights="int8")
    # a saved quantized checkpoint: quantized without the flag; another format is refused
    copy.deepcopy(fp32).quantize("int4").save_pretrained(tmp_path / "q")
    tok.save(tmp_path / "q")
    assert main(["generate", "--model", str(tmp_path / "q"), *args]) == 0
    assert main(["generate", "--model", str(tmp_path / "q"), "--weights", "int4", *args]) == 0
    assert main(["generate", "--model", str(tmp_path / "q"), "--weights", "int8", *args]) == 2
    assert "holds int4 weights" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(tmp_path / "f"), "--weights", "int3", *args])
    # serve: the flag reaches the loader, which quantizes
    import uvicorn

    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(kw, app=app))
    assert main(["serve", "--model", str(tmp_path / "f"), "--weights", "int8"]) == 0
    assert ran["app"].state.fastlm.model.quantization == {"weights": "int8", "keep_head": False}
    fastlm.serve.serve(tmp_path / "q")
    assert ran["app"].state.fastlm.model.quantization == {"weights": "int4", "keep_head": False}
