r"""The ``torch`` backend of the Gramian estimators: vectorised over tokens in chunks of T.

Token sums as ``reference.gramian_statistics`` defines them, without a Python loop over tokens.

``frozen``: per chunk, Σ_{batch,t} (b_t b_tᵀ) ⊘ den_t over a (batch, dim, N, N, T) block.

``ltv``: with chunk-local inclusive log-decays S_t = Σ_{chunk start ≤ k ≤ t} dt_k and the causal
weights K[s, t] = exp(A (S_t − S_s)) for s ≤ t (≤ 1: no overflow), the forward recurrence inside a
chunk is P_t = (E_t E_tᵀ) ⊙ P_in + Σ_{s≤t} v_{s,t} v_{s,t}ᵀ with E_t = exp(A S_t), v_{s,t} = b_s ⊙ K[s,t],
so a chunk's sum over t is one elementwise product with the incoming state plus one Gram product
(a matrix multiplication).  The backward recurrence for Q is the mirror image: weights K[t, s] for
s ≥ t and F_t = exp(A (S_end − S_t)).  Only the (batch, dim, N, N) states carried between chunks loop
in Python, over L / T chunks.  See docs/ltv_closed_form.md for the closed form behind it.
"""

from __future__ import annotations

import torch

from ..reference.gramians import GramianStatistics, _outer, _safe_ratio, lti_denominator, token_system
from ..checks import check_gramian_inputs
from ..reference.selective_scan import _compute_dtype, discretize_delta

__all__ = ["gramian_sums_chunked", "mean_lti_sums"]

# Elements per intermediate block: bounds memory to ~64 MB (float32) whatever the shapes.
_BLOCK_ELEMENTS = 1 << 24


def _chunk_length(per_token: int, L: int, square: bool) -> int:
    """Largest chunk length T (<= 64) keeping per_token · T (or · T²) under the block budget."""
    T = 64
    while T > 1 and per_token * (T * T if square else T) > _BLOCK_ELEMENTS:
        T //= 2
    return max(1, min(T, L))


def gramian_sums_chunked(delta, A, B, C, *, estimator, delta_bias=None, delta_softplus=False, mask=None):
    """Token sums for ``frozen`` or ``ltv`` (shapes as in ``reference.gramians.gramian_statistics``).

    Returns a ``GramianStatistics`` whose sums are (dim, N, N), float32 (float64 for float64 delta).
    """
    a, e, b, c = token_system(delta, A, B, C, delta_bias=delta_bias, delta_softplus=delta_softplus, mask=mask)
    batch, dim, N, L = a.shape
    real = a.new_ones(batch, L) if mask is None else mask.to(a.dtype)
    count = batch * L if mask is None else int(mask.bool().sum())
    if estimator == "frozen":
        P, Q = _frozen(e, b, c, real)
    elif estimator == "ltv":
        dt = discretize_delta(delta.to(b.dtype), None if delta_bias is None else delta_bias.to(b.dtype),
                              delta_softplus) * real[:, None, :]  # padding: dt = 0, decay 1
        P, Q = _ltv(-(dt.unsqueeze(2) * A.to(b.dtype)[None, :, :, None]), b, c, real)
    else:
        raise ValueError(f"the torch backend computes 'frozen' and 'ltv' sums, got {estimator!r}")
    return GramianStatistics(estimator, count, {"P": P, "Q": Q})


def _frozen(e, b, c, real):
    batch, dim, N, L = e.shape
    T = _chunk_length(batch * dim * N * N, L, square=False)
    P = e.new_zeros(dim, N, N)
    Q = e.new_zeros(dim, N, N)
    for t0 in range(0, L, T):
        sl = slice(t0, t0 + T)
        den = lti_denominator(e[..., sl].movedim(-1, -2))  # (batch, dim, T, N, N)
        bt, ct = b[..., sl].movedim(-1, -2), c[..., sl].movedim(-1, -2)  # (batch, dim, T, N)
        P += _safe_ratio(bt.unsqueeze(-1) * bt.unsqueeze(-2), den).sum((0, 2))
        Q += _safe_ratio(ct.unsqueeze(-1) * ct.unsqueeze(-2), den).sum((0, 2))
    return P, Q


