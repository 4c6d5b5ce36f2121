r"""Which states to keep: importance, rank choice and selection (METHOD.md §5–6).

A Mamba1 layer's diagonal A differs per channel while B and C are shared by all channels, so the
only reduction that keeps the selective scan exact in structure is one set of kept state indices
per layer.  Each state i gets one importance number per layer:

- ``diagonal``: s_i = Σ_d sqrt(P_d[i,i] Q_d[i,i]) — the HSVs when the Gramians are diagonal.
- ``balanced``: the Hankel energy state i carries,
      s_i = Σ_d Σ_k σ_{d,k} |T_d[i,k] T_d⁻¹[k,i]| = Σ_d Σ_k |(L_P V)_{ik} (L_Q U)_{ik}|
  (the σ factors cancel, so no division by small HSVs).
- ``ghost``: GHOST's controllability × observability score from forward passes (Menezes &
  Kyrillidis 2026; ``reference.ghost``): s_i = Σ_d Σ_t Σ_p h_t[d, i, p]² c_t[i]² over calibration
  tokens.  It needs the states' sums collected by a scan (``GramianCollector(ghost=True)``), not the
  Gramians: pass them as ``ghost=`` (dim, N).

``choose_rank`` turns the importance spectrum into a kept size r, ``select_states`` into indices.
"""

from __future__ import annotations

import math

import torch

from .balancing import check_gramians, hankel_factors

__all__ = [
    "IMPORTANCE_RULES",
    "RANK_MODES",
    "KEEP_RULES",
    "state_importance",
    "choose_rank",
    "select_states",
    "reduce_selective_ssm",
]

IMPORTANCE_RULES = ("balanced", "diagonal", "ghost")
RANK_MODES = ("tolerance", "fixed", "rank")
KEEP_RULES = ("largest", "smallest", "random")


def state_importance(
    P: torch.Tensor | None, Q: torch.Tensor | None, rule: str = "balanced", *, name: str | None = None,
    ghost: torch.Tensor | None = None,
) -> torch.Tensor:
    """Importance of each state index, summed over the layer's channels.

    P, Q: (dim, N, N) Gramians (unused by ``ghost``); ghost: (dim, N) GHOST sums (``ghost`` only).
    Returns (N,) float64, non-negative.
    """
    if rule not in IMPORTANCE_RULES:
        raise ValueError(f"importance rule must be one of {IMPORTANCE_RULES}, got {rule!r}")
    if rule == "ghost":
        where = f"{name}: " if name else ""
        if ghost is None or ghost.dim() != 2:
            raise ValueError(f"{where}importance='ghost' needs the (dim, N) GHOST sums of a forward scan "
                             f"(GramianCollector(ghost=True)), got {None if ghost is None else tuple(ghost.shape)}")
        if not torch.isfinite(ghost).all():
            raise ValueError(f"{where}GHOST sums contain NaN/inf; has the model diverged?")
        return ghost.to(torch.float64).clamp_min(0).sum(0)
    if rule == "diagonal":
        check_gramians(P, Q, name=name)
        diag_P = torch.diagonal(P.to(torch.float64), dim1=-2, dim2=-1).clamp_min(0)
        diag_Q = torch.diagonal(Q.to(torch.float64), dim1=-2, dim2=-1).clamp_min(0)
        return (diag_P * diag_Q).sqrt().sum(0)
    X, Y, _ = hankel_factors(P, Q, name=name)
    return (X * Y).abs().sum((0, 2))


