"""The Gramian estimators against their definitions and against scipy's Lyapunov solver."""

import numpy as np
import pytest
import torch
from helpers import assert_close, random_gramian_inputs

from compressm_mamba.reference import (
    ESTIMATORS,
    gramian_statistics,
    gramians,
    gramians_from_statistics,
    hankel_singular_values,
    state_importance,
)
from compressm_mamba.reference.gramians import ltv_sums_closed_form, token_system


def lti_inputs(dim=3, N=5, L=50, dt=0.3, batch=2, seed=0):
    """Constant dt, B, C: an LTI system per channel.  Returns scan inputs and (a, b, c) per channel."""
    g = torch.Generator().manual_seed(seed)
    A = -torch.rand(dim, N, generator=g, dtype=torch.float64) * 1.5 - 0.1
    Bv = torch.randn(N, generator=g, dtype=torch.float64)
    Cv = torch.randn(N, generator=g, dtype=torch.float64)
    delta = torch.full((batch, dim, L), dt, dtype=torch.float64)
    B = Bv[None, :, None].expand(batch, N, L).contiguous()
    C = Cv[None, :, None].expand(batch, N, L).contiguous()
    return delta, A, B, C, Bv, Cv


def dlyap(a, rhs):
    """scipy's solution of X = diag(a) X diag(a) + rhs."""
    scipy_linalg = pytest.importorskip("scipy.linalg", reason="the Lyapunov cross-check needs scipy")
    return torch.from_numpy(scipy_linalg.solve_discrete_lyapunov(np.diag(a.numpy()), rhs.numpy()))


@pytest.mark.parametrize("estimator", ["mean_lti", "frozen"])
def test_lti_case_equals_scipy_lyapunov(estimator):
    delta, A, B, C, Bv, Cv = lti_inputs()
    P, Q = gramians(delta, A, B, C, estimator=estimator)
    for d in range(A.shape[0]):
        a = torch.exp(0.3 * A[d])
        b = 0.3 * Bv
        assert_close(P[d], dlyap(a, torch.outer(b, b)), rtol=1e-12, atol=1e-14, name=f"P[{d}]")
        assert_close(Q[d], dlyap(a, torch.outer(Cv, Cv)), rtol=1e-12, atol=1e-14, name=f"Q[{d}]")


def test_ltv_converges_to_lyapunov_at_rate_one_over_L():
    """ltv's time average equals P_inf (1 - rho (1 - rho^L) / (L (1 - rho))) exactly, so its error
    decays like 1/L: measured, doubling L from 64 to 1024 halves the max relative error each time
    (ratios 2.0 within 3 %)."""
    errors = []
    Ls = [64, 128, 256, 512, 1024]
    for L in Ls:
        delta, A, B, C, Bv, Cv = lti_inputs(dim=2, N=4, L=L, batch=1)
        P, Q = gramians(delta, A, B, C, estimator="ltv")
        err = 0.0
        for d in range(2):
            a = torch.exp(0.3 * A[d])
            rho = torch.outer(a, a)
            shrink = 1 - rho * (1 - rho**L) / (L * (1 - rho))
            P_inf = dlyap(a, torch.outer(0.3 * Bv, 0.3 * Bv))
            Q_inf = dlyap(a, torch.outer(Cv, Cv))
            assert_close(P[d], P_inf * shrink, rtol=1e-10, atol=1e-13, name=f"finite-L P[{d}], L={L}")
            assert_close(Q[d], Q_inf * shrink, rtol=1e-10, atol=1e-13, name=f"finite-L Q[{d}], L={L}")
            err = max(err, float(((P[d] - P_inf).abs() / P_inf.abs()).max()))
        errors.append(err)
    ratios = [errors[i] / errors[i + 1] for i in range(len(errors) - 1)]
    assert all(abs(r - 2.0) < 0.06 for r in ratios), f"errors {errors}, ratios {ratios}"
    assert errors[-1] < 0.02


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("ngroups", [None, 3])
def test_gramians_symmetric_psd(estimator, ngroups):
    delta, A, B, C, bias = random_gramian_inputs(batch=2, dim=6, N=7, L=15, ngroups=ngroups, seed=1)
    P, Q = gramians(delta, A, B, C, estimator=estimator, delta_bias=bias, delta_softplus=True)
    assert P.shape == Q.shape == (6, 7, 7) and P.dtype == torch.float64
    for M, name in ((P, "P"), (Q, "Q")):
        assert torch.equal(M, M.transpose(-1, -2)), f"{name} not exactly symmetric"
        lam = torch.linalg.eigvalsh(M)
        assert (lam >= -1e-12 * lam.abs().max()).all(), f"{name} has negative eigenvalues {lam.min()}"


