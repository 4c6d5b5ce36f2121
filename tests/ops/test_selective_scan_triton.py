"""Triton selective scan (compressm_mamba.kernels.selective_scan) against the float64 reference.

Forward (out, last state, chunk checkpoints) and backward (every gradient) on the same rounded
inputs the kernel saw, cast up to float64.  Without a GPU the kernels run in Triton's interpreter
(tests/conftest.py switches it on), so the CPU shapes are tiny; the CUDA-only tests use bigger ones.
Every launch passes poison=True: the launchers fill each output with NaN first, and assert_close
rejects non-finite values, so an element a kernel never writes fails the test.

The cases reach every mechanism of the kernels: several time tiles per chunk and several chunks
(carries between tiles and checkpoints, the re-walk from a checkpoint), one-tile chunks (the
re-walk compiled out), a default 64-channel backward block, time splits (the local passes and the carry pass, forward
and backward), several channel blocks per program (dB/dC partials accumulated over blocks), partial
tiles at the sequence end, state splits (several warps of a program on disjoint states, N not a
multiple of their number; the default plan's at N = 128 and 200), N from 1 to 200 (the same state loop for every N), groups, fp32 B/C with
fp16 u (4-step tiles), and z / D / delta_bias / softplus on and off.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, random_scan_inputs, reference_checkpoints, reference_scan_with_grads


pytestmark = pytest.mark.requires_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (rtol, atol) by the dtype of the tensor compared.  The kernel computes in fp32 from exactly the
# inputs the reference sees, so the error is fp32 accumulation plus the final rounding to the
# output's dtype: fp16 keeps 11 significant bits (~5e-4 relative), bf16 8 (~4e-3).
TOL = {
    torch.float32: (2e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
}

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _kernels():
    from compressm_mamba.kernels import selective_scan as kernels

    return kernels


def _make_inputs(batch, dim, N, L, ngroups, dtype, bc_fp32, with_D, with_z, with_bias, softplus, seed):
    """Kernel inputs on DEVICE: u / delta / z in ``dtype``, B / C in ``dtype`` or fp32, A / D / bias fp32."""
    x = random_scan_inputs(batch, dim, N, L, ngroups=ngroups, seed=seed, with_D=with_D, with_z=with_z,
                           with_bias=with_bias)
    if not softplus:
        # Without softplus the step size is used as is; keep it positive (a real discretisation).
        x["delta"] = F.softplus(x["delta"])
        if with_bias:
            x["delta_bias"] = x["delta_bias"].abs()
    dtypes = dict(u=dtype, delta=dtype, z=dtype, A=torch.float32, D=torch.float32, delta_bias=torch.float32,
                  B=torch.float32 if bc_fp32 else dtype, C=torch.float32 if bc_fp32 else dtype)
    return {k: None if v is None else v.to(device=DEVICE, dtype=dtypes[k]).contiguous() for k, v in x.items()}






def _check(tensor, expected, name):
    # atol is relative to the tensor's largest magnitude (at least 1): a summed gradient's rounding
    # error scales with its terms, so an entry near zero from cancellation cannot meet rtol alone.
    rtol, atol = TOL[tensor.dtype]
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    assert_close(tensor.cpu(), expected, rtol=rtol, atol=atol * scale, name=name)


def _run_and_compare(batch, dim, N, L, ngroups, chunk_size, dtype, *, with_D=True, with_z=True, with_bias=True,
                     softplus=True, bc_fp32=False, block_d=None, n_splits=None, bwd_splits=None, d_splits=None, state_splits=1,
                     bwd_state_splits=None, seed=0):
    kernels = _kernels()
    inputs = _make_inputs(batch, dim, N, L, ngroups, dtype, bc_fp32, with_D, with_z, with_bias, softplus, seed)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]

    out, last_state, ckpts = kernels.selective_scan_fwd(*args, softplus, chunk_size, block_d=block_d, n_splits=n_splits,
                                                        n_state_splits=state_splits, poison=True)
    assert out.dtype == dtype and last_state.dtype == torch.float32 and ckpts.dtype == torch.float32
    assert ckpts.shape == (batch, dim, math.ceil(L / chunk_size), N)

    dout = torch.randn(batch, dim, L, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    ref_out, ref_last, ref_grads = reference_scan_with_grads(inputs, dout, softplus)
    _check(out, ref_out, "out")
    _check(last_state, ref_last, "last_state")
    _check(ckpts, reference_checkpoints(inputs, softplus, chunk_size), "checkpoints")

    grads = kernels.selective_scan_bwd(dout, *args, softplus, ckpts, chunk_size, block_d=block_d, n_splits=bwd_splits,
                                       d_splits=d_splits, n_state_splits=bwd_state_splits, poison=True)
    for name, grad in zip(GRAD_NAMES, grads):
        if inputs[name] is None:
            assert grad is None, f"d{name} should be None when {name} is None"
            continue
        assert grad.shape == inputs[name].shape, f"d{name} shape {tuple(grad.shape)}"
        assert grad.dtype == inputs[name].dtype, f"d{name} dtype {grad.dtype} != {inputs[name].dtype}"
        _check(grad, ref_grads[name], f"d{name}")
    return grads


# (batch, dim, N, L, ngroups, chunk_size, options).  The interpreter's cost grows with programs x
# tiles x N, so the long sequences run with small N (N only bounds the state loop, the same code for
# every N) and the large N with one tile.  fp32 inputs make 4-step tiles, fp16 ones 8-step tiles (4
# with fp32 B/C), so a small chunk_size gives several chunks, and tiles per chunk, on short L;
# n_splits / bwd_splits force time splits (local passes + carry passes).  block_d=4 with d_splits=1
# makes one program walk several channel blocks, adding into its dB/dC partial.  Default block_d
# with more than 32 channels per group: two 32-channel blocks (a partial one) in both directions;
# block_d=64 (two channels per thread, the backward's former default) stays an option, run below.
CPU_CASES = [
    pytest.param(2, 3, 1, 1, 1, 8, {}, id="L1-N1"),
    # 8 tiles in 4 chunks of 2 tiles (re-walk from a checkpoint), a partial last tile, 2 time splits.
    pytest.param(1, 2, 3, 29, 1, 8, dict(n_splits=2, bwd_splits=2), id="L29-N3-chunk8-splits"),
    # One-tile chunks (no re-walk), 3 chunks over 2 and 3 time splits, no z.
    pytest.param(1, 2, 12, 10, 1, 4, dict(with_z=False, n_splits=2, bwd_splits=3),
                 id="L10-N12-chunk4-splits-noz"),
    pytest.param(1, 10, 13, 5, 2, 8, dict(with_D=False, with_bias=False, softplus=False, block_d=4, d_splits=1,
                                          n_splits=1, bwd_splits=1),
                 id="L5-N13-G2-nosoftplus-blockwalk"),
    pytest.param(1, 2, 128, 3, 1, 8, dict(softplus=False, with_D=False), id="L3-N128-nosoftplus"),
    pytest.param(1, 1, 200, 2, 1, 4, dict(with_z=False, with_bias=False), id="L2-N200"),
    # State splits (warps of one program on disjoint states, sums over n met once per tile): N = 7
    # over 4 / 2 warps leaves rows past N; two tiles per chunk (re-walk), time splits, 64-channel
    # blocks (two channel halves per thread) over 40 channels.
    pytest.param(1, 40, 7, 13, 1, 8, dict(n_splits=2, bwd_splits=2, state_splits=4, bwd_state_splits=2, block_d=64),
                 id="L13-N7-dim40-statesplits"),
    # ... without z, D, bias or softplus, small blocks walked by one program (dB/dC added per block).
    pytest.param(1, 5, 6, 9, 1, 8, dict(with_z=False, with_D=False, with_bias=False, softplus=False, block_d=4,
                                        d_splits=1, state_splits=2, bwd_state_splits=4),
                 id="L9-N6-statesplits-bare-blockwalk"),
]

FP16_CASES = [
    # Default tiles, chunks and splits; 40 channels: fwd blocks of 32 (a partial one), a bwd block of 64.
    pytest.param(1, 40, 4, 9, 1, 8, {}, id="L9-N4-dim40-defaults"),
    # 5 tiles in 3 chunks of 2 (8-step tiles), 3 forward and 2 backward time splits.
    pytest.param(1, 2, 2, 37, 1, 16, dict(n_splits=3, bwd_splits=2), id="L37-N2-chunk16-splits"),
    pytest.param(1, 10, 5, 7, 2, 4, dict(with_z=False, softplus=False, bc_fp32=True, block_d=4, d_splits=1),
                 id="L7-N5-G2-BCfp32-blockwalk"),
    pytest.param(1, 3, 16, 1, 1, 64, dict(with_D=False, with_z=False, with_bias=False), id="L1-N16-bare"),
    # State splits with groups, 3 tiles in 2 chunks of 2 (re-walk), N = 5 over 4 / 2 warps.
    pytest.param(1, 40, 5, 17, 2, 16, dict(state_splits=4, bwd_state_splits=2), id="L17-N5-G2-statesplits"),
]


@pytest.mark.parametrize("batch, dim, N, L, ngroups, chunk_size, opts", CPU_CASES)
def test_fp32_matchesreference_scan_with_grads(batch, dim, N, L, ngroups, chunk_size, opts):
    _run_and_compare(batch, dim, N, L, ngroups, chunk_size, torch.float32, **opts)


@pytest.mark.parametrize("batch, dim, N, L, ngroups, chunk_size, opts", FP16_CASES)
def test_fp16_matchesreference_scan_with_grads(batch, dim, N, L, ngroups, chunk_size, opts):
    _run_and_compare(batch, dim, N, L, ngroups, chunk_size, torch.float16, **opts)


def test_backward_plan_bounds_scratch_by_the_inputs():
    """The backward's dB/dC partials fit in the size of its inputs and its tile-start scratch in half
    of it, at the reference shape (batch 8, dim 3072, L 2048, bf16) for N = 12 ... 256, while up to
    N = 128 time splits make up the channel rows (warps x channels per thread) a 132-SM GPU needs (a
    plan: nothing is launched).  At N = 256 the scratch bound wins and the plan has fewer rows (the
    docstring of kernels.selective_scan)."""
    kernels = _kernels()
    batch, dim, L = 8, 3072, 2048
    for N in (12, 16, 128, 256):
        chunk = kernels.default_chunk_size(N)
        input_bytes = 4 * batch * dim * L * 2 + 2 * batch * N * L * 2  # dout, u, delta, z; B, C
        plan = kernels.backward_plan(batch, dim, L, N, 1, torch.bfloat16, torch.bfloat16, chunk, input_bytes, "cpu")
        assert plan["partial_bytes"] <= input_bytes, (N, plan)
        assert plan["scratch_bytes"] <= input_bytes // 2, (N, plan)
        assert plan["BLOCK_T"] == 8 and plan["tiles_per_chunk"] == chunk // 8
        # Parallel channel rows (a thread owns BLOCK_D / (32 num_warps) channels, each an independent
        # recurrence): what hides latency, whether as warps or as rows within a warp.
        rows = batch * plan["d_splits"] * plan["n_splits"] * plan["BLOCK_D"] // 32
        if N <= 128:
            assert plan["n_splits"] > 1 and rows >= 132 * 8, (N, plan)
        # State splits only where the scratch bound leaves the GPU short of warps (large N): then
        # >= 4 warps per scheduler (132 SMs x 4) are launched.
        warps = batch * plan["d_splits"] * plan["n_splits"] * plan["num_warps"] * plan["n_state_splits"]
        if N <= 16:
            assert plan["n_state_splits"] == 1, (N, plan)
        else:
            assert plan["n_state_splits"] == 4, (N, plan)
        if N == 128:
            assert warps >= 132 * 4 * 4, (N, plan)


def test_empty_sequence():
    """L = 0: no chunk, a zero last state, zero parameter gradients, empty per-step tensors."""
    kernels = _kernels()
    inputs = _make_inputs(2, 5, 12, 0, 1, torch.float32, False, True, True, True, True, seed=0)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    out, last_state, ckpts = kernels.selective_scan_fwd(*args, True, 8, poison=True)
    assert out.shape == (2, 5, 0) and ckpts.shape == (2, 5, 0, 12)
    assert torch.equal(last_state.cpu(), torch.zeros(2, 5, 12))
    dout = torch.zeros(2, 5, 0, device=DEVICE)
    du, ddelta, dA, dB, dC, dD, dz, dbias = kernels.selective_scan_bwd(dout, *args, True, ckpts, 8, poison=True)
    assert du.shape == ddelta.shape == dz.shape == (2, 5, 0) and dB.shape == dC.shape == (2, 1, 12, 0)
    for name, t in (("dA", dA), ("dD", dD), ("ddelta_bias", dbias)):
        assert torch.equal(t.cpu(), torch.zeros_like(t.cpu())), name


def test_poison_fills_outputs_with_nan(monkeypatch):
    """The poison switch the tests rely on really pre-fills buffers with NaN (flag and env var)."""
    kernels = _kernels()
    assert torch.isnan(kernels._empty((3, 4), torch.float16, "cpu", poison=True)).all()
    monkeypatch.setenv("COMPRESSM_MAMBA_POISON", "1")
    assert kernels._want_poison(None) and not kernels._want_poison(False)
    monkeypatch.delenv("COMPRESSM_MAMBA_POISON")
    assert not kernels._want_poison(None)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "batch, dim, N, L, ngroups, chunk_size, opts",
    [
        pytest.param(2, 100, 16, 300, 2, 64, {}, id="L300-N16-G2"),
        pytest.param(1, 37, 200, 129, 1, 32, dict(with_z=False, softplus=False), id="L129-N200"),
        pytest.param(2, 24, 13, 63, 4, 8, dict(bc_fp32=True, with_D=False), id="L63-N13-G4-BCfp32"),
        pytest.param(1, 300, 12, 2000, 1, 64, dict(n_splits=5, bwd_splits=4, d_splits=1), id="L2000-N12-splits"),
    ],
)
def test_cuda_matchesreference_scan_with_grads(batch, dim, N, L, ngroups, chunk_size, opts, dtype):
    grads = _run_and_compare(batch, dim, N, L, ngroups, chunk_size, dtype, **opts)
    again = _run_and_compare(batch, dim, N, L, ngroups, chunk_size, dtype, **opts)
    for name, g1, g2 in zip(GRAD_NAMES, grads, again):
        if g1 is not None:
            assert torch.equal(g1, g2), f"d{name} differs between two identical runs (must be deterministic)"
