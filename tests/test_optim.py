"""Muon (fastlm.optim): the Newton-Schulz orthogonalization and the optimizer step against a
float64 computation of their definitions, state save/load, and bad input."""
import copy

import pytest
import torch

from fastlm.optim import NS_COEFFICIENTS, Muon, orthogonalize


def _ns_float64(g, steps):
    """The quintic Newton-Schulz iteration of the definition, in float64, on the short side."""
    a, b, c = NS_COEFFICIENTS
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    x = x.t() if tall else x
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        s = x @ x.t()
        x = a * x + b * (s @ x) + c * (s @ (s @ x))
    return x.t() if tall else x


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (3, 7), (64, 64), (128, 384), (513, 65)])
def test_orthogonalize_matches_float64_and_flattens_the_spectrum(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0] * 1000 + shape[1]))
    got = orthogonalize(g)
    assert got.dtype == g.dtype and got.shape == g.shape
    want = _ns_float64(g, 5)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-4
    # five steps leave every singular value of the (full-rank, random) update in about [0.5, 1.3]
    sv = torch.linalg.svdvals(got.double())
    assert float(sv.max()) < 1.3 and float(sv.min()) > 0.3
    # and it points along U V^T, the exact orthogonalization
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    cos = (got.double() * (u @ vh)).sum() / (got.double().norm() * (u @ vh).norm())
    assert float(cos) > 0.9


@pytest.mark.parametrize("shape", [(2, 9), (5, 17), (128, 384), (128, 512), (512, 128), (3, 40, 13), (1, 1, 2)])
def test_gram_form_is_the_plain_iteration(shape):
    """Matrices with one side at least twice the other run the steps on their Gram matrix
    (float32 / float64): the same iteration, to the dtype's rounding, batched or not."""
    from fastlm import optim

    g = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    mats = g.reshape(-1, *shape[-2:])
    want = torch.stack([_ns_float64(m, 5) for m in mats]).reshape(shape)
    got64 = orthogonalize(g.double())
    assert ((got64 - want).norm() / want.norm()).item() < 1e-12
    got32 = orthogonalize(g)
    assert ((got32.double() - want).norm() / want.norm()).item() < 1e-5
    # the form itself, on the wide orientation, against the plain steps in float64
    x = mats.double().mT if mats.size(-2) > mats.size(-1) else mats.double()
    x = x / x.norm(dim=(-2, -1), keepdim=True)
    a, b, c = NS_COEFFICIENTS
    plain = x
    for _ in range(5):
        s_ = plain @ plain.mT
        plain = a * plain + (b * s_ + c * s_ @ s_) @ plain
    assert torch.allclose(optim._gram_iteration(x, 5), plain, atol=1e-12)
    assert torch.allclose(optim._plain_iteration(x, 5), plain, atol=1e-12)


def test_orthogonalize_keeps_float64_and_refuses_non_matrices():
    g = torch.randn(5, 9, dtype=torch.float64)
    assert orthogonalize(g).dtype == torch.float64
    for bad in (torch.randn(5), torch.randn(2, 3, 4, 5)):
        with pytest.raises(ValueError, match="matrix"):
            orthogonalize(bad)


@pytest.mark.parametrize("shape", [(64, 32), (32, 96), (3, 48, 24)])
def test_orthogonalize_in_bf16_stays_near_float64(shape):
    """bf16 products (the "bfloat16" / "auto" ns_dtype): the result is g's dtype, within bf16's
    rounding of the float64 iteration, and its spectrum is flattened all the same."""
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    got = orthogonalize(g, dtype=torch.bfloat16)
    assert got.dtype == g.dtype and got.shape == g.shape
    want = orthogonalize(g.double())
    err = ((got.double() - want).norm() / want.norm()).item()
    assert 1e-4 < err < 5e-2  # it did round (bf16 ran), and only by bf16's precision
    sv = torch.linalg.svdvals(got.double())
    assert float(sv.max()) < 1.4 and float(sv.min()) > 0.3


