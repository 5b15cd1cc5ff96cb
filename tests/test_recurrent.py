"""LSTM/GRU baselines: the GPT's interface, checkpoints, and learning."""
import pytest
import torch

import fastlm
from fastlm import GPTConfig, build_model, load_model


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_interface_and_checkpoint_round_trip(arch, tmp_path):
    torch.manual_seed(0)
    m = build_model(GPTConfig(arch=arch, vocab_size=40, block_size=16, n_layer=2, n_embd=24, n_head=1))
    idx = torch.randint(0, 40, (3, 10))
    logits, loss = m(idx, targets=idx)
    assert logits.shape == (3, 10, 40)
    assert torch.allclose(m.loss(idx, idx), loss, rtol=1e-5)
    m.save_pretrained(tmp_path)
    m2 = load_model(tmp_path)
    assert type(m2).__name__ == "RecurrentLM" and m2.config.arch == arch
    m.eval()
    assert torch.equal(m(idx), m2(idx))
    # The state carries over: reading in two pieces equals reading at once.
    y_all = m.hidden_states(idx)
    y1, st = m.hidden_states(idx[:, :4], return_state=True)
    y2 = m.hidden_states(idx[:, 4:], state=st)
    assert torch.allclose(torch.cat([y1, y2], 1), y_all, atol=1e-6)


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_loss_falls_on_a_learnable_sequence(arch):
    torch.manual_seed(1)
    m = build_model(GPTConfig(arch=arch, vocab_size=12, block_size=32, n_layer=1, n_embd=32, n_head=1))
    seq = torch.arange(64) % 12  # a cycle: perfectly predictable from the previous token
    x, y = seq[:-1].view(1, -1), seq[1:].view(1, -1)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    first = m.loss(x, y).item()
    for _ in range(60):
        opt.zero_grad()
        loss = m.loss(x, y)
        loss.backward()
        opt.step()
    assert loss.item() < first / 4


def test_gpt_refuses_recurrent_config():
    with pytest.raises(ValueError, match="build_model"):
        fastlm.GPT(GPTConfig(arch="lstm", vocab_size=10, n_embd=8, n_head=1))
    with pytest.raises(ValueError, match="arch"):
        GPTConfig(arch="rnn")
