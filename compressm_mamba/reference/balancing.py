r"""Hankel singular values and balanced transforms by the square-root method (METHOD.md §4).

Per channel (or head), in float64:

    P = L_P L_Pᵀ,  Q = L_Q L_Qᵀ,  L_Qᵀ L_P = U Σ Vᵀ   (SVD),
    hsv = diag(Σ) = sqrt(eig(P Q)),
    T = L_P V Σ^{-1/2},  T⁻¹ = Σ^{-1/2} Uᵀ L_Qᵀ,   so  T⁻¹ P T⁻ᵀ = Tᵀ Q T = Σ.

The factors come from a Cholesky decomposition where P (or Q) is numerically positive definite,
and from an eigendecomposition (L = W sqrt(max(λ, 0))) where it is only semi-definite — the
``mean_lti`` Gramians are rank-deficient in floating point.  Any factor with P = L Lᵀ gives the same
σ and the same products L_P V, L_Q U (they are invariant to L -> L W for orthogonal W), so the two
routes are interchangeable.  Everything is batched over channels with torch.linalg.
"""

from __future__ import annotations

import torch

__all__ = ["gramian_factor", "check_gramians", "hankel_factors", "hankel_singular_values", "balanced_transform"]


def check_gramians(P: torch.Tensor, Q: torch.Tensor, *, name: str | None = None) -> None:
    """Raise ValueError naming the layer and the first channel whose P or Q is not finite or misshaped.

    P, Q: (dim, N, N).  ``name`` is the layer's name, used in the message.
    """
    where = f"{name}: " if name else ""
    for label, M in (("P", P), ("Q", Q)):
        if M.dim() != 3 or M.shape[-1] != M.shape[-2]:
            raise ValueError(f"{where}Gramian {label} must be (dim, N, N), got shape {tuple(M.shape)}")
    if P.shape != Q.shape:
        raise ValueError(f"{where}P and Q shapes differ: {tuple(P.shape)} vs {tuple(Q.shape)}")
    for label, M in (("P", P), ("Q", Q)):
        bad = ~torch.isfinite(M).flatten(1).all(1)
        if bad.any():
            ch = int(bad.nonzero()[0])
            raise ValueError(
                f"{where}Gramian {label} of channel {ch} contains NaN/inf "
                f"({int(bad.sum())} of {M.shape[0]} channels affected); has the model diverged?"
            )


def gramian_factor(M: torch.Tensor) -> torch.Tensor:
    """A factor L with M = L Lᵀ for each symmetric PSD matrix in M, (..., N, N) -> (..., N, N), float64.

    Cholesky where it succeeds; eigh square roots (negative round-off eigenvalues clamped to 0)
    for the matrices where it does not.
    """
    M = M.to(torch.float64)
    M = 0.5 * (M + M.transpose(-1, -2))
    L, info = torch.linalg.cholesky_ex(M)
    failed = info != 0
    if failed.any():
        lam, W = torch.linalg.eigh(M[failed])
        L = L.clone()
        L[failed] = W * lam.clamp_min(0).sqrt().unsqueeze(-2)
    return L


def hankel_factors(P: torch.Tensor, Q: torch.Tensor, *, name: str | None = None):
    """The square-root method's pieces: (L_P V, L_Q U, hsv).

    P, Q: (dim, N, N).  Returns X = L_P V and Y = L_Q U, each (dim, N, N) float64, and hsv (dim, N)
    descending.  The balanced transform is T = X Σ^{-1/2}, T⁻¹ = Σ^{-1/2} Yᵀ; X and Y alone give the
    ``balanced`` state importance without dividing by small HSVs.
    """
    check_gramians(P, Q, name=name)
    L_P = gramian_factor(P)
    L_Q = gramian_factor(Q)
    U, S, Vh = torch.linalg.svd(L_Q.transpose(-1, -2) @ L_P)
    return L_P @ Vh.transpose(-1, -2), L_Q @ U, S


def hankel_singular_values(P: torch.Tensor, Q: torch.Tensor, *, name: str | None = None) -> torch.Tensor:
    """Hankel singular values sqrt(eig(P Q)), (dim, N, N) x 2 -> (dim, N) float64, descending."""
    check_gramians(P, Q, name=name)
    L_P = gramian_factor(P)
    L_Q = gramian_factor(Q)
    return torch.linalg.svdvals(L_Q.transpose(-1, -2) @ L_P)


def balanced_transform(P: torch.Tensor, Q: torch.Tensor, *, name: str | None = None):
    """Balancing transform of each channel: (T, Tinv, hsv).

    P, Q: (dim, N, N).  Returns T, Tinv (dim, N, N) float64 and hsv (dim, N) descending, with
    Tinv P Tinvᵀ = Tᵀ Q T = diag(hsv) and Tinv T = I when the pair is minimal.  HSVs below
    ``N · eps · hsv_max`` (directions that are numerically uncontrollable or unobservable) are
    floored there to keep T finite; for those directions the identities hold only approximately.
    """
    X, Y, hsv = hankel_factors(P, Q, name=name)
    floor = hsv[..., :1] * (hsv.shape[-1] * torch.finfo(torch.float64).eps)
    inv_sqrt = hsv.clamp_min(torch.finfo(torch.float64).tiny).maximum(floor).rsqrt()
    T = X * inv_sqrt.unsqueeze(-2)
    Tinv = inv_sqrt.unsqueeze(-1) * Y.transpose(-1, -2)
    return T, Tinv, hsv
