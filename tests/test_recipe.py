"""Training with Muon (TrainConfig(optimizer="muon")): which parameters each optimizer gets,
each group's learning rate on the schedule, exact resume from a checkpoint, and the refusals."""
import json

import pytest
import torch

from fastlm import GPT, GPTConfig, Trainer, TrainConfig
from fastlm.data import prepare
from fastlm.optim import MuonWithAdamW

pytest.importorskip("fastlm.tokenizer")

TEXT = "".join(f"{w} shall not pass, said the {w} to line {i};\n" for i, w in
               enumerate(["king", "queen", "fool", "knight", "bishop", "rook"] * 60))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("chars")
    src = d / "text.txt"
    src.write_text(TEXT)
    prepare([src], d / "prepared", vocab_size=256, val_fraction=0.1, progress=False, verbose=False)
    return d / "prepared"


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**dict(vocab_size=257, block_size=32, n_layer=2, n_head=2, n_embd=32), **kw}))


def tiny_config(out, **kw):
    base = dict(out_dir=str(out), batch_size=8, max_iters=24, eval_interval=8, eval_iters=2, log_interval=1,
                warmup_iters=3, lr=3e-3, min_lr=3e-4, progress=False, plot=False, tensorboard=False, threads=1,
                seed=7, device="cpu", optimizer="muon", muon_lr=0.02, muon_momentum=0.9)
    base.update(kw)
    return TrainConfig(**base)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(data_dir, tmp_path):
    model = tiny_model(tie_word_embeddings=False)
    t = Trainer(model, tiny_config(tmp_path), data_dir)
    assert isinstance(t.optimizer, MuonWithAdamW)
    muon = [g for g in t.optimizer.param_groups if g["use_muon"]]
    assert len(muon) == 1
    names = {id(p): n for n, p in model.named_parameters()}
    got = sorted(names[id(p)] for p in muon[0]["params"])
    want = sorted(n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2)
    assert got == want and len(want) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per layer
    rest = {names[id(p)] for g in t.optimizer.param_groups if not g["use_muon"] for p in g["params"]}
    assert {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"} <= rest
    assert len(rest) + len(want) == len(list(model.parameters()))
    # each group's learning rate: the schedule's lr for AdamW, scaled by muon_lr / lr for Muon
    t.train_step(1.5e-3)
    assert muon[0]["lr"] == pytest.approx(0.01)
    assert muon[0]["ns_steps"] == 5
    assert Trainer(tiny_model(), tiny_config(tmp_path / "ns3", muon_ns_steps=3), data_dir).optimizer.param_groups[0][
        "ns_steps"] == 3
    assert all(g["lr"] == 1.5e-3 for g in t.optimizer.param_groups if not g["use_muon"])


def test_muon_run_resumes_bit_for_bit(data_dir, tmp_path):
    full, broken = tmp_path / "full", tmp_path / "broken"
    a = Trainer(tiny_model(), tiny_config(full, lr_decay_iters=24), data_dir)
    a.train()
    # the same run stopped at step 16 (its checkpoint), then resumed in a new Trainer to step 24
    Trainer(tiny_model(), tiny_config(broken, lr_decay_iters=24, max_iters=16), data_dir).train()
    b = Trainer(tiny_model(seed=1), tiny_config(broken, lr_decay_iters=24, resume=True), data_dir)
    b.train()
    la, lb = read_jsonl(full / "train_log.jsonl"), read_jsonl(broken / "train_log.jsonl")
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(1, 25))
    assert la == lb  # the same loss and learning rate at every step
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), n
    assert la[-1]["loss"] < la[0]["loss"]


def test_resume_with_another_optimizer_is_refused(data_dir, tmp_path):
    from fastlm.checkpoint import CheckpointError

    Trainer(tiny_model(), tiny_config(tmp_path, max_iters=8), data_dir).train()
    with pytest.raises(CheckpointError, match="optimizer='muon'"):
        Trainer(tiny_model(), tiny_config(tmp_path, max_iters=16, optimizer="adamw", resume=True), data_dir).train()


def test_muon_refusals(data_dir, tmp_path):
    with pytest.raises(ValueError, match="optimizer must be"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="muon_lr"):
        TrainConfig(optimizer="muon", muon_lr=0.0)
    with pytest.raises(ValueError, match="lr > 0"):
        TrainConfig(optimizer="muon", lr=0.0)
    with pytest.raises(ValueError, match="fsdp"):
        TrainConfig(optimizer="muon", fsdp=True)
    for bad in (0, 21, 2.5):
        with pytest.raises(ValueError, match="muon_ns_steps"):
            TrainConfig(optimizer="muon", muon_ns_steps=bad)
    # no block matrices (no layers): nothing for Muon to train
    with pytest.raises(ValueError, match="no weight matrices"):
        Trainer(tiny_model(n_layer=0), tiny_config(tmp_path), data_dir)


