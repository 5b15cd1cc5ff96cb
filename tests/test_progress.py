"""Progress bars (fastlm._progress): shown when forced or on a terminal, never with --quiet or
progress=False, and in the long jobs that use them (eval, prepare, perplexity, fine-tuning)."""
import io
import json

import pytest
import torch

from fastlm import GPT, GPTConfig, Tokenizer, _progress
from fastlm._progress import progress_bar
from fastlm.cli import main
from fastlm.evaluate import perplexity

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(60))


@pytest.fixture
def drawn(monkeypatch):
    """Every update drawn and the last one kept, so a finished bar shows its total."""
    monkeypatch.setitem(_progress.BAR_DEFAULTS, "mininterval", 0)
    monkeypatch.setitem(_progress.BAR_DEFAULTS, "leave", True)
    monkeypatch.delenv("FASTLM_PROGRESS", raising=False)


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_bar_forced_on_advances_to_its_total(drawn):
    out = io.StringIO()
    assert sum(progress_bar(range(10), enabled=True, file=out, desc="work")) == 45
    assert "work" in out.getvalue() and "10/10" in out.getvalue()


def test_bar_shown_on_a_terminal_only(drawn, monkeypatch):
    tty, pipe = _Tty(), io.StringIO()
    for stream in (tty, pipe):
        bar = progress_bar(total=3, file=stream)
        bar.update(3)
        bar.close()
    assert "3/3" in tty.getvalue() and pipe.getvalue() == ""
    off = _Tty()
    list(progress_bar(range(3), enabled=False, file=off))  # progress=False / --quiet wins
    monkeypatch.setenv("FASTLM_PROGRESS", "0")
    list(progress_bar(range(3), file=off))
    assert off.getvalue() == ""
    monkeypatch.setenv("FASTLM_PROGRESS", "1")
    list(progress_bar(range(3), file=pipe))
    assert "3/3" in pipe.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("progress")
    tok = Tokenizer.train([TEXT], 280)
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=16, n_layer=1, n_head=2, n_embd=16)).save_pretrained(d / "m")
    tok.save(d / "m")
    (d / "text.txt").write_text(TEXT)
    return d, tok


def test_perplexity_bar_counts_windows(checkpoint, drawn, monkeypatch, capsys):
    d, tok = checkpoint
    model = GPT.from_pretrained(d / "m")
    r = perplexity(model, TEXT, tokenizer=tok)
    assert capsys.readouterr().err == ""  # stderr is not a terminal here
    monkeypatch.setenv("FASTLM_PROGRESS", "1")
    assert perplexity(model, TEXT, tokenizer=tok, batch_size=3) == r
    assert f"{r['windows']}/{r['windows']}" in capsys.readouterr().err
    perplexity(model, TEXT, tokenizer=tok, progress=False)
    assert capsys.readouterr().err == ""


def test_eval_cli_bar_and_quiet(checkpoint, drawn, monkeypatch, capsys):
    d, _ = checkpoint
    args = ["eval", str(d / "m"), "--data", str(d / "text.txt")]
    assert main(args) == 0
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("FASTLM_PROGRESS", "1")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "perplexity" in err and "100%" in err
    assert main(args + ["--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_prepare_cli_bars_and_quiet(checkpoint, drawn, monkeypatch, capsys, tmp_path):
    d, _ = checkpoint
    args = ["prepare", "--data", str(d / "text.txt"), "--tokenizer", str(d / "m")]
    monkeypatch.setenv("FASTLM_PROGRESS", "1")
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "cleaning: 100%" in err and "1/1" in err and "tokenizing: 100%" in err
    assert main(args + ["--out", str(tmp_path / "b"), "--quiet"]) == 0
    err = capsys.readouterr().err  # the report's lines, no bar
    assert "cleaning:" in err and "%|" not in err
    assert (tmp_path / "a" / "train.bin").read_bytes() == (tmp_path / "b" / "train.bin").read_bytes()


def test_finetune_bar(drawn, monkeypatch, capsys, tmp_path):
    from fastlm.finetune import finetune

    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps({"text": f"item {i} is {'good' if i % 2 else 'bad'}",
                                        "label": "pos" if i % 2 else "neg"}) + "\n" for i in range(20)))
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)
    opts = dict(vocab_size=280, max_iters=4, eval_interval=2, eval_iters=1, batch_size=4, plot=False,
                tensorboard=False)
    finetune("classification", cfg, data, tmp_path / "a", **opts)
    assert "training" not in capsys.readouterr().err  # not a terminal
    monkeypatch.setenv("FASTLM_PROGRESS", "1")
    summary = finetune("classification", cfg, data, tmp_path / "b", **opts)
    assert "4/4" in capsys.readouterr().err
    finetune("classification", cfg, data, tmp_path / "c", progress=False, **opts)
    assert "training" not in capsys.readouterr().err
    # fastlm eval --task: a bar over the models, none with --quiet.
    args = ["eval", summary["pipeline_dir"], "--data", str(data), "--task", "classification"]
    assert main(args) == 0
    assert "evaluating (classification): 100%" in capsys.readouterr().err
    assert main(args + ["--quiet"]) == 0
    assert "%|" not in capsys.readouterr().err