def test_frozen_is_mean_of_per_token_lyapunov_solutions():
    delta, A, B, C, bias = random_gramian_inputs(batch=2, dim=2, N=4, L=5, seed=2)
    P, Q = gramians(delta, A, B, C, estimator="frozen", delta_bias=bias, delta_softplus=True)
    a, _, b, c = token_system(delta, A, B, C, delta_bias=bias, delta_softplus=True)
    for d in range(2):
        P_ref = sum(dlyap(a[bi, d, :, t], torch.outer(b[bi, d, :, t], b[bi, d, :, t])) for bi in range(2) for t in range(5))
        Q_ref = sum(dlyap(a[bi, d, :, t], torch.outer(c[bi, d, :, t], c[bi, d, :, t])) for bi in range(2) for t in range(5))
        assert_close(P[d], P_ref / 10, rtol=1e-11, atol=1e-14, name=f"P[{d}]")
        assert_close(Q[d], Q_ref / 10, rtol=1e-11, atol=1e-14, name=f"Q[{d}]")


def test_mean_lti_is_lyapunov_of_the_mean_system():
    delta, A, B, C, bias = random_gramian_inputs(batch=3, dim=2, N=4, L=6, seed=3)
    P, Q = gramians(delta, A, B, C, estimator="mean_lti", delta_bias=bias, delta_softplus=True)
    a, _, b, c = token_system(delta, A, B, C, delta_bias=bias, delta_softplus=True)
    for d in range(2):
        a_bar, b_bar, c_bar = a[:, d].mean((0, 2)), b[:, d].mean((0, 2)), c[:, d].mean((0, 2))
        assert_close(P[d], dlyap(a_bar, torch.outer(b_bar, b_bar)), rtol=1e-11, atol=1e-14, name="P")
        assert_close(Q[d], dlyap(a_bar, torch.outer(c_bar, c_bar)), rtol=1e-11, atol=1e-14, name="Q")


def test_ltv_is_the_explicit_time_varying_gramian():
    """P_t = sum_{s<=t} Phi(t,s) b_s b_s^T Phi(t,s)^T and Q_t = sum_{s>=t} Phi(s,t)^T c_s c_s^T Phi(s,t),
    with Phi built as explicit products of the diagonal transitions."""
    delta, A, B, C, bias = random_gramian_inputs(batch=1, dim=2, N=3, L=6, seed=4)
    P, Q = gramians(delta, A, B, C, estimator="ltv", delta_bias=bias, delta_softplus=True)
    a, _, b, c = token_system(delta, A, B, C, delta_bias=bias, delta_softplus=True)
    L = 6
    for d in range(2):
        def phi(t, s):  # transition from s to t >= s
            out = torch.eye(3, dtype=torch.float64)
            for k in range(s + 1, t + 1):
                out = torch.diag(a[0, d, :, k]) @ out
            return out

        P_ref = sum(phi(t, s) @ torch.outer(b[0, d, :, s], b[0, d, :, s]) @ phi(t, s).T
                    for t in range(L) for s in range(t + 1)) / L
        Q_ref = sum(phi(s, t).T @ torch.outer(c[0, d, :, s], c[0, d, :, s]) @ phi(s, t)
                    for t in range(L) for s in range(t, L)) / L
        assert_close(P[d], P_ref, rtol=1e-12, atol=1e-14, name="P")
        assert_close(Q[d], Q_ref, rtol=1e-12, atol=1e-14, name="Q")


