"""fastlm.ops: backend choice, input validation, custom-op registration, torch.compile,
and the reference itself checked against torch's own functions."""
import importlib
import importlib.machinery
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastlm
import fastlm.ops as ops
from fastlm.ops import _cpu_choice
from fastlm import reference

from conftest import rel_error


# ----------------------------------------------------------------------------- dispatch
def test_backends_lists_reference_and_cpu():
    b = ops.backends()
    assert b[0] == "reference"
    assert "cpu" in b, "the C++ extension must be built and loadable"


def test_backends_status_names_every_backend_and_why_not():
    status = ops.backends_status()
    assert list(status) == ["reference", "cpu", "cuda", "triton"]
    assert [n for n, st in status.items() if st.available] == ops.backends()
    for name, st in status.items():
        assert isinstance(st, ops.BackendStatus) and isinstance(st.why_unavailable, str)
        assert (st.why_unavailable == "") == st.available, name
        if not st.available:
            with pytest.raises(RuntimeError, match="not available"):
                ops.use_backend(name).__enter__()


def test_every_fused_op_has_one_namespace_per_kernel_family():
    """The Triton launchers are the C++ ops' schemas under ``fastlm_triton``: the same names,
    so one glue in fastlm/ops serves both."""
    if "triton" not in ops.backends():
        pytest.skip("triton backend unavailable")
    from fastlm import kernels

    for name, launcher in kernels.OPS.items():
        assert launcher._qualname == f"fastlm_triton::{name}"
        if "cpu" in ops.backends():
            assert hasattr(torch.ops.fastlm, name), f"{name}: no C++ op of that name"


