r"""Reference Gramian estimators of selective (input-dependent) SSM blocks (METHOD.md §3).

Channel d of a Mamba1 layer (or head h of a Mamba2 layer, with A's row constant) is, token by
token, a diagonal linear system

    h_t = a_t * h_{t-1} + b_t u_t,   y_t = <c_t, h_t>,
    a_t = exp(dt_t A_d) in R^N,   b_t = dt_t B_t,   c_t = C_t.

It changes with every token, so "the" controllability / observability Gramian (P, Q) needs a
definition.  Three estimators, each averaged over the tokens (batch x positions) the layer sees:

``mean_lti`` (E1, the paper's surrogate): average the system, then take its LTI Gramians
    P = (b̄ b̄ᵀ) ⊘ (1 − ā āᵀ),  Q = (c̄ c̄ᵀ) ⊘ (1 − ā āᵀ)   with ā = E[a_t], b̄ = E[b_t], c̄ = E[c_t].

``frozen`` (E2): the expected Gramian of the system frozen at each token
    P = E_t[(b_t b_tᵀ) ⊘ (1 − a_t a_tᵀ)],  Q = E_t[(c_t c_tᵀ) ⊘ (1 − a_t a_tᵀ)].

``ltv`` (E3): finite-horizon time-varying Gramians, averaged over time
    P_t = (a_t a_tᵀ) ⊙ P_{t−1} + b_t b_tᵀ          (forward, P_0 = 0)
    Q_t = (a_{t+1} a_{t+1}ᵀ) ⊙ Q_{t+1} + c_t c_tᵀ   (backward, Q_{L+1} = 0)
    P = E_batch[(1/L) Σ_t P_t],  Q = E_batch[(1/L) Σ_t Q_t].
    Closed form (derived in docs/ltv_closed_form.md, pinned by a test), with S_t = Σ_{k≤t} dt_k:
    Σ_t P_t[i,j] = Σ_s b_s[i] b_s[j] Σ_{t≥s} exp((A_i + A_j)(S_t − S_s)).

Numerics: 1 − a_i a_j is formed as e_i + e_j − e_i e_j with e = −expm1(dt·A) ∈ [0, 1): no
catastrophic cancellation when a → 1 (e_i e_j ≤ (e_i + e_j)/2, so at most one bit is lost), and the
expression is exactly symmetric in floating point.  A token with dt·(A_i + A_j) = 0 has b_t = 0 too
(dt = 0) or a marginally stable pair; its term is taken as its dt → 0 limit, 0.

Accumulation: ``gramian_statistics`` returns token *sums* (and the token count), which add across
batches (and all-reduce across ranks); ``gramians_from_statistics`` turns them into (P, Q).
Memory is O(dim · N²) however many batches are added.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..checks import check_gramian_inputs
from .selective_scan import _compute_dtype, discretize_delta, expand_groups

__all__ = [
    "ESTIMATORS",
    "GramianStatistics",
    "gramian_statistics",
    "gramians_from_statistics",
    "gramians",
    "token_system",
    "lti_denominator",
    "ltv_sums_closed_form",
]

ESTIMATORS = ("mean_lti", "frozen", "ltv")


def _check_estimator(estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")


def token_system(
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    mask: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
):
    """Per-token diagonal systems (a_t, e_t, b_t, c_t) of every channel.

    Args:
        delta: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (batch, ngroups, N, L).
        delta_bias: (dim,) or None; delta_softplus: apply softplus after the bias.
        mask: (batch, L) bool/0-1 or None.  A masked-out token (padding) is removed from the
            sequence: a_t = 1, e_t = b_t = c_t = 0, so it neither decays nor excites the state.
        dtype: compute dtype (default: float64 for float64 delta, else float32).

    Returns:
        a, e, b, c, each (batch, dim, N, L): a = exp(dt A), e = −expm1(dt A) = 1 − a,
        b = dt B, c = C (groups expanded to channels).
    """
    check_gramian_inputs(delta, A, B, C, delta_bias)
    batch, dim, L = delta.shape
    N = A.shape[1]
    cdt = dtype or _compute_dtype(delta.dtype)
    dt = discretize_delta(
        delta.to(cdt), None if delta_bias is None else delta_bias.to(cdt), delta_softplus
    )  # (batch, dim, L)
    dtA = dt.unsqueeze(2) * A.to(cdt)[None, :, :, None]  # (batch, dim, N, L)
    a = torch.exp(dtA)
    e = -torch.expm1(dtA)
    b = dt.unsqueeze(2) * expand_groups(B.to(cdt), dim)
    c = expand_groups(C.to(cdt), dim).expand(batch, dim, N, L)
    if mask is not None:
        keep = _check_mask(mask, batch, L)[:, None, None, :]
        a = torch.where(keep, a, torch.ones_like(a))
        e, b, c = (torch.where(keep, x, torch.zeros_like(x)) for x in (e, b, c))
    return a, e, b, c


def _check_mask(mask: torch.Tensor, batch: int, L: int) -> torch.Tensor:
    """The padding mask as a (batch, L) bool tensor; True = a real token."""
    if mask.shape != (batch, L):
        raise ValueError(f"mask must be (batch={batch}, L={L}), got shape {tuple(mask.shape)}")
    return mask.bool()


def lti_denominator(e: torch.Tensor) -> torch.Tensor:
    """1 − a_i a_j for a = 1 − e, formed without cancellation: (..., N) -> (..., N, N)."""
    ei, ej = e.unsqueeze(-1), e.unsqueeze(-2)
    return ei + ej - ei * ej


def _outer(x: torch.Tensor) -> torch.Tensor:
    """x xᵀ over the last axis: (..., N) -> (..., N, N)."""
    return x.unsqueeze(-1) * x.unsqueeze(-2)


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with 0 where den == 0 (the dt -> 0 limit of a token's Gramian term)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


@dataclass
class GramianStatistics:
    """Token sums from which an estimator's (P, Q) follow; adds across batches and ranks.

    ``sums`` holds, per estimator:
        mean_lti: ``e``, ``b``, ``c`` — each (dim, N), sums over tokens of e_t, b_t, c_t;
        frozen, ltv: ``P``, ``Q`` — each (dim, N, N), sums over tokens of the per-token terms.
    ``count`` is the number of tokens summed (batch · L per call).
    """

    estimator: str
    count: int
    sums: dict = field(default_factory=dict)

    def __add__(self, other: "GramianStatistics") -> "GramianStatistics":
        if other.estimator != self.estimator:
            raise ValueError(f"cannot add {other.estimator!r} statistics to {self.estimator!r} ones")
        if other.sums.keys() != self.sums.keys():
            raise ValueError("statistics hold different sums")
        for k in self.sums:
            if self.sums[k].shape != other.sums[k].shape:
                raise ValueError(
                    f"statistic {k!r}: shapes differ ({tuple(self.sums[k].shape)} vs "
                    f"{tuple(other.sums[k].shape)}); was the layer cut in between?"
                )
        return GramianStatistics(
            self.estimator, self.count + other.count, {k: self.sums[k] + other.sums[k] for k in self.sums}
        )


def gramian_statistics(
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    estimator: str = "ltv",
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    mask: torch.Tensor | None = None,
) -> GramianStatistics:
    """Token sums of one batch for ``estimator`` (shapes as in ``token_system``).

    ``mask`` (batch, L) removes padding tokens: they add nothing and are not counted.
    """
    _check_estimator(estimator)
    a, e, b, c = token_system(delta, A, B, C, delta_bias=delta_bias, delta_softplus=delta_softplus, mask=mask)
    batch, dim, N, L = a.shape
    if mask is None:
        count = batch * L
        real = a.new_ones(batch, L)
    else:
        real = mask.to(a.dtype)
        count = int(mask.bool().sum())
    if estimator == "mean_lti":
        return GramianStatistics(estimator, count, {"e": e.sum((0, 3)), "b": b.sum((0, 3)), "c": c.sum((0, 3))})

    P_sum = a.new_zeros(dim, N, N)
    Q_sum = a.new_zeros(dim, N, N)
    if estimator == "frozen":
        for t in range(L):
            den = lti_denominator(e[..., t])  # (batch, dim, N, N)
            P_sum += _safe_ratio(_outer(b[..., t]), den).sum(0)
            Q_sum += _safe_ratio(_outer(c[..., t]), den).sum(0)
        return GramianStatistics(estimator, count, {"P": P_sum, "Q": Q_sum})

    # ltv: forward recurrence for P, backward for Q, both summed over t.
    P_t = a.new_zeros(batch, dim, N, N)
    for t in range(L):
        P_t = _outer(a[..., t]) * P_t + _outer(b[..., t])
        P_sum += (P_t * real[:, t, None, None, None]).sum(0)
    Q_t = a.new_zeros(batch, dim, N, N)
    for t in reversed(range(L)):
        if t + 1 < L:
            Q_t = _outer(a[..., t + 1]) * Q_t
        Q_t = Q_t + _outer(c[..., t])
        Q_sum += (Q_t * real[:, t, None, None, None]).sum(0)
    return GramianStatistics(estimator, count, {"P": P_sum, "Q": Q_sum})


def gramians_from_statistics(stats: GramianStatistics):
    """(P, Q), each (dim, N, N), from accumulated token sums."""
    _check_estimator(stats.estimator)
    if stats.count <= 0:
        raise ValueError("no tokens were accumulated: the calibration data was empty")
    if stats.estimator == "mean_lti":
        e_bar = stats.sums["e"] / stats.count
        b_bar = stats.sums["b"] / stats.count
        c_bar = stats.sums["c"] / stats.count
        den = lti_denominator(e_bar)
        P = _safe_ratio(_outer(b_bar), den)
        Q = _safe_ratio(_outer(c_bar), den)
        return P, Q
    return stats.sums["P"] / stats.count, stats.sums["Q"] / stats.count


def gramians(
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    estimator: str = "ltv",
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    mask: torch.Tensor | None = None,
):
    """Gramian estimates of every channel of a selective SSM block, averaged over batch and time.

    Args:
        delta: (batch, dim, L) step sizes (before bias / softplus), as given to the scan.
        A: (dim, N) (Mamba2 heads: one row per head, constant along N).
        B, C: (batch, N, L) or (batch, ngroups, N, L).
        estimator: ``"mean_lti"`` | ``"frozen"`` | ``"ltv"`` (default ``"ltv"``, METHOD.md §3).
        delta_bias: (dim,) or None; delta_softplus: as in ``selective_scan``.
        mask: (batch, L) or None; padding tokens (False / 0) are removed from the sequences.

    Returns:
        (P, Q), each (dim, N, N), symmetric PSD, float64 for float64 inputs (else float32).
    """
    return gramians_from_statistics(
        gramian_statistics(
            delta, A, B, C, estimator=estimator, delta_bias=delta_bias, delta_softplus=delta_softplus, mask=mask
        )
    )


def ltv_sums_closed_form(
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
):
    """Σ_batch Σ_t P_t and Σ_batch Σ_t Q_t of the ``ltv`` estimator by the closed form (no recurrence).

    With S_t = Σ_{k≤t} dt_k (per channel) and w = A_i + A_j:
        Σ_t P_t[i,j] = Σ_s b_s[i] b_s[j] Σ_{t≥s} exp(w (S_t − S_s)),
        Σ_t Q_t[i,j] = Σ_s c_s[i] c_s[j] Σ_{t≤s} exp(w (S_s − S_t)).
    O(L²) work and memory per entry: a check for the recurrence and for kernels, not a fast path.
    Shapes as in ``gramians``; returns (P_sum, Q_sum), each (dim, N, N).  See docs/ltv_closed_form.md.
    """
    _, _, b, c = token_system(delta, A, B, C, delta_bias=delta_bias, delta_softplus=delta_softplus)
    cdt = b.dtype
    dt = discretize_delta(delta.to(cdt), None if delta_bias is None else delta_bias.to(cdt), delta_softplus)
    S = torch.cumsum(dt, dim=-1)  # (batch, dim, L)
    L = S.shape[-1]
    gap = S[..., None, :] - S[..., :, None]  # gap[..., s, t] = S_t − S_s
    later = torch.ones(L, L, dtype=torch.bool, device=S.device).triu()  # t >= s
    w = A.to(cdt)[:, :, None] + A.to(cdt)[:, None, :]  # (dim, N, N)
    # decay[b, d, i, j, s, t] = exp(w_ij (S_t − S_s)) for t >= s, else 0; gap is <= 0 where masked out.
    decay = torch.exp(w[None, :, :, :, None, None] * gap.clamp_min(0)[:, :, None, None]) * later
    weight_P = decay.sum(-1)  # Σ_{t≥s}: (batch, dim, N, N, L over s)
    weight_Q = decay.sum(-2)  # Σ_{s≤t}, indexed by the later time: (batch, dim, N, N, L)
    P_sum = torch.einsum("bdis,bdjs,bdijs->dij", b, b, weight_P)
    Q_sum = torch.einsum("bdis,bdjs,bdijs->dij", c, c, weight_Q)
    return P_sum, Q_sum
