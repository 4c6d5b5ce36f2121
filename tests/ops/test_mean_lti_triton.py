"""Triton mean_lti token sums (compressm_mamba.kernels.mean_lti_sums) against the float64 reference.

The reference sees the very inputs the kernel saw (after rounding to fp16 / bf16), in float64, so
the tolerances only cover the kernel's fp32 arithmetic.  Without a GPU the kernel runs in Triton's
interpreter (tests/conftest.py): shapes are tiny on purpose (L <= 64).
"""

import pytest
import torch
from helpers import assert_close, gramian_kernel_inputs, gramian_padding_mask, random_gramian_inputs

from compressm_mamba import ops
from compressm_mamba.reference.gramians import gramian_statistics

pytestmark = pytest.mark.requires_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Declared tolerances: (rtol, atol as a fraction of the largest |entry| of the reference sum).  b and
# c are sums of terms of both signs, so an absolute floor scaled to the sum is the honest measure
# there; e is a sum of positive terms and is held to rtol alone (its relative accuracy for tiny
# dt A is the point of the expm1 polynomial).  Measured in the interpreter over the cases below:
# e within 2.1e-7 relative, b / c within 2.4e-7 of the largest entry.  The looser bf16 values leave room for GPU exp2 and for
# the longer sums of real shapes.
TOLERANCES = {
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-5, 2e-6),
    torch.bfloat16: (1e-4, 1e-5),
}


@pytest.fixture(autouse=True)
def kernels(monkeypatch):
    """The kernel module, with partial outputs pre-filled with NaN so that any unwritten entry fails."""
    from compressm_mamba.kernels import mean_lti_sums

    monkeypatch.setattr(mean_lti_sums, "DEBUG_FILL_NAN", True)
    return mean_lti_sums


def make_inputs(*args, **kwargs):
    """``helpers.gramian_kernel_inputs`` on DEVICE."""
    return gramian_kernel_inputs(*args, device=DEVICE, **kwargs)


def check_against_reference(sums, ref_args, dtype):
    ref = gramian_statistics(ref_args["delta"], ref_args["A"], ref_args["B"], ref_args["C"], estimator="mean_lti",
                             delta_bias=ref_args["delta_bias"], delta_softplus=ref_args["delta_softplus"],
                             mask=ref_args["mask"])
    rtol, atol = TOLERANCES[dtype]
    for name, got in zip(("e", "b", "c"), sums):
        want = ref.sums[name]
        assert got.dtype == torch.float32 and got.shape == want.shape, (name, got.dtype, got.shape)
        floor = 0.0 if name == "e" else atol * float(want.abs().max().clamp_min(1e-30))
        # assert_close also asserts that every entry is finite: none was left at its NaN fill.
        assert_close(got.cpu(), want, rtol=rtol, atol=floor, name=f"mean_lti {name}")
    return ref