@pytest.mark.parametrize("ngroups", [None, 2])
def test_ltv_closed_form_equals_recurrence(ngroups):
    delta, A, B, C, bias = random_gramian_inputs(batch=2, dim=4, N=5, L=13, ngroups=ngroups, seed=5)
    stats = gramian_statistics(delta, A, B, C, estimator="ltv", delta_bias=bias, delta_softplus=True)
    P_sum, Q_sum = ltv_sums_closed_form(delta, A, B, C, delta_bias=bias, delta_softplus=True)
    assert_close(P_sum, stats.sums["P"], rtol=1e-11, atol=1e-13, name="P sums")
    assert_close(Q_sum, stats.sums["Q"], rtol=1e-11, atol=1e-13, name="Q sums")


def test_ltv_weighted_gram_form_for_scalar_A():
    """Mamba2 heads (A constant along N): sum_t P_t = B~^T diag(w) B~, a matrix product, with
    w_s = 1 + exp(2 A dt_{s+1}) w_{s+1}; likewise Q with v_s = 1 + exp(2 A dt_s) v_{s-1}."""
    g = torch.Generator().manual_seed(6)
    batch, nheads, N, L = 2, 3, 6, 17
    delta = torch.rand(batch, nheads, L, generator=g, dtype=torch.float64) * 0.5 + 0.05
    A = (-torch.rand(nheads, 1, generator=g, dtype=torch.float64) - 0.1).expand(nheads, N)
    B = torch.randn(batch, N, L, generator=g, dtype=torch.float64)
    C = torch.randn(batch, N, L, generator=g, dtype=torch.float64)
    stats = gramian_statistics(delta, A, B, C, estimator="ltv")
    decay = torch.exp(2 * A[:, 0, None] * delta)  # (batch, nheads, L)
    w = torch.ones_like(delta)
    v = torch.ones_like(delta)
    for s in range(L - 2, -1, -1):
        w[..., s] = 1 + decay[..., s + 1] * w[..., s + 1]
    for s in range(1, L):
        v[..., s] = 1 + decay[..., s] * v[..., s - 1]
    b = delta[:, :, None, :] * B[:, None]  # (batch, nheads, N, L)
    P_sum = torch.einsum("bhil,bhl,bhjl->hij", b, w, b)
    Q_sum = torch.einsum("bil,bhl,bjl->hij", C, v, C)
    assert_close(P_sum, stats.sums["P"], rtol=1e-11, atol=1e-13, name="P sums")
    assert_close(Q_sum, stats.sums["Q"], rtol=1e-11, atol=1e-13, name="Q sums")


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_statistics_add_across_batches(estimator):
    delta, A, B, C, bias = random_gramian_inputs(batch=4, dim=3, N=5, L=8, ngroups=1, seed=7)
    kw = dict(estimator=estimator, delta_bias=bias, delta_softplus=True)
    whole = gramians(delta, A, B, C, **kw)
    parts = gramian_statistics(delta[:1], A, B[:1], C[:1], **kw) + gramian_statistics(delta[1:], A, B[1:], C[1:], **kw)
    assert parts.count == 4 * 8
    for got, want, name in zip(gramians_from_statistics(parts), whole, "PQ"):
        assert_close(got, want, rtol=1e-12, atol=1e-15, name=name)