def test_kernels_folder_hands_the_top_level_name_to_an_installed_package(tmp_path):
    """With the checkout's root first on sys.path, ``import kernels`` (transformers' probe for
    Hugging Face's package) gets the installed package of that name, not this folder."""
    root = pathlib.Path(__file__).resolve().parents[1]
    if not (root / "kernels" / "__init__.py").is_file():
        pytest.skip("not a source checkout")
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("CUDAProperties = 'the installed package'\n")
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; "
            "from kernels import CUDAProperties; import kernels; print(CUDAProperties, kernels.__file__)")
    out = subprocess.run([sys.executable, "-c", code, str(root), str(site)], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("the installed package ") and str(site) in out


@pytest.mark.skipif("triton" not in ops.backends(), reason="triton backend unavailable")
def test_kernels_folder_under_another_name_leaves_the_triton_ops_alone(monkeypatch):
    """A checkout's kernels/ folder is importable as a top-level ``kernels`` when the checkout's
    root is on sys.path, and transformers imports that name to probe for Hugging Face's package.
    That import must neither define the Triton ops a second time (torch would drop the ones
    fastlm.kernels holds, leaving dangling handles) nor load any kernel module."""
    import torch._library.custom_ops as custom_ops

    root = pathlib.Path(__file__).resolve().parents[1]
    if not (root / "kernels" / "__init__.py").is_file():
        pytest.skip("not a source checkout")
    libs = {k: v for k, v in custom_ops.OPDEF_TO_LIB.items() if k.startswith("fastlm_triton::")}
    assert "fastlm_triton::layer_norm_fwd" in libs
    monkeypatch.syspath_prepend(str(root))
    for name in [m for m in sys.modules if m == "kernels" or m.startswith("kernels.")]:
        monkeypatch.delitem(sys.modules, name)
    # where a package of that name is installed (Hugging Face's), the import is handed over to it
    installed = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if pathlib.Path(p or ".").resolve() != root])
    top = importlib.import_module("kernels")
    try:
        if installed is not None:
            assert pathlib.Path(top.__file__).resolve() == pathlib.Path(installed.origin).resolve()
        else:
            assert top.OPS == {}
            for mod in ("norms", "loss", "attention"):
                with pytest.raises(ImportError, match=f"fastlm.kernels.{mod}"):
                    importlib.import_module(f"kernels.{mod}")
        now = {k: v for k, v in custom_ops.OPDEF_TO_LIB.items() if k.startswith("fastlm_triton::")}
        assert now.keys() == libs.keys() and all(now[k] is libs[k] for k in libs)
        x, w, b = torch.randn(3, 7, dtype=torch.float64), torch.rand(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
        with ops.use_backend("triton"):
            got = ops.layer_norm(x.float(), w.float(), b.float())
        assert rel_error(got, reference.layer_norm(x, w, b)) < 1e-5
    finally:
        for name in [m for m in sys.modules if m == "kernels" or m.startswith("kernels.")]:
            del sys.modules[name]


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown fastlm backend 'nope'"):
        with ops.use_backend("nope"):
            pass


def test_unavailable_backend_is_refused():
    if "cuda" in ops.backends():
        pytest.skip("CUDA backend is usable here")
    with pytest.raises(RuntimeError, match="'cuda' is not available"):
        with ops.use_backend("cuda"):
            pass


def test_use_backend_nests_and_restores():
    x = torch.randn(4, 8)
    w = torch.ones(8)
    # the automatic choice: the CPU kernel where it wins at this SIMD level and size, else the reference
    auto = "cpu" if _cpu_choice.preferred("layer_norm")(x.numel()) else "reference"
    assert ops.implementation("layer_norm", x) == auto
    with ops.use_backend("reference"):
        assert ops.implementation("layer_norm", x) == "reference"
        with ops.use_backend("cpu"):
            assert ops.implementation("layer_norm", x) == "cpu"
        assert ops.implementation("layer_norm", x) == "reference"
    assert ops.implementation("layer_norm", x) == auto
    with ops.use_backend("auto"):
        assert ops.implementation("layer_norm", x) == auto
    ops.layer_norm(x, w)


def test_backend_on_the_wrong_device_is_an_error():
    x = torch.randn(2, 8, device="meta")
    with ops.use_backend("cpu"), pytest.raises(ValueError, match="runs on cpu tensors"):
        ops.layer_norm(x, torch.ones(8, device="meta"))


def test_environment_variable_selects_backend():
    code = ("import torch, fastlm.ops as o; x = torch.randn(3, 5); "
            "print(o.implementation('layer_norm', x), o.requested_backend())")
    env = dict(os.environ, FASTLM_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["reference", "reference"]
    env["FASTLM_BACKEND"] = "bogus"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "unknown fastlm backend 'bogus'" in r.stderr


def test_import_without_extension_falls_back_with_one_warning(tmp_path):
    # A fastlm._C that fails to import: fastlm must still import, warn once, and serve
    # every op from the reference backend.
    code = r"""
import sys, warnings, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in ("fastlm._C", "fastlm._C_cuda"):
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import torch, fastlm
    x = torch.randn(3, 5)
    y = fastlm.ops.layer_norm(x, torch.ones(5))
msgs = [str(m.message) for m in w if "fastlm._C" in str(m.message)]
print(len(msgs), "cpu" in fastlm.ops.backends(), fastlm.ops.implementation("layer_norm", x))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "1 False reference"


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("call,exc,msg", [
    (lambda: ops.attention(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)), ValueError, "4 dimensions"),
    (lambda: ops.attention(torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)), ValueError, "multiple"),
    (lambda: ops.attention(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)), ValueError, "head size"),
    (lambda: ops.attention(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8)), ValueError, "one shape"),
    (lambda: ops.attention(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8).double(), torch.randn(1, 2, 4, 8)), TypeError, "dtype"),
    (lambda: ops.attention(torch.randn(1, 1, 4, 300), torch.randn(1, 1, 4, 300), torch.randn(1, 1, 4, 300)), ValueError, "between 1 and 256"),
    (lambda: ops.attention(torch.randn(1, 1, 0, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)), ValueError, "at least 1"),
    (lambda: ops.attention([1], torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)), TypeError, "torch.Tensor"),
    (lambda: ops.attention(torch.ones(1, 1, 4, 8, dtype=torch.long), torch.ones(1, 1, 4, 8), torch.ones(1, 1, 4, 8)), TypeError, "floating-point"),
    (lambda: ops.decode_attention(torch.randn(2, 2, 1, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8), torch.tensor([3.0, 4.0])), ValueError, "cache_lens"),
    (lambda: ops.decode_attention(torch.randn(2, 2, 1, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8), torch.tensor([3])), ValueError, "cache_lens"),
    (lambda: ops.layer_norm(torch.randn(4, 8), torch.ones(7)), ValueError, "weight must have shape"),
    (lambda: ops.layer_norm(torch.randn(4, 8), torch.ones(8), torch.zeros(7)), ValueError, "bias"),
    (lambda: ops.layer_norm(torch.randn(4, 8), torch.ones(8).double()), TypeError, "dtype"),
    (lambda: ops.layer_norm(torch.randn(4, 8), torch.ones(8), residual=torch.randn(4, 9)), ValueError, "residual"),
    (lambda: ops.rms_norm(torch.randn(()), torch.ones(1)), ValueError, "at least one dimension"),
    (lambda: ops.gelu(torch.arange(3)), TypeError, "floating-point"),
    (lambda: ops.cross_entropy(torch.randn(4, 10), torch.zeros(5, dtype=torch.long)), ValueError, "targets must have shape"),
    (lambda: ops.cross_entropy(torch.randn(4, 10), torch.zeros(4)), TypeError, "int64"),
    (lambda: ops.cross_entropy(torch.randn(4, 10), torch.zeros(4, dtype=torch.long), reduction="avg"), ValueError, "reduction"),
    (lambda: ops.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 7), torch.zeros(4, dtype=torch.long)), ValueError, "weight must have shape"),
    (lambda: ops.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long), chunk_size=0), ValueError, "chunk_size"),
])
def test_bad_input_raises_clear_error(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


def test_cpu_kernel_rejects_bad_input_without_crashing():
    # Called directly, bypassing the Python checks, the C++ op still refuses cleanly.
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.fastlm.layer_norm_fwd(torch.randn(3, 4), torch.ones(5), None, None, 1e-5)


# ----------------------------------------------------------------------------- custom ops
def _opcheck_cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g)
    r = torch.randn(5, 7, generator=g)
    w = torch.randn(7, generator=g)
    b = torch.randn(7, generator=g)
    return [
        ("layer_norm_fwd", (x, w, b, r, 1e-5)),
        ("layer_norm_fwd", (x.double(), w.double(), None, None, 1e-5)),
        ("rms_norm_fwd", (x, w, r, 1e-6)),
        ("rms_norm_fwd", (x[:, :5], w[:5], None, 1e-6)),
        ("gelu_fwd", (x,)),
    ]


@pytest.mark.parametrize("name,args", _opcheck_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    args = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)
    torch.library.opcheck(getattr(torch.ops.fastlm, name).default, args)


@pytest.mark.skipif("cpu" not in ops.backends(), reason="C++ extension unavailable")
def test_eager_driver_matches_the_registered_autograd():
    """Each fused op's formula runs under two drivers (fastlm/ops/_forms.py): the eager
    autograd.Function the public ops use, and torch.library's registration that calls through
    torch.ops take. Same inputs, float64, only some requiring grad: same outputs and gradients,
    and the public op's graph node is the eager Function's."""
    from fastlm.ops import _forms

    g = torch.Generator().manual_seed(3)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x, r, w, b = rand(6, 11), rand(6, 11), rand(11), rand(11)
    q, k, v = (rand(2, 3, 5, 8).float() for _ in range(3))  # the CPU attention takes no float64
    h, wl, t = rand(9, 11), rand(13, 11), torch.randint(0, 13, (9,), generator=g)
    cases = [
        ("layer_norm_fwd", (x, w, b, r, 1e-5), (0, 1, 3)),
        ("layer_norm_fwd", (x, w, None, None, 1e-5), (0,)),
        ("rms_norm_fwd", (x, w, r, 1e-6), (1, 2)),
        ("gelu_fwd", (x,), (0,)),
        ("attention_fwd", (q, k, v, True, 0.3), (0, 2)),
        ("linear_cross_entropy_fwd", (h, wl, t, -100, "mean", 0, True), (0, 1)),
    ]
    with ops.use_backend("cpu"):
        for name, args, wants in cases:
            results = []
            for drive in (_forms.op("fastlm", name), getattr(torch.ops.fastlm, name)):
                leaves = [a.clone().requires_grad_(i in wants) if isinstance(a, torch.Tensor) else a
                          for i, a in enumerate(args)]
                out = drive(*leaves)
                first = out[0] if isinstance(out, (tuple, list)) else out
                if drive is not getattr(torch.ops.fastlm, name):
                    assert type(first.grad_fn).__name__.startswith(f"fastlm_{name}"), (name, first.grad_fn)
                seed = torch.randn(first.shape, generator=torch.Generator().manual_seed(5), dtype=first.dtype)
                grads = torch.autograd.grad((first * seed).sum(), [leaves[i] for i in wants])
                results.append((first.detach(), grads))
            (o1, g1), (o2, g2) = results
            assert torch.equal(o1, o2), name
            tol = 1e-12 if o1.dtype == torch.float64 else 1e-6
            for a, c in zip(g1, g2):
                assert torch.allclose(a, c, rtol=tol, atol=tol), name
            with torch.no_grad():  # no gradient wanted: straight to the kernel, nothing recorded
                out = _forms.op("fastlm", name)(*[a.clone().requires_grad_() if isinstance(a, torch.Tensor)
                                                 and a.is_floating_point() else a for a in args])
                first = out[0] if isinstance(out, (tuple, list)) else out
                assert first.grad_fn is None and not first.requires_grad, name


def test_torch_compile_fullgraph_through_ops():
    torch._dynamo.reset()

    def f(x, r, w, b, q, k, v):
        y, h = ops.layer_norm(x, w, b, residual=r)
        z = ops.rms_norm(ops.gelu(y), w)
        a = ops.attention(q, k, v, causal=True)
        return z.sum() + h.sum() + a.sum()

    g = torch.Generator().manual_seed(1)
    args = [torch.randn(3, 16, generator=g, requires_grad=True), torch.randn(3, 16, generator=g),
            torch.randn(16, generator=g), torch.randn(16, generator=g),
            torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g)]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(*args)
    out.backward()
    grad_c = args[0].grad.clone()
    args[0].grad = None
    ref = f(*args)
    ref.backward()
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(grad_c, args[0].grad, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("backend", ["reference"] + [b for b in ("cpu",) if b in ops.backends()])
def test_ops_under_autocast_take_mixed_dtypes_as_torch_does(backend):
    """Under torch.autocast a GPT mixes a bf16 projection output with a float32 residual stream
    and float32 gains: the fused ops cast as their torch counterparts do (attention to the
    autocast dtype, like SDPA; the norms and the loss to float32, as on CUDA), and gradients
    reach the float32 leaves in float32."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 16, generator=g).bfloat16().requires_grad_()  # a projection's output
    r = torch.randn(2, 5, 16, generator=g).requires_grad_()  # the float32 residual stream
    w = (1 + 0.1 * torch.randn(16, generator=g)).requires_grad_()
    b = (0.1 * torch.randn(16, generator=g)).requires_grad_()
    q = torch.randn(1, 2, 5, 8, generator=g).requires_grad_()
    head = torch.randn(7, 16, generator=g).requires_grad_()
    t = torch.randint(0, 7, (2, 5), generator=g)
    with ops.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        y, h = ops.layer_norm(x, w, b, residual=r)
        y2, _ = ops.rms_norm(x, w, residual=r)
        a = ops.attention(q, q, q)
        loss = ops.linear_cross_entropy(y, head, t)
        ce = ops.cross_entropy(F.linear(y, head), t)
    assert y.dtype == h.dtype == y2.dtype == torch.float32
    assert a.dtype == torch.bfloat16
    assert loss.dtype == ce.dtype == torch.float32
    want_y = F.layer_norm(x.float() + r, (16,), w, b)
    assert rel_error(y, want_y) < 1e-5
    want_loss = F.cross_entropy(F.linear(want_y.bfloat16(), head.bfloat16()).float().reshape(-1, 7), t.reshape(-1))
    assert abs(loss.item() - want_loss.item()) < 1e-2 * abs(want_loss.item())
    assert abs(ce.item() - want_loss.item()) < 1e-2 * abs(want_loss.item())
    (loss + a.float().sum() + y2.sum()).backward()
    for leaf in (x, r, w, b, q, head):
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype and torch.isfinite(leaf.grad).all()
    # Without autocast mixed dtypes stay an error.
    with ops.use_backend(backend), pytest.raises(TypeError, match="dtype"):
        ops.layer_norm(x, w, b, residual=r)


@pytest.mark.parametrize("backend", ["reference"] + [b for b in ("cpu",) if b in ops.backends()])
def test_gpt_trains_under_autocast(backend):
    """A GPT's loss and gradients under bf16 autocast (what the Trainer uses on CUDA GPUs): the
    same on the fused kernels as on the reference, and near the float32 loss."""
    from fastlm import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=300, block_size=64))
    idx = torch.randint(0, 300, (2, 33))

    def run(name, autocast):
        model.zero_grad(set_to_none=True)
        with ops.use_backend(name), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model.loss(idx[:, :-1], idx[:, 1:])
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = run(backend, True)
    ref_loss, ref_grads = run("reference", True)
    f32_loss, _ = run("reference", False)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref_loss.item()) < 1e-3 * ref_loss.item()
    assert abs(loss.item() - f32_loss.item()) < 1e-2 * f32_loss.item()
    for a, b in zip(grads, ref_grads):
        assert a.dtype == torch.float32 and rel_error(a, b) < 3e-2


