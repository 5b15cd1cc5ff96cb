"""Chat input to the text-generation pipeline (transformers' result shape), the chat session that
keeps a conversation within the context, and ``fastlm chat`` driven through a scripted stdin."""
import io
import json

import pytest
import torch

pytest.importorskip("jinja2")

import fastlm  # noqa: E402
from fastlm import GPT, GPTConfig  # noqa: E402
from fastlm.cli import main  # noqa: E402
from fastlm.cli.chat import chat_loop  # noqa: E402
from fastlm.generation import ChatSession, ContextFull, generate  # noqa: E402
from fastlm.tokenizer.chat_template import ChatTemplate  # noqa: E402

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. 你好 😀 ") * 4
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _model_dir(d, template=None, block_size=128):
    tok = fastlm.Tokenizer.train([TEXT], vocab_size=300, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    tok.chat_template = template
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=block_size, n_layer=2, n_head=4, n_embd=32,
                          initializer_range=0.3))
    model.save_pretrained(d)
    tok.save(d)
    return d


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    return _model_dir(tmp_path_factory.mktemp("chatml"), CHATML)


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    return _model_dir(tmp_path_factory.mktemp("plain"))


class _Recorder:
    """Wraps fastlm.pipelines.generate and records the prompts it is given."""

    def __init__(self, monkeypatch):
        import fastlm.pipelines as pipelines

        self.prompts, real = [], pipelines.generate

        def generate(model, prompts, **kw):
            self.prompts.append([list(p) for p in prompts])
            self.stop = kw.get("stop")
            return real(model, prompts, **kw)

        monkeypatch.setattr(pipelines, "generate", generate)


MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be or not?"}]


def test_pipeline_chat_returns_the_conversation(chatml_dir, monkeypatch):
    transformers = pytest.importorskip("transformers")
    rec = _Recorder(monkeypatch)
    pipe = fastlm.pipeline("text-generation", model=chatml_dir)
    msgs = [dict(m) for m in MSGS]
    out = pipe(msgs, max_new_tokens=8)
    assert msgs == MSGS  # the caller's messages are not changed
    assert isinstance(out, list) and len(out) == 1 and set(out[0]) == {"generated_text"}
    conv = out[0]["generated_text"]
    assert conv[:2] == MSGS and len(conv) == 3 and conv[2]["role"] == "assistant"
    # the prompt given to generation is the template as transformers renders it, its special
    # tokens as special tokens
    hf = transformers.AutoTokenizer.from_pretrained(str(chatml_dir))
    text = hf.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    tok = pipe.tokenizer
    prompt = tok.encode(text, allowed_special="all")
    assert rec.prompts[-1] == [prompt] and prompt.count(tok.special_tokens["<|im_start|>"]) == 3
    # the reply is what generation makes of that prompt
    want = generate(pipe.model, prompt, max_new_tokens=8, tokenizer=tok, return_dict_in_generate=True,
                    eos_token_id=tok.eot_token)
    assert conv[2]["content"] == want.texts[0]
    assert pipe(MSGS, max_new_tokens=8, return_full_text=False) == [{"generated_text": want.texts[0]}]
    ids = pipe(MSGS, max_new_tokens=8, return_tensors=True)[0]["generated_token_ids"]
    assert ids == prompt + want.tokens[0]


def test_pipeline_chat_batches_prefill_and_samples(chatml_dir, monkeypatch):
    rec = _Recorder(monkeypatch)
    pipe = fastlm.pipeline("text-generation", model=chatml_dir)
    other = [{"role": "user", "content": "whether 'tis nobler"}]
    out = pipe([MSGS, other], max_new_tokens=5)
    assert len(out) == 2 and all(len(group) == 1 for group in out)
    assert out[1][0]["generated_text"][:1] == other and out[1][0]["generated_text"][1]["role"] == "assistant"
    assert len(rec.prompts[-1]) == 2
    # a chat ending with the assistant's words: the reply continues them (no end-of-turn after them)
    prefill = other + [{"role": "assistant", "content": "Aye, "}]
    res = pipe(prefill, max_new_tokens=5)[0]["generated_text"]
    assert len(res) == 2 and res[1]["role"] == "assistant" and res[1]["content"].startswith("Aye, ")
    tok = pipe.tokenizer
    assert tok.decode(rec.prompts[-1][0]).endswith("<|im_start|>assistant\nAye, ")
    samples = pipe(MSGS, max_new_tokens=5, do_sample=True, num_return_sequences=3, seed=1)
    assert len(samples) == 3 and all(s["generated_text"][:2] == MSGS for s in samples)
    with pytest.raises(ValueError, match="role"):
        pipe([{"content": "no role"}])
    with pytest.raises(ValueError, match="non-empty"):
        pipe([MSGS, []])


