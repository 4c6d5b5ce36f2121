"""Hankel singular values and balanced transforms: the control-theory identities."""

import numpy as np
import pytest
import torch
from helpers import assert_close, random_gramian_inputs

from compressm_mamba.reference import (
    balanced_transform,
    gramian_factor,
    gramians,
    hankel_factors,
    hankel_singular_values,
)


def random_pd(n, batch, seed, rank=None):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(batch, n, rank or n, generator=g, dtype=torch.float64)
    return X @ X.transpose(-1, -2) + (0 if rank else 0.1 * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("estimator", ["frozen", "ltv", "mean_lti"])
def test_hsv_equal_sqrt_eig_PQ(estimator):
    delta, A, B, C, bias = random_gramian_inputs(batch=2, dim=4, N=6, L=12, seed=1)
    P, Q = gramians(delta, A, B, C, estimator=estimator, delta_bias=bias, delta_softplus=True)
    hsv = hankel_singular_values(P, Q)
    assert hsv.shape == (4, 6) and hsv.dtype == torch.float64
    assert (hsv[:, :-1] >= hsv[:, 1:]).all(), "not descending"
    for d in range(4):
        ev = np.sort(np.linalg.eigvals(P[d].numpy() @ Q[d].numpy()).real)[::-1]
        ref = torch.from_numpy(np.sqrt(np.clip(ev, 0, None)).copy())
        # eig(PQ) of a rank-deficient pair is only accurate to ~eps * |PQ|: compare absolutely there.
        assert_close(hsv[d], ref, rtol=1e-7, atol=1e-7 * float(ref[0]), name=f"hsv[{d}]")


def test_balanced_transform_balances():
    delta, A, B, C, bias = random_gramian_inputs(batch=2, dim=3, N=5, L=20, seed=2)
    P, Q = gramians(delta, A, B, C, estimator="frozen", delta_bias=bias, delta_softplus=True)
    T, Tinv, hsv = balanced_transform(P, Q)
    eye = torch.eye(5, dtype=torch.float64).expand(3, 5, 5)
    assert_close(Tinv @ T, eye, rtol=0, atol=1e-10, name="Tinv T")
    diag = torch.diag_embed(hsv)
    assert_close(Tinv @ P @ Tinv.transpose(-1, -2), diag, rtol=0, atol=1e-10 * float(hsv.max()), name="Tinv P Tinv^T")
    assert_close(T.transpose(-1, -2) @ Q @ T, diag, rtol=0, atol=1e-10 * float(hsv.max()), name="T^T Q T")


def test_factor_handles_semidefinite_matrices():
    P = random_pd(6, 3, seed=3, rank=2)  # rank 2: Cholesky fails
    _, info = torch.linalg.cholesky_ex(P)
    assert (info != 0).all()
    L = gramian_factor(P)
    assert_close(L @ L.transpose(-1, -2), P, rtol=0, atol=1e-12 * float(P.abs().max()), name="L L^T")
    Q = random_pd(6, 3, seed=4)
    hsv = hankel_singular_values(P, Q)
    assert torch.isfinite(hsv).all()
    assert (hsv[:, 2:] < 1e-6 * hsv[:, :1]).all(), "a rank-2 P has only 2 nonzero HSVs"
    T, Tinv, hsv2 = balanced_transform(P, Q)
    assert torch.isfinite(T).all() and torch.isfinite(Tinv).all()
    # On the minimal (nonzero-HSV) part the transform still balances.
    top = (Tinv @ P @ Tinv.transpose(-1, -2))[:, :2, :2]
    assert_close(top, torch.diag_embed(hsv2[:, :2]), rtol=1e-8, atol=1e-10, name="balanced block")


def test_factor_choice_does_not_change_products():
    """L_P V and L_Q U are invariant to the factor choice (Cholesky vs any L W with W orthogonal)."""
    P, Q = random_pd(5, 2, seed=5), random_pd(5, 2, seed=6)
    X, Y, s = hankel_factors(P, Q)
    W, _ = torch.linalg.qr(torch.randn(2, 5, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    L_P = torch.linalg.cholesky(P) @ W
    L_Q = torch.linalg.cholesky(Q)
    U, S, Vh = torch.linalg.svd(L_Q.transpose(-1, -2) @ L_P)
    X2, Y2 = L_P @ Vh.transpose(-1, -2), L_Q @ U
    # Singular vectors are defined up to a shared sign per direction.
    sign = torch.sign((X * X2).sum(-2, keepdim=True))
    assert_close(X2 * sign, X, rtol=1e-9, atol=1e-11, name="L_P V")
    assert_close(Y2 * sign, Y, rtol=1e-9, atol=1e-11, name="L_Q U")
    assert_close(S, s, rtol=1e-12, atol=0, name="hsv")


@pytest.mark.parametrize("which", ["P", "Q"])
def test_non_finite_gramian_names_layer_and_channel(which):
    P, Q = random_pd(4, 5, seed=8), random_pd(4, 5, seed=9)
    bad = P if which == "P" else Q
    bad[3, 1, 2] = float("nan")
    for fn in (hankel_singular_values, balanced_transform):
        with pytest.raises(ValueError, match=rf"backbone.layers.2.mixer: Gramian {which} of channel 3 contains NaN"):
            fn(P, Q, name="backbone.layers.2.mixer")


def transfer_function(a, b, c, omegas):
    """G(e^{iw}) = c^T (I - A e^{-iw})^{-1} b for h_t = A h_{t-1} + b u_t, y_t = c^T h_t."""
    n = a.shape[0]
    out = []
    for w in omegas:
        z_inv = np.exp(-1j * w)
        out.append(c @ np.linalg.solve(np.eye(n) - a * z_inv, b))
    return np.array(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_truncation_error_bound(seed):
    """||G - G_r||_inf <= 2 * sum of the dropped HSVs, on a dense frequency grid, for every r."""
    g = torch.Generator().manual_seed(seed)
    N = 8
    a = torch.exp(-torch.rand(N, generator=g, dtype=torch.float64) * 2.0 - 0.02)  # poles in (0.13, 0.98)
    b = torch.randn(N, generator=g, dtype=torch.float64)
    c = torch.randn(N, generator=g, dtype=torch.float64)
    # LTI Gramians from the reference itself: constant dt = 1, A = log(a).
    L = 4
    delta = torch.ones(1, 1, L, dtype=torch.float64)
    P, Q = gramians(delta, torch.log(a)[None], b[None, :, None].expand(1, N, L), c[None, :, None].expand(1, N, L),
                    estimator="mean_lti")
    T, Tinv, hsv = balanced_transform(P, Q)
    T, Tinv, hsv = T[0].numpy(), Tinv[0].numpy(), hsv[0].numpy()
    Ab, bb, cb = Tinv @ np.diag(a.numpy()) @ T, Tinv @ b.numpy(), T.T @ c.numpy()
    omegas = np.linspace(0, np.pi, 4001)
    G = transfer_function(np.diag(a.numpy()), b.numpy(), c.numpy(), omegas)
    assert np.allclose(transfer_function(Ab, bb, cb, omegas), G, atol=1e-8 * np.abs(G).max()), "balancing changed G"
    for r in range(1, N):
        Gr = transfer_function(Ab[:r, :r], bb[:r], cb[:r], omegas)
        err = np.abs(G - Gr).max()
        bound = 2 * hsv[r:].sum()
        assert err <= bound * (1 + 1e-9), f"r={r}: ||G-G_r|| = {err:.4e} > 2 sum(dropped) = {bound:.4e}"
        # and the error is not trivially small: at least the first dropped HSV, up to grid resolution
        assert err >= 0.9 * hsv[r], f"r={r}: error {err:.3e} below sigma_(r+1) = {hsv[r]:.3e}"
