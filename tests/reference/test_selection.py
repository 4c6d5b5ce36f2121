"""State importance, rank choice and selection."""

import pytest
import torch
from helpers import assert_close, random_gramian_inputs

from compressm_mamba.reference import (
    choose_rank,
    gramians,
    hankel_factors,
    hankel_singular_values,
    select_states,
    state_importance,
)


def spectrum(*values):
    return torch.tensor(values, dtype=torch.float64)


# ---- choose_rank on hand-made spectra ------------------------------------------------------------

@pytest.mark.parametrize(
    "values, tau, expected",
    [
        # total 10; tau 0.25 needs >= 7.5: cumsum 4, 7, 9 -> r = 3 (3 < 0.95 * 4 = 3.8: cut)
        ((4, 3, 2, 1), 0.25, 3),
        # tau 0.05 needs >= 9.5: r = 4 = N -> no cut
        ((4, 3, 2, 1), 0.05, 4),
        # exactly on the threshold: 3 of four equal states hold 75 %
        ((1, 1, 1, 1), 0.25, 3),
        # order does not matter; 8 + 1 = 9 of 10 >= 0.9 -> r = 2
        ((0.25, 8, 0.25, 0.25, 0.25, 1), 0.1, 2),
        # plain sums, not squares: squares would give r = 1 (64 / 66.25 > 0.9)
        ((8, 1, 0.5, 0.5), 0.1, 2),
    ],
)
def test_choose_rank_tolerance(values, tau, expected):
    assert choose_rank(spectrum(*values), "tolerance", tau=tau) == expected


@pytest.mark.parametrize(
    "N, fraction, expected",
    [
        (16, 0.1, 14),  # floor(14.4) = 14 < 15.2
        (128, 0.1, 115),  # floor(115.2)
        (10, 0.04, 9),  # floor(9.6) = 9 < 9.5
        (20, 0.04, 20),  # floor(19.2) = 19 >= 0.95 * 20 = 19 -> gated, no cut
        (4, 0.5, 2),
    ],
)
def test_choose_rank_fixed(N, fraction, expected):
    assert choose_rank(torch.rand(N, dtype=torch.float64), "fixed", fraction=fraction) == expected


def test_choose_rank_rank_and_gate():
    s = torch.arange(16, 0, -1, dtype=torch.float64)
    assert choose_rank(s, "rank", rank=4) == 4
    assert choose_rank(s, "rank", rank=15) == 15  # 15 < 15.2
    assert choose_rank(s, "rank", rank=16) == 16
    assert choose_rank(spectrum(*range(20, 0, -1)), "rank", rank=19) == 20  # 19 >= 19: gated
    assert choose_rank(spectrum(*range(20, 0, -1)), "rank", rank=19, gate=1.0) == 19
    assert choose_rank(s, "rank", rank=12, gate=0.5) == 16  # 12 >= 8: gated


def test_choose_rank_min_state():
    s = spectrum(100, 0.001, 0.001, 0.001, 0.001, 0.001)
    assert choose_rank(s, "tolerance", tau=0.01) == 1
    assert choose_rank(s, "tolerance", tau=0.01, min_state=3) == 3
    assert choose_rank(s, "rank", rank=2, min_state=3) == 3
    assert choose_rank(torch.zeros(8, dtype=torch.float64), "tolerance", tau=0.1, min_state=2) == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="tolerance", tau=0.0), "tau must be in"),
        (dict(mode="tolerance", tau=1.0), "tau must be in"),
        (dict(mode="tolerance"), "tau must be in"),
        (dict(mode="fixed", fraction=1.5), "fraction must be in"),
        (dict(mode="rank", rank=0), "rank must be an integer >= 1"),
        (dict(mode="rank", rank=2.5), "rank must be an integer"),
        (dict(mode="rank", rank=9), "exceeds the layer's state size N=8"),
        (dict(mode="pca"), "mode must be one of"),
        (dict(mode="rank", rank=2, gate=0.0), "gate must be in"),
        (dict(mode="rank", rank=2, min_state=0), "min_state"),
    ],
)
def test_choose_rank_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        choose_rank(torch.ones(8, dtype=torch.float64), **kwargs)


def test_choose_rank_rejects_bad_spectra():
    with pytest.raises(ValueError, match="NaN"):
        choose_rank(spectrum(1, float("nan")), "rank", rank=1)
    with pytest.raises(ValueError, match="non-negative"):
        choose_rank(spectrum(1, -1), "rank", rank=1)