def test_ns_dtype_setting(monkeypatch):
    """ns_dtype: "float32" and "bfloat16" as named; "auto" takes bf16 only where the device
    multiplies it natively; float64 matrices keep float64 under "auto"; bad values refused."""
    from fastlm import optim

    cpu = torch.device("cpu")
    assert optim.ns_dtype_for("float32", cpu, torch.float32) == torch.float32
    assert optim.ns_dtype_for("bfloat16", cpu, torch.float32) == torch.bfloat16
    for native in (True, False):
        monkeypatch.setattr(optim, "native_bf16_products", lambda device, native=native: native)
        assert optim.ns_dtype_for("auto", cpu, torch.float32) == (torch.bfloat16 if native else torch.float32)
        assert optim.ns_dtype_for("auto", cpu, torch.float64) == torch.float64
    # the step follows the setting: bf16 products round the update, float32 ones reproduce orthogonalize's
    w = torch.nn.Parameter(torch.randn(40, 24, generator=torch.Generator().manual_seed(1)))
    grad = torch.randn(40, 24, generator=torch.Generator().manual_seed(2))
    updates = {}
    for dt in ("float32", "bfloat16"):
        p = torch.nn.Parameter(w.detach().clone())
        p.grad = grad.clone()
        Muon([p], lr=0.1, momentum=0.0, nesterov=False, ns_dtype=dt).step()
        updates[dt] = (w.detach() - p.detach()) / 0.1 / (40 / 24) ** 0.5
    assert torch.allclose(updates["float32"], orthogonalize(grad), atol=1e-6)
    assert 1e-4 < ((updates["bfloat16"] - updates["float32"]).norm() / updates["float32"].norm()).item() < 5e-2
    with pytest.raises(ValueError, match="ns_dtype"):
        Muon([w], ns_dtype="float16")
    from fastlm.train import TrainConfig
    with pytest.raises(ValueError, match="muon_ns_dtype"):
        TrainConfig(optimizer="muon", muon_ns_dtype="half")


def test_no_native_bf16_where_torch_is_held_below_avx512():
    """With torch's kernels held to AVX2 (an AVX-512 machine standing in for an AVX2 one), bf16
    products are emulated, so "auto" keeps the Newton-Schulz products in float32."""
    import os
    import subprocess
    import sys

    code = ("import torch; from fastlm.optim import native_bf16_products, ns_dtype_for; "
            "d = torch.device('cpu'); print(native_bf16_products(d), ns_dtype_for('auto', d, torch.float32))")
    for cap in ("avx2", "default"):
        out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, ATEN_CPU_CAPABILITY=cap),
                             capture_output=True, text=True, check=True).stdout.split()
        assert out == ["False", "torch.float32"], (cap, out)