def test_statistics_refuse_mismatched_sums():
    delta, A, B, C, _ = random_gramian_inputs(batch=1, dim=2, N=4, L=3, seed=8)
    s1 = gramian_statistics(delta, A, B, C, estimator="ltv")
    with pytest.raises(ValueError, match="cannot add"):
        s1 + gramian_statistics(delta, A, B, C, estimator="frozen")
    small = gramian_statistics(delta, A[:, :3], B[:, :3], C[:, :3], estimator="ltv")
    with pytest.raises(ValueError, match="shapes differ"):
        s1 + small


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_permuting_states_permutes_gramians_and_keeps_hsvs(estimator):
    delta, A, B, C, bias = random_gramian_inputs(batch=2, dim=3, N=6, L=10, ngroups=1, seed=9)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    kw = dict(estimator=estimator, delta_bias=bias, delta_softplus=True)
    P, Q = gramians(delta, A, B, C, **kw)
    Pp, Qp = gramians(delta, A[:, perm], B[:, :, perm], C[:, :, perm], **kw)
    assert_close(Pp, P[:, perm][:, :, perm], rtol=1e-12, atol=1e-15, name="P permuted")
    assert_close(Qp, Q[:, perm][:, :, perm], rtol=1e-12, atol=1e-15, name="Q permuted")
    assert_close(hankel_singular_values(Pp, Qp), hankel_singular_values(P, Q), rtol=1e-8, atol=1e-12, name="hsv")
    for rule in ("balanced", "diagonal"):
        s, sp = state_importance(P, Q, rule), state_importance(Pp, Qp, rule)
        assert_close(sp, s[perm], rtol=1e-8, atol=1e-12, name=f"{rule} importance")


def test_zero_step_tokens_contribute_nothing():
    """dt = 0 makes 1 - a_i a_j = 0; the token's term is its dt -> 0 limit (0), not NaN."""
    delta, A, B, C, _ = random_gramian_inputs(batch=1, dim=2, N=3, L=4, seed=10)
    delta = delta.abs()
    delta[..., 1] = 0.0
    for est in ESTIMATORS:
        P, Q = gramians(delta, A, B, C, estimator=est)
        assert torch.isfinite(P).all() and torch.isfinite(Q).all(), est
    P_f, _ = gramians(delta, A, B, C, estimator="frozen")
    keep = torch.tensor([0, 2, 3])
    P_ref, _ = gramians(delta[..., keep], A, B[..., keep], C[..., keep], estimator="frozen")
    assert_close(P_f * 4 / 3, P_ref, rtol=1e-12, atol=1e-15, name="frozen P without the dt=0 token")


def test_bad_estimator_and_empty_statistics():
    delta, A, B, C, _ = random_gramian_inputs(batch=1, dim=2, N=3, L=4, seed=11)
    with pytest.raises(ValueError, match="estimator must be one of"):
        gramians(delta, A, B, C, estimator="exact")
    with pytest.raises(ValueError, match="A must be"):
        gramians(delta, A[:1], B, C)
    empty = gramian_statistics(delta[..., :0], A, B[..., :0], C[..., :0], estimator="ltv")
    with pytest.raises(ValueError, match="no tokens"):
        gramians_from_statistics(empty)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_mask_removes_padding_tokens(estimator):
    """A padded batch with its mask gives the same sums as the unpadded sequences on their own."""
    delta, A, B, C, bias = random_gramian_inputs(batch=2, dim=3, N=4, L=9, seed=12)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :3] = False  # left padding
    mask[1, 6:] = False  # right padding
    mask[1, 2] = False  # and a hole
    kw = dict(estimator=estimator, delta_bias=bias, delta_softplus=True)
    padded = gramian_statistics(delta, A, B, C, mask=mask, **kw)
    parts = None
    for i in range(2):
        keep = mask[i].nonzero().squeeze(1)
        s = gramian_statistics(delta[i : i + 1, :, keep], A, B[i : i + 1, :, keep], C[i : i + 1, :, keep], **kw)
        parts = s if parts is None else parts + s
    assert padded.count == parts.count == int(mask.sum())
    for k in padded.sums:
        assert_close(padded.sums[k], parts.sums[k], rtol=1e-12, atol=1e-14, name=k)
    with pytest.raises(ValueError, match="mask must be"):
        gramian_statistics(delta, A, B, C, mask=mask[:, :5], **kw)
