"""Triton Gramian token sums (compressm_mamba.kernels.gramians) against the float64 reference.

The reference sees the very inputs the kernel saw (after rounding to fp16 / bf16), in float64, so
the tolerances only cover the kernel's fp32 arithmetic.  Without a GPU the kernels run in Triton's
interpreter (tests/conftest.py): shapes are tiny on purpose.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, gramian_kernel_inputs

from compressm_mamba.reference.gramians import gramian_statistics

pytestmark = pytest.mark.requires_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Declared tolerances: (rtol, atol as a fraction of the largest |entry| of the reference sum).
# Off-diagonal entries are sums of terms of both signs, so an absolute floor scaled to the
# matrix is the honest measure there.  Measured in the interpreter: at most 5e-7 relative
# (with a 0.1 * rtol floor) over every case here.  fp16 / bf16 inputs are exact in fp32, so
# the kernel's error is the same fp32 arithmetic; the looser values leave room for GPU exp /
# division approximations and, for bf16, longer sequences.
TOLERANCES = {
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-5, 2e-6),
    torch.bfloat16: (1e-4, 1e-5),
}


@pytest.fixture(autouse=True)
def kernels(monkeypatch):
    """The kernel module, with outputs pre-filled with NaN so that any unwritten entry fails."""
    from compressm_mamba.kernels import gramians

    monkeypatch.setattr(gramians, "DEBUG_FILL_NAN", True)
    return gramians


def make_inputs(*args, **kwargs):
    """``helpers.gramian_kernel_inputs`` on DEVICE."""
    return gramian_kernel_inputs(*args, device=DEVICE, **kwargs)


def reference_sums(ref_args, estimator):
    stats = gramian_statistics(ref_args["delta"], ref_args["A"], ref_args["B"], ref_args["C"],
                               estimator=estimator, delta_bias=ref_args["delta_bias"],
                               delta_softplus=ref_args["delta_softplus"], mask=ref_args["mask"])
    return stats.sums["P"], stats.sums["Q"]


def check_against_reference(kernels, estimator, kernel_args, ref_args, *, constant_rows=False,
                            dtype=torch.float32, exact_symmetry=True, **launch):
    P, Q = kernels.gramian_sums(**kernel_args, estimator=estimator, constant_rows=constant_rows, **launch)
    P_ref, Q_ref = reference_sums(ref_args, estimator)
    rtol, atol = TOLERANCES[dtype]
    for name, got, ref in (("P", P, P_ref), ("Q", Q, Q_ref)):
        assert got.dtype == torch.float32 and got.shape == ref.shape, (name, got.dtype, got.shape)
        got = got.cpu()
        # assert_close also asserts that every entry is finite: none was left at its NaN fill.
        assert_close(got, ref, rtol=rtol, atol=atol * float(ref.abs().max().clamp_min(1e-30)),
                     name=f"{estimator} {name}")
        if exact_symmetry:
            assert torch.equal(got, got.transpose(-1, -2)), f"{name} is not exactly symmetric"
        else:
            assert_close(got, got.transpose(-1, -2), rtol=1e-6, atol=1e-7 * float(got.abs().max()),
                         name=f"{name} symmetry")
    return P, Q


# (batch, dim, N, L, ngroups, bias, softplus, masked): a covering set of the shape space, not the
# product.  dim is never a multiple of a block (channels are not tiled; odd counts catch index bugs).
GENERAL_CASES = {
    "N1-L1-mask": (2, 3, 1, 1, 1, True, True, True),
    "N13-L63-g2-mask": (2, 6, 13, 63, 2, True, True, True),
    "N64-L7-plain": (2, 3, 64, 7, 1, False, False, False),
    "N16-L1-g2-nobias": (2, 6, 16, 1, 2, False, True, True),
    "N12-L7-positive-dt": (2, 3, 12, 7, 1, True, False, True),
}


@pytest.mark.parametrize("estimator", ["frozen", "ltv"])
@pytest.mark.parametrize("case", list(GENERAL_CASES))
def test_general_rows_match_reference(kernels, estimator, case):
    batch, dim, N, L, ngroups, bias, softplus, masked = GENERAL_CASES[case]
    args, ref = make_inputs(batch, dim, N, L, ngroups, bias=bias, softplus=softplus, masked=masked,
                            seed=N + L)
    check_against_reference(kernels, estimator, args, ref)


CONSTANT_ROW_CASES = {
    "N1-L1-mask": (2, 3, 1, 1, 1, True, True, True),
    "N16-L63-g2-mask": (2, 6, 16, 63, 2, True, True, True),
    "N13-L7-positive-dt": (2, 3, 13, 7, 1, False, False, True),
    "N64-L7-plain": (2, 3, 64, 7, 1, True, True, False),
    "N12-L63-g2-nobias": (2, 6, 12, 63, 2, False, True, True),
}


@pytest.mark.parametrize("estimator", ["frozen", "ltv"])
@pytest.mark.parametrize("case", list(CONSTANT_ROW_CASES))
def test_constant_rows_weighted_gram_matches_reference(kernels, estimator, case):
    """Mamba2 heads (A's rows constant): the weighted-Gram kernel against the same reference."""
    batch, dim, N, L, ngroups, bias, softplus, masked = CONSTANT_ROW_CASES[case]
    args, ref = make_inputs(batch, dim, N, L, ngroups, bias=bias, softplus=softplus, masked=masked,
                            constant_rows=True, seed=N + L + 1)
    check_against_reference(kernels, estimator, args, ref, constant_rows=True, exact_symmetry=False)


@pytest.mark.parametrize("constant_rows", [False, True])
@pytest.mark.parametrize("estimator", ["frozen", "ltv"])
def test_fp16_inputs(kernels, estimator, constant_rows):
    args, ref = make_inputs(2, 6, 12, 7, 2, dtype=torch.float16, constant_rows=constant_rows, seed=3)
    check_against_reference(kernels, estimator, args, ref, constant_rows=constant_rows, dtype=torch.float16,
                            exact_symmetry=not constant_rows)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("constant_rows", [False, True])
@pytest.mark.parametrize("estimator", ["frozen", "ltv"])
def test_bf16_inputs(kernels, estimator, constant_rows):
    args, ref = make_inputs(3, 6, 16, 63, 2, dtype=torch.bfloat16, constant_rows=constant_rows, seed=4)
    check_against_reference(kernels, estimator, args, ref, constant_rows=constant_rows, dtype=torch.bfloat16,
                            exact_symmetry=not constant_rows)


@pytest.mark.parametrize(
    "estimator, constant_rows, block_n",
    [("frozen", False, 4), ("ltv", False, 4), ("frozen", True, 16), ("ltv", True, 16)],
)
def test_multi_tile_outputs_with_ragged_edges(kernels, estimator, constant_rows, block_n):
    """Several tiles per side, N not a multiple of the tile: upper tiles computed, lower mirrored."""
    N = 13 if block_n == 4 else 40
    args, ref = make_inputs(1, 2, N, 7, 1, constant_rows=constant_rows, seed=5)
    check_against_reference(kernels, estimator, args, ref, constant_rows=constant_rows,
                            exact_symmetry=not constant_rows, block_n=block_n)


@pytest.mark.parametrize("constant_rows", [False, True])
@pytest.mark.parametrize("estimator", ["frozen", "ltv"])
def test_batch_splits_add_atomically(kernels, estimator, constant_rows):
    """Three sequences over two programs per tile (2 + 1), partial sums added atomically."""
    args, ref = make_inputs(3, 2, 12, 7, 1, constant_rows=constant_rows, seed=6)
    check_against_reference(kernels, estimator, args, ref, constant_rows=constant_rows,
                            exact_symmetry=not constant_rows, batch_splits=2)


@pytest.mark.parametrize("constant_rows", [False, True])
@pytest.mark.parametrize("estimator", ["frozen", "ltv"])
def test_tiny_and_zero_step_sizes(kernels, estimator, constant_rows):
    """dt ~ 1e-5 (softplus far in its left tail) and dt == 0 exactly: frozen's denominator
    1 - a_i a_j is then ~dt, so e = -expm1(dt A) must keep its relative accuracy, and a zero
    denominator must give the reference's 0 (its dt -> 0 limit)."""
    args, ref = make_inputs(2, 3, 12, 7, 1, constant_rows=constant_rows, masked=False, bias=False, seed=7)
    small = args["delta"] - 10.0
    args_sp = dict(args, delta=small)
    ref_sp = dict(ref, delta=small.cpu().double())
    check_against_reference(kernels, estimator, args_sp, ref_sp, constant_rows=constant_rows,
                            exact_symmetry=not constant_rows)

    zero_dt = F.softplus(args["delta"])
    zero_dt[:, :, 2] = 0.0
    zero_dt[0, 1, :] = 0.0
    args_0 = dict(args, delta=zero_dt, delta_softplus=False)
    ref_0 = dict(ref, delta=zero_dt.cpu().double(), delta_softplus=False)
    check_against_reference(kernels, estimator, args_0, ref_0, constant_rows=constant_rows,
                            exact_symmetry=not constant_rows)


def test_single_group_bc_layout_and_fully_masked_batch(kernels):
    """B, C given as (batch, N, L) equal the one-group layout; an all-padding batch sums to 0."""
    args, _ = make_inputs(2, 3, 7, 5, 1, constant_rows=True, seed=8)
    three_d = dict(args, B=args["B"][:, 0], C=args["C"][:, 0])
    for estimator in ("frozen", "ltv"):
        P4, Q4 = kernels.gramian_sums(**args, estimator=estimator)
        P3, Q3 = kernels.gramian_sums(**three_d, estimator=estimator)
        assert torch.equal(P3, P4) and torch.equal(Q3, Q4)
    empty = dict(args, mask=torch.zeros_like(args["mask"]))
    for estimator, constant_rows in (("frozen", False), ("ltv", False), ("frozen", True), ("ltv", True)):
        P, Q = kernels.gramian_sums(**empty, estimator=estimator, constant_rows=constant_rows)
        assert torch.equal(P, torch.zeros_like(P)) and torch.equal(Q, torch.zeros_like(Q))