# ----------------------------------------------------------------------------- torch forms
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_forms_compute_the_spec(monkeypatch, dtype):
    """The reference backend's forms on GPUs (torch's fused ops, fastlm/ops/_torch_forms.py),
    run here on CPU tensors by lifting the device switch, against the float64 spec."""
    from fastlm.ops import _torch_forms as TF

    monkeypatch.setattr(TF, "_spec_only", lambda t, cpu_spec=True: t.dtype == torch.float64)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    g = torch.Generator().manual_seed(5)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    def check(got, want):
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        for a, b in zip(got, want):
            assert a.dtype in (dtype, torch.float32) and rel_error(a, b) < tol, rel_error(a, b)

    for B, H, Hkv, Tq, Tk, D, causal in [(2, 4, 2, 9, 9, 16, True), (1, 3, 3, 5, 11, 8, False),
                                         (1, 2, 1, 4, 7, 8, True)]:  # the last: bottom-right causal
        q, k, v = rnd(B, H, Tq, D), rnd(B, Hkv, Tk, D), rnd(B, Hkv, Tk, D)
        check(TF.attention(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal, scale=0.3),
              reference.attention(q, k, v, causal=causal, scale=0.3))
    x, r, w, b = rnd(6, 33), rnd(6, 33), rnd(33) + 1, rnd(33)
    lo = [t.to(dtype) for t in (x, r, w, b)]
    check(TF.layer_norm(lo[0], lo[2], lo[3], 1e-5, residual=lo[1]), reference.layer_norm(x, w, b, 1e-5, residual=r))
    check(TF.layer_norm(lo[0], lo[2], None, 1e-5), reference.layer_norm(x, w, None, 1e-5))
    check(TF.rms_norm(lo[0], lo[2], 1e-6, residual=lo[1]), reference.rms_norm(x, w, 1e-6, residual=r))
    check(TF.gelu(lo[0]), reference.gelu(x))
    logits, t = rnd(2, 5, 40), torch.randint(0, 40, (2, 5), generator=g)
    t[0, 1] = -100
    for red in ("mean", "sum", "none"):
        check(TF.cross_entropy(logits.to(dtype), t, reduction=red), reference.cross_entropy(logits, t, reduction=red))
    head = rnd(40, 33)
    for red in ("mean", "none"):
        check(TF.linear_cross_entropy(lo[0], head.to(dtype), t.reshape(-1)[:6], reduction=red),
              reference.linear_cross_entropy(x, head, t.reshape(-1)[:6], reduction=red))


