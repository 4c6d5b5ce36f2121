"""Input checks shared by the reference and the public ops: every error names the argument."""

from __future__ import annotations

import torch

__all__ = ["check_scan_inputs", "check_gramian_inputs", "check_state_update_inputs"]


def _check_tensors(reference_name: str, reference: torch.Tensor, named: dict) -> None:
    """Each named input is a floating-point tensor on the reference input's device."""
    for name, t in named.items():
        if t is None:
            continue
        if not torch.is_tensor(t):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.device != reference.device:
            raise ValueError(f"{name} is on {t.device} but {reference_name} is on {reference.device}: "
                             "all inputs must share a device")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_bc(B, C, batch: int, dim: int, N: int, L: int) -> None:
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 2 and tuple(t.shape) == (dim, N):
            # mamba_ssm's selective_scan_fn accepts a time-invariant (dim, N) B or C; we refuse it
            # rather than silently materialising an L-times larger tensor.
            raise ValueError(
                f"{name} of shape (dim={dim}, N={N}) (constant over time) is not supported: pass it input-dependent "
                f"as (batch={batch}, N={N}, L={L}) or (batch, ngroups, N, L); a per-channel constant {name} equals "
                f"{name}[None, :, :, None].expand(batch, dim, N, L) (ngroups = dim)"
            )
        if t.dim() not in (3, 4) or t.shape[0] != batch or tuple(t.shape[-2:]) != (N, L):
            raise ValueError(
                f"{name} must be (batch={batch}, N={N}, L={L}) or (batch, ngroups, N, L), got {tuple(t.shape)}"
            )
        if t.dim() == 4 and dim % t.shape[1] != 0:
            raise ValueError(f"{name}: dim={dim} is not a multiple of ngroups={t.shape[1]}")


def _check_leading(name: str, t, what: str, dim: int) -> None:
    if t is not None and tuple(t.shape) != (dim,):
        raise ValueError(f"{name} must be ({what}={dim},), got {tuple(t.shape)}")


def check_scan_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None) -> int:
    """Check selective-scan inputs in ``selective_scan_fn``'s layouts; returns N."""
    if not torch.is_tensor(u) or u.dim() != 3:
        raise ValueError(f"u must be a (batch, dim, L) tensor, got {getattr(u, 'shape', type(u).__name__)}")
    if not u.is_floating_point():
        raise TypeError(f"u must be a floating-point tensor, got {u.dtype}")
    _check_tensors("u", u, {"delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias})
    batch, dim, L = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (dim={dim}, N), got {tuple(A.shape)}")
    N = A.shape[1]
    _check_bc(B, C, batch, dim, N, L)
    _check_leading("D", D, "dim", dim)
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    _check_leading("delta_bias", delta_bias, "dim", dim)
    return N


def check_gramian_inputs(delta, A, B, C, delta_bias=None, mask=None) -> int:
    """Check Gramian-estimator inputs (delta (batch, dim, L), A (dim, N), B/C, mask (batch, L)); returns N."""
    if not torch.is_tensor(delta) or delta.dim() != 3:
        raise ValueError(f"delta must be a (batch, dim, L) tensor, got {getattr(delta, 'shape', type(delta).__name__)}")
    if not delta.is_floating_point():
        raise TypeError(f"delta must be a floating-point tensor, got {delta.dtype}")
    _check_tensors("delta", delta, {"A": A, "B": B, "C": C, "delta_bias": delta_bias})
    batch, dim, L = delta.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (dim={dim}, N), got {tuple(A.shape)}")
    N = A.shape[1]
    _check_bc(B, C, batch, dim, N, L)
    _check_leading("delta_bias", delta_bias, "dim", dim)
    if mask is not None:
        if not torch.is_tensor(mask):
            raise TypeError(f"mask must be a (batch={batch}, L={L}) tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != (batch, L):
            raise ValueError(f"mask must be (batch={batch}, L={L}), got {tuple(mask.shape)}")
        if mask.device != delta.device:
            raise ValueError(f"mask is on {mask.device} but delta is on {delta.device}: all inputs must share a device")
    return N


def check_state_update_inputs(state, x, dt, A, B, C, D=None, z=None, dt_bias=None) -> int:
    """Check one-token state-update inputs: state (batch, dim, N), x / dt / z (batch, dim), A (dim, N),
    B / C (batch, N) or (batch, ngroups, N), D / dt_bias (dim,); returns N."""
    if not torch.is_tensor(x) or x.dim() != 2:
        raise ValueError(f"x must be a (batch, dim) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    _check_tensors("x", x, {"state": state, "dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z, "dt_bias": dt_bias})
    batch, dim = x.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (dim={dim}, N), got {tuple(A.shape)}")
    N = A.shape[1]
    if tuple(state.shape) != (batch, dim, N):
        raise ValueError(f"state must be (batch={batch}, dim={dim}, N={N}), got {tuple(state.shape)}")
    if dt.shape != x.shape:
        raise ValueError(f"dt must have x's shape {tuple(x.shape)}, got {tuple(dt.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    for name, t in (("B", B), ("C", C)):
        if t.dim() not in (2, 3) or t.shape[0] != batch or t.shape[-1] != N:
            raise ValueError(f"{name} must be (batch={batch}, N={N}) or (batch, ngroups, N), got {tuple(t.shape)}")
        if t.dim() == 3 and dim % t.shape[1] != 0:
            raise ValueError(f"{name}: dim={dim} is not a multiple of ngroups={t.shape[1]}")
    _check_leading("D", D, "dim", dim)
    _check_leading("dt_bias", dt_bias, "dim", dim)
    return N
