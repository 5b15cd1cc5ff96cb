"""Muon: momentum orthogonalized by Newton-Schulz, for the 2-D weight matrices of a network.

Each step keeps a momentum buffer per matrix as SGD does (buf = mu buf + g; the Nesterov form
uses g + mu buf), then replaces the update by its nearest semi-orthogonal matrix, U V^T for
the update's SVD U S V^T, approximated by a few steps of a quintic Newton-Schulz iteration
(matrix products only, so it runs on the fast paths of any device). Every direction the
update spans then moves by the same amount, however unevenly the raw gradient weighs them.
The step is scaled by sqrt(max(1, rows / cols)) so that tall and wide matrices move alike,
and weight decay is decoupled (p <- p (1 - lr wd)), as in AdamW.

Muon is meant for the hidden matrices (attention and MLP projections); embeddings, the output
layer, gains and biases train better with AdamW. ``MuonWithAdamW`` is one optimizer over both
kinds of parameter group (``use_muon=True`` or not), so a training run saves, loads and
schedules one optimizer state; the Trainer builds it for ``TrainConfig(optimizer="muon")``. The
method, the iteration's coefficients and the recipe around it are Keller Jordan's (the
modded-nanogpt speedrun, 2024).

``AdamW`` is AdamW over CPU float32 parameters in two passes of a C++ kernel per step (the
global gradient norm for clipping, then the update of every tensor, chunked across threads),
instead of a separate clipping pass and one kernel launch per tensor.

Both keep torch's optimizer protocol (``param_groups``, ``state``, ``state_dict`` in torch's
layout, ``load_state_dict``, ``zero_grad``, ``add_param_group``) without subclassing
``torch.optim.Optimizer``: its methods import TorchDynamo on first use, which costs a short
training run more start-up time than anything else it loads.
"""
from __future__ import annotations

import functools
import math
from collections import defaultdict

import torch