@pytest.mark.parametrize("shape", [(4, 9, 5), (3, 5, 9), (1, 7, 7)])
def test_a_batch_is_each_matrix_orthogonalized_on_its_own(shape):
    g = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(shape[0]))
    g[0] *= 1e3  # the scaling is per matrix, not over the batch
    batch = orthogonalize(g)
    for i in range(shape[0]):
        assert torch.allclose(batch[i], orthogonalize(g[i]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nesterov", [True, False])
def test_step_matches_its_definition_in_float64(nesterov):
    gen = torch.Generator().manual_seed(3)
    w = torch.nn.Parameter(torch.randn(96, 32, generator=gen))  # tall: scaled by sqrt(3)
    w0 = w.detach().double().clone()
    opt = Muon([w], lr=0.03, momentum=0.9, nesterov=nesterov, weight_decay=0.1)
    buf = torch.zeros_like(w0)
    ref = w0.clone()
    for _ in range(3):
        g = torch.randn(96, 32, generator=gen)
        w.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + g.double()
        update = g.double() + 0.9 * buf if nesterov else buf
        ref = ref * (1 - 0.03 * 0.1) - 0.03 * 3 ** 0.5 * _ns_float64(update, 5)
    assert ((w.detach().double() - ref).norm() / ref.norm()).item() < 1e-5
    assert not torch.equal(w.detach().double(), w0)


def test_state_dict_resumes_exactly():
    gen = torch.Generator().manual_seed(5)
    grads = [torch.randn(16, 24, generator=gen) for _ in range(6)]

    def run(w, opt, gs):
        for g in gs:
            w.grad = g.clone()
            opt.step()

    a = torch.nn.Parameter(torch.randn(16, 24, generator=gen))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a = Muon([a], lr=0.02)
    run(a, opt_a, grads)
    opt_b = Muon([b], lr=0.02)
    run(b, opt_b, grads[:3])
    saved = copy.deepcopy(opt_b.state_dict())
    b2 = torch.nn.Parameter(b.detach().clone())
    opt_b2 = Muon([b2], lr=0.02)
    opt_b2.load_state_dict(saved)
    run(b2, opt_b2, grads[3:])
    assert torch.equal(a.detach(), b2.detach())


def test_skips_parameters_without_gradients_and_refuses_bad_settings():
    w = torch.nn.Parameter(torch.randn(4, 4))
    before = w.detach().clone()
    Muon([w]).step()
    assert torch.equal(w.detach(), before)
    with pytest.raises(ValueError, match="matrices only"):
        Muon([torch.nn.Parameter(torch.randn(8))])
    for bad in (dict(lr=0), dict(momentum=1.0), dict(ns_steps=0), dict(weight_decay=-1)):
        with pytest.raises(ValueError):
            Muon([w], **bad)


def test_trains_a_small_regression():
    """A linear least-squares problem: Muon's loss falls, as SGD's does."""
    gen = torch.Generator().manual_seed(7)
    x, true = torch.randn(256, 20, generator=gen), torch.randn(20, 10, generator=gen)
    y = x @ true
    w = torch.nn.Parameter(torch.zeros(20, 10))
    opt = Muon([w], lr=0.05, momentum=0.9)
    first = None
    for _ in range(200):
        loss = ((x @ w - y) ** 2).mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first


def test_muon_with_adamw_steps_each_group_as_its_own_optimizer_would():
    """MuonWithAdamW = Muon on the use_muon groups + torch's AdamW on the others, each group at
    its own learning rate; its state_dict resumes exactly."""
    from fastlm.optim import MuonWithAdamW

    gen = torch.Generator().manual_seed(11)
    shapes = [(24, 16), (16,), (40, 16)]
    init = [torch.randn(*s, generator=gen) for s in shapes]
    grads = [[torch.randn(*s, generator=gen) for s in shapes] for _ in range(6)]
    ps = [torch.nn.Parameter(t.clone()) for t in init]
    opt = MuonWithAdamW([{"params": [ps[0]], "use_muon": True, "lr": 0.03, "momentum": 0.9},
                         {"params": [ps[1], ps[2]], "lr": 2e-3, "betas": (0.9, 0.99), "weight_decay": 0.1}])
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    ref_muon = Muon([ref[0]], lr=0.03, momentum=0.9)
    ref_adam = torch.optim.AdamW([ref[1], ref[2]], lr=2e-3, betas=(0.9, 0.99), weight_decay=0.1, foreach=False)
    for step, gs in enumerate(grads):
        for p, r, g in zip(ps, ref, gs):
            p.grad, r.grad = g.clone(), g.clone()
        opt.step()
        ref_muon.step()
        ref_adam.step()
        if step == 2:
            saved = copy.deepcopy(opt.state_dict())
            mid = [p.detach().clone() for p in ps]
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-7)
    assert not torch.equal(ps[0].detach(), init[0])
    # resume from the state after step 3 and replay the last three steps: the same weights, bit for bit
    qs = [torch.nn.Parameter(t) for t in mid]
    opt2 = MuonWithAdamW([{"params": [qs[0]], "use_muon": True, "lr": 0.03, "momentum": 0.9},
                          {"params": [qs[1], qs[2]], "lr": 2e-3, "betas": (0.9, 0.99), "weight_decay": 0.1}])
    opt2.load_state_dict(saved)
    for gs in grads[3:]:
        for q, g in zip(qs, gs):
            q.grad = g.clone()
        opt2.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p.detach(), q.detach())


def test_muon_with_adamw_refuses_bad_groups():
    from fastlm.optim import MuonWithAdamW

    w, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match="matrices only"):
        MuonWithAdamW([{"params": [b], "use_muon": True}])
    with pytest.raises(ValueError, match="momentum"):
        MuonWithAdamW([{"params": [w], "use_muon": True, "momentum": 1.5}])
    with pytest.raises(ValueError, match="AdamW settings"):
        MuonWithAdamW([{"params": [b], "lr": -1.0}])
    with pytest.raises(TypeError, match="parameter groups"):
        MuonWithAdamW([w])


# ----------------------------------------------------------------------------- fastlm's AdamW
def _adamw_float64(params, grads_seq, lr, betas, eps, wd, max_norm=None):
    """AdamW with optional global-norm clipping, from its definition, in float64."""
    b1, b2 = betas
    p = [t.double().clone() for t in params]
    m = [torch.zeros_like(t) for t in p]
    v = [torch.zeros_like(t) for t in p]
    for t, grads in enumerate(grads_seq, start=1):
        g = [x.double() for x in grads]
        if max_norm is not None:
            norm = torch.sqrt(sum((x * x).sum() for x in g)).item()
            g = [x * min(1.0, max_norm / (norm + 1e-6)) for x in g]
        for i in range(len(p)):
            p[i] = p[i] * (1 - lr * wd)
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i]
            mhat, vhat = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
            p[i] = p[i] - lr * mhat / (vhat.sqrt() + eps)
    return p


