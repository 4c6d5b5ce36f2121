r"""GHOST's state score (Menezes & Kyrillidis, 2026): controllability × observability from forward passes.

GHOST ranks the states of a trained SSM by how much each one both *holds* and *shows* on real data:
run the scan over calibration tokens and sum, per state i,

    g_i = Σ_t Σ_p h_t[i, p]² · c_t[i]²

where h_t is the actual state (driven by the layer's actual input x, not a white-noise input as in
the Gramians) and c_t = C_t its readout.  A state that is never excited (zero B) has h ≡ 0; one that
is never read (zero C) has c ≡ 0: both score 0.  Compared with the Hankel importance it needs the
layer's input x (an extra (batch, channels, P, L) tensor) and one scan per calibration batch, but no
N × N statistic and no factorisation.

Per channel d (Mamba1: d_inner channels with P = 1; Mamba2: heads with head_dim P):
    h_t = a_t ⊙ h_{t−1} + b_t x_tᵀ,   a_t = exp(dt_t A_d), b_t = dt_t B_t   (h_t is N × P)
and the score is summed over the batch, the tokens and P, giving (channels, N); a layer's state
importance sums its channels (``state_importance(rule="ghost")``).  Padding tokens (mask False)
neither decay nor excite the state and are not read.
"""

from __future__ import annotations

import torch

from .gramians import token_system

__all__ = ["ghost_sums"]


def ghost_sums(
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    x: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Σ over batch, tokens and P of h_t² · c_t², per channel and state.

    Args:
        delta: (batch, dim, L) after bias and softplus; A: (dim, N); B, C: (batch, N, L) or
            (batch, ngroups, N, L); x: (batch, dim, P, L) or (batch, dim, L) (P = 1) — the scan input.
        mask: (batch, L), False at padding.  dtype: compute dtype (float64 for float64 delta, else float32).
    Returns:
        (dim, N) non-negative sums in the compute dtype; they add across batches.
    """
    if x.dim() == 3:
        x = x.unsqueeze(2)
    if x.dim() != 4 or x.shape[0] != delta.shape[0] or x.shape[1] != delta.shape[1] or x.shape[3] != delta.shape[2]:
        raise ValueError(f"x must be (batch, dim, P, L) matching delta {tuple(delta.shape)}, got {tuple(x.shape)}")
    a, _, b, c = token_system(delta, A, B, C, mask=mask, dtype=dtype)  # each (batch, dim, N, L)
    x = x.to(a.dtype)
    if mask is not None:
        x = x * mask.to(a.dtype)[:, None, None, :]
    batch, dim, N, L = a.shape
    h = a.new_zeros(batch, dim, N, x.shape[2])
    score = a.new_zeros(dim, N)
    for t in range(L):
        h = a[..., t, None] * h + b[..., t, None] * x[:, :, None, :, t]
        score += (h.square().sum(-1) * c[..., t].square()).sum(0)
    return score
