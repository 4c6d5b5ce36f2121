"""Pure-torch emulation of the CUDA selective-scan kernels' algorithm (csrc/selective_scan/selective_scan.cuh).

The CUDA kernels cannot run without a GPU, so their *algorithm* is proven here, on CPU, in float32:
the same decomposition, recomputation schedule and order of every cross-thread sum, vectorised over
(batch, channel, state) with torch and walked over time step by step exactly as a kernel thread does:

forward   tiles in time; the state before every chunk of ``CHUNK`` steps is stored (checkpoints);
          a = exp2(dt * A2) with A2 = A log2(e) folded in once; out = (y + D u) silu(z).
backward  chunks in reverse (block ``slot`` owning slices slot, slot + n_slots, ... of ``chans``
          channels walks them in order within each chunk): pass 1 recomputes the state before
          every sub-tile of ``sub`` steps from the checkpoint, pass 2 recomputes each sub-tile's
          states ("hist") and runs the reverse recurrence over them.  dB / dC of a step are summed
          over a slice's channels, then added into the slot's partial in slice order; the caller
          sums partials over slots.  (Channels are independent otherwise, so the emulation walks
          all of them at once.)

``exp2_rel_err`` multiplies every exp2 by (1 + e), e uniform in [-err, err], to show that the
approximate MUFU.EX2 the kernels use (``ex2.approx.ftz.f32``, within 2 ulp = 2^-22 relative) keeps
results within the kernel tests' fp32 tolerances (house style 11: fast exp needs a test showing it is
safe).  Shapes: u, delta, z (batch, dim, L); A (dim, N); B, C (batch, G, N, L); D, delta_bias (dim,).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

CHUNK = 64  # kScanChunk
KERNEL_SIZES = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)  # COMPRESSM_SCAN_ALL_NSTATES
MIN_LANES = 2  # scan_lanes_per_channel's start
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def kernel_layout(N: int, threads: int = 128) -> dict:
    """The compiled state size serving N, lanes per channel, states per thread, channels per block (slice),
    backward sub-tile: selective_scan.h's scan_kernel_nstate / scan_lanes_per_channel and ScanTraits."""
    k = next(s for s in KERNEL_SIZES if N <= s)
    lanes = MIN_LANES
    while lanes < 32 and k % (2 * lanes) == 0 and k // (2 * lanes) >= 6:
        lanes *= 2
    return dict(kernel_n=k, lanes=lanes, states=k // lanes, chans=threads // lanes, sub=4 if k >= 256 else 8)


class _Exp2:
    """exp2 in float32, optionally with a bounded random relative error (the MUFU.EX2 model)."""

    def __init__(self, rel_err: float, seed: int):
        self.rel_err = rel_err
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.exp2(x)
        if self.rel_err:
            e = (torch.rand(x.shape, generator=self.gen, dtype=torch.float64) * 2 - 1) * self.rel_err
            y = (y.double() * (1 + e)).float()
        return y


def _prepare(u, delta, A, B, C, D, z, delta_bias, softplus):
    f32 = torch.float32
    batch, dim, L = u.shape
    G = B.shape[1]
    x = delta.to(f32) + (delta_bias.to(f32)[:, None] if delta_bias is not None else 0)
    dt = torch.where(x > 20, x, torch.log1p(torch.exp2(x * LOG2E))) if softplus else x
    rep = dim // G
    Bx = B.to(f32).repeat_interleave(rep, dim=1)  # (batch, dim, N, L): channel d sees group d // rep
    Cx = C.to(f32).repeat_interleave(rep, dim=1)
    A2 = A.to(f32) * LOG2E
    return dt, dt * u.to(f32), Bx, Cx, A2, x


def forward(u, delta, A, B, C, D=None, z=None, delta_bias=None, softplus=True, *, exp2_rel_err=0.0, seed=0):
    """(out fp32, last_state, checkpoints (batch, dim, n_chunks, N)) as the forward kernel computes them."""
    exp2 = _Exp2(exp2_rel_err, seed)
    dt, dtu, Bx, Cx, A2, _ = _prepare(u, delta, A, B, C, D, z, delta_bias, softplus)
    batch, dim, L = u.shape
    N = A.shape[1]
    h = torch.zeros(batch, dim, N)
    y = torch.zeros(batch, dim, L)
    ckpts = []
    for t in range(L):
        if t % CHUNK == 0:
            ckpts.append(h.clone())
        a = exp2(dt[:, :, t, None] * A2)
        h = a * h + dtu[:, :, t, None] * Bx[..., t]
        y[:, :, t] = (h * Cx[..., t]).sum(-1)
    out = y + (D.float()[:, None] * u.float() if D is not None else 0)
    if z is not None:
        out = out * F.silu(z.float())
    ckpt = torch.stack(ckpts, 2) if ckpts else torch.zeros(batch, dim, 0, N)
    return out, h, ckpt


def backward(dout, u, delta, A, B, C, D=None, z=None, delta_bias=None, softplus=True, *, checkpoints,
             n_slots=None, exp2_rel_err=0.0, seed=1):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) in the kernel's schedule and summation order.

    n_slots: blocks per (batch, group); None = one per slice (as many as the binding allows).
    """
    exp2 = _Exp2(exp2_rel_err, seed)
    f32 = torch.float32
    dt, dtu, Bx, Cx, A2, x = _prepare(u, delta, A, B, C, D, z, delta_bias, softplus)
    batch, dim, L = u.shape
    G, N = B.shape[1], A.shape[1]
    dpg = dim // G
    lay = kernel_layout(N)
    chans, sub = lay["chans"], lay["sub"]
    n_slices = -(-dpg // chans)
    n_slots = n_slices if n_slots is None else n_slots
    assert 1 <= n_slots <= n_slices
    uf, doutf = u.to(f32), dout.to(f32)
    Dv = D.to(f32)[:, None] if D is not None else torch.zeros(dim, 1)
    if z is not None:
        zf = z.to(f32)
        sz = torch.sigmoid(zf)
        dy = doutf * zf * sz
    else:
        dy = doutf

    g = torch.zeros(batch, dim, N)
    dA = torch.zeros(batch, dim, N)
    gB_all = torch.zeros(batch, dim, L)
    gAh_all = torch.zeros(batch, dim, L)
    y_all = torch.zeros(batch, dim, L)
    # Per-step channel sums of one slice: (batch, G, n_slices, L, N), reduced in the kernel's order below.
    slice_dB = torch.zeros(batch, G, n_slices, L, N)
    slice_dC = torch.zeros(batch, G, n_slices, L, N)
    n_chunks = -(-L // CHUNK)
    for chunk in reversed(range(n_chunks)):
        tc0 = chunk * CHUNK
        n_sub = -(-(min(tc0 + CHUNK, L) - tc0) // sub)
        h = checkpoints[:, :, chunk].to(f32).clone()
        sub_h = []
        for s in range(n_sub):  # pass 1
            sub_h.append(h.clone())
            if s == n_sub - 1:
                break
            for t in range(tc0 + s * sub, tc0 + (s + 1) * sub):
                h = exp2(dt[:, :, t, None] * A2) * h + dtu[:, :, t, None] * Bx[..., t]
        for s in reversed(range(n_sub)):  # pass 2
            t0 = tc0 + s * sub
            steps = range(t0, min(t0 + sub, L))
            hist, hc = [], sub_h[s]
            for t in steps:
                hist.append(hc)
                hc = exp2(dt[:, :, t, None] * A2) * hc + dtu[:, :, t, None] * Bx[..., t]
            for i, t in reversed(list(enumerate(steps))):
                y_all[:, :, t] = (hc * Cx[..., t]).sum(-1)
                gk = g + dy[:, :, t, None] * Cx[..., t]
                ga = gk * exp2(dt[:, :, t, None] * A2)
                gah = ga * hist[i]
                gB_all[:, :, t] = (gk * Bx[..., t]).sum(-1)
                gAh_all[:, :, t] = (gah * A2).sum(-1)
                dA = dA + gah * dt[:, :, t, None]
                vb = gk * dtu[:, :, t, None]
                vc = hc * dy[:, :, t, None]
                for name, v in (("B", vb), ("C", vc)):
                    target = slice_dB if name == "B" else slice_dC
                    target[:, :, :, t] = _slice_sums(v, G, dpg, chans, n_slices)
                g = ga
                hc = hist[i]

    du = dt * gB_all + dy * Dv
    ddt = uf * gB_all + LN2 * gAh_all
    if softplus:
        ddt = ddt * torch.sigmoid(x)
    dz = None
    if z is not None:
        dz = doutf * (y_all + Dv * uf) * sz * (1 + zf * (1 - sz))
    dB = _slot_order_sum(slice_dB, n_slots)
    dC = _slot_order_sum(slice_dC, n_slots)
    dD = (dy * uf).sum(-1).sum(0) if D is not None else None
    dbias = ddt.sum(-1).sum(0) if delta_bias is not None else None
    return du, ddt, dA.sum(0), dB, dC, dD, dz, dbias


def _slice_sums(v: torch.Tensor, G: int, dpg: int, chans: int, n_slices: int) -> torch.Tensor:
    """(batch, dim, N) per-channel values -> (batch, G, n_slices, N) sums over each slice's channels."""
    batch, _, N = v.shape
    v = v.reshape(batch, G, dpg, N)
    pad = n_slices * chans - dpg
    if pad:
        v = torch.cat([v, v.new_zeros(batch, G, pad, N)], 2)
    return v.reshape(batch, G, n_slices, chans, N).sum(3)


