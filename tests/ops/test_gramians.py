"""ops.gramians: the torch backend against the reference, and dispatch."""

import pytest
import torch
from helpers import assert_close, random_gramian_inputs

import compressm_mamba.torch_backend.gramians as torch_gramians
from compressm_mamba import ops
from compressm_mamba.reference import gramian_statistics, gramians


@pytest.mark.parametrize("estimator", ["frozen", "ltv"])
@pytest.mark.parametrize("L, N, ngroups", [(1, 1, None), (7, 12, 2), (63, 13, None), (63, 16, 1)])
@pytest.mark.parametrize("small_blocks", [False, True])
def test_torch_backend_matches_reference(estimator, L, N, ngroups, small_blocks, monkeypatch):
    if small_blocks:  # force many chunks: the carried states between chunks are exercised
        monkeypatch.setattr(torch_gramians, "_BLOCK_ELEMENTS", 4 * N * N)
    delta, A, B, C, bias = random_gramian_inputs(batch=2, dim=4, N=N, L=L, ngroups=ngroups, seed=L + N)
    mask = torch.ones(2, L, dtype=torch.bool)
    mask[0, : L // 3] = False  # left padding
    if L > 4:
        mask[1, 3] = False  # a hole
    kw = dict(estimator=estimator, delta_bias=bias, delta_softplus=True, mask=mask)
    ref = gramian_statistics(delta, A, B, C, **kw)
    got = ops.gramian_sums(delta, A, B, C, backend="torch", **kw)
    assert got.count == ref.count
    for k in ("P", "Q"):
        assert_close(got.sums[k], ref.sums[k], rtol=1e-10, atol=1e-12, name=k)


@pytest.mark.parametrize("L, N, ngroups", [(1, 1, None), (7, 12, 2), (63, 13, None), (63, 16, 4)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("small_blocks", [False, True])
def test_mean_lti_sums_match_reference_without_system_tensors(L, N, ngroups, dtype, small_blocks, monkeypatch):
    if small_blocks:  # several time chunks for the e sum
        monkeypatch.setattr(torch_gramians, "_BLOCK_ELEMENTS", 2 * 4 * N)
    delta, A, B, C, bias = random_gramian_inputs(batch=2, dim=4, N=N, L=L, ngroups=ngroups, seed=L + N + 1)
    delta, A, B, C, bias = (x.to(dtype) for x in (delta, A, B, C, bias))
    mask = torch.ones(2, L, dtype=torch.bool)
    mask[0, : L // 3] = False  # left padding
    if L > 4:
        mask[1, 3] = False  # a hole
    for kw in (dict(delta_bias=bias, delta_softplus=True, mask=mask), dict()):
        ref = gramian_statistics(delta.double(), A.double(), B.double(), C.double(), estimator="mean_lti",
                                 **{k: (v.double() if k == "delta_bias" else v) for k, v in kw.items()})
        got = torch_gramians.mean_lti_sums(delta, A, B, C, **kw)
        assert got.count == ref.count and got.estimator == "mean_lti"
        tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        for k in ("e", "b", "c"):
            assert got.sums[k].dtype == dtype
            assert_close(got.sums[k].double(), ref.sums[k], name=k, **tol)
    # the op runs it for mean_lti on every backend but the reference
    assert ops.gramian_sums(delta, A, B, C, estimator="mean_lti", backend="torch").sums["e"].dtype == dtype


def test_auto_and_mean_lti():
    delta, A, B, C, bias = random_gramian_inputs(batch=2, dim=3, N=6, L=20, seed=2)
    for est in ("mean_lti", "frozen", "ltv"):
        P, Q = ops.gramians(delta, A, B, C, estimator=est, delta_bias=bias, delta_softplus=True)
        P_ref, Q_ref = gramians(delta, A, B, C, estimator=est, delta_bias=bias, delta_softplus=True)
        assert_close(P, P_ref, rtol=1e-10, atol=1e-13, name=f"{est} P")
        assert_close(Q, Q_ref, rtol=1e-10, atol=1e-13, name=f"{est} Q")


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(estimator="exact"), ValueError, "estimator must be one of"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
        (dict(mask=torch.ones(2, 3, dtype=torch.bool)), ValueError, "mask must be"),
        (dict(delta_bias=torch.zeros(5, dtype=torch.float64)), ValueError, "delta_bias must be"),
    ],
)
def test_bad_inputs(kwargs, err, match):
    delta, A, B, C, _ = random_gramian_inputs(batch=2, dim=3, N=4, L=6, seed=3)
    with pytest.raises(err, match=match):
        ops.gramians(delta, A, B, C, **kwargs)
    with pytest.raises(ValueError, match="A must be"):
        ops.gramians(delta, A[:2], B, C)


@pytest.mark.requires_triton
@pytest.mark.parametrize("estimator", ["frozen", "ltv"])
@pytest.mark.parametrize("constant_rows", [False, True])
def test_triton_backend_through_ops(estimator, constant_rows):
    """ops picks the weighted-Gram kernel by itself when A's rows are constant (Mamba2 heads)."""
    delta, A, B, C, bias = random_gramian_inputs(batch=2, dim=3, N=5, L=7, ngroups=None, seed=4)
    if constant_rows:
        A = A[:, :1].expand(3, 5).contiguous()
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, :2] = False
    kw = dict(estimator=estimator, delta_bias=bias, delta_softplus=True, mask=mask)
    ref = gramian_statistics(delta, A, B, C, **kw)
    got = ops.gramian_sums(delta.float(), A.float(), B.float(), C.float(), backend="triton",
                           **{**kw, "delta_bias": bias.float()})
    assert got.count == ref.count
    for k in ("P", "Q"):
        assert_close(got.sums[k], ref.sums[k], rtol=1e-4, atol=1e-5, name=k)