needs_native = pytest.mark.skipif(not __import__("fastlm.optim", fromlist=["x"]).native_adamw_available(),
                                  reason="fastlm's C++ extension is not built")


@needs_native
@pytest.mark.parametrize("max_norm", [None, 0.5, 1e9])
@pytest.mark.parametrize("shapes", [[(1,)], [(7, 3), (5,)], [(3, 40000), (130,), (1, 1), (17, 33)]])
def test_adamw_matches_float64_definition(shapes, max_norm):
    from fastlm.optim import AdamW

    gen = torch.Generator().manual_seed(len(shapes) * 7 + (0 if max_norm is None else 1))
    init = [torch.randn(*s, generator=gen) for s in shapes]
    grads = [[torch.randn(*s, generator=gen) * 3 for s in shapes] for _ in range(5)]
    ps = [torch.nn.Parameter(t.clone()) for t in init]
    opt = AdamW(ps, lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, max_grad_norm=max_norm)
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
    want = _adamw_float64(init, grads, 3e-3, (0.8, 0.95), 1e-6, 0.1, max_norm)
    for p, w in zip(ps, want):
        assert (p.detach().double() - w).abs().max().item() < 1e-5
    if max_norm is not None:
        last = torch.sqrt(sum((g.double() ** 2).sum() for g in grads[-1])).item()
        assert opt.last_grad_norm == pytest.approx(last, rel=1e-5)


@needs_native
def test_adamw_matches_torch_adamw_with_clipping_and_groups_and_resumes_exactly():
    """The same groups through torch.optim.AdamW + clip_grad_norm_ and through fastlm's AdamW with
    max_grad_norm: the same weights to float32 rounding; state dicts move between the two."""
    from fastlm.optim import AdamW

    gen = torch.Generator().manual_seed(5)
    shapes = [(24, 16), (16,), (40, 16), (3,)]
    init = [torch.randn(*s, generator=gen) for s in shapes]
    grads = [[torch.randn(*s, generator=gen) for s in shapes] for _ in range(6)]
    ps = [torch.nn.Parameter(t.clone()) for t in init]
    rs = [torch.nn.Parameter(t.clone()) for t in init]
    groups = lambda q: [{"params": [q[0], q[2]], "weight_decay": 0.1}, {"params": [q[1], q[3]], "weight_decay": 0.0}]
    opt = AdamW(groups(ps), lr=2e-3, betas=(0.9, 0.99), max_grad_norm=1.0)
    ref = torch.optim.AdamW(groups(rs), lr=2e-3, betas=(0.9, 0.99), foreach=False)
    for step, gs in enumerate(grads):
        for p, r, g in zip(ps, rs, gs):
            p.grad, r.grad = g.clone(), g.clone()
        opt.step()
        torch.nn.utils.clip_grad_norm_(rs, 1.0)
        ref.step()
        opt.zero_grad()
        assert all(p.grad is None for p in ps)
        if step == 2:
            saved = copy.deepcopy(opt.state_dict())
            mid = [p.detach().clone() for p in ps]
    for p, r in zip(ps, rs):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=2e-6, atol=1e-7)
    # torch's state dict loads into fastlm's AdamW and the other way round
    sd = ref.state_dict()
    assert set(opt.state_dict()["state"]) == set(sd["state"]) == {0, 1, 2, 3}
    assert opt.state_dict()["param_groups"][1]["params"] == sd["param_groups"][1]["params"]
    qs = [torch.nn.Parameter(t.clone()) for t in init]
    AdamW(groups(qs), lr=2e-3).load_state_dict(sd)
    torch.optim.AdamW(groups(qs), lr=2e-3).load_state_dict(opt.state_dict())
    # resume from the state after step 3: the last three steps again, bit for bit
    qs = [torch.nn.Parameter(t) for t in mid]
    opt2 = AdamW(groups(qs), lr=2e-3, betas=(0.9, 0.99), max_grad_norm=1.0)
    opt2.load_state_dict(saved)
    for gs in grads[3:]:
        for q, g in zip(qs, gs):
            q.grad = g.clone()
        opt2.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p.detach(), q.detach())


