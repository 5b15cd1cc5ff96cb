"""The check every op bench makes before it times (llm.c's dev/cuda discipline: validate each
variant against a reference, then time it): fastlm's result, and the competitor's, against the
reference or the competitor, as a relative error in float64.

Imported by the bench files as `from checks import assert_close` (pytest puts bench/ on
sys.path for the test files in it, which have no package).
"""
import torch


def assert_close(got, want, tol, what="fastlm's result"):
    """Fail unless ||got - want|| / ||want|| < tol, computed in float64.

    got and want are tensors, or equal-length sequences of tensors (a forward's output and
    its gradients, say), each pair checked on its own. NaN never passes (NaN < tol is False).
    """
    if isinstance(got, (tuple, list)):
        assert len(got) == len(want), f"{what}: {len(got)} results against {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, tol, f"{what} [{i}]")
        return
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} against {tuple(want.shape)}"
    err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
    assert err < tol, f"{what} is off the reference: relative error {err:.2e} (tolerance {tol:.0e})"
