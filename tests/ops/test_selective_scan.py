"""ops.selective_scan: the torch backend against the reference (forward and backward), and dispatch."""

import pytest
import torch
from helpers import assert_close, random_scan_inputs

from compressm_mamba import ops
from compressm_mamba.reference import selective_scan as reference_scan
from compressm_mamba.torch_backend.selective_scan import selective_scan_torch

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def scan_with_grads(fn, inputs, dout, **kw):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
    args = {k: leaves.get(k) for k in inputs}
    out, last = fn(**args, return_last_state=True, **kw)
    (out * dout).sum().backward()
    return out.detach(), last.detach(), {k: leaves[k].grad for k in leaves}


@pytest.mark.parametrize(
    "L, N, dim, ngroups",
    [(1, 1, 3, None), (2, 3, 2, None), (7, 12, 5, 1), (7, 13, 4, 2), (63, 16, 5, None), (64, 64, 2, 2)],
)
@pytest.mark.parametrize("softplus", [True, False])
def test_torch_backend_matches_reference_forward_and_backward(L, N, dim, ngroups, softplus):
    x = random_scan_inputs(batch=2, dim=dim, N=N, L=L, ngroups=ngroups, seed=L + N)
    if not softplus:
        x["delta"] = x["delta"].abs() + 0.05
    dout = torch.randn(2, dim, L, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out, last, grads = scan_with_grads(selective_scan_torch, x, dout, delta_softplus=softplus)
    ref_out, ref_last, ref_grads = scan_with_grads(reference_scan, x, dout, delta_softplus=softplus)
    assert_close(out, ref_out, rtol=1e-10, atol=1e-12, name="out")
    assert_close(last, ref_last, rtol=1e-10, atol=1e-12, name="last_state")
    for name in GRAD_NAMES:
        assert_close(grads[name], ref_grads[name], rtol=1e-9, atol=1e-11, name=f"d{name}")


def test_torch_backend_fp32_inputs():
    x32 = random_scan_inputs(batch=2, dim=4, N=16, L=40, dtype=torch.float32, seed=3)
    x64 = {k: v.double() for k, v in x32.items()}
    out = ops.selective_scan(**x32, delta_softplus=True, backend="torch")
    assert out.dtype == torch.float32
    assert_close(out, reference_scan(**x64, delta_softplus=True), rtol=1e-4, atol=1e-5, name="fp32 out")


def test_auto_backend_on_cpu_is_torch_and_reports_the_state_size():
    x = random_scan_inputs(batch=1, dim=3, N=7, L=5, dtype=torch.float32)
    ops.selective_scan(**x, delta_softplus=True)
    assert ops.selective_scan.__module__ == "compressm_mamba.ops.selective_scan"
    from compressm_mamba.ops.selective_scan import last_call

    assert last_call == {"backend": "torch", "state_size": 7, "seqlen": 5}
    ops.selective_scan(**x, delta_softplus=True, backend="reference")
    assert last_call["backend"] == "reference"


def test_bad_backends_say_how_to_get_them():
    x = random_scan_inputs(batch=1, dim=3, N=4, L=5, dtype=torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.selective_scan(**x, backend="fast")
    with pytest.raises(RuntimeError, match="compressm_mamba._C.*COMPRESSM_MAMBA_FORCE_CUDA_BUILD=1"):
        ops.selective_scan(**x, backend="cuda")


@pytest.mark.parametrize(
    "field, bad, err, match",
    [
        ("u", torch.zeros(3, 5), ValueError, "u must be a"),
        ("delta", torch.zeros(1, 3, 4), ValueError, "delta must have u's shape"),
        ("A", torch.zeros(3, 4, dtype=torch.int64), TypeError, "A must be a floating-point"),
        ("B", torch.zeros(1, 5, 5), ValueError, "B must be"),
        ("C", torch.zeros(1, 2, 4, 5), ValueError, "C: dim=3 is not a multiple of ngroups=2"),
        ("D", torch.zeros(4), ValueError, "D must be"),
        ("z", torch.zeros(1, 3, 6), ValueError, "z must have"),
        ("delta_bias", torch.zeros(2), ValueError, "delta_bias must be"),
        ("B", "not a tensor", TypeError, "B must be a tensor"),
    ],
)
def test_bad_inputs_name_the_argument(field, bad, err, match):
    x = random_scan_inputs(batch=1, dim=3, N=4, L=5, dtype=torch.float32)
    x[field] = bad
    with pytest.raises(err, match=match):
        ops.selective_scan(**x)


def test_non_contiguous_inputs_are_fine():
    x = random_scan_inputs(batch=2, dim=4, N=6, L=9, dtype=torch.float64, seed=4)
    nc = {k: (v.transpose(-1, -2).contiguous().transpose(-1, -2) if v.dim() >= 2 else v) for k, v in x.items()}
    assert not nc["u"].is_contiguous()
    assert_close(ops.selective_scan(**nc, delta_softplus=True, backend="torch"),
                 reference_scan(**x, delta_softplus=True), rtol=1e-10, atol=1e-12, name="out")


@pytest.mark.requires_triton
@pytest.mark.parametrize("ngroups", [None, 2])
def test_triton_backend_through_ops_forward_and_backward(ngroups):
    """The autograd.Function around the Triton kernels (interpreter on CPU) against the reference."""
    x32 = random_scan_inputs(batch=2, dim=4, N=5, L=9, ngroups=ngroups, dtype=torch.float32, seed=6)
    x64 = {k: v.double() for k, v in x32.items()}
    dout = torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(2))
    out, last, grads = scan_with_grads(lambda **kw: ops.selective_scan(**kw, backend="triton"), x32, dout,
                                       delta_softplus=True)
    ref_out, ref_last, ref_grads = scan_with_grads(reference_scan, x64, dout.double(), delta_softplus=True)
    assert_close(out, ref_out, rtol=2e-5, atol=1e-5, name="out")
    assert_close(last, ref_last, rtol=2e-5, atol=1e-5, name="last_state")
    for name in GRAD_NAMES:
        assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-4, name=f"d{name}")