class ParamGroupOptimizer:
    """The optimizer protocol fastlm's optimizers share with ``torch.optim.Optimizer``:
    ``param_groups`` (dicts with ``params`` and the group's settings), ``state`` (per parameter),
    ``state_dict`` / ``load_state_dict`` in torch's layout (parameters numbered in group order,
    so a state saved by a torch optimizer of the same groups loads here and back), ``zero_grad``
    and ``add_param_group``. Subclasses implement ``_update`` (one step, under no_grad)."""

    def __init__(self, params, defaults: dict):
        self.defaults = dict(defaults)
        self.state: defaultdict = defaultdict(dict)
        self.param_groups: list = []
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for g in groups:
            self.add_param_group(g)

    def add_param_group(self, group: dict) -> None:
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError("a parameter group is a dict with 'params'")
        group = dict(group)
        params = group["params"]
        group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in group["params"]:
            if not isinstance(p, torch.Tensor) or not p.is_leaf:
                raise ValueError("optimizers take leaf tensors (parameters) only")
        for k, v in self.defaults.items():
            group.setdefault(k, v)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in group["params"]):
            raise ValueError("a parameter appears in more than one parameter group")
        self.param_groups.append(group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_()
                    p.grad.zero_()

    def state_dict(self) -> dict:
        index, groups, i = {}, [], 0
        for g in self.param_groups:
            ids = []
            for p in g["params"]:
                index.setdefault(id(p), i)
                ids.append(index[id(p)])
                i += 1
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ids})
        state = {index[id(p)]: dict(st) for p, st in self.state.items() if id(p) in index}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(saved)} parameter groups, the optimizer has "
                             f"{len(self.param_groups)}")
        for s, g in zip(saved, self.param_groups):
            if len(s["params"]) != len(g["params"]):
                raise ValueError("loaded state dict contains a parameter group that does not match the size of the "
                                 "optimizer's group")
        by_index = {i: p for s, g in zip(saved, self.param_groups) for i, p in zip(s["params"], g["params"])}
        state = defaultdict(dict)
        for i, st in state_dict["state"].items():
            p = by_index.get(int(i))
            if p is None:
                continue
            # moments follow their parameter's dtype and device; a step count stays as saved
            state[p] = {k: (v.detach().clone() if k == "step" else v.detach().to(p.device, p.dtype).clone())
                        if isinstance(v, torch.Tensor) else v for k, v in st.items()}
        self.state = state
        for s, g in zip(saved, self.param_groups):
            g.update({k: v for k, v in s.items() if k != "params"})

    def step(self, closure=None):
        """One update of every group; ``closure`` (re-evaluates the loss, with gradients) first
        when given. Returns its loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._update()
        return loss

    def _update(self) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in self.defaults.items())
        return f"{type(self).__name__}({len(self.param_groups)} groups, {settings})"


def native_adamw_available() -> bool:
    """Whether the C++ extension with the fused AdamW kernel is loaded."""
    try:
        return hasattr(torch.ops.fastlm, "adamw_step_")
    except (AttributeError, RuntimeError):
        return False


def fits_native_adamw(params) -> bool:
    """Whether ``AdamW`` takes these parameters: plain (not distributed-tensor) float32 CPU
    tensors, contiguous, and the extension loaded."""
    return native_adamw_available() and all(
        type(p) in (torch.Tensor, torch.nn.Parameter) and p.device.type == "cpu" and p.dtype == torch.float32
        and p.is_contiguous() for p in params)


def _adamw_state(p, state):
    st = state.get(p)
    if st is None or "step" not in st:
        st = state[p] = {"step": torch.zeros((), dtype=torch.float32),
                         "exp_avg": torch.zeros_like(p, memory_format=torch.contiguous_format),
                         "exp_avg_sq": torch.zeros_like(p, memory_format=torch.contiguous_format)}
    return st


def _adamw_operands(group, state):
    """The parameters of ``group`` that have a gradient, with their gradients, moments and step
    tensors (state created on first use), as the AdamW kernels take them."""
    params, grads, avgs, sqs, steps = [], [], [], [], []
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError("AdamW does not take sparse gradients")
        st = _adamw_state(p, state)
        params.append(p)
        grads.append(p.grad)
        avgs.append(st["exp_avg"])
        sqs.append(st["exp_avg_sq"])
        steps.append(st["step"])
    return params, grads, avgs, sqs, steps


def _adamw_groups_step(groups, state, grad_scale: float = 1.0) -> None:
    """One AdamW step of every group (dicts with params, lr, betas, eps, weight_decay) through
    the C++ kernel, gradients multiplied by grad_scale."""
    for group in groups:
        params, grads, avgs, sqs, steps = _adamw_operands(group, state)
        if not params:
            continue
        for t in steps:
            t += 1
        beta1, beta2 = group["betas"]
        torch.ops.fastlm.adamw_step_([p.data for p in params], [g.contiguous() for g in grads], avgs, sqs,
                                     [float(t) for t in steps], float(group["lr"]), float(beta1), float(beta2),
                                     float(group["eps"]), float(group["weight_decay"]), float(grad_scale))


def grad_norm(params) -> float:
    """The global L2 norm of the gradients of ``params`` (CPU float32), one pass in C++."""
    grads = [p.grad.contiguous() for p in params if p.grad is not None]
    return math.sqrt(torch.ops.fastlm.sum_squares(grads)) if grads else 0.0


def clip_coefficient(norm: float, max_norm: float) -> float:
    """What ``torch.nn.utils.clip_grad_norm_`` multiplies the gradients by."""
    return min(max_norm / (norm + 1e-6), 1.0) if norm == norm else norm


class AdamW(ParamGroupOptimizer):
    """AdamW (decoupled weight decay) for CPU float32 parameters through fastlm's C++ kernel:
    the same update as ``torch.optim.AdamW`` (same settings, same state layout), with optional
    clipping of the global gradient norm to ``max_grad_norm`` inside the step (what
    ``torch.nn.utils.clip_grad_norm_`` before the step computes; the norm before clipping is
    kept in ``last_grad_norm``). Parameters elsewhere (CUDA, bf16, DTensor shards) belong to
    ``torch.optim.AdamW``; ``fits_native_adamw`` says which."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 max_grad_norm: float | None = None):
        b1, b2 = betas
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"AdamW: bad settings lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"AdamW: max_grad_norm must be positive or None, got {max_grad_norm}")
        super().__init__(params, dict(lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay))
        if not native_adamw_available():
            raise RuntimeError("fastlm.optim.AdamW needs fastlm's C++ extension; use torch.optim.AdamW")
        for g in self.param_groups:
            if not fits_native_adamw(g["params"]):
                raise ValueError("fastlm.optim.AdamW takes contiguous float32 CPU tensors; use torch.optim.AdamW "
                                 "for other devices and dtypes")
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm: float | None = None

    def _update(self) -> None:
        scale = 1.0
        if self.max_grad_norm is not None:
            self.last_grad_norm = grad_norm([p for g in self.param_groups for p in g["params"]])
            scale = clip_coefficient(self.last_grad_norm, self.max_grad_norm)
        _adamw_groups_step(self.param_groups, self.state, scale)


