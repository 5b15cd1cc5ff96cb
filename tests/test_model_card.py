"""Model cards (fastlm.train.card): every checkpoint the Trainer writes carries a README.md in
the Hugging Face format with the run's figures; a README.md written by a person is kept."""
import json

import pytest
import torch

from fastlm import GPT, GPTConfig, Trainer, TrainConfig
from fastlm.data import TokenData, prepare, stdlib_corpus
from fastlm.train.card import CARD_MARK

yaml = pytest.importorskip("yaml")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    prepare(None, d, vocab_size=300, documents=stdlib_corpus(max_files=8), val_fraction=0.1, progress=False,
            verbose=False)
    return d


def _trainer(data_dir, out, **kw):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=16, norm="rmsnorm"))
    cfg = TrainConfig(**{"out_dir": str(out), "max_iters": 6, "eval_interval": 3, "eval_iters": 1, "batch_size": 4,
                         "lr": 3e-3, "progress": False, "tensorboard": False, "license": "mit", **kw})
    return Trainer(model, cfg, data_dir)


def _split(card: str) -> tuple[dict, str]:
    """(the YAML front matter, the Markdown body) of a card."""
    assert card.startswith("---\n")
    head, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_trainer_checkpoints_carry_model_cards(data_dir, tmp_path):
    t = _trainer(data_dir, tmp_path / "run", plot=True)
    t.train()
    last = t.history[-1]
    step_dir = tmp_path / "run" / "checkpoints" / f"step-{t.step:07d}"
    meta, body = _split((step_dir / "README.md").read_text())
    assert meta["library_name"] == "fastlm" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "mit" and "fastlm" in meta["tags"]
    assert body.startswith(CARD_MARK)
    td = TokenData(data_dir)
    for want in ["layers: 1, width (n_embd): 16, heads: 2", "context: 32 tokens, vocabulary: 300 ids",
                 "norm=rmsnorm", f"parameters: {t.model.num_parameters():,}",
                 f"{td.num_tokens('train'):,} training tokens", f"{td.num_tokens('val'):,} validation tokens",
                 f"steps: {t.step:,} of 6", f"final train loss: {last['train_loss']:.4f}",
                 f"val loss: {last['val_loss']:.4f}", f"val perplexity: {last['val_perplexity']:.2f}",
                 f"val bits per byte: {last['val_bits_per_byte']:.3f}", f"fastlm generate --model {step_dir}",
                 f'GPT.from_pretrained({str(step_dir)!r})', str(data_dir)]:
        assert want in body, want
    # The loss curves, linked relatively.
    assert (tmp_path / "run" / "loss.svg").is_file()
    assert "](../../loss.svg)" in body
    best_body = (tmp_path / "run" / "best" / "README.md").read_text()
    assert "](../loss.svg)" in best_body
    # The best checkpoint's card has the figures of the evaluation that made it the best.
    best = next(r for r in t.history if r["step"] == t.best_step)
    _, best_body = _split((tmp_path / "run" / "best" / "README.md").read_text())
    assert f"val loss: {best['val_loss']:.4f}" in best_body and f"best val loss: {t.best_val:.4f}" in best_body


def test_hand_written_readme_kept_own_card_rewritten(data_dir, tmp_path):
    t = _trainer(data_dir, tmp_path / "run", max_iters=3, plot=False)
    t.train()
    best = tmp_path / "run" / "best"
    first = (best / "README.md").read_text()
    assert CARD_MARK in first and "loss.svg" not in first
    # Saved again later in the run: fastlm's own card follows the model.
    t.step += 5
    t.save_checkpoint(best)
    again = (best / "README.md").read_text()
    assert again != first and f"for {t.step:,} steps" in again
    # A card written by a person stays as it is, byte for byte.
    mine = "---\nlicense: apache-2.0\n---\n# My model\n\nWritten by hand.\n"
    (best / "README.md").write_text(mine)
    t.save_checkpoint(best)
    assert (best / "README.md").read_text() == mine
    assert json.loads((best / "config.json").read_text())["n_layer"] == 1  # the checkpoint itself was written


def test_finetuned_pipeline_card(tmp_path):
    from fastlm.finetune import finetune

    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps({"text": f"item {i} is {'good' if i % 2 else 'bad'}",
                                        "label": "pos" if i % 2 else "neg"}) + "\n" for i in range(20)))
    summary = finetune("classification", GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16), data,
                       tmp_path / "ft", vocab_size=280, max_iters=2, eval_interval=2, eval_iters=1, batch_size=4,
                       progress=False, plot=False, tensorboard=False)
    meta, body = _split((tmp_path / "ft" / "best" / "README.md").read_text())
    assert meta["pipeline_tag"] == "text-classification" and "license" not in meta
    assert f"load_pipeline({summary['pipeline_dir']!r})" in body and str(data) in body