@needs_native
def test_adamw_refuses_bad_input():
    from fastlm.optim import AdamW

    w = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="bad settings"):
        AdamW([w], lr=-1.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        AdamW([w], max_grad_norm=0.0)
    with pytest.raises(ValueError, match="float32 CPU"):
        AdamW([torch.nn.Parameter(torch.randn(3, dtype=torch.float64))])
    with pytest.raises(ValueError, match="more than one"):
        AdamW([{"params": [w]}, {"params": [w]}])
    opt = AdamW([w])
    with pytest.raises(ValueError, match="groups"):
        opt.load_state_dict({"state": {}, "param_groups": []})
    w.grad = torch.randn(3, 3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    with pytest.raises(RuntimeError, match="one length"):
        torch.ops.fastlm.adamw_step_([w.data], [], [], [], [1.0], 1e-3, 0.9, 0.99, 1e-8, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.fastlm.adamw_step_([w.data], [torch.zeros(9)], [torch.zeros(3, 3)], [torch.zeros(3, 3)], [1.0],
                                     1e-3, 0.9, 0.99, 1e-8, 0.0, 1.0)


@needs_native
def test_trainer_uses_fastlm_adamw_on_cpu_and_never_imports_dynamo(tmp_path):
    """A CPU float32 run trains through fastlm's AdamW (clipping inside its step), and a training
    step never imports TorchDynamo (torch.optim.Optimizer's methods would)."""
    import os
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, torch\n"
        "from fastlm import GPT, GPTConfig, Trainer\n"
        "from fastlm.train import TrainConfig\n"
        "from fastlm.optim import AdamW\n"
        "torch.manual_seed(0)\n"
        "from fastlm.data import prepare, stdlib_corpus\n"
        "docs = stdlib_corpus(max_files=8)\n"
        f"prepare(None, {str(tmp_path / 'data')!r}, vocab_size=256, documents=docs, val_fraction=0.1, "
        "progress=False, verbose=False)\n"
        "m = GPT(GPTConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=16))\n"
        f"cfg = TrainConfig(out_dir={str(tmp_path / 'run')!r}, batch_size=2, block_size=16, grad_clip=1.0, "
        "progress=False, plot=False, device='cpu', lr=1e-2)\n"
        f"t = Trainer(m, cfg, {str(tmp_path / 'data')!r})\n"
        "assert isinstance(t.optimizer, AdamW), type(t.optimizer)\n"
        "first = t.train_step(1e-2).item()\n"
        "for _ in range(20): last = t.train_step(1e-2).item()\n"
        "assert t.optimizer.last_grad_norm is not None and t.optimizer.last_grad_norm > 0\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    # without the suite's TRITON_INTERPRET, under which the Triton kernels (and TorchDynamo) load on the CPU
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_muon_with_adamw_steps_other_dtypes_with_torchs_adamw():
    """Parameters the C++ AdamW does not take (float64 here) step through torch's AdamW function:
    the same weights as torch.optim.AdamW, to the last bit."""
    from fastlm.optim import MuonWithAdamW

    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)]
    grads = [[torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in init] for _ in range(4)]
    ps = [torch.nn.Parameter(t.clone()) for t in init]
    rs = [torch.nn.Parameter(t.clone()) for t in init]
    opt = MuonWithAdamW([{"params": ps, "lr": 2e-3, "weight_decay": 0.1}])
    ref = torch.optim.AdamW(rs, lr=2e-3, weight_decay=0.1, foreach=False)
    for gs in grads:
        for p, r, g in zip(ps, rs, gs):
            p.grad, r.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, r in zip(ps, rs):
        assert torch.equal(p.detach(), r.detach())
    assert float(opt.state[ps[0]]["step"]) == 4.0


@pytest.mark.parametrize("kind", ["muon", "muon_with_adamw", "adamw"])
def test_step_with_a_closure_returns_its_loss_and_updates(kind):
    from fastlm.optim import AdamW, MuonWithAdamW, native_adamw_available

    if kind == "adamw" and not native_adamw_available():
        pytest.skip("fastlm's C++ extension is not built")
    w = torch.nn.Parameter(torch.randn(8, 4, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    opt = {"muon": lambda: Muon([w], lr=0.02), "muon_with_adamw": lambda: MuonWithAdamW([{"params": [w], "lr": 1e-2}]),
           "adamw": lambda: AdamW([w], lr=1e-2, max_grad_norm=1.0)}[kind]()
    before = w.detach().clone()

    def closure():
        opt.zero_grad()
        loss = (x @ w).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and loss.grad_fn is not None  # evaluated with gradients
    assert torch.isfinite(loss) and not torch.equal(w.detach(), before)
    assert opt.step() is None
