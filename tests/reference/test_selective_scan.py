"""The reference scans against independent computations (float64)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, random_scan_inputs

from compressm_mamba import _optional
from compressm_mamba.reference import reduce_selective_ssm, selective_scan, selective_scan_mamba2

TOL = dict(rtol=1e-10, atol=1e-12)


def naive_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """One scalar state at a time: h = exp(dt*a) h + dt*b*u, y = sum_n c h (no broadcasting tricks)."""
    batch, dim, L = u.shape
    N = A.shape[1]
    out = torch.zeros(batch, dim, L, dtype=torch.float64)
    last = torch.zeros(batch, dim, N, dtype=torch.float64)
    for bi in range(batch):
        for d in range(dim):
            g = 0 if B.dim() == 3 else d // (dim // B.shape[1])
            h = [0.0] * N
            for t in range(L):
                dt = float(delta[bi, d, t]) + (0.0 if delta_bias is None else float(delta_bias[d]))
                if delta_softplus:
                    dt = float(F.softplus(torch.tensor(dt, dtype=torch.float64)))
                y = 0.0
                for n in range(N):
                    b = float(B[bi, n, t] if B.dim() == 3 else B[bi, g, n, t])
                    c = float(C[bi, n, t] if C.dim() == 3 else C[bi, g, n, t])
                    h[n] = float(torch.exp(torch.tensor(dt * float(A[d, n]), dtype=torch.float64))) * h[n]
                    h[n] += dt * b * float(u[bi, d, t])
                    y += c * h[n]
                if D is not None:
                    y += float(D[d]) * float(u[bi, d, t])
                if z is not None:
                    zz = float(z[bi, d, t])
                    y *= zz / (1.0 + float(torch.exp(torch.tensor(-zz, dtype=torch.float64))))
                out[bi, d, t] = y
            last[bi, d] = torch.tensor(h, dtype=torch.float64)
    return out, last


@pytest.mark.parametrize("ngroups", [None, 1, 3])
@pytest.mark.parametrize("softplus", [False, True])
@pytest.mark.parametrize("L", [1, 7])
def test_scan_equals_naive_loop(ngroups, softplus, L):
    x = random_scan_inputs(batch=2, dim=6, N=5, L=L, ngroups=ngroups, seed=L + 10 * softplus)
    if not softplus:
        x["delta"] = x["delta"].abs() + 0.05  # raw delta must be a positive step size
    out, last = selective_scan(**x, delta_softplus=softplus, return_last_state=True)
    ref_out, ref_last = naive_scan(**x, delta_softplus=softplus)
    assert_close(out, ref_out, **TOL, name="out")
    assert_close(last, ref_last, **TOL, name="last_state")


def test_scan_optional_inputs_absent():
    x = random_scan_inputs(batch=1, dim=3, N=4, L=5, with_D=False, with_z=False, with_bias=False, seed=3)
    out = selective_scan(**x, delta_softplus=True)
    ref, _ = naive_scan(**x, delta_softplus=True)
    assert_close(out, ref, **TOL, name="out")


def test_scan_keeps_input_dtype_and_computes_wider():
    x = random_scan_inputs(batch=1, dim=4, N=3, L=6, dtype=torch.float16, seed=4)
    out, last = selective_scan(**x, delta_softplus=True, return_last_state=True)
    assert out.dtype == torch.float16 and last.dtype == torch.float32
    x64 = {k: (None if v is None else v.to(torch.float64)) for k, v in x.items()}
    ref = selective_scan(**x64, delta_softplus=True)
    assert_close(out, ref, rtol=2e-3, atol=2e-3, name="fp16 out vs float64 on the same rounded inputs")


@pytest.mark.requires_mamba_ssm
@pytest.mark.parametrize("ngroups", [None, 2])
def test_scan_equals_mamba_ssm_reference(ngroups):
    ref_fn = _optional.mamba_ssm_selective_scan_ref()
    if ref_fn is None:
        pytest.skip("mamba_ssm is not importable here")
    # mamba_ssm's reference computes in float32 whatever it is given: feed it float32 inputs and
    # compare with ours in float64 on the same rounded values.
    x32 = random_scan_inputs(batch=2, dim=4, N=8, L=13, ngroups=ngroups, seed=5, dtype=torch.float32)
    x64 = {k: v.to(torch.float64) for k, v in x32.items()}
    out, last = selective_scan(**x64, delta_softplus=True, return_last_state=True)
    ref_out, ref_last = ref_fn(
        x32["u"], x32["delta"], x32["A"], x32["B"], x32["C"], D=x32["D"], z=x32["z"],
        delta_bias=x32["delta_bias"], delta_softplus=True, return_last_state=True,
    )
    assert_close(ref_out, out, rtol=1e-5, atol=1e-5, name="mamba_ssm out vs ours")
    assert_close(ref_last, last, rtol=1e-5, atol=1e-5, name="mamba_ssm last_state vs ours")


@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("D_per_channel", [False, True])
def test_mamba2_layout_equals_mamba1_with_constant_A_rows(ngroups, D_per_channel):
    g = torch.Generator().manual_seed(7)
    batch, L, nheads, headdim, N = 2, 9, 4, 3, 5
    x = torch.randn(batch, L, nheads, headdim, generator=g, dtype=torch.float64)
    dt = torch.randn(batch, L, nheads, generator=g, dtype=torch.float64) * 0.5 - 1
    A = -torch.rand(nheads, generator=g, dtype=torch.float64) - 0.1
    B = torch.randn(batch, L, ngroups, N, generator=g, dtype=torch.float64)
    C = torch.randn(batch, L, ngroups, N, generator=g, dtype=torch.float64)
    D = torch.randn((nheads, headdim) if D_per_channel else (nheads,), generator=g, dtype=torch.float64)
    z = torch.randn(batch, L, nheads, headdim, generator=g, dtype=torch.float64)
    dt_bias = torch.randn(nheads, generator=g, dtype=torch.float64) * 0.1
    out2, last2 = selective_scan_mamba2(x, dt, A, B, C, D, z, dt_bias, True, return_last_state=True)

    dim = nheads * headdim
    u = x.reshape(batch, L, dim).transpose(1, 2)
    delta = dt.repeat_interleave(headdim, dim=2).transpose(1, 2)
    A1 = A.repeat_interleave(headdim)[:, None].expand(dim, N)
    B1 = B.permute(0, 2, 3, 1)  # (batch, ngroups, N, L)
    C1 = C.permute(0, 2, 3, 1)
    D1 = D.reshape(-1) if D_per_channel else D.repeat_interleave(headdim)
    z1 = z.reshape(batch, L, dim).transpose(1, 2)
    out1, last1 = selective_scan(
        u, delta, A1, B1, C1, D1, z1, dt_bias.repeat_interleave(headdim), True, return_last_state=True
    )
    assert_close(out2, out1.transpose(1, 2).reshape(batch, L, nheads, headdim), **TOL, name="out")
    assert_close(last2, last1.reshape(batch, nheads, headdim, N), **TOL, name="last_state")


@pytest.mark.parametrize("ngroups", [None, 2])
def test_selection_equals_zeroing_dropped_states(ngroups):
    x = random_scan_inputs(batch=2, dim=4, N=9, L=12, ngroups=ngroups, seed=11)
    idx = torch.tensor([0, 3, 4, 8])
    dropped = torch.ones(9, dtype=torch.bool)
    dropped[idx] = False
    B0, C0 = x["B"].clone(), x["C"].clone()
    B0[..., dropped, :] = 0
    C0[..., dropped, :] = 0
    full = selective_scan(**{**x, "B": B0, "C": C0}, delta_softplus=True)

    # The reduction helper slices parameters the same way model surgery will: A's columns, B/C rows.
    A_r, B_r, C_r = reduce_selective_ssm(
        x["A"], x["B"].movedim(-2, 0), x["C"].movedim(-2, 0), idx
    )
    small = selective_scan(**{**x, "A": A_r, "B": B_r.movedim(0, -2), "C": C_r.movedim(0, -2)}, delta_softplus=True)
    assert small.shape == full.shape
    assert_close(small, full, **TOL, name="selected vs zeroed")
    # and the cut is not trivially equal to the uncut model
    assert (selective_scan(**x, delta_softplus=True) - full).abs().max() > 1e-3


def test_keep_all_is_identity():
    x = random_scan_inputs(batch=1, dim=3, N=6, L=8, seed=12)
    idx = torch.arange(6)
    A_r, B_r, C_r = reduce_selective_ssm(x["A"], x["B"].movedim(-2, 0), x["C"].movedim(-2, 0), idx)
    assert torch.equal(A_r, x["A"]) and torch.equal(B_r.movedim(0, -2), x["B"])
    out = selective_scan(**{**x, "A": A_r, "B": B_r.movedim(0, -2), "C": C_r.movedim(0, -2)}, delta_softplus=True)
    assert torch.equal(out, selective_scan(**x, delta_softplus=True))


@pytest.mark.parametrize(
    "field, bad, match",
    [
        ("u", torch.zeros(2, 3), "u must be"),
        ("delta", torch.zeros(1, 3, 4), "delta must"),
        ("A", torch.zeros(2, 4), "A must be"),
        ("B", torch.zeros(1, 3, 5), "B must be"),
        ("C", torch.zeros(1, 1, 6, 5), "C must be"),
        ("D", torch.zeros(2), "D must be"),
        ("z", torch.zeros(1, 3, 4), "z must"),
        ("delta_bias", torch.zeros(4), "delta_bias must"),
    ],
)
def test_scan_bad_shapes_name_the_argument(field, bad, match):
    x = random_scan_inputs(batch=1, dim=3, N=4, L=5, seed=0)
    x[field] = bad.to(torch.float64)
    with pytest.raises(ValueError, match=match):
        selective_scan(**x)


def test_reduce_rejects_bad_indices():
    A = torch.zeros(3, 4)
    rows = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="idx"):
        reduce_selective_ssm(A, rows, rows, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="repeated"):
        reduce_selective_ssm(A, rows, rows, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="N=4 rows"):
        reduce_selective_ssm(A, rows[:3], rows, torch.tensor([1]))