# (batch, dim, N, L, ngroups, bias, softplus, masked, constant_rows): a covering set, not the
# product.  N not a power of two, channels not a multiple of the channel tile, L not a multiple of
# the token tile, groups (Mamba2 n_groups > 1), constant rows (Mamba2 heads).
CASES = {
    "N1-L1-mask": (2, 3, 1, 1, 1, True, True, True, False),
    "N13-L63-g2-mask": (2, 6, 13, 63, 2, True, True, True, False),
    "N20-L17-plain": (2, 5, 20, 17, 1, False, False, False, False),
    "N16-L40-g4-nobias": (3, 8, 16, 40, 4, False, True, True, False),
    "N12-L7-positive-dt": (2, 3, 12, 7, 1, True, False, True, False),
    "N24-L33-g2-constant-rows": (2, 6, 24, 33, 2, True, True, True, True),
    "N5-L9-constant-rows-plain": (2, 3, 5, 9, 1, False, False, False, True),
    "N128-L9-g2-mask": (2, 4, 128, 9, 2, True, True, True, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sums_match_reference(kernels, case):
    batch, dim, N, L, ngroups, bias, softplus, masked, rows = CASES[case]
    args, ref = make_inputs(batch, dim, N, L, ngroups, bias=bias, softplus=softplus, masked=masked,
                            constant_rows=rows, seed=N + L)
    check_against_reference(kernels.mean_lti_sums(**args, constant_rows=rows), ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [False, True])
def test_half_precision_inputs(kernels, dtype, rows):
    args, ref = make_inputs(2, 6, 13, 45, 3, dtype=dtype, constant_rows=rows, seed=7)
    check_against_reference(kernels.mean_lti_sums(**args, constant_rows=rows), ref, dtype)


@pytest.mark.parametrize("tiles", [dict(block_d=1, block_n=4, block_t=8, splits=1),
                                   dict(block_d=4, block_n=2, block_t=4, splits=5),
                                   dict(block_d=8, block_n=32, block_t=64, splits=3)])
def test_tilings_and_splits_agree(kernels, tiles):
    """Tiles smaller and larger than the shape, and token ranges split over programs (partial sums
    added in a fixed order) all give the reference's sums."""
    args, ref = make_inputs(3, 6, 13, 29, 2, seed=11)
    check_against_reference(kernels.mean_lti_sums(**args, **tiles), ref, torch.float32)


def test_small_dt_keeps_relative_accuracy(kernels):
    """e = -expm1(dt A) for dt A down to 1e-7: exp(dt A) - 1 would lose every digit there; the
    polynomial branch keeps fp32 relative accuracy.  Also dt A beyond the branch point (-0.5)."""
    dim, N, L = 3, 4, 16
    A = -torch.tensor([[1e-6, 1e-4, 0.3, 4.0]]).expand(dim, N).contiguous()
    delta = torch.logspace(-1, 0, L).expand(1, dim, L).contiguous()
    B = torch.randn(1, N, L, generator=torch.Generator().manual_seed(0))
    C = torch.randn(1, N, L, generator=torch.Generator().manual_seed(1))
    e, _, _ = kernels.mean_lti_sums(delta.to(DEVICE), A.to(DEVICE), B.to(DEVICE), C.to(DEVICE))
    want = gramian_statistics(delta.double(), A.double(), B.double(), C.double(), estimator="mean_lti").sums["e"]
    assert float(want.min()) < 1e-5  # the smallest sums really are tiny (terms of 1e-7 .. 1e-6)
    assert_close(e.cpu(), want, rtol=1e-6, atol=0.0, name="e")


def test_empty_token_ranges_give_zero_sums(kernels):
    """A batch whose every token is padding: every sum is exactly 0 (and written)."""
    args, _ = make_inputs(2, 3, 5, 6, 1, seed=3)
    args["mask"] = torch.zeros(2, 6, dtype=torch.bool, device=DEVICE)
    for s in kernels.mean_lti_sums(**args, splits=2):
        assert torch.equal(s.cpu(), torch.zeros(3, 5))


def test_op_routes_to_the_kernel_and_matches_torch():
    """ops.gramian_sums(estimator="mean_lti", backend="triton") runs this kernel (non-contiguous
    inputs, 3-D B / C, half A as a model may hold it) and agrees with the torch backend."""
    delta, A, B, C, bias = random_gramian_inputs(2, 4, 6, 20, seed=5)
    delta = delta.float().to(DEVICE).transpose(1, 2).contiguous().transpose(1, 2)  # (batch, dim, L), L not last
    A16 = A.half().to(DEVICE)
    B, C = B.float().to(DEVICE), C.float().to(DEVICE)
    mask = gramian_padding_mask(2, 20).to(DEVICE)
    kw = dict(estimator="mean_lti", delta_bias=bias.float().to(DEVICE), delta_softplus=True, mask=mask)
    got = ops.gramian_sums(delta, A16, B, C, backend="triton", **kw)
    want = ops.gramian_sums(delta, A16, B, C, backend="torch", **kw)
    assert got.count == want.count == int(mask.sum())
    for k in ("e", "b", "c"):
        assert got.sums[k].dtype == torch.float32
        assert_close(got.sums[k].cpu(), want.sums[k].cpu(), rtol=1e-5, atol=1e-6 * float(want.sums[k].abs().max()),
                     name=k)


def test_triton_backend_refuses_float64():
    delta, A, B, C, _ = random_gramian_inputs(2, 3, 4, 6, seed=2)
    with pytest.raises(ValueError, match="float64 inputs need backend='torch'"):
        ops.gramian_sums(delta.to(DEVICE), A.to(DEVICE), B.to(DEVICE), C.to(DEVICE), estimator="mean_lti",
                         backend="triton")


def test_auto_runs_the_kernel_on_cuda_and_torch_elsewhere(monkeypatch):
    """The choice is by device and availability only: auto on a CPU tensor runs torch (float64
    sums for float64 inputs), auto on a CUDA tensor runs the kernel (checked by spying on it)."""
    import importlib

    import compressm_mamba.torch_backend.gramians as torch_gramians

    op = importlib.import_module("compressm_mamba.ops.gramians")  # the module (ops.gramians is a function)

    calls = []
    original = op.mean_lti_sums
    monkeypatch.setattr(op, "mean_lti_sums", lambda *a, **k: calls.append("torch") or original(*a, **k))
    delta, A, B, C, _ = random_gramian_inputs(2, 3, 4, 6, seed=2)
    stats = ops.gramian_sums(delta, A, B, C, estimator="mean_lti")
    assert calls == ["torch"] and stats.sums["e"].dtype == torch.float64
    assert op.mean_lti_sums is not torch_gramians.mean_lti_sums  # the spy is in place
    if torch.cuda.is_available():
        calls.clear()
        ops.gramian_sums(delta.float().cuda(), A.float().cuda(), B.float().cuda(), C.float().cuda(),
                         estimator="mean_lti")
        assert calls == []
