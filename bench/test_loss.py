"""Benchmark: fused linear + cross-entropy, forward + backward, at the GPT-2 training shape
N = 4096 rows, V = 50257, C = 768, float32, 2 threads.

  fastlm         fastlm.ops.linear_cross_entropy (chunked, fused softmax/gradient step)
  torch_unfused  F.cross_entropy(h @ W.T, t) + autograd: materialises (N, V) logits and grad
  torch_chunked  a plain PyTorch loop over 1024-row chunks computing the same gradients
Each records its peak extra memory (VmHWM over the inputs, reset through
/proc/self/clear_refs before the measured call) in extra_info["peak_extra_mb"], and the
floor: the three matmuls, timed alone, in the "matmul_floor" entry. Before timing, each
implementation's loss, dh and dw are checked against the reference in float64 (relative error
under 1e-4), so that every entry computes the same gradients.

    pytest bench/test_loss.py --benchmark-only --benchmark-json=loss.json
    python bench/tables.py loss.json
"""
import pytest
import torch
import torch.nn.functional as F

from checks import assert_close
from fastlm import ops
from fastlm import reference as R

torch.set_num_threads(2)
N, V, C = 4096, 50257, 768


def _status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


def _peak_extra(fn):
    """Peak resident memory above the current one while fn runs (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return float("nan")
    base = _status("VmRSS")
    fn()
    return (_status("VmHWM") - base) / 2**20


def _data():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, C, generator=g).requires_grad_()
    w = (torch.randn(V, C, generator=g) * 0.02).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[::50] = -100
    return h, w, t


_REF = []


def _reference(h, w, t, chunk=512):
    """Loss, dh and dw of the reference's linear_cross_entropy in float64. The rows go through
    in chunks with reduction="sum" (the (N, V) float64 logits and their gradient would take
    3.3 GB at once); the sums are exact to split, and the mean divides by the rows that count."""
    if not _REF:
        w64 = w.detach().double().requires_grad_()
        total, dh, dw = h.new_zeros((), dtype=torch.float64), [], torch.zeros_like(w64)
        n = (t != -100).sum()
        for i in range(0, h.shape[0], chunk):
            hc = h[i:i + chunk].detach().double().requires_grad_()
            loss = R.linear_cross_entropy(hc, w64, t[i:i + chunk], reduction="sum")
            g_h, g_w = torch.autograd.grad(loss, (hc, w64))
            total += loss.detach()
            dh.append(g_h / n)
            dw += g_w / n
        _REF.extend([total / n, torch.cat(dh), dw])
    return _REF


def torch_chunked(h, w, t, chunk=1024):
    """Chunked loss and gradients in plain PyTorch (what a careful user writes by hand)."""
    keep = t != -100
    n = keep.sum()
    dh = torch.empty_like(h)
    dw = torch.zeros_like(w)
    total = h.new_zeros(())
    for i in range(0, h.shape[0], chunk):
        hc, tc, kc = h[i:i + chunk], t[i:i + chunk], keep[i:i + chunk]
        z = hc @ w.T
        lse = z.logsumexp(-1)
        safe = torch.where(kc, tc, 0)
        total += torch.where(kc, lse - z.gather(1, safe[:, None]).squeeze(1), 0).sum()
        p = (z - lse[:, None]).exp_()
        p[torch.arange(len(tc)), safe] -= 1
        p *= (kc / n)[:, None]
        dh[i:i + chunk] = p @ w
        dw.addmm_(p.T, hc)
    return total / n, dh, dw


@pytest.mark.parametrize("impl", ["fastlm", "torch_unfused", "torch_chunked", "matmul_floor"])
def test_linear_cross_entropy_fwdbwd(benchmark, impl):
    benchmark.group = f"linear_ce_fwdbwd N={N} V={V} C={C}"
    h, w, t = _data()
    if impl == "fastlm":
        def fn():
            loss = ops.linear_cross_entropy(h, w, t)
            return loss, *torch.autograd.grad(loss, (h, w))
    elif impl == "torch_unfused":
        def fn():
            loss = F.cross_entropy(h @ w.T, t)
            return loss, *torch.autograd.grad(loss, (h, w))
    elif impl == "torch_chunked":
        def fn():
            with torch.no_grad():
                return torch_chunked(h, w, t)
    else:
        hd, wd = h.detach(), w.detach()
        z = torch.empty(N, V)

        def fn():
            torch.mm(hd, wd.T, out=z)
            return z @ wd, z.T @ hd
    if impl != "matmul_floor":
        assert_close(fn(), _reference(h, w, t), 1e-4, f"{impl}'s loss, dh, dw")
        benchmark.extra_info["peak_extra_mb"] = _peak_extra(fn)
    benchmark.pedantic(fn, rounds=3, warmup_rounds=0, iterations=1)