# (a, b, c) of X <- a X + (b A + c A^2) X, A = X X^T: chosen to push every singular value of
# the normalised update into about [0.7, 1.2] in five steps rather than to converge exactly.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An approximation of U V^T for a matrix g = U S V^T: g scaled to unit Frobenius norm (so
    every singular value is at most 1), then `steps` quintic Newton-Schulz steps on its short
    side. ``g`` may also be a batch (n, rows, cols) of same-shaped matrices, each orthogonalised
    on its own (one batched product per step instead of n small ones). The products run in
    ``dtype``: float32 by default (float64 stays float64), or bfloat16 (the speedrun's choice
    on GPUs: the iteration only has to push the singular values into about [0.7, 1.2], which
    bf16's 8-bit mantissa does as well; the norm is taken in float32). Returned in g's dtype."""
    if g.dim() not in (2, 3):
        raise ValueError(f"orthogonalize: expected a matrix or a batch of matrices, got shape {tuple(g.shape)}")
    if dtype is None:
        dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    x = g.float() if g.dtype != torch.float64 else g
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.transpose(-2, -1)
    x = (x / (x.norm(dim=(-2, -1), keepdim=True) + eps)).to(dtype)
    gram = dtype != torch.bfloat16 and x.size(-1) >= 2 * x.size(-2)
    x = (_gram_iteration if gram else _plain_iteration)(x, steps)
    if tall:
        x = x.transpose(-2, -1)
    return x.to(g.dtype)


def _plain_iteration(x, steps):
    """``steps`` Newton-Schulz steps of a wide x (m, n) or a batch of them: x <- a x + (b s +
    c s^2) x with s = x x^T, each "p q + beta r" one product call (addmm / baddbmm) instead of
    a product, two scalings and an add over the whole matrix."""
    a, b, c = NS_COEFFICIENTS
    fma = torch.addmm if x.dim() == 2 else torch.baddbmm
    for _ in range(steps):
        s = torch.matmul(x, x.transpose(-2, -1))
        x = fma(x, fma(s, s, s, beta=b, alpha=c), x, beta=a)
    return x


def _gram_iteration(x, steps):
    """The same Newton-Schulz steps for a wide x (m, n), n >= 2m, run on its m x m Gram matrix.
    Step k is x_{k+1} = p_k x_k with p_k = a I + b s_k + c s_k^2, s_k = x_k x_k^T, so
    s_{k+1} = p_k s_k p_k = p_k^2 s_k (p_k is a polynomial in s_k, so they commute) and the
    result is (p_{steps-1} ... p_0) x_0: two (m, n) products in all instead of two a step, and
    about 17 m^3 of square ones, which is fewer multiply-adds once n >= 2m (41% fewer over a
    GPT block's matrices of n = 3m and 4m). Exact arithmetic gives the plain iteration's result;
    in float32 it matches it to float32's rounding. bf16 rounds the accumulated product too
    coarsely (twice the plain iteration's error), so bf16 keeps the plain steps."""
    a, b, c = NS_COEFFICIENTS
    fma = torch.addmm if x.dim() == 2 else torch.baddbmm
    s = torch.matmul(x, x.transpose(-2, -1))
    q = None
    for k in range(steps):
        p = fma(s, s, s, beta=b, alpha=c)
        p.diagonal(dim1=-2, dim2=-1).add_(a)  # a I + b s + c s^2
        q = p if q is None else torch.matmul(p, q)
        if k + 1 < steps:
            s = torch.matmul(p, torch.matmul(p, s))
    return torch.matmul(q, x)


def _muon_direction(p, state, group):
    """The momentum step of the matrix ``p`` (its gradient set): returns the update to
    orthogonalise (Nesterov's look-ahead when ``nesterov``)."""
    g = p.grad
    if g.is_sparse:
        raise RuntimeError("Muon does not take sparse gradients")
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(g)
    buf = state["momentum_buffer"]
    buf.mul_(group["momentum"]).add_(g)
    return g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf


def _muon_apply(p, update, group):
    """p <- p (1 - lr wd) - lr sqrt(max(1, rows / cols)) update, ``update`` orthogonalised."""
    lr, wd = group["lr"], group["weight_decay"]
    scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
    if wd:
        p.mul_(1 - lr * wd)
    p.add_(update, alpha=-lr * scale)


NS_DTYPES = ("auto", "float32", "bfloat16")


@functools.lru_cache(maxsize=None)
def native_bf16_products(device: torch.device) -> bool:
    """Whether bf16 matrix products run natively on ``device`` (and so about twice as fast as
    float32): CUDA GPUs with bf16, CPUs with AVX512_BF16 or AMX (oneDNN's bf16 kernels) where
    torch is not held below AVX-512 (``ATEN_CPU_CAPABILITY=avx2``, as when an AVX-512 machine
    stands in for an AVX2 one: its bf16 products are then emulated). Asked once per device, not
    at every optimizer step."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "NO AVX", "AVX2"):
            return False
        cpu = getattr(torch, "cpu", None)
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(cpu, name, lambda: False)() for name in probes)
    return False


def ns_dtype_for(setting: str, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the Newton-Schulz products for a Muon group's ``ns_dtype`` setting: "auto"
    takes bfloat16 where the device multiplies it natively, float32 elsewhere; float64 matrices
    keep float64 unless "bfloat16" is asked for."""
    if setting == "bfloat16" or (setting == "auto" and dtype != torch.float64 and native_bf16_products(device)):
        return torch.bfloat16
    return torch.float64 if dtype == torch.float64 else torch.float32


def _muon_group_step(params, state, group):
    """One Muon step of every matrix of ``group`` with a gradient: the orthogonalisation runs
    once per set of same-shaped matrices, as one batch."""
    live = [p for p in params if p.grad is not None]
    updates = [_muon_direction(p, state[p], group) for p in live]
    same = {}
    for i, u in enumerate(updates):
        same.setdefault((tuple(u.shape), u.dtype, u.device), []).append(i)
    for (_, dtype, device), idx in same.items():
        batch = orthogonalize(torch.stack([updates[i] for i in idx]), steps=group["ns_steps"],
                              dtype=ns_dtype_for(group.get("ns_dtype", "float32"), device, dtype))
        for j, i in enumerate(idx):
            _muon_apply(live[i], batch[j], group)


def _check_ns_dtype(ns_dtype, who="Muon"):
    if ns_dtype not in NS_DTYPES:
        raise ValueError(f"{who}: ns_dtype must be one of {', '.join(NS_DTYPES)}, got {ns_dtype!r}")


def _check_muon_settings(lr, momentum, ns_steps, weight_decay, who="Muon"):
    if lr <= 0:
        raise ValueError(f"{who}: lr must be > 0, got {lr}")
    if not 0 <= momentum < 1:
        raise ValueError(f"{who}: momentum must be in [0, 1), got {momentum}")
    if ns_steps < 1:
        raise ValueError(f"{who}: ns_steps must be >= 1, got {ns_steps}")
    if weight_decay < 0:
        raise ValueError(f"{who}: weight_decay must be >= 0, got {weight_decay}")


def _check_matrices(params):
    for p in params:
        if p.dim() != 2:
            raise ValueError(f"Muon trains matrices only; got a parameter of shape {tuple(p.shape)} "
                             "(give embeddings, gains and biases to AdamW)")


class Muon(ParamGroupOptimizer):
    """Muon over 2-D parameters (see the module's docstring).

    lr: the step of an orthogonalized update (its singular values are about 1), so typical
    values (0.01-0.05) are far larger than AdamW's; momentum, nesterov: the SGD momentum the
    update is taken from; ns_steps: Newton-Schulz steps; ns_dtype: the dtype of their products,
    "float32" (default), "bfloat16", or "auto" (bfloat16 where the device multiplies it natively,
    ``native_bf16_products``); weight_decay: decoupled, as AdamW's. Its state (one momentum buffer per matrix) saves and loads with ``state_dict`` like any
    torch optimizer's.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 weight_decay: float = 0.0, ns_dtype: str = "float32"):
        _check_muon_settings(lr, momentum, ns_steps, weight_decay)
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay, ns_dtype=ns_dtype))
        for group in self.param_groups:
            _check_matrices(group["params"])
            _check_ns_dtype(group["ns_dtype"])

    def _update(self) -> None:
        for group in self.param_groups:
            _muon_group_step(group["params"], self.state, group)


class MuonWithAdamW(ParamGroupOptimizer):
    """Muon for the parameter groups marked ``use_muon=True`` (2-D matrices), AdamW for the
    others, in one optimizer: one ``state_dict`` and one list of ``param_groups``, each group
    with its own learning rate.

    A Muon group takes ``lr``, ``momentum``, ``nesterov``, ``ns_steps``, ``ns_dtype``, ``weight_decay``
    (defaults: Muon's); an AdamW group ``lr``, ``betas``, ``eps``, ``weight_decay`` (defaults:
    torch's AdamW). The AdamW groups step with fastlm's AdamW kernel on CPU float32 parameters
    and torch's own AdamW function elsewhere, the update ``torch.optim.AdamW`` computes; their
    state is AdamW's (``step``, ``exp_avg``, ``exp_avg_sq``), a Muon matrix's its
    ``momentum_buffer``.
    """

    _MUON = dict(lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, ns_dtype="float32", weight_decay=0.0)
    _ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

    def __init__(self, param_groups):
        groups = []
        for g in param_groups:
            if not isinstance(g, dict) or "params" not in g:
                raise TypeError("MuonWithAdamW takes a list of parameter groups (dicts with 'params' and 'use_muon')")
            g = dict(g)
            g["params"] = list(g["params"])
            g["use_muon"] = bool(g.get("use_muon", False))
            for k, v in (self._MUON if g["use_muon"] else self._ADAMW).items():
                g.setdefault(k, v)
            if g["use_muon"]:
                _check_muon_settings(g["lr"], g["momentum"], g["ns_steps"], g["weight_decay"], "MuonWithAdamW")
                _check_ns_dtype(g["ns_dtype"], "MuonWithAdamW")
                _check_matrices(g["params"])
            else:
                b1, b2 = g["betas"]
                if g["lr"] < 0 or g["eps"] < 0 or g["weight_decay"] < 0 or not (0 <= b1 < 1 and 0 <= b2 < 1):
                    raise ValueError(f"MuonWithAdamW: bad AdamW settings lr={g['lr']}, betas={g['betas']}, "
                                     f"eps={g['eps']}, weight_decay={g['weight_decay']}")
            groups.append(g)
        super().__init__(groups, {})

    def _update(self) -> None:
        adam = []
        for group in self.param_groups:
            if group["use_muon"]:
                _muon_group_step(group["params"], self.state, group)
            else:
                adam.append(group)
        if not adam:
            return
        if fits_native_adamw([p for g in adam for p in g["params"]]):
            _adamw_groups_step(adam, self.state)
            return
        from torch.optim.adamw import adamw as torch_adamw  # other devices and dtypes

        for group in adam:  # torch's AdamW function increments the step tensors itself
            params, grads, avgs, sqs, steps = _adamw_operands(group, self.state)
            if params:
                beta1, beta2 = group["betas"]
                torch_adamw(params, grads, avgs, sqs, [], steps, amsgrad=False, beta1=beta1, beta2=beta2,
                            lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