# ----------------------------------------------------------------------------- the fast recipe
def test_linear_schedule():
    from fastlm.train import lr_at

    cfg = TrainConfig(lr=1.0, min_lr=0.0, warmup_iters=10, max_iters=110, lr_schedule="linear")
    assert lr_at(9, cfg) == pytest.approx(10 / 11)
    assert [lr_at(s, cfg) for s in (10, 35, 60, 110, 200)] == pytest.approx([1.0, 0.75, 0.5, 0.0, 0.0])
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="target_val_loss"):
        TrainConfig(target_val_loss=float("nan"))


def test_fast_recipe_and_its_toml_agree(tmp_path):
    from pathlib import Path

    from fastlm.train import RECIPES, load_config_file

    fast = TrainConfig.fast(max_iters=300)
    assert fast.optimizer == "muon" and fast.lr_schedule == "linear" and fast.max_iters == 300
    for k, v in RECIPES["fast"]["train"].items():
        if k != "max_iters":
            assert getattr(fast, k) == v
    GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, **RECIPES["fast"]["model"])  # valid switches
    toml = load_config_file(Path(__file__).resolve().parent.parent / "configs" / "fast.toml")
    assert toml == {**RECIPES["fast"]["model"], **RECIPES["fast"]["train"]}


def test_two_layer_toml_is_the_fast_recipe_at_its_size():
    """configs/fast-2layer.toml: the fast recipe's switches and optimizer, with the size, batch
    and schedule it states; every key a CLI setting, the model a valid GPTConfig."""
    from pathlib import Path

    from fastlm.train import RECIPES, load_config_file

    toml = load_config_file(Path(__file__).resolve().parent.parent / "configs" / "fast-2layer.toml")
    size = dict(n_layer=2, n_head=2, n_embd=128, block_size=64)
    schedule = dict(batch_size=16, lr=1e-2, warmup_iters=5, max_iters=240, eval_interval=240, muon_ns_dtype="float32")
    assert toml == {**RECIPES["fast"]["model"], **RECIPES["fast"]["train"], **size, **schedule}
    GPTConfig(vocab_size=257, **size, **RECIPES["fast"]["model"])
    TrainConfig(**{k: v for k, v in toml.items() if k not in size and k not in RECIPES["fast"]["model"]})


def test_target_val_loss_stops_training(data_dir, tmp_path):
    cfg = dict(max_iters=16, eval_interval=4, optimizer="adamw")
    free = Trainer(tiny_model(), tiny_config(tmp_path / "free", **cfg), data_dir)
    free.train()
    vals = [r["val_loss"] for r in free.history]
    # the target: the val loss of the 3rd evaluation, above every earlier one's
    assert vals[2] < min(vals[:2])
    stopped = Trainer(tiny_model(), tiny_config(tmp_path / "stop", target_val_loss=vals[2], **cfg), data_dir)
    summary = stopped.train()
    assert summary["step"] == 12 and summary["stop_reason"].startswith("target val loss")
    assert [r["val_loss"] for r in stopped.history] == vals[:3]


def test_cli_recipe_fast(data_dir, tmp_path):
    from fastlm.cli import main

    out = tmp_path / "run"
    assert main(["train", "--recipe", "fast", "--data", str(data_dir), "--out", str(out), "--n-layer", "1",
                 "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4", "--max-iters", "4",
                 "--eval-interval", "4", "--eval-iters", "1", "--threads", "1", "--mlp", "gelu",
                 "--target-val-loss", "0.5", "--no-progress"]) == 0
    state = json.loads((out / "best" / "trainer_state.json").read_text())
    assert state["config"]["optimizer"] == "muon" and state["config"]["lr_schedule"] == "linear"
    assert state["config"]["target_val_loss"] == 0.5 and state["config"]["max_iters"] == 4  # flags win
    model = state["model_config"]
    assert model["qk_norm"] and model["zero_init_proj"] and not model["tie_word_embeddings"]
    assert model["pos"] == "rope" and model["mlp"] == "gelu"  # the flag won over the recipe
    with pytest.raises(SystemExit):  # argparse: not one of the recipes
        main(["train", "--recipe", "slow", "--data", str(data_dir), "--out", str(tmp_path / "x")])


def test_evaluate_groups_batches_without_changing_the_mean(data_dir, tmp_path):
    """On the CPU evaluate() runs up to 8 same-shaped batches per forward: the mean equals the
    batch-by-batch one over the same batches."""
    import numpy as np

    t = Trainer(tiny_model(), tiny_config(tmp_path, optimizer="adamw"), data_dir)
    got = t.evaluate(iters=11)  # one group of 8, one of 3
    rng = np.random.default_rng([t.config.seed, 1])
    t.model.eval()
    with torch.no_grad():
        want = sum(t._loss_fn(*t._batch("val", rng)).item() for _ in range(11)) / 11
    assert got == pytest.approx(want, rel=1e-5)
