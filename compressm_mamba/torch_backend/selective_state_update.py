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
    as_c = lambda t: t if t.dtype == cdt else t.to(cdt)  # noqa: E731  (a no-op .to still costs a dispatch)
    x_c = as_c(x)
    dt_c = as_c(dt) if dt_bias is None else as_c(dt) + as_c(dt_bias)
    if dt_softplus:
        dt_c = F.softplus(dt_c)
    decay = torch.mul(dt_c.unsqueeze(-1), as_c(A)).exp_()  # (batch, dim, N)
    needs_graph = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, B, C, D, z, dt_bias))
    in_place = not needs_graph and state.dtype == cdt and state.is_contiguous()
    # Out of place, the previous state is copied: autograd keeps it for d(decay), and it is overwritten below.
    h = state.mul_(decay) if in_place else decay * state.detach().to(cdt, copy=True)
    dtx = (dt_c * x_c).view(batch, G, dim // G, 1)
    if in_place:
        h.view(batch, G, dim // G, N).addcmul_(dtx, as_c(B).view(batch, G, 1, N))
    else:
        h = torch.addcmul(h.view(batch, G, dim // G, N), dtx, as_c(B).view(batch, G, 1, N)).view(batch, dim, N)
        state.copy_(h.detach())
    y = torch.matmul(h.view(batch, G, dim // G, N), as_c(C).view(batch, G, N, 1)).view(batch, dim)
    if D is not None:
        y = torch.addcmul(y, as_c(D), x_c)
    if z is not None:
        y = y * F.silu(as_c(z))
    return y if y.dtype == x.dtype else y.to(x.dtype)
