r"""The ``torch`` backend of the selective scan: vectorised over time, for CPUs (and a fallback everywhere).

The recurrence h_t = a_t h_{t−1} + x_t (a_t = exp(dt_t A), x_t = dt_t B_t u_t) is solved by recursive
doubling: after step k every position holds the sum over the 2^k tokens before it, so log2(L) steps
of whole-tensor operations replace the Python loop over L time steps, with no exponentials of
differences that could overflow (products of decays only shrink).

Forward and backward are one ``torch.autograd.Function``: the forward keeps only the states h
(batch, dim, N, L); the backward runs the same doubling backwards in time for g_t = ∂loss/∂h_t,
g_t = a_{t+1} g_{t+1} + C_t ∂loss/∂y_t, and forms every gradient elementwise from h_{t−1} and g_t.
Memory is a few (batch, dim, N, L) tensors; work is O(batch · dim · N · L · log L).

Channels are laid out as (ngroups, dim // ngroups) so that B and C broadcast over a group's
channels without being copied per channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference.selective_scan import _compute_dtype, skip_and_gate

__all__ = ["selective_scan_chunked", "linear_scan"]


def linear_scan(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """h_t = a_t h_{t−1} + x_t along the last axis (h_{−1} = 0), by recursive doubling.

    a, x: (..., L) of one dtype.  Returns h (..., L).  log2(L) steps, each a few whole-tensor ops.
    """
    L = x.shape[-1]
    h = x.clone()
    decay = a.clone()
    k = 1
    while k < L:
        # The right-hand sides are evaluated into fresh tensors before the slices are written, so the
        # overlap of h[..., k:] and h[..., :-k] is harmless.
        h[..., k:] = h[..., k:] + decay[..., k:] * h[..., :-k]
        if 2 * k < L:
            decay[..., k:] = decay[..., k:] * decay[..., :-k]
        k *= 2
    return h


class _DoublingScan(torch.autograd.Function):
    """The scan core on grouped layouts; see the module docstring for the gradient formulas."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C):
        # u, dt: (batch, G, dpg, 1, L); A: (1, G, dpg, N, 1); B, C: (batch, G, 1, N, L)
        a = torch.exp(dt * A)
        h = linear_scan(a, dt * u * B)  # (batch, G, dpg, N, L)
        y = (h * C).sum(3, keepdim=True)  # (batch, G, dpg, 1, L)
        ctx.save_for_backward(u, dt, A, B, C, h)
        return y, h[..., -1]

    @staticmethod
    def backward(ctx, dy, _dlast):
        u, dt, A, B, C, h = ctx.saved_tensors
        a = torch.exp(dt * A)
        # g_t = a_{t+1} g_{t+1} + C_t dy_t, i.e. the forward recurrence on time-reversed, shifted decays.
        a_next = F.pad(a[..., 1:], (0, 1))
        g = linear_scan(a_next.flip(-1), (C * dy).flip(-1)).flip(-1)  # (batch, G, dpg, N, L)
        h_prev = F.pad(h[..., :-1], (1, 0))
        da = g * h_prev  # ∂loss/∂a_t
        du = (g * dt * B).sum(3, keepdim=True)
        ddt = (g * u * B + da * a * A).sum(3, keepdim=True)
        dA = (da * a * dt).sum((0, 4), keepdim=True)
        dB = (g * dt * u).sum(2, keepdim=True)
        dC = (h * dy).sum(2, keepdim=True)
        return du, ddt, dA, dB, dC


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
):
    """Selective scan with ``selective_scan_fn``'s layouts (see ``reference.selective_scan``).

    u, delta: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (batch, ngroups, N, L); D: (dim,);
    z: (batch, dim, L); delta_bias: (dim,).  Computes in float32 (float64 for float64 inputs); returns
    out (batch, dim, L) in u's dtype [and the last state (batch, dim, N)].  Differentiable in every
    tensor input.  Inputs are assumed valid (``ops.selective_scan`` checks them).
    """
    batch, dim, L = u.shape
    N = A.shape[1]
    cdt = _compute_dtype(u.dtype)
    G = 1 if B.dim() == 3 else B.shape[1]
    dt = delta.to(cdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    grouped = (batch, G, dim // G, 1, L)
    y, last = _DoublingScan.apply(
        u.to(cdt).reshape(grouped),
        dt.reshape(grouped),
        A.to(cdt).reshape(1, G, dim // G, N, 1),
        B.to(cdt).reshape(batch, G, 1, N, L),
        C.to(cdt).reshape(batch, G, 1, N, L),
    )
    out = skip_and_gate(y.reshape(batch, dim, L), u.to(cdt), D, z).to(u.dtype)
    return (out, last.reshape(batch, dim, N).detach()) if return_last_state else out
