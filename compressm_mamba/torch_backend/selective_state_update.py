"""The ``torch`` backend of the one-token selective state update: a handful of in-place tensor ops.

A decode step on a CPU is bound by the number of tensor ops (each one a dispatch and often an
allocation), not by arithmetic: the state is decayed and fed in place (``mul_`` + ``addcmul_`` on
the cached tensor when it already has the compute dtype), and y = <C, h> is one batched matmul over
the B/C groups.  Differentiable in every input except the state (which is a cache: it is written
with the new, detached value), so a decode step inside a graph that needs gradients still gets them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference.selective_scan import _compute_dtype

__all__ = ["selective_state_update_torch"]


def selective_state_update_torch(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decode step (``reference.selective_state_update``'s math); ``state`` is updated in place.

    state: (batch, dim, N); x, dt, z: (batch, dim); A: (dim, N); B, C: (batch, N) or (batch, ngroups, N);
    D, dt_bias: (dim,).  Returns out (batch, dim) in x's dtype.  Inputs are assumed valid
    (``ops.selective_state_update`` checks them).
    """
    batch, dim = x.shape
    N = A.shape[1]
    G = 1 if B.dim() == 2 else B.shape[1]
    cdt = _compute_dtype(x.dtype)
    x_c = x.to(cdt)
    dt_c = dt.to(cdt) if dt_bias is None else dt.to(cdt) + dt_bias.to(cdt)
    if dt_softplus:
        dt_c = F.softplus(dt_c)
    decay = torch.exp(dt_c.unsqueeze(-1) * A.to(cdt))  # (batch, dim, N)
    needs_graph = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, B, C, D, z, dt_bias))
    in_place = not needs_graph and state.dtype == cdt and state.is_contiguous()
    # Out of place, the previous state is copied: autograd keeps it for d(decay), and it is overwritten below.
    h = state.mul_(decay) if in_place else decay * state.detach().to(cdt, copy=True)
    inject = (dt_c * x_c).view(batch, G, dim // G, 1) * B.to(cdt).view(batch, G, 1, N)
    if in_place:
        h.view(batch, G, dim // G, N).add_(inject)
    else:
        h = (h.view(batch, G, dim // G, N) + inject).view(batch, dim, N)
        state.copy_(h.detach())
    y = torch.matmul(h.view(batch, G, dim // G, N), C.to(cdt).view(batch, G, N, 1)).view(batch, dim)
    if D is not None:
        y = y + D.to(cdt) * x_c
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(x.dtype)
