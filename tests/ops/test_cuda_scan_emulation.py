"""The CUDA scan's algorithm, proven on CPU: its pure-torch emulation against the float64 reference.

tests/cuda_scan_emulation.py replays csrc/selective_scan/selective_scan.cuh's schedule in float32:
checkpointed chunks, sub-tile recomputation, the reverse recurrence over recomputed states, dB / dC
summed per slice, per slot in slice order, then over slots.  These tests check it, forward and
backward, against compressm_mamba.reference in float64, over the paths the kernels have: several
chunks and ragged ones, N = 1, 12, 13, 16, 128, 256 (every thread layout and the 4-step backward
tile of N = 256), z / D / delta_bias on and off, groups, fewer slots than slices; and with the
exp2 relative error of the MUFU.EX2 instruction injected (twice its bound), which must stay within
the kernel tests' fp32 tolerances.  The kernels themselves are checked against the same reference
by tests/ops/test_cuda_kernels.py on a GPU.
"""

from __future__ import annotations

import re
from pathlib import Path

import cuda_scan_emulation as emu
import pytest
import torch
from helpers import assert_close, random_scan_inputs, reference_checkpoints, reference_scan_with_grads

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
RTOL, ATOL = 2e-5, 1e-5  # test_cuda_kernels.SCAN_TOL[float32]: atol is relative to the largest |entry|
EX2_ERR = 2.0**-21  # twice the 2-ulp bound of ex2.approx.ftz.f32


def _inputs(batch, dim, N, L, ngroups, *, softplus=True, seed=0, **opts):
    x = random_scan_inputs(batch, dim, N, L, ngroups=ngroups, seed=seed, **opts)
    if not softplus:
        x["delta"] = torch.nn.functional.softplus(x["delta"])
        if x["delta_bias"] is not None:
            x["delta_bias"] = x["delta_bias"].abs()
    if x["B"].dim() == 3:
        x["B"], x["C"] = x["B"].unsqueeze(1), x["C"].unsqueeze(1)
    return {k: None if v is None else v.float() for k, v in x.items()}  # what an fp32 kernel sees


def _check(got, want, name):
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    assert_close(got.double(), want, rtol=RTOL, atol=ATOL * scale, name=name)


def _run(batch, dim, N, L, ngroups, *, softplus=True, n_slots=None, exp2_rel_err=0.0, seed=0, **opts):
    x = _inputs(batch, dim, N, L, ngroups, softplus=softplus, seed=seed, **opts)
    args = [x[k] for k in GRAD_NAMES]
    out, last, ckpt = emu.forward(*args, softplus, exp2_rel_err=exp2_rel_err, seed=seed)
    dout = torch.randn(batch, dim, L, generator=torch.Generator().manual_seed(seed + 1))
    ref_out, ref_last, ref_grads = reference_scan_with_grads(x, dout, softplus)
    _check(out, ref_out, "out")
    _check(last, ref_last, "last_state")
    _check(ckpt, reference_checkpoints(x, softplus, emu.CHUNK), "checkpoints")
    grads = emu.backward(dout, *args, softplus, checkpoints=ckpt, n_slots=n_slots, exp2_rel_err=exp2_rel_err,
                         seed=seed + 2)
    for name, grad in zip(GRAD_NAMES, grads):
        if x[name] is None:
            assert grad is None, name
            continue
        assert grad.shape == x[name].shape, (name, grad.shape)
        _check(grad, ref_grads[name], f"d{name}")


@pytest.mark.parametrize(
    "batch, dim, N, L, ngroups, opts",
    [
        pytest.param(2, 5, 1, 130, 1, {}, id="N1-three-chunks"),
        pytest.param(2, 70, 12, 130, 1, {}, id="N12-two-slices-ragged"),
        pytest.param(1, 6, 13, 75, 2, dict(with_z=False), id="N13-G2-noz"),
        pytest.param(2, 4, 16, 64, None, dict(with_D=False, with_bias=False), id="N16-one-chunk-bare"),
        pytest.param(1, 20, 16, 65, 1, dict(softplus=False), id="N16-chunk-plus-1-nosoftplus"),
        pytest.param(1, 3, 128, 70, 1, {}, id="N128"),
        pytest.param(1, 8, 256, 67, 2, dict(softplus=False), id="N256-sub4-G2"),
        pytest.param(1, 3, 16, 1, 1, {}, id="L1"),
    ],
)
def test_emulation_matches_reference(batch, dim, N, L, ngroups, opts):
    opts = dict(opts)
    softplus = opts.pop("softplus", True)
    _run(batch, dim, N, L, ngroups, softplus=softplus, seed=N + L, **opts)


def test_emulation_with_fewer_slots_than_slices():
    """A block walking several slices (n_slots < n_slices) sums them in slice order: same gradients."""
    assert emu.kernel_layout(8)["chans"] == 64
    _run(1, 150, 8, 40, 1, n_slots=2, seed=3)  # 3 slices of 64 channels, 2 slots


@pytest.mark.parametrize("N", [12, 16])
def test_fast_exp2_error_stays_within_fp32_tolerance(N):
    """Every exp2 off by up to 2^-21 relative (twice MUFU.EX2's bound): still within the kernel tolerances."""
    _run(2, 6, N, 140, 2, exp2_rel_err=EX2_ERR, seed=N)


def test_kernel_layout_matches_the_header():
    """kernel_layout mirrors selective_scan.h (compiled sizes, lanes) and the .cuh's sub-tile choice."""
    csrc = Path(__file__).resolve().parents[2] / "csrc" / "selective_scan"
    header, kernels = (csrc / "selective_scan.h").read_text(), (csrc / "selective_scan.cuh").read_text()
    sizes = re.search(r"#define COMPRESSM_SCAN_ALL_NSTATES\(X\) ((?:X\(\d+\) ?)+)", header).group(1)
    assert [int(n) for n in re.findall(r"\d+", sizes)] == list(emu.KERNEL_SIZES)
    assert re.search(r"int lanes = (\d+);", header).group(1) == str(emu.MIN_LANES)
    assert re.search(r"kBwdT = kNState >= 256 \? 4 : 8;", kernels)
    assert re.search(r"constexpr int kScanChunk = (\d+);", header).group(1) == str(emu.CHUNK)
    assert [emu.kernel_layout(n)["kernel_n"] for n in (1, 12, 13, 16, 17, 100, 200)] == [4, 12, 16, 16, 24, 128, 256]
    lay = {n: (emu.kernel_layout(n)["lanes"], emu.kernel_layout(n)["states"]) for n in (4, 12, 16, 96, 128, 256)}
    assert lay == {4: (2, 2), 12: (2, 6), 16: (2, 8), 96: (16, 6), 128: (16, 8), 256: (32, 8)}
    assert emu.kernel_layout(256)["sub"] == 4 and emu.kernel_layout(128)["sub"] == 8


@pytest.mark.parametrize("N", [12, 16, 128, 256])
def test_backward_scratch_within_twice_its_inputs(N):
    """At the reference shape (8, 3072, 2048) bf16 with z: dB / dC partials + dA partial + slot sum <= 2x inputs."""
    s = emu.backward_scratch_bytes(8, 3072, 2048, N, 1, 2)
    assert 1 <= s["n_slots"] <= s["n_slices"]
    assert s["partials"] <= s["inputs"]
    assert s["total"] <= 2 * s["inputs"], s
