r"""The ``torch`` backend of the selective scan: chunked and vectorised, for CPUs (and a fallback everywhere).

No Python loop over time steps: the sequence is cut into chunks of T tokens; inside a chunk every
state is a weighted sum of the chunk's inputs, with weights from cumulative log-decays,

    h_t = exp(S_t) h_start + Σ_{s≤t} exp(S_t − S_s) x_s,    S_t = Σ_{k≤t, k in chunk} dt_k A,   x_s = dt_s B_s u_s,

computed as one batched (T × T) product per chunk (exp(S_t − S_s) ≤ 1 for s ≤ t: no overflow,
unlike the exp(S_t)·cumsum(exp(−S_s) x_s) shortcut).  Only the chunk-to-chunk carry h_start is a
(short) loop, over L / T chunks.  Work is T times the sequential scan's, in large vectorised
operations; memory is O(batch · dim · N · L · T).  Gradients come from autograd through these ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference.selective_scan import _compute_dtype, discretize_delta

__all__ = ["selective_scan_chunked", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 16


def selective_scan_chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
):
    """Selective scan with ``selective_scan_fn``'s layouts (see ``reference.selective_scan``).

    u, delta: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (batch, ngroups, N, L); D: (dim,);
    z: (batch, dim, L); delta_bias: (dim,).  Computes in float32 (float64 for float64 inputs); returns
    out (batch, dim, L) in u's dtype [and the last state (batch, dim, N)].  Inputs are assumed valid
    (``ops.selective_scan`` checks them).
    """
    batch, dim, L = u.shape
    N = A.shape[1]
    cdt = _compute_dtype(u.dtype)
    G = 1 if B.dim() == 3 else B.shape[1]
    dt = discretize_delta(delta.to(cdt), None if delta_bias is None else delta_bias.to(cdt), delta_softplus)

    T = max(1, min(chunk_size, L))
    nc = -(-L // T)
    pad = nc * T - L
    # Channels are laid out as (G, dim // G) so that B and C broadcast over a group's channels
    # without being copied per channel.
    def chunks(x):  # (..., L) -> (..., nc, T), zero-padded
        return F.pad(x, (0, pad)).unflatten(-1, (nc, T))

    dt_c = chunks(dt).view(batch, G, dim // G, 1, nc, T)
    u_c = chunks(u.to(cdt)).view(batch, G, dim // G, 1, nc, T)
    B_c = chunks(B.to(cdt).view(batch, G, 1, N, L))  # (batch, G, 1, N, nc, T)
    C_c = chunks(C.to(cdt).view(batch, G, 1, N, L))
    A_c = A.to(cdt).view(1, G, dim // G, N, 1, 1)

    log_decay = torch.cumsum(dt_c * A_c, dim=-1)  # S_t inside each chunk: (batch, G, dpg, N, nc, T)
    x = (dt_c * u_c) * B_c  # (batch, G, dpg, N, nc, T)
    # weights[t, s] = exp(S_t − S_s) for s <= t; -inf above the diagonal gives exactly 0.
    causal = torch.ones(T, T, dtype=torch.bool, device=u.device).tril()
    gap = log_decay.unsqueeze(-1) - log_decay.unsqueeze(-2)
    weights = torch.exp(gap.masked_fill(~causal, float("-inf")))
    h_local = torch.einsum("...ts,...s->...t", weights, x)  # states from this chunk's inputs only

    # Carry the state across chunks: h_start[c] = exp(S_end[c−1]) h_start[c−1] + h_local_end[c−1].
    chunk_decay = torch.exp(log_decay[..., -1])  # (batch, G, dpg, N, nc)
    starts = [torch.zeros_like(chunk_decay[..., 0])]
    for c in range(nc - 1):
        starts.append(chunk_decay[..., c] * starts[-1] + h_local[..., c, -1])
    h_start = torch.stack(starts, dim=-1)  # (batch, G, dpg, N, nc)
    h = h_local + torch.exp(log_decay) * h_start.unsqueeze(-1)

    y = (h * C_c).sum(3).flatten(-2)[..., :L].reshape(batch, dim, L)
    out = y if D is None else y + u.to(cdt) * D.to(cdt)[:, None]
    if z is not None:
        out = out * F.silu(z.to(cdt))
    out = out.to(u.dtype)
    if not return_last_state:
        return out
    # The last real token sits at position (L - 1) % T of the last chunk; padding after it has x = 0
    # and decay 1, so the padded end state equals the true last state.
    last = chunk_decay[..., -1] * h_start[..., -1] + h_local[..., -1, -1]
    return out, last.reshape(batch, dim, N)
