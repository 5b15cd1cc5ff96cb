"""fastlm.pipeline("text-generation") and `fastlm generate`, on a checkpoint directory that holds
a model and its tokenizer, as Hugging Face's pipeline is used."""
import pytest
import torch

import fastlm
from fastlm import GPT, GPTConfig
from fastlm.cli import main

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. 你好 😀 ") * 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-model")
    tok = fastlm.Tokenizer.train([TEXT], vocab_size=300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=128, n_layer=2, n_head=4, n_embd=32,
                          initializer_range=0.3, eos_token_id=tok.eot_token))
    model.save_pretrained(d)
    tok.save(d)
    return d


def test_pipeline_from_directory(model_dir):
    pipe = fastlm.pipeline("text-generation", model=str(model_dir))
    out = pipe("question", max_new_tokens=12)
    assert isinstance(out, list) and len(out) == 1 and set(out[0]) == {"generated_text"}
    text = out[0]["generated_text"]
    assert text.startswith("question")
    # the same as generate + decode
    tok = pipe.tokenizer
    ids = pipe.model.generate(tok.encode("question"), max_new_tokens=12)[len(tok.encode("question")):]
    ids = [i for i in ids if i != tok.eot_token]
    assert text == "question" + tok.decode(ids)
    assert pipe("question", max_new_tokens=12, return_full_text=False)[0]["generated_text"] == text[len("question"):]


def test_pipeline_options_pass_through(model_dir):
    pipe = fastlm.pipeline("text-generation", model=model_dir)
    outs = pipe("the sea", max_new_tokens=10, num_return_sequences=3, do_sample=True, top_k=20, top_p=0.9,
                temperature=1.2, seed=0)
    assert len(outs) == 3 and all(o["generated_text"].startswith("the sea") for o in outs)
    assert outs == pipe("the sea", max_new_tokens=10, num_return_sequences=3, do_sample=True, top_k=20, top_p=0.9,
                        temperature=1.2, seed=0)
    batch = pipe(["a", "to be or"], max_new_tokens=5)
    assert len(batch) == 2 and batch[1][0]["generated_text"].startswith("to be or")
    ids = pipe("a", max_new_tokens=5, return_tensors=True)[0]["generated_token_ids"]
    assert ids[:1] == pipe.tokenizer.encode("a")
    with pytest.raises(ValueError, match="do_sample"):
        pipe("a", num_return_sequences=2)
    with pytest.raises(TypeError, match="unexpected"):
        pipe("a", no_such_option=1)


def test_pipeline_with_objects_and_errors(model_dir, tmp_path):
    tok = fastlm.Tokenizer.load(model_dir)
    model = GPT.from_pretrained(model_dir)
    out = fastlm.pipeline("text-generation", model=model, tokenizer=tok)("x", max_new_tokens=3)
    assert out[0]["generated_text"].startswith("x")
    with pytest.raises(ValueError, match="text-generation"):
        fastlm.pipeline("summarization", model=model, tokenizer=tok)
    with pytest.raises(ValueError, match="tokenizer"):
        fastlm.pipeline("text-generation", model=model)
    model.save_pretrained(tmp_path)  # no tokenizer files there
    with pytest.raises(ValueError, match="tokenizer"):
        fastlm.pipeline("text-generation", model=tmp_path)


def test_pipeline_stops_at_the_tokenizers_end_of_text(tmp_path):
    """A checkpoint whose config.json names no eos_token_id stops at the end-of-text token of
    the tokenizer saved beside it."""
    tok = fastlm.Tokenizer.train([TEXT], vocab_size=300)
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=16,
                          tie_word_embeddings=False))
    assert model.config.eos_token_id is None
    with torch.no_grad():  # every position's hidden state is ln_f's bias: the eot token always wins
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.eot_token] = 1.0
    model.save_pretrained(tmp_path)
    tok.save(tmp_path)
    pipe = fastlm.pipeline("text-generation", model=tmp_path)
    assert pipe.defaults["eos_token_id"] == tok.eot_token
    assert pipe("to be", max_new_tokens=10)[0]["generated_text"] == "to be"


def test_cli_generate_streams(model_dir, capsys):
    rc = main(["generate", "--model", str(model_dir), "--prompt", "whether", "--max-new-tokens", "8"])
    assert rc == 0
    printed = capsys.readouterr().out
    pipe = fastlm.pipeline("text-generation", model=model_dir)
    assert printed == pipe("whether", max_new_tokens=8)[0]["generated_text"] + "\n"
    rc = main(["generate", "--model", str(model_dir), "--prompt", "whether", "--max-new-tokens", "-1"])
    assert rc == 2 and "max_new_tokens" in capsys.readouterr().err
