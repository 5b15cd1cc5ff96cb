"""What the server's tests share: the text their tokenizer trains on, the model name, a server
on a loopback port, its engine, and a bounded wait."""
import time

import torch

from fastlm import GPT, GPTConfig
from fastlm.serve import ServeConfig, ServerThread, create_app

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. 你好 😀 ") * 4
NAME = "tiny"


def make_model(tok, block_size=256, seed=0, pad=0):
    """A small random-init GPT for ``tok``; ``pad`` ids past the tokenizer's vocabulary, as real
    checkpoints pad theirs."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=tok.n_vocab + pad, block_size=block_size, n_layer=2, n_head=4, n_embd=64,
                         initializer_range=0.3)).eval()


def start(model, tok, chat=None, **cfg):
    """A started ServerThread serving ``model`` as NAME with ServeConfig fields ``cfg``."""
    return ServerThread(create_app(model, tok, ServeConfig(model_name=NAME, **cfg), chat)).start()


def engine(server):
    return server.server.config.app.state.fastlm.engine


def wait_until(cond, timeout=10.0):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            return False
        time.sleep(0.01)
    return True