def test_pipeline_chat_plain_template(plain_dir, monkeypatch):
    rec = _Recorder(monkeypatch)
    pipe = fastlm.pipeline("text-generation", model=plain_dir)
    out = pipe(MSGS, max_new_tokens=6, stop=["zz"])
    assert out[0]["generated_text"][2]["role"] == "assistant"
    assert pipe.tokenizer.decode(rec.prompts[-1][0]) == "Be brief.\n\nUser: To be or not?\n\nAssistant:"
    assert rec.stop == ["zz", "\nUser:"]  # the base model must not write the user's turn


# ----------------------------------------------------------------------------- the chat session
def test_session_keeps_the_system_message_and_drops_the_oldest_turns(tmp_path):
    d = _model_dir(tmp_path / "small", CHATML, block_size=64)
    tok, model = fastlm.Tokenizer.load(d), GPT.from_pretrained(d)
    s = ChatSession(model, tok, system="Be brief.", max_new_tokens=4)
    assert s.prompt_budget == 60
    for i in range(6):
        reply = "".join(s.send(f"turn {i}: to be or not to be"))
        assert s.messages[-1] == {"role": "assistant", "content": reply.strip()}
        window = s.window()
        assert window[0] == {"role": "system", "content": "Be brief."}
        assert window[-1]["role"] == "assistant" and window[1]["role"] == "user"
    assert len(s.messages) == 13  # the whole conversation is kept
    assert len(s.window()) < 13  # but only the latest turns are sent
    assert len(s.template.encode(s.window()[:-1], tok)) <= 60
    # a message that cannot fit even alone: an error, and it leaves no trace
    window = s.window()
    with pytest.raises(ContextFull, match="does not fit"):
        list(s.send("to be or not to be " * 20))
    assert len(s.messages) == 13 and s.window() == window
    s.reset()
    assert s.messages == [{"role": "system", "content": "Be brief."}] and s.start == 0
    s.set_system(None)
    assert s.messages == [] and s.window() == []