def test_reference_backend_keeps_the_spec_on_cpu():
    """On CPU tensors (and in float64 anywhere) the reference backend is the spec itself."""
    from fastlm.ops import _dispatch

    q = torch.randn(1, 2, 6, 8)
    with ops.use_backend("reference"):
        assert torch.equal(ops.attention(q, q, q), reference.attention(q, q, q))
    assert _dispatch._BACKENDS["reference"].ops["attention"].fn.__module__ == "fastlm.ops._torch_forms"


@pytest.mark.skipif("cpu" not in ops.backends(), reason="C++ extension unavailable")
def test_automatic_choice_without_a_kernel_is_torchs_own_op(monkeypatch):
    """Where no CPU kernel is preferred at the level (_cpu_choice), the automatic choice serves
    PyTorch's fused op (SDPA, F.layer_norm, ...), not the spec's plain ops; asked for by name,
    the reference stays the spec. Both compute the spec's function."""
    from fastlm.ops import _cpu_choice

    monkeypatch.setattr(_cpu_choice, "NATIVE_WINS", {k: frozenset() for k in _cpu_choice.NATIVE_WINS})
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g, requires_grad=True) for _ in range(3))
    x, r, w = torch.randn(5, 16, generator=g, requires_grad=True), torch.randn(5, 16, generator=g), torch.randn(16)
    assert ops.implementation("attention", q) == "reference"
    calls = {
        "ScaledDotProduct": lambda: ops.attention(q, k, v, causal=True),
        "NativeLayerNorm": lambda: ops.layer_norm(x, w, None, residual=r)[0],
        "Gelu": lambda: ops.gelu(x),
    }
    for node, call in calls.items():
        auto = call()
        assert node.lower() in type(auto.grad_fn).__name__.lower(), (node, auto.grad_fn)
        with ops.use_backend("reference"):
            spec = call()
        assert node.lower() not in type(spec.grad_fn).__name__.lower(), (node, spec.grad_fn)
        assert rel_error(auto, spec) < 1e-5, node
    # F.rms_norm is composed of plain ops on CPUs: the same function, no node of its own to find
    assert rel_error(ops.rms_norm(x, w, residual=r)[0], reference.rms_norm(x, w, residual=r)[0]) < 1e-5
    monkeypatch.undo()
    if _cpu_choice.preferred("gelu")():  # and where the kernel wins, the kernel serves
        assert ops.implementation("gelu", x) == "cpu"