def _slot_order_sum(slice_sums: torch.Tensor, n_slots: int) -> torch.Tensor:
    """Slot s stores its first slice's sums and adds slices s + n_slots, ... in order; then the slots are
    summed in slot order and transposed to (batch, G, N, L)."""
    n_slices = slice_sums.shape[2]
    parts = []
    for s in range(n_slots):
        acc = slice_sums[:, :, s].clone()
        for j in range(s + n_slots, n_slices, n_slots):
            acc = acc + slice_sums[:, :, j]
        parts.append(acc)
    return torch.stack(parts, 2).sum(2).transpose(2, 3)


def backward_scratch_bytes(batch: int, dim: int, L: int, N: int, ngroups: int, elem_bytes: int,
                           with_z: bool = True) -> dict:
    """The backward's scratch as bindings.cpp sizes it (bytes): dB / dC per-slot partials, dA partial and
    gradient carry, the slot sums; and the backward's input bytes that bound the partials."""
    lay = kernel_layout(N)
    n_slices = -(-(dim // ngroups) // lay["chans"])
    n_chunks = -(-L // CHUNK)
    inputs = (3 + with_z) * batch * dim * L * elem_bytes  # dout, u, delta, z
    inputs += 2 * batch * ngroups * N * L * elem_bytes + batch * dim * n_chunks * N * 4 + dim * N * 4
    slot_bytes = 2 * batch * ngroups * L * N * 4
    n_slots = min(n_slices, max(1, inputs // slot_bytes)) if slot_bytes else n_slices
    partials = n_slots * slot_bytes
    per_channel = 2 * batch * dim * N * 4  # dA partial, gradient carry between chunks
    return dict(n_slices=n_slices, n_slots=n_slots, inputs=inputs, partials=partials, per_channel=per_channel,
                slot_sum=2 * batch * ngroups * L * N * 4,
                total=partials + per_channel + 2 * batch * ngroups * L * N * 4)


__all__ = ["forward", "backward", "kernel_layout", "backward_scratch_bytes", "CHUNK"]
