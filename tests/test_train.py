"""fastlm.train: schedule, config files, end-to-end training, early stopping, non-finite
losses, checkpoints (exact resume after SIGKILL, damaged and mismatched checkpoints), the
train and demo commands."""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastlm import GPT, GPTConfig, Trainer, TrainConfig
from fastlm.checkpoint import CheckpointError
from fastlm.data import TokenData, prepare, stdlib_corpus
from fastlm.train import NonFiniteLossError, find_checkpoints, load_config_file, lr_at

pytest.importorskip("fastlm.tokenizer")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    prepare(None, d, vocab_size=256, documents=stdlib_corpus(max_files=40), val_fraction=0.1, progress=False,
            verbose=False)
    return d


def tiny_model(vocab=257, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=dropout))


def tiny_config(out, **kw):
    base = dict(out_dir=str(out), batch_size=8, max_iters=30, eval_interval=10, eval_iters=4, log_interval=5,
                warmup_iters=3, lr=3e-3, min_lr=3e-4, progress=False, plot=False, threads=1, seed=7, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- config
def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    assert lr_at(0, cfg) == pytest.approx(1 / 11)
    assert lr_at(9, cfg) == pytest.approx(10 / 11)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == lr_at(500, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 120))


def test_config_validation():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="unknown keys"):
        TrainConfig.from_dict({"lr": 1e-3, "learning_rate": 1})


def test_config_files(tmp_path):
    (tmp_path / "a.toml").write_text('n-layer = 3\nlr = 2e-3\n[train]\nmax_iters = 50\n[model]\nn_embd = 48\n')
    assert load_config_file(tmp_path / "a.toml") == {"n_layer": 3, "lr": 2e-3, "max_iters": 50, "n_embd": 48}
    (tmp_path / "b.json").write_text('{"batch_size": 4, "seed": 1}')
    assert load_config_file(tmp_path / "b.json") == {"batch_size": 4, "seed": 1}
    (tmp_path / "c.toml").write_text("lr = = 1")
    with pytest.raises(ValueError, match="cannot parse"):
        load_config_file(tmp_path / "c.toml")
    with pytest.raises(FileNotFoundError):
        load_config_file(tmp_path / "none.toml")


def test_config_files_on_python_3_10(tmp_path, monkeypatch):
    """Without the standard library's tomllib (Python 3.10) the tomli package parses TOML."""
    import tomllib

    monkeypatch.setitem(sys.modules, "tomllib", None)  # import tomllib now fails
    monkeypatch.setitem(sys.modules, "tomli", tomllib)  # the same parser, as tomli provides it
    (tmp_path / "a.toml").write_text('lr = 2e-3\n[model]\nn_embd = 48\n')
    assert load_config_file(tmp_path / "a.toml") == {"lr": 2e-3, "n_embd": 48}


def test_optimizer_decays_matrices_only(data_dir, tmp_path):
    t = Trainer(tiny_model(), tiny_config(tmp_path), data_dir)
    decay, no_decay = t.optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])


# ----------------------------------------------------------------------------- training
def test_train_end_to_end_val_loss_falls(data_dir, tmp_path):
    out = tmp_path / "run"
    summary = Trainer(tiny_model(), tiny_config(out, max_iters=60, eval_interval=20, plot=True), data_dir).train()
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [20, 40, 60]
    for key in ("step", "train_loss", "val_loss", "lr", "tokens_per_s", "val_perplexity", "val_bits_per_byte"):
        assert key in metrics[0]
    assert metrics[-1]["val_loss"] < metrics[0]["val_loss"] < math.log(257)
    assert metrics[-1]["val_perplexity"] == pytest.approx(math.exp(metrics[-1]["val_loss"]))
    assert summary["stop_reason"] == "max_iters reached"
    assert [p.name for p in find_checkpoints(out)] == ["step-0000040", "step-0000060"]  # keep_last=2
    svg = (out / "loss.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 2  # the train and val curves
    best = GPT.from_pretrained(out / "best")
    state = json.loads((out / "best" / "trainer_state.json").read_text())
    assert state["step"] == summary["best_step"]
    assert (out / "best" / "tokenizer.json").is_file()
    assert best.config.n_layer == 2


def test_early_stopping(data_dir, tmp_path):
    out = tmp_path / "run"
    # with a learning rate of zero the val loss can never improve after the first evaluation
    summary = Trainer(tiny_model(), tiny_config(out, lr=0.0, min_lr=0.0, max_iters=100, eval_interval=5,
                                                patience=2), data_dir).train()
    assert summary["step"] == 15 and summary["stop_reason"].startswith("early stopping")
    assert summary["best_step"] == 5
    assert len(read_jsonl(out / "metrics.jsonl")) == 3


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    out = tmp_path / "run"
    model = tiny_model()
    trainer = Trainer(model, tiny_config(out, max_iters=40, eval_interval=10, log_interval=1), data_dir)
    real_loss = trainer._loss_fn

    def loss_fn(x, y):
        loss = real_loss(x, y)
        return loss * float("nan") if trainer.step >= 16 else loss

    trainer._loss_fn = loss_fn
    with pytest.raises(NonFiniteLossError, match="step 17.*step-0000010"):
        trainer.train()
    assert [p.name for p in find_checkpoints(out)] == ["step-0000010"]
    good = GPT.from_pretrained(out / "checkpoints" / "step-0000010")
    assert all(torch.isfinite(p).all() for p in good.parameters())


# ----------------------------------------------------------------------------- checkpoints
RUN_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from fastlm import GPT, GPTConfig, Trainer, TrainConfig
    data, out, kill_at, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=257, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.1))
    cfg = TrainConfig(out_dir=out, batch_size=4, max_iters=24, eval_interval=8, eval_iters=2, log_interval=1,
                      warmup_iters=3, lr=3e-3, min_lr=3e-4, progress=False, plot=False, seed=3, threads=1, device="cpu",
                      resume=resume)
    def on_step(t):
        if t.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    Trainer(model, cfg, data, on_step=on_step).train()
