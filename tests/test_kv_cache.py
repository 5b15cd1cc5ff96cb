"""fastlm.ops.kv_cache_write: the CPU kernel and the reference write a decode step's keys and
values bit for bit, into strided views, and refuse bad input without a stray write."""
import pytest
import torch

import fastlm
from conftest import on_backend

CPU = "kv_cache_write" in fastlm.ops.get_backend("cpu").ops if "cpu" in fastlm.ops.backends() else False


def _kv_write_case(B, Hkv, L, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    kc = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64).to(dtype)
    vc = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64).to(dtype)
    # k and v as a decode step makes them: strided slices of one (B, (H + 2 Hkv) D) projection
    qkv = torch.randn(B, 3 * Hkv * D, generator=g, dtype=torch.float64).to(dtype)
    k = qkv[:, Hkv * D:2 * Hkv * D].view(B, Hkv, D)
    v = qkv[:, 2 * Hkv * D:].view(B, Hkv, D)
    pos = torch.randint(0, L, (B,), generator=g)
    return kc, vc, k, v, pos


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("B,Hkv,L,D", [(1, 1, 1, 1), (3, 2, 17, 40), (8, 4, 192, 64), (2, 5, 9, 128)])
def test_kv_cache_write(backend, dtype, B, Hkv, L, D):
    if backend == "cpu" and not CPU:
        pytest.skip("fastlm._C not built")
    kc, vc, k, v, pos = _kv_write_case(B, Hkv, L, D, dtype, seed=B * 100 + L)
    want_k, want_v = kc.clone(), vc.clone()
    for b in range(B):
        want_k[b, :, int(pos[b])] = k[b]
        want_v[b, :, int(pos[b])] = v[b]
    with on_backend(backend):
        fastlm.ops.kv_cache_write(kc, vc, k, v, pos.to(torch.int32))
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)  # a copy: bit for bit, nothing else touched


def test_kv_cache_write_into_strided_views_and_bad_input():
    """The caches may be views (one layer of a (layers, 2, B, Hkv, L, D) tensor); bad input is a
    clear error from the public op and from the CPU kernel itself, never a stray write."""
    g = torch.Generator().manual_seed(7)
    kv = torch.zeros(3, 2, 2, 3, 10, 16)
    k, v = torch.rand(2, 3, 16, generator=g) + 1, torch.rand(2, 3, 16, generator=g) + 1  # no zeros
    pos = torch.tensor([9, 0])
    fastlm.ops.kv_cache_write(kv[1, 0], kv[1, 1], k, v, pos)
    assert torch.equal(kv[1, 0, 0, :, 9], k[0]) and torch.equal(kv[1, 0, 1, :, 0], k[1])
    assert torch.equal(kv[1, 1, 0, :, 9], v[0]) and torch.equal(kv[1, 1, 1, :, 0], v[1])
    assert torch.count_nonzero(kv) == k.numel() + v.numel()  # nothing else written
    kc, vc = kv[1, 0], kv[1, 1]
    with pytest.raises(ValueError, match="positions"):
        fastlm.ops.kv_cache_write(kc, vc, k, v, torch.tensor([10, 0]))
    with pytest.raises(ValueError, match="positions"):
        fastlm.ops.kv_cache_write(kc, vc, k, v, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="positions"):
        fastlm.ops.kv_cache_write(kc, vc, k, v, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"\(B, Hkv, D\)"):
        fastlm.ops.kv_cache_write(kc, vc, k[:, :2], v, pos)
    with pytest.raises(TypeError, match="dtype"):
        fastlm.ops.kv_cache_write(kc, vc, k.double(), v, pos)
    if CPU:
        before = kv.clone()
        with pytest.raises(ValueError, match="positions"):
            torch.ops.fastlm.kv_cache_write(kc, vc, k, v, torch.tensor([3, 10]))
        with pytest.raises(ValueError, match="must be"):
            torch.ops.fastlm.kv_cache_write(kc, vc, k[:, :2], v, pos)
        assert torch.equal(kv, before)
        torch.library.opcheck(torch.ops.fastlm.kv_cache_write.default, (kc.clone(), vc.clone(), k, v, pos))