@pytest.mark.skipif("cpu" not in ops.backends(), reason="C++ extension unavailable")
def test_automatic_choice_follows_the_input_size(monkeypatch):
    """A kernel measured ahead of torch only from some size on (_cpu_choice.MIN_NUMEL) serves
    from that size; smaller inputs go to torch's op. Asked for by name, it serves at any size."""
    from fastlm.ops import _cpu_choice, _native

    level = _native.cpu_isa()
    monkeypatch.setitem(_cpu_choice.NATIVE_WINS, "layer_norm", frozenset({level}))
    monkeypatch.setitem(_cpu_choice.MIN_NUMEL, "layer_norm", {level: 64})
    w = torch.randn(16)
    small, big = torch.randn(3, 16), torch.randn(4, 16)  # 48 and 64 elements
    assert ops.implementation("layer_norm", small) == "reference"
    assert ops.implementation("layer_norm", big) == "cpu"
    assert ops.implementation("rms_norm", small) == "cpu"  # no size rule of its own
    # with the residual the norm reads twice the elements: 96
    assert type(ops.layer_norm(small.clone().requires_grad_(), w, residual=small)[0].grad_fn).__name__.startswith(
        "fastlm_layer_norm_fwd")
    with ops.use_backend("cpu"):
        assert ops.implementation("layer_norm", small) == "cpu"
    x = small.clone().requires_grad_()
    assert "NativeLayerNorm" in type(ops.layer_norm(x, w).grad_fn).__name__
    x = big.clone().requires_grad_()
    assert type(ops.layer_norm(x, w).grad_fn).__name__.startswith("fastlm_layer_norm_fwd")


