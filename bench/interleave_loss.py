"""Interleaved timing of the fused linear + cross-entropy and its competitors, round by round
(so a change in machine load hits every implementation alike). Same inputs and functions
as bench/test_loss.py.

    python bench/interleave_loss.py
"""
import sys, time, statistics, torch, torch.nn.functional as F
sys.path.insert(0, __import__("os").path.dirname(__file__))
from test_loss import _data, torch_chunked, N, V, C
from fastlm import ops
torch.set_num_threads(2)
h, w, t = _data()
hd, wd = h.detach(), w.detach()
z = torch.empty(N, V)
def fl():
    loss = ops.linear_cross_entropy(h, w, t); return torch.autograd.grad(loss, (h, w))
def unf():
    loss = F.cross_entropy(h @ w.T, t); return torch.autograd.grad(loss, (h, w))
def ch():
    with torch.no_grad(): return torch_chunked(h, w, t)
def floor():
    torch.mm(hd, wd.T, out=z); return z @ wd, z.T @ hd
impls = {"fastlm": fl, "torch_chunked": ch, "torch_unfused": unf, "matmul_floor": floor}
times = {k: [] for k in impls}
for rnd in range(3):
    for k, f in impls.items():
        a = time.perf_counter(); f(); times[k].append(time.perf_counter() - a)
    print(rnd, {k: round(v[-1], 2) for k, v in times.items()}, flush=True)
med = {k: statistics.median(v) for k, v in times.items()}
for k in impls:
    print(f"{k:14s} median {med[k]:.2f} s  speed vs unfused {med['torch_unfused']/med[k]:.2f}x  vs chunked {med['torch_chunked']/med[k]:.2f}x")