def choose_rank(
    importance: torch.Tensor,
    mode: str,
    *,
    tau: float | None = None,
    fraction: float = 0.1,
    rank: int | None = None,
    gate: float = 0.95,
    min_state: int = 1,
) -> int:
    """How many states to keep, given a layer's importance spectrum.

    Args:
        importance: (N,) non-negative importances (any order).
        mode: ``"tolerance"`` — smallest r whose r largest importances hold at least (1 − tau) of the
            total (plain sums, not squares, as in the paper); ``"fixed"`` — cut ``fraction`` of the
            current N, r = floor((1 − fraction) · N); ``"rank"`` — r = ``rank``.
        tau: tolerance in (0, 1), for ``"tolerance"``.
        fraction: in (0, 1), for ``"fixed"`` (default 0.1).
        rank: target size 1 <= rank <= N, for ``"rank"``.
        gate: a cut happens only if r < gate · N (default 0.95); otherwise N is returned.
        min_state: r is never below this (default 1).

    Returns:
        r, an int in [min(min_state, N), N]; r == N means "do not cut this layer".
    """
    if importance.dim() != 1 or importance.numel() == 0:
        raise ValueError(f"importance must be a non-empty (N,) vector, got shape {tuple(importance.shape)}")
    if not torch.isfinite(importance).all():
        raise ValueError("importance contains NaN/inf; has the model diverged?")
    if (importance < 0).any():
        raise ValueError("importance must be non-negative")
    if not 0.0 < gate <= 1.0:
        raise ValueError(f"gate must be in (0, 1], got {gate}")
    if not (isinstance(min_state, int) and min_state >= 1):
        raise ValueError(f"min_state must be an integer >= 1, got {min_state!r}")
    N = importance.numel()

    if mode == "tolerance":
        if tau is None or not 0.0 < tau < 1.0:
            raise ValueError(f"tau must be in (0, 1) for mode='tolerance', got {tau!r}")
        s = torch.sort(importance.to(torch.float64), descending=True).values
        total = s.sum()
        if total <= 0:
            r = min_state
        else:
            # A relative slack of 1e-12 keeps a spectrum that meets the threshold exactly on paper
            # (e.g. [1, 1, 1, 1] with tau = 0.25) from missing it by one rounding error.
            need = (1.0 - tau) * total * (1.0 - 1e-12)
            r = int((torch.cumsum(s, 0) >= need).nonzero()[0]) + 1
    elif mode == "fixed":
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1) for mode='fixed', got {fraction!r}")
        r = math.floor((1.0 - fraction) * N)
    elif mode == "rank":
        if rank is None or isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an integer >= 1 for mode='rank', got {rank!r}")
        if rank > N:
            raise ValueError(f"rank={rank} exceeds the layer's state size N={N}")
        r = rank
    else:
        raise ValueError(f"mode must be one of {RANK_MODES}, got {mode!r}")

    r = min(max(r, min_state), N)
    if r >= gate * N:
        return N
    return r


def select_states(
    importance: torch.Tensor, r: int, keep: str = "largest", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Indices of the r states to keep, sorted ascending, (r,) int64.

    ``largest`` keeps the r most important (ties broken towards the lower index), ``smallest`` the
    r least important, ``random`` r uniformly drawn with ``generator`` (ablations).
    """
    if importance.dim() != 1:
        raise ValueError(f"importance must be (N,), got shape {tuple(importance.shape)}")
    N = importance.numel()
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= N:
        raise ValueError(f"r must be an integer in [1, N={N}], got {r!r}")
    if keep == "largest":
        order = torch.sort(importance, descending=True, stable=True).indices
    elif keep == "smallest":
        order = torch.sort(importance, descending=False, stable=True).indices
    elif keep == "random":
        order = torch.randperm(N, generator=generator, device="cpu").to(importance.device)
    else:
        raise ValueError(f"keep must be one of {KEEP_RULES}, got {keep!r}")
    return torch.sort(order[:r]).values


def reduce_selective_ssm(A_log: torch.Tensor, B_rows: torch.Tensor, C_rows: torch.Tensor, idx: torch.Tensor):
    """Keep only the states ``idx`` of a Mamba1 block's parameters.

    A_log: (dim, N); B_rows, C_rows: (N, ...) — e.g. x_proj's B and C row blocks, (N, d_inner).
    Returns (A_log[:, idx], B_rows[idx], C_rows[idx]) as new tensors.
    """
    N = A_log.shape[-1]
    if B_rows.shape[0] != N or C_rows.shape[0] != N:
        raise ValueError(
            f"B_rows and C_rows must have N={N} rows (A_log's last axis), got {B_rows.shape[0]} and {C_rows.shape[0]}"
        )
    idx = idx.to(device=A_log.device, dtype=torch.long)
    if idx.dim() != 1 or idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= N:
        raise ValueError(f"idx must be a non-empty 1-D index vector into [0, {N}), got {idx.tolist()}")
    if torch.unique(idx).numel() != idx.numel():
        raise ValueError("idx contains repeated states")
    return A_log[:, idx].clone(), B_rows[idx.to(B_rows.device)].clone(), C_rows[idx.to(C_rows.device)].clone()
