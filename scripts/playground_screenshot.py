"""Make docs/playground.png: the web playground of `fastlm serve` after two streamed chat replies.

A tiny GPT is trained (200 steps: minutes on a small CPU) on four dialogue lines in the server's
plain chat template (so that its reply reads as text, not as the noise of a random model), served
on a loopback port, and the page is driven in headless Chromium (tests/_browser.py, the
driver of tests/test_playground.py) through two chat turns; the screenshot is written
atomically.

    python scripts/playground_screenshot.py [--out docs/playground.png] [--steps 200]
"""
import argparse
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import fastlm  # noqa: E402
from fastlm.serve import ServeConfig, ServerThread, create_app  # noqa: E402

from _browser import Browser, find_chromium  # noqa: E402

DIALOGUE = [
    ("What is the question?", "To be, or not to be, that is the question."),
    ("What should we suffer?", "The slings and arrows of outrageous fortune."),
    ("And what then?", "To take arms against a sea of troubles, and by opposing end them."),
    ("Who speaks?", "Hamlet, Prince of Denmark, alone on the stage."),
]


def train(steps: int):
    text = "".join(f"User: {q}\n\nAssistant: {a}\n\n" for q, a in DIALOGUE) * 8
    tok = fastlm.Tokenizer.train([text], vocab_size=320)
    torch.manual_seed(0)
    model = fastlm.GPT(fastlm.GPTConfig(vocab_size=tok.n_vocab, block_size=256, n_layer=2, n_head=4, n_embd=128))
    ids = torch.tensor(tok.encode(text))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    T = 128
    for step in range(steps):
        starts = torch.randint(0, len(ids) - T - 1, (8,))
        x = torch.stack([ids[s:s + T] for s in starts])
        y = torch.stack([ids[s + 1:s + T + 1] for s in starts])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"step {step}: loss {loss.item():.3f}", flush=True)
    print(f"trained {steps} steps, final loss {loss.item():.3f}")
    return model.eval(), tok


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "playground.png"))
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    exe = find_chromium()
    if exe is None:
        sys.exit("no Chromium found: apt-get install chromium, or set FASTLM_CHROMIUM")
    model, tok = train(args.steps)
    app = create_app(model, tok, ServeConfig(model_name="hamlet-tiny"))
    with ServerThread(app) as server, tempfile.TemporaryDirectory() as tmp, \
            Browser(exe, tmp, width=1100, height=820) as browser:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait("document.querySelector('#model').textContent.startsWith('hamlet-tiny')")
        page.type("#temperature", "0")
        page.type("#max_tokens", "40")
        for question in ("What is the question?", "What should we suffer?"):  # the lines in the order trained on
            page.type("#prompt", question)
            page.click("#send")
            page.wait("document.body.dataset.state === 'idle' && document.querySelector('#finish').dataset.reason")
        page.screenshot(args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
