"""The command line: fastlm --version, fastlm info, python -m fastlm."""
import json
import subprocess
import sys

import fastlm


def _run(*args):
    return subprocess.run([sys.executable, "-m", "fastlm", *args], capture_output=True, text=True, timeout=120)


def test_version():
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"fastlm {fastlm.__version__}"


def test_info_json():
    r = _run("info", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["fastlm"] == fastlm.__version__
    assert "cpu" in info["backends_usable"] and "reference" in info["backends_usable"]
    assert info["extension_cpu"]["cpu_isa"] == info["cpu_isa"] in ("baseline", "avx2", "avx512", "avx512_vnni", "neon")
    assert info["cpu_isa"] in info["cpu_isas_supported"]
    assert set(info["cpu_native_ops"]) <= {"attention", "decode_attention", "layer_norm", "rms_norm", "gelu",
                                           "decode_linear", "decode_linear_q", "linear_cross_entropy",
                                           "kv_cache_write"}
    assert info["threads"] >= 1


def test_info_text_and_help():
    r = _run("info")
    assert r.returncode == 0 and "backends_usable" in r.stdout
    r = _run()
    assert r.returncode == 0 and "info" in r.stdout


# ----------------------------------------------------------------------------- generate, serve: device, dtype, options
import pytest  # noqa: E402
import torch  # noqa: E402

from fastlm import GPT, GPTConfig  # noqa: E402
from fastlm.cli import main  # noqa: E402

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer " * 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-model")
    tok = fastlm.Tokenizer.train([TEXT], vocab_size=300)
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=64, n_layer=2, n_head=4, n_embd=32, initializer_range=0.3,
                  eos_token_id=tok.eot_token)).save_pretrained(d)
    tok.save(d)
    return d


def test_generate_device_and_dtype(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--prompt", "whether", "--max-new-tokens", "8",
                 "--device", "cpu", "--dtype", "bfloat16"]) == 0
    printed = capsys.readouterr().out
    pipe = fastlm.pipeline("text-generation", model=model_dir, dtype=torch.bfloat16, device="cpu")
    assert pipe.model.transformer.wte.weight.dtype == torch.bfloat16
    assert printed == pipe("whether", max_new_tokens=8)[0]["generated_text"] + "\n"
    if not torch.cuda.is_available():
        assert main(["generate", "--model", str(model_dir), "--prompt", "a", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt", "a", "--device", "warp-drive"]) == 2
    assert "--device" in capsys.readouterr().err


def test_generate_sampling_options_need_do_sample(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--prompt", "whether", "--max-new-tokens", "8"]) == 0
    greedy = capsys.readouterr().out
    assert main(["generate", "--model", str(model_dir), "--prompt", "whether", "--max-new-tokens", "8",
                 "--temperature", "0.7", "--top-k", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == greedy and "--temperature, --top-k are used only with --do-sample" in out.err
    assert main(["generate", "--model", str(model_dir), "--prompt", "whether", "--max-new-tokens", "8",
                 "--temperature", "0.7", "--do-sample", "--seed", "1"]) == 0
    assert "--do-sample" not in capsys.readouterr().err


def test_generate_checkpoint_whose_eos_lies_outside_its_vocabulary(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    tok = fastlm.Tokenizer.train([TEXT], vocab_size=300)
    cfg = transformers.GPT2Config(vocab_size=tok.n_vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    assert cfg.eos_token_id == 50256
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    tok.save(tmp_path)
    with pytest.warns(UserWarning, match="eos_token_id"):
        assert main(["generate", "--model", str(tmp_path), "--prompt", "to be", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("to be")


def test_serve_flags(model_dir, monkeypatch):
    import fastlm.serve

    seen = {}
    monkeypatch.setattr(fastlm.serve, "serve", lambda model_dir, **kw: seen.update(kw, model_dir=model_dir))
    monkeypatch.delenv("FASTLM_API_KEY", raising=False)
    assert main(["serve", "--model", str(model_dir), "--device", "cpu", "--dtype", "bf16", "--allowed-hosts",
                 "api.example, *.corp.example", "--cors-origin", "http://a.example", "--cors-origin",
                 "http://b.example", "--max-connections", "9", "--header-timeout", "2", "--body-timeout", "3",
                 "--idle-timeout", "4", "--send-timeout", "5"]) == 0
    cfg = seen["config"]
    assert seen["device"] == torch.device("cpu") and seen["dtype"] == torch.bfloat16
    assert cfg.allowed_hosts == ("api.example", "*.corp.example")
    assert cfg.cors_origins == ("http://a.example", "http://b.example")
    assert (cfg.max_connections, cfg.header_timeout, cfg.body_timeout, cfg.idle_timeout, cfg.send_timeout) == \
        (9, 2.0, 3.0, 4.0, 5.0)
    assert cfg.api_key is None and cfg.model_name == model_dir.name and cfg.playground
    seen.clear()
    assert main(["serve", "--model", str(model_dir)]) == 0
    assert seen["config"].allowed_hosts is None and seen["device"] is None and seen["dtype"] is None
    assert main(["serve", "--model", str(model_dir), "--no-playground"]) == 0 and not seen["config"].playground
    assert main(["serve", "--model", str(model_dir), "--header-timeout", "0"]) == 2
    assert main(["serve", "--model", str(model_dir), "--allowed-hosts", " , "]) == 2


def test_serve_loads_onto_device_in_dtype(model_dir, monkeypatch):
    import uvicorn

    import fastlm.serve

    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(kw, app=app))
    fastlm.serve.serve(model_dir, dtype=torch.bfloat16, device="cpu")
    st = ran["app"].state.fastlm
    w = st.model.transformer.wte.weight
    assert w.dtype == torch.bfloat16 and w.device.type == "cpu"
    assert st.cfg.allowed_hosts is None and ran["host"] == "127.0.0.1"  # bound to loopback: the loopback names
    fastlm.serve.serve(model_dir, host="0.0.0.0")
    assert ran["app"].state.fastlm.cfg.allowed_hosts == ("*",)  # bound elsewhere: any name, unless narrowed