def _gram(X: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σ over batch, s and t of weight[b, t] X[b,d,i,s,t] X[b,d,j,s,t] -> (dim, N, N), as one bmm."""
    batch, dim, N = X.shape[:3]
    Xw = (X * weight[:, None, None, None, :].sqrt()).permute(1, 2, 0, 3, 4).reshape(dim, N, -1)
    return Xw @ Xw.transpose(1, 2)


def _ltv(log_decay, b, c, real):
    """log_decay: (batch, dim, N, L) = −dt·A >= 0 per token (0 for padding); b, c: (batch, dim, N, L)."""
    batch, dim, N, L = b.shape
    T = _chunk_length(batch * dim * N, L, square=True)
    P_sum = b.new_zeros(dim, N, N)
    Q_sum = b.new_zeros(dim, N, N)
    P_in = b.new_zeros(batch, dim, N, N)
    chunks = []
    for t0 in range(0, L, T):
        sl = slice(t0, t0 + T)
        S = -torch.cumsum(log_decay[..., sl], dim=-1)  # A · (chunk-local inclusive cumsum of dt), <= 0
        Tc = S.shape[-1]
        causal = torch.ones(Tc, Tc, dtype=torch.bool, device=b.device).triu()  # [s, t]: s <= t
        K = torch.exp((S.unsqueeze(-2) - S.unsqueeze(-1)).masked_fill(~causal, float("-inf")))  # K[s, t]
        E = torch.exp(S)  # decay from the chunk's incoming state to t
        m = real[:, sl]
        chunks.append((S, K, E, m, sl))

        Vb = b[..., sl].unsqueeze(-1) * K  # v_{s,t} = b_s ⊙ K[s, t]: (batch, dim, N, s, t)
        P_sum += (P_in * torch.einsum("bdit,bdjt,bt->bdij", E, E, m)).sum(0) + _gram(Vb, m)
        end = Vb[..., -1]  # v_{s,T-1}
        P_in = _outer(E[..., -1]) * P_in + end @ end.transpose(-1, -2)

    Q_in = b.new_zeros(batch, dim, N, N)  # the future's contribution, seen from the chunk's last token
    for S, K, E, m, sl in reversed(chunks):
        Fd = torch.exp(S[..., -1:] - S)  # F_t = exp(A (S_end − S_t))
        Wc = c[..., sl].unsqueeze(-1) * K.transpose(-1, -2)  # w_{s,t} = c_s ⊙ K[t, s] for s >= t
        Q_sum += (Q_in * torch.einsum("bdit,bdjt,bt->bdij", Fd, Fd, m)).sum(0) + _gram(Wc, m)
        cE = c[..., sl] * E  # c_s ⊙ exp(A S_s): the chunk's tokens seen from before its first token
        Q_in = _outer(E[..., -1]) * Q_in + cE @ cE.transpose(-1, -2)
    return P_sum, Q_sum


def mean_lti_sums(delta, A, B, C, *, delta_bias=None, delta_softplus=False, mask=None):
    """``mean_lti`` token sums without the (batch, dim, N, L) system tensors.

    Same contract as ``reference.gramians.gramian_statistics(..., estimator="mean_lti")``: sums over
    batch and real tokens of e_t = -expm1(dt_t A) and b_t = dt_t B_t, each (dim, N), and of c_t = C_t
    expanded to channels.  The reference forms a, e, b and c at (batch, dim, N, L) — four tensors of
    26 GB each in fp32 at (8, 3072, 2048, N=128), more than a training step can spare on a GPU.  Here
    sum_t dt_t B_t is a per-group matrix product, sum_t C_t does not depend on the channel, and only
    sum_t e_t needs a (batch, dim, N, T) block, made one chunk of time at a time.

    delta: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (batch, ngroups, N, L); mask: (batch, L).
    Sums are float32 (float64 for float64 delta).
    """
    check_gramian_inputs(delta, A, B, C, delta_bias, mask)
    batch, dim, L = delta.shape
    N = A.shape[1]
    cdt = _compute_dtype(delta.dtype)
    dt = discretize_delta(delta.to(cdt), None if delta_bias is None else delta_bias.to(cdt), delta_softplus)
    if mask is None:
        count = batch * L
        real = None
    else:
        real = mask.to(cdt)
        count = int(mask.bool().sum())
        dt = dt * real[:, None, :]  # a padding token: dt = 0, so e = 0 and b = 0
    B4 = (B if B.dim() == 4 else B.unsqueeze(1)).to(cdt)
    C4 = (C if C.dim() == 4 else C.unsqueeze(1)).to(cdt)
    G = B4.shape[1]
    if real is not None:
        C4 = C4 * real[:, None, None, :]
    # b: per group g, sum over batch and time of dt (batch, dim/G, L) x B_g (batch, N, L) -> (dim/G, N)
    dt_g = dt.reshape(batch, G, dim // G, L)
    b_sum = torch.einsum("bgdl,bgnl->gdn", dt_g, B4).reshape(dim, N)
    c_sum = C4.sum((0, 3)).repeat_interleave(dim // G, dim=0)  # (dim, N)
    A_c = A.to(cdt)
    e_sum = torch.zeros(dim, N, dtype=cdt, device=delta.device)
    T = _chunk_length(batch * dim * N, L, square=False)
    for t0 in range(0, L, T):
        block = dt[:, :, t0:t0 + T].unsqueeze(2) * A_c[None, :, :, None]  # (batch, dim, N, T)
        e_sum -= torch.expm1(block).sum((0, 3))
    return GramianStatistics("mean_lti", count, {"e": e_sum, "b": b_sum, "c": c_sum})