""")


def _run(script, *args):
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, timeout=300)


def test_resume_after_sigkill_is_exact(data_dir, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    full, broken = tmp_path / "full", tmp_path / "broken"
    r = _run(script, data_dir, full, -1, 0)
    assert r.returncode == 0, r.stderr
    r = _run(script, data_dir, broken, 13, 0)
    assert r.returncode == -9, r.stderr  # killed mid-run, after the checkpoint at step 8
    assert [p.name for p in find_checkpoints(broken)] == ["step-0000008"]
    r = _run(script, data_dir, broken, -1, 1)
    assert r.returncode == 0, r.stderr
    a, b = read_jsonl(full / "train_log.jsonl"), read_jsonl(broken / "train_log.jsonl")
    assert [x["step"] for x in a] == [x["step"] for x in b] == list(range(1, 25))
    assert a == b  # the same loss and learning rate at every step
    ma, mb = read_jsonl(full / "metrics.jsonl"), read_jsonl(broken / "metrics.jsonl")
    drop = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert drop(ma) == drop(mb) and len(ma) == 3


def test_damaged_and_mismatched_checkpoints(data_dir, tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_model(), tiny_config(out, max_iters=10, eval_interval=10), data_dir).train()
    ckpt = find_checkpoints(out)[-1]

    # an existing run is never overwritten silently
    with pytest.raises(CheckpointError, match="--resume"):
        Trainer(tiny_model(), tiny_config(out, max_iters=20), data_dir).train()
    # nothing to resume
    with pytest.raises(CheckpointError, match="nothing to resume"):
        Trainer(tiny_model(), tiny_config(tmp_path / "empty", resume=True), data_dir).train()
    # another model shape
    other = GPT(GPTConfig(vocab_size=257, block_size=32, n_layer=3, n_head=2, n_embd=32))
    with pytest.raises(CheckpointError, match="n_layer=2 \\(now 3\\)"):
        Trainer(other, tiny_config(out, resume=True, max_iters=20), data_dir).train()
    # a truncated optimizer file
    opt = ckpt / "optimizer.safetensors"
    saved = opt.read_bytes()
    opt.write_bytes(saved[: len(saved) // 2])
    with pytest.raises(CheckpointError, match="optimizer.safetensors"):
        Trainer(tiny_model(), tiny_config(out, resume=True, max_iters=20), data_dir).train()
    opt.write_bytes(saved)
    # damaged trainer state
    state = ckpt / "trainer_state.json"
    good = state.read_text()
    state.write_text(good[:40])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Trainer(tiny_model(), tiny_config(out, resume=True, max_iters=20), data_dir).train()
    state.write_text(json.dumps({k: v for k, v in json.loads(good).items() if k != "data_rng"}))
    with pytest.raises(CheckpointError, match="damaged"):
        Trainer(tiny_model(), tiny_config(out, resume=True, max_iters=20), data_dir).train()
    state.unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        Trainer(tiny_model(), tiny_config(out, resume=True, max_iters=20), data_dir).train()
    state.write_text(good)
    summary = Trainer(tiny_model(), tiny_config(out, resume=True, max_iters=20), data_dir).train()
    assert summary["step"] == 20


def test_data_folder_metadata_stays_inside_the_folder(data_dir, tmp_path):
    import shutil

    d = tmp_path / "data"
    shutil.copytree(data_dir, d)
    outside = tmp_path / "outside"
    shutil.copytree(data_dir / "tokenizer", outside)
    (outside / "id_rsa").write_text("PRIVATE KEY")
    (d / "link").symlink_to(outside)
    meta = json.loads((d / "meta.json").read_text())
    for bad in (str(outside), "../outside", "link", "tokenizer/../../outside", "", 3):
        (d / "meta.json").write_text(json.dumps({**meta, "tokenizer": bad}))
        with pytest.raises(ValueError, match="tokenizer path"):
            TokenData(d)
    (d / "meta.json").write_text(json.dumps(meta))
    # Files planted beside the tokenizer's own never reach a checkpoint, nor what a link names.
    (d / "tokenizer" / "id_rsa").write_text("PRIVATE KEY")
    (d / "tokenizer" / "merges.txt").unlink()
    (d / "tokenizer" / "merges.txt").symlink_to(outside / "id_rsa")
    out = tmp_path / "run"
    Trainer(tiny_model(), tiny_config(out, max_iters=2, eval_interval=2, eval_iters=1), d).train()
    ckpt = find_checkpoints(out)[-1]
    names = sorted(p.name for p in ckpt.iterdir())
    assert "id_rsa" not in names and "merges.txt" not in names
    assert {"tokenizer.json", "vocab.json", "tokenizer_config.json"} <= set(names)
    assert all("PRIVATE KEY" not in p.read_text(errors="replace") for p in ckpt.iterdir() if p.is_file())


def test_resume_skips_a_torn_log_line(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    Trainer(tiny_model(), tiny_config(out, max_iters=10, eval_interval=10), data_dir).train()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 20, "train_lo')  # a run killed while writing its next line
    with open(out / "train_log.jsonl", "a") as f:
        f.write("\x00\x00\x00")
    summary = Trainer(tiny_model(), tiny_config(out, max_iters=20, eval_interval=10, resume=True), data_dir).train()
    assert summary["step"] == 20
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [10, 20]
    assert [r["step"] for r in read_jsonl(out / "train_log.jsonl")] == list(range(5, 21, 5))
    assert "skipped 1 damaged line" in capsys.readouterr().err


def test_failed_save_leaves_no_temporary_folder(data_dir, tmp_path, monkeypatch):
    from fastlm.train import state as train_mod  # where checkpoints are written

    out = tmp_path / "run"
    trainer = Trainer(tiny_model(), tiny_config(out, max_iters=20, eval_interval=10), data_dir)
    real = train_mod.save_tensors

    def full_disk(path, *a, **k):
        if trainer.step >= 20:
            raise OSError(28, "No space left on device")
        real(path, *a, **k)

    monkeypatch.setattr(train_mod, "save_tensors", full_disk)
    with pytest.raises(OSError, match="No space"):
        trainer.train()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000010"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(train_mod, "save_tensors", real)
    # What a killed save leaves (a temporary folder; a checkpoint set aside and never replaced)
    # is cleared, or put back, when the next run starts.
    (out / "checkpoints" / ".step-0000020.tmp-999999").mkdir()
    os.replace(out / "best", out / ".best.old-999999")
    summary = Trainer(tiny_model(), tiny_config(out, max_iters=20, eval_interval=10, resume=True), data_dir).train()
    assert summary["step"] == 20
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000010", "step-0000020"]
    assert (out / "best" / "config.json").is_file() and not list(out.glob(".best.*"))


# ----------------------------------------------------------------------------- commands
def test_cli_train_with_config_file(data_dir, tmp_path):
    from fastlm.cli import main

    cfg = tmp_path / "run.toml"
    cfg.write_text('[model]\nn_layer = 1\nn_head = 2\nn_embd = 32\nblock_size = 32\n'
                   '[train]\nbatch_size = 4\nmax_iters = 12\neval_interval = 6\neval_iters = 2\nthreads = 1\n')
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--data", str(data_dir), "--out", str(out), "--max-iters", "6",
                 "--no-progress"]) == 0
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [6]  # the flag won over the file
    assert json.loads((out / "best" / "config.json").read_text())["n_layer"] == 1
    # a missing --out and an unknown setting are errors; --resume continues the run
    assert main(["train", "--data", str(data_dir / "..")]) == 2
    (tmp_path / "bad.json").write_text('{"learning_rate": 1}')
    assert main(["train", "--config", str(tmp_path / "bad.json"), "--data", str(data_dir), "--out", str(out)]) == 2
    assert main(["train", "--config", str(cfg), "--data", str(data_dir), "--out", str(out), "--resume",
                 "--no-progress"]) == 0
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [6, 12]


def test_cli_train_raw_text_bytes(tmp_path):
    from fastlm.cli import main

    text = tmp_path / "t.txt"
    text.write_text("".join(f"To be or not to be, line {i}.\n" for i in range(300)))
    out = tmp_path / "run"
    assert main(["train", "--data", str(text), "--vocab-size", "256", "--out", str(out), "--n-layer", "1",
                 "--n-head", "1", "--n-embd", "16", "--block-size", "16", "--batch-size", "2", "--max-iters", "4",
                 "--eval-interval", "4", "--eval-iters", "1", "--threads", "1", "--no-progress"]) == 0
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert meta["vocab_size"] == 257 and meta["split"]["method"] == "tail"


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "fastlm", "demo", "--out", str(out), "--minutes", "0.25",
                        "--max-files", "20", "--vocab-size", "300", "--n-layer", "1", "--n-embd", "32",
                        "--block-size", "32", "--batch-size", "4", "--no-progress"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "def fibonacci(n):" in r.stdout and "class Stack:" in r.stdout
    assert "fastlm train" in r.stdout and "fastlm generate" in r.stdout
    assert (out / "best" / "model.safetensors").is_file() and (out / "metrics.jsonl").is_file()
    assert (out / "loss.svg").is_file()