# ----------------------------------------------------------------------------- the reference
def test_reference_matches_torch_functions():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 33, generator=g, dtype=torch.float64)
    w, b = torch.randn(33, generator=g, dtype=torch.float64), torch.randn(33, generator=g, dtype=torch.float64)
    assert rel_error(reference.layer_norm(x, w, b, 1e-5), F.layer_norm(x, (33,), w, b, 1e-5)) < 1e-12
    assert rel_error(reference.rms_norm(x, w, 1e-6), F.rms_norm(x, (33,), w, 1e-6)) < 1e-12
    assert rel_error(reference.gelu(x), F.gelu(x, approximate="tanh")) < 1e-12
    t = torch.randint(0, 33, (6,), generator=g)
    t[2] = -100
    assert rel_error(reference.cross_entropy(x, t), F.cross_entropy(x, t)) < 1e-12
    assert rel_error(reference.cross_entropy(x, t, reduction="none"), F.cross_entropy(x, t, reduction="none")) < 1e-12
    h, W = x[:, :8], torch.randn(40, 8, generator=g, dtype=torch.float64)
    assert rel_error(reference.linear_cross_entropy(h, W, t), F.cross_entropy(h @ W.T, t)) < 1e-12
    q, k, v = (torch.randn(2, 3, 17, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for causal in (False, True):
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert rel_error(reference.attention(q, k, v, causal=causal), ref) < 1e-12


def test_reference_attention_bottom_right_causal_and_gqa():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 3, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 7, 8, generator=g, dtype=torch.float64) for _ in range(2))
    out = reference.attention(q, k, v, causal=True)
    # The last query sees every key; query i sees keys 0 .. i + 4.
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    for i in range(3):
        s = (q[:, :, i:i + 1] @ kk[:, :, : i + 5].transpose(-1, -2)) / math.sqrt(8)
        exp = torch.softmax(s, -1) @ vv[:, :, : i + 5]
        assert rel_error(out[:, :, i:i + 1], exp) < 1e-12


def test_reference_decode_attention_equals_full_attention_on_each_prefix():
    g = torch.Generator().manual_seed(4)
    B, H, Hkv, L, D, Tq = 3, 4, 2, 20, 8, 2
    lens = torch.tensor([2, 11, 20])
    q = torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64)
    kc, vc = (torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64) for _ in range(2))
    out = reference.decode_attention(q, kc, vc, lens)
    for b in range(B):
        n = int(lens[b])
        exp = reference.attention(q[b:b + 1], kc[b:b + 1, :, :n], vc[b:b + 1, :, :n], causal=True)
        assert rel_error(out[b:b + 1], exp) < 1e-12


def test_version():
    assert isinstance(fastlm.__version__, str) and fastlm.__version__.count(".") == 2
