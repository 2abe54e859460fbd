"""Gradient per path length (reslab.diagnostics.paths), checked on cases with known answers.

REFERENCE.md section 3: the exact coefficients must equal a brute-force sum over all 2^n paths, add up to the
autograd input gradient, agree between recurrence and FFT; Veit et al.'s sampling must converge to the
brute-force mean single-path norm, and differ from the exact sums where paths cancel.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reslab
from reslab import BranchSpec, Trunk, create_residual
from reslab.diagnostics.paths import (PathProfile, analyse_paths, binomial_length_distribution,
                                      binomial_path_counts, model_cotangent, path_coefficients, plot_paths,
                                      veit_sampling)
from reslab.residuals.base import AdditiveScheme, residual_class

D, N = 5, 3  # features, batch


def linear_trunk(n: int, scheme: str = "identity", scale: float = 1.0, seed: int = 0, **kw) -> Trunk:
    """``n`` bias-free linear branches with fixed random matrices ``W ~ scale * N(0, 1/d)``, in float64."""
    gen = torch.Generator().manual_seed(seed)
    branches = [nn.Linear(D, D, bias=False) for _ in range(n)]
    trunk = Trunk(branches, create_residual(scheme, [BranchSpec(D, D, 1, "features")] * n, **kw)).double()
    with torch.no_grad():
        for p in trunk.parameters():  # branch weights and any projection shortcuts
            p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(D))
    return trunk.eval()


def point(trunk: Trunk, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(N, D, generator=gen, dtype=torch.float64)
    return x0, torch.randn(N, D, generator=gen, dtype=torch.float64)


def autograd_grad(trunk: Trunk, x0: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    x = x0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(trunk(x), x, g)
    return grad


def brute_force_paths(trunk: Trunk, x0: torch.Tensor, g: torch.Tensor) -> dict[tuple[int, ...], torch.Tensor]:
    """Every path's input gradient, from explicit matrices (independent of the code under test).

    Block i: ``z = a x P_i^T + b x W_i^T``, ``x' = post(z)``; a path through branch set ``T`` has
    gradient ``g -> (mask_i *) -> b v W_i (i in T) or a v P_i (i not in T)``, blocks taken n-1..0.
    """
    scheme = trunk.scheme
    a, b = getattr(scheme, "a", 1.0), getattr(scheme, "b", 1.0)
    relu = scheme.post_op == "relu"
    n = len(trunk)
    Ws = [br.weight.detach() for br in trunk.branches]
    Ps = [sc.proj.weight.detach() if hasattr(sc, "proj") else torch.eye(D, dtype=torch.float64)
          for sc in scheme.shortcuts]
    x, masks = x0, []
    for i in range(n):
        z = a * x @ Ps[i].T + b * x @ Ws[i].T
        masks.append((z > 0).double() if relu else torch.ones_like(z))
        x = z.clamp(min=0) if relu else z
    paths = {}
    for r in range(n + 1):
        for subset in itertools.combinations(range(n), r):
            v = g
            for i in reversed(range(n)):
                v = v * masks[i]
                v = b * v @ Ws[i] if i in subset else a * v @ Ps[i]
            paths[subset] = v
    return paths


def by_length(paths: dict[tuple[int, ...], torch.Tensor], n: int) -> torch.Tensor:
    out = torch.zeros(n + 1, N, D, dtype=torch.float64)
    for subset, v in paths.items():
        out[len(subset)] += v
    return out


# --- exact coefficients ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 4, 8, 10])
def test_identity_linear_matches_brute_force(n):
    trunk = linear_trunk(n, seed=n)
    x0, g = point(trunk)
    coeffs = path_coefficients(trunk, x0, g)
    assert coeffs.shape == (n + 1, N, D) and coeffs.dtype == torch.float64
    torch.testing.assert_close(coeffs, by_length(brute_force_paths(trunk, x0, g), n), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(coeffs.sum(0), autograd_grad(trunk, x0, g), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(path_coefficients(trunk, x0, g, method="fft"), coeffs, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kind", ["scaled", "relu", "projection", "scaled_relu_projection"])
def test_other_skips_match_brute_force_and_autograd(kind):
    kw: dict = {}
    if "scaled" in kind:
        kw.update(a=0.5, b=2.0)
    if "relu" in kind:
        kw.update(post="relu")
    if "projection" in kind:
        kw.update(shortcut="C")
    n = 6
    trunk = linear_trunk(n, "scaled" if "scaled" in kind else "identity", seed=3, **kw)
    x0, g = point(trunk, seed=4)
    coeffs = path_coefficients(trunk, x0, g)
    torch.testing.assert_close(coeffs, by_length(brute_force_paths(trunk, x0, g), n), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(coeffs.sum(0), autograd_grad(trunk, x0, g), rtol=1e-10, atol=1e-12)
    fft = path_coefficients(trunk, x0, g, method="fft", radius=0.7)
    torch.testing.assert_close(fft, coeffs, rtol=1e-8, atol=1e-10)
    if "relu" in kind:  # the ReLU mask really cuts something here
        assert (trunk(x0) == 0).any()


def test_plain_only_full_length_path():
    n = 5
    trunk = linear_trunk(n, "plain", seed=2)
    x0, g = point(trunk)
    coeffs = path_coefficients(trunk, x0, g)
    assert torch.all(coeffs[:n] == 0)
    torch.testing.assert_close(coeffs[n], autograd_grad(trunk, x0, g), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(path_coefficients(trunk, x0, g, method="fft"), coeffs, rtol=1e-8, atol=1e-10)
    veit = veit_sampling(trunk, x0, g, samples=4)
    assert np.all(veit[:n] == 0) and veit[n] > 0


def test_gated_scheme_and_lesions_are_refused():
    specs = [BranchSpec(D, D, 1, "features")] * 3
    trunk = Trunk([nn.Linear(D, D) for _ in range(3)], create_residual("highway", specs))
    x0 = torch.randn(N, D)
    with pytest.raises(ValueError, match="path analysis needs an additive scheme; highway is not"):
        path_coefficients(trunk, x0, torch.randn(N, D))
    with pytest.raises(ValueError, match="additive"):
        veit_sampling(trunk, x0, torch.randn(N, D), samples=2)
    ok = linear_trunk(3)
    ok.set_lesion([1])
    with pytest.raises(ValueError, match="lesion"):
        path_coefficients(ok, *point(ok))
    ok.set_lesion()
    ok.set_order([2, 1, 0])
    with pytest.raises(ValueError, match="order"):
        path_coefficients(ok, *point(ok))
    ok.set_order(None)
    with pytest.raises(ValueError, match="shape"):
        path_coefficients(ok, torch.randn(N, D), torch.randn(N + 1, D))
    with pytest.raises(ValueError, match="method"):
        path_coefficients(ok, *point(ok), method="svd")


# --- Veit et al. sampling ----------------------------------------------------------------------------------
def test_veit_sampling_converges_to_brute_force_mean():
    n, tol = 6, 0.05
    trunk = linear_trunk(n, scale=0.5, seed=7)
    x0, g = point(trunk, seed=8)
    paths = brute_force_paths(trunk, x0, g)
    mean = np.array([np.mean([float(v.norm()) for s, v in paths.items() if len(s) == k]) for k in range(n + 1)])
    veit = veit_sampling(trunk, x0, g, samples=400, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(veit, mean, rtol=tol)
    # The tolerance is tight enough to catch the likely mistakes: swapping the roles of branch and skip
    # (length k <-> n - k) or taking the norm of the summed vector instead of the mean of norms.
    swapped = mean[::-1]
    summed = path_coefficients(trunk, x0, g).flatten(1).norm(dim=1).numpy() / binomial_path_counts(n)
    for k in range(n + 1):
        if k != n - k:
            assert abs(swapped[k] / mean[k] - 1) > 3 * tol
        if 0 < k < n:
            assert abs(summed[k] / mean[k] - 1) > 3 * tol
    lengths = veit_sampling(trunk, x0, g, samples=5, lengths=[2, 4])
    assert np.isnan(lengths[[0, 1, 3, 5, 6]]).all() and np.isfinite(lengths[[2, 4]]).all()


def test_exact_and_veit_differ_by_cancellation():
    n = 10
    trunk = linear_trunk(n, seed=11)
    x0, g = point(trunk, seed=12)
    exact = path_coefficients(trunk, x0, g).flatten(1).norm(dim=1).numpy()
    total = veit_sampling(trunk, x0, g, samples=100) * binomial_path_counts(n)
    np.testing.assert_allclose(exact[[0, n]], total[[0, n]], rtol=1e-10)  # single paths: nothing cancels
    ratio = total[3:8] / exact[3:8]
    assert np.all(ratio > 1.0) and ratio.max() > 3.0, ratio


# --- binomial counts -------------------------------------------------------------------------------------
def test_binomial_counts():
    counts = binomial_path_counts(54)
    assert counts.sum() == 2.0 ** 54 and counts[27] == math.comb(54, 27)
    dist = binomial_length_distribution(54)
    assert dist.sum() == pytest.approx(1.0)
    assert dist[19:36].sum() > 0.95  # REFERENCE.md section 3: > 95% of paths are 19-35 blocks long
    np.testing.assert_array_equal(binomial_path_counts(3), [1, 3, 3, 1])


def test_profile_summaries():
    w = np.array([0.0, 1.0, 8.0, 1.0, 0.0])
    p = PathProfile(lengths=np.arange(5), exact_norm=w, veit_mean=None, veit_total=None,
                    path_counts=binomial_path_counts(4), full_grad_norm=1.0)
    assert p.effective_depth() == pytest.approx(2.0)
    assert p.mass_range(mass=0.8) == (2, 2)
    assert p.mass_range(mass=0.85) in ((1, 2), (2, 3))
    assert p.mass_range(mass=1.0) == (1, 3)
    with pytest.raises(ValueError, match="Veit"):
        p.effective_depth("veit")


# --- on a model ---------------------------------------------------------------------------------------------
def _tiny(residual: str = "identity", **kw) -> tuple[reslab.ResidualNet, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = reslab.create_model("mlp8", residual, width=8, input_shape=(6,), num_classes=4, **kw)
    gen = torch.Generator().manual_seed(1)
    return model, torch.randn(7, 6, generator=gen), torch.randint(0, 4, (7,), generator=gen)


def _loss_grad(model, inputs, targets) -> torch.Tensor:
    model.eval()
    x0 = model.stem(inputs).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model.head(model.trunk(x0)), targets), x0)
    return grad


def test_analyse_paths_on_model():
    model, inputs, targets = _tiny()
    model.train()
    profile = analyse_paths(model, inputs, targets, samples=50)
    assert model.training and model.trunk.branches[0].norm1.training  # modes restored
    n = len(model.trunk)
    assert n == 3 and profile.lengths.tolist() == [0, 1, 2, 3]
    grad = _loss_grad(model, inputs, targets)
    coeffs = path_coefficients(model.trunk, *model_cotangent(model, inputs, targets))
    torch.testing.assert_close(coeffs.sum(0).float(), grad, rtol=1e-4, atol=1e-7)
    assert profile.full_grad_norm == pytest.approx(float(grad.norm()), rel=1e-4)
    assert 0 <= profile.effective_depth() <= n and 0 <= profile.effective_depth("veit") <= n
    lo, hi = profile.mass_range()
    assert 0 <= lo <= hi <= n
    assert profile.backward_passes == {"exact": n + 1, "veit": 50 * (n + 1)}
    assert set(profile.seconds) == {"exact", "veit"}
    np.testing.assert_allclose(profile.veit_total, profile.veit_mean * binomial_path_counts(n))
    fig = plot_paths(profile)
    assert len(fig.axes[0].lines) == 3
    assert analyse_paths(model, inputs, targets, samples=0).veit_mean is None


ADDITIVE = [r for r in reslab.list_residuals() if issubclass(residual_class(r), AdditiveScheme)
            and not residual_class(r).capabilities.needs_roles  # the tiny net's branches have no roles
            and residual_class(r).begin is AdditiveScheme.begin]  # refused: a begin of its own (Peri-LN's N_e)


@pytest.mark.parametrize("residual", ADDITIVE)
def test_every_additive_scheme_sums_to_the_gradient(residual):
    model, inputs, targets = _tiny(residual)
    with torch.no_grad():  # off every special init (zero-initialised scales), so that every path carries something
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    coeffs = path_coefficients(model.trunk, *model_cotangent(model, inputs, targets))
    torch.testing.assert_close(coeffs.sum(0).float(), _loss_grad(model, inputs, targets), rtol=1e-4, atol=1e-7)
    assert coeffs[1:].abs().sum() > 0