# ----------------------------------------------------------------------------- fastlm chat
def _run(args, script, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    rc = main(["chat", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_chat_scripted_session(chatml_dir, tmp_path, monkeypatch, capsys):
    saved, after_reset = tmp_path / "conv.json", tmp_path / "after.json"
    script = (f"/system Be brief.\nhello there\n\nwhat next?\n/save {saved}\n/reset\n/save {after_reset}\n"
              "/nonsense\n")
    rc, out, err = _run(["--model", str(chatml_dir), "--max-new-tokens", "6"], script, monkeypatch, capsys)
    assert rc == 0, err
    conv = json.loads(saved.read_text())
    assert [m["role"] for m in conv] == ["system", "user", "assistant", "user", "assistant"]
    assert conv[0]["content"] == "Be brief." and conv[1]["content"] == "hello there"
    assert conv[3]["content"] == "what next?"
    assert json.loads(after_reset.read_text()) == [{"role": "system", "content": "Be brief."}]
    # the replies are those of a session with the same options, each on a line of its own
    s = ChatSession(GPT.from_pretrained(chatml_dir), fastlm.Tokenizer.load(chatml_dir), system="Be brief.",
                    max_new_tokens=6)
    r1 = "".join(s.send("hello there"))
    r2 = "".join(s.send("what next?"))
    assert out == r1 + "\n" + r2 + "\n"
    assert conv[2]["content"] == r1.strip() and conv[4]["content"] == r2.strip()
    assert "(system message set)" in err and "(conversation cleared)" in err and "unknown command /nonsense" in err
    assert not list(tmp_path.glob(".conv.json.*"))  # written atomically: no temporary file left


def test_cli_chat_streams_and_ctrl_c_stops_the_reply_only(plain_dir, tmp_path, monkeypatch, capsys):
    import fastlm.generation.chat as chat_mod

    real = chat_mod.stream
    deltas = []

    def interrupted(*args, **kwargs):  # the reply is cut by Ctrl-C after two pieces
        for k, delta in enumerate(real(*args, **kwargs)):
            if k == 2:
                raise KeyboardInterrupt
            deltas.append(delta)
            yield delta

    monkeypatch.setattr(chat_mod, "stream", interrupted)
    saved = tmp_path / "c.json"
    script = f"to be\n/save {saved}\n/exit\nnever read\n"
    rc, out, err = _run(["--model", str(plain_dir), "--max-new-tokens", "20", "--do-sample", "--seed", "3",
                         "--temperature", "0.9"], script, monkeypatch, capsys)
    assert rc == 0 and "(reply stopped)" in err
    assert len(deltas) == 2 and out == "".join(deltas) + "\n"
    conv = json.loads(saved.read_text())
    assert conv == [{"role": "user", "content": "to be"}, {"role": "assistant", "content": "".join(deltas).strip()}]

    # streamed: one write per piece of the reply, as it is generated
    monkeypatch.setattr(chat_mod, "stream", real)

    class Out(io.StringIO):
        writes = 0

        def write(self, s):
            Out.writes += 1
            return super().write(s)

    session = ChatSession(GPT.from_pretrained(plain_dir), fastlm.Tokenizer.load(plain_dir),
                          ChatTemplate.from_dir(plain_dir), max_new_tokens=12)
    out = Out()
    assert chat_loop(session, io.StringIO("to be\n"), out, io.StringIO()) == 0
    assert Out.writes >= 3 and out.getvalue().endswith("\n")

    class CtrlC(io.StringIO):  # Ctrl-C at the prompt quits
        def readline(self, *a):
            raise KeyboardInterrupt

    assert chat_loop(session, CtrlC(), io.StringIO(), io.StringIO()) == 0


def test_cli_chat_kv_dtype(plain_dir, monkeypatch, capsys):
    """--kv-dtype bf16: the replies are those of a session whose KV cache is bf16."""
    rc, out, err = _run(["--model", str(plain_dir), "--max-new-tokens", "8", "--kv-dtype", "bf16"],
                        "to be or not\nwhat next?\n", monkeypatch, capsys)
    assert rc == 0, err
    s = ChatSession(GPT.from_pretrained(plain_dir), fastlm.Tokenizer.load(plain_dir), max_new_tokens=8,
                    kv_dtype="bf16")
    assert out == "".join(s.send("to be or not")) + "\n" + "".join(s.send("what next?")) + "\n"
    with pytest.raises(SystemExit):
        _run(["--model", str(plain_dir), "--kv-dtype", "int8"], "hi\n", monkeypatch, capsys)


def test_cli_chat_errors(plain_dir, monkeypatch, capsys):
    rc, out, err = _run(["--model", str(plain_dir), "--max-new-tokens", "0"], "hi\n", monkeypatch, capsys)
    assert rc == 2 and "max_new_tokens" in err
    rc, out, err = _run(["--model", str(plain_dir), "--temperature", "0.5", "--max-new-tokens", "2"], "/save\n",
                        monkeypatch, capsys)
    assert rc == 0 and "only with --do-sample" in err and "/save needs a path" in err
    rc, out, err = _run(["--model", str(plain_dir)], "to be or not " * 100 + "\n/exit\n", monkeypatch, capsys)
    assert rc == 0 and "does not fit the model's context" in err and out == ""


def test_stream_takes_token_ids(plain_dir):
    tok, model = fastlm.Tokenizer.load(plain_dir), GPT.from_pretrained(plain_dir)
    ids = tok.encode("to be or not")
    want = generate(model, ids, max_new_tokens=10, tokenizer=tok, return_dict_in_generate=True, eos_token_id=tok.eot_token)
    assert "".join(fastlm.stream(model, tok, ids, max_new_tokens=10)) == want.texts[0]
    with pytest.raises(ValueError, match="token ids"):
        list(fastlm.stream(model, tok, [tok.n_vocab + 5], max_new_tokens=2))


def test_server_load_uses_the_shared_template(tmp_path):
    pytest.importorskip("fastapi")
    transformers = pytest.importorskip("transformers")
    from fastlm.serve import load

    template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}" \
               "{% if add_generation_prompt %}[assistant]{% endif %}"
    d = _model_dir(tmp_path / "m", template)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(bos_token={"__type": "AddedToken", "content": "<|im_start|>"}, eos_token="<|im_end|>")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    _, tok, chat = load(d)
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    want = hf.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True)
    assert want.startswith("<|im_start|>[system] Be brief.<|im_end|>")
    assert chat.render(MSGS) == want and chat.stop == []
    assert chat.encode(MSGS, tok) == tok.encode(want, allowed_special="all")