# ---- select_states ----------------------------------------------------------------------------

def test_select_states_rules():
    s = spectrum(0.5, 3.0, 0.1, 2.0, 2.0, 0.7)
    assert select_states(s, 3).tolist() == [1, 3, 4]
    assert select_states(s, 2).tolist() == [1, 3]  # tie between 3 and 4 goes to the lower index
    assert select_states(s, 2, keep="smallest").tolist() == [0, 2]
    assert select_states(s, 6).tolist() == list(range(6))  # keep-all
    r1 = select_states(s, 3, keep="random", generator=torch.Generator().manual_seed(0))
    r2 = select_states(s, 3, keep="random", generator=torch.Generator().manual_seed(0))
    assert torch.equal(r1, r2) and r1.tolist() == sorted(set(r1.tolist())) and len(r1) == 3
    draws = {tuple(select_states(s, 3, keep="random", generator=torch.Generator().manual_seed(k)).tolist())
             for k in range(20)}
    assert len(draws) > 3, "random selection does not vary with the seed"
    assert select_states(s, 3).dtype == torch.int64
    for bad_r in (0, 7, 2.0):
        with pytest.raises(ValueError, match="r must be an integer"):
            select_states(s, bad_r)
    with pytest.raises(ValueError, match="keep must be one of"):
        select_states(s, 2, keep="median")


# ---- state_importance --------------------------------------------------------------------------

def test_diagonal_rule_by_hand():
    P = torch.diag_embed(torch.tensor([[4.0, 1.0, 9.0], [1.0, 1.0, 1.0]], dtype=torch.float64))
    Q = torch.diag_embed(torch.tensor([[1.0, 4.0, 1.0], [9.0, 0.0, 4.0]], dtype=torch.float64))
    # channel 0: sqrt(4), sqrt(4), sqrt(9) = 2, 2, 3; channel 1: 3, 0, 2
    assert state_importance(P, Q, "diagonal").tolist() == [5.0, 2.0, 5.0]
    # Diagonal Gramians are already balanced up to scaling: both rules agree and give the HSVs.
    assert_close(state_importance(P, Q, "balanced"), spectrum(5, 2, 5), rtol=1e-12, atol=1e-12, name="balanced")
    assert_close(hankel_singular_values(P, Q)[0], spectrum(3, 2, 2), rtol=1e-12, atol=0, name="hsv")


def test_balanced_participations_sum_to_hsvs():
    """sum_i sigma_k T_ik Tinv_ki = sigma_k (signed): the |.| importance spreads each HSV over states."""
    delta, A, B, C, bias = random_gramian_inputs(batch=2, dim=3, N=6, L=12, seed=3)
    P, Q = gramians(delta, A, B, C, estimator="ltv", delta_bias=bias, delta_softplus=True)
    X, Y, hsv = hankel_factors(P, Q)
    assert_close((X * Y).sum(-2), hsv, rtol=1e-9, atol=1e-12, name="signed participation")
    s = state_importance(P, Q, "balanced")
    assert float(s.sum()) >= float(hsv.sum()) * (1 - 1e-12)


def test_mean_lti_balanced_equals_diagonal():
    """METHOD.md §3: for E1 the two importance rules coincide exactly."""
    for seed in range(4):
        delta, A, B, C, bias = random_gramian_inputs(batch=2, dim=4, N=7, L=10, seed=seed)
        P, Q = gramians(delta, A, B, C, estimator="mean_lti", delta_bias=bias, delta_softplus=True)
        s_bal = state_importance(P, Q, "balanced")
        s_diag = state_importance(P, Q, "diagonal")
        assert_close(s_bal, s_diag, rtol=1e-6, atol=1e-12 * float(s_diag.max()), name=f"seed {seed}")


def test_importance_rules_differ_for_full_gramians():
    delta, A, B, C, bias = random_gramian_inputs(batch=2, dim=4, N=7, L=10, seed=5)
    P, Q = gramians(delta, A, B, C, estimator="frozen", delta_bias=bias, delta_softplus=True)
    assert (state_importance(P, Q, "balanced") - state_importance(P, Q, "diagonal")).abs().max() > 1e-4
    with pytest.raises(ValueError, match="importance rule"):
        state_importance(P, Q, "trace")
