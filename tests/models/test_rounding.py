"""Ranks the kernels can use (issue 14, item 4): CompressConfig.rounding and the report's kernel N."""

import pytest
import torch
from helpers import random_ids, tiny_mamba2

pytest.importorskip("transformers")

import compressm_mamba as cm  # noqa: E402
from compressm_mamba.models.base import kernel_state_size  # noqa: E402
from compressm_mamba.models.mamba2 import Mamba2Adapter  # noqa: E402


def test_state_sizes_each_scan_computes():
    assert [kernel_state_size(n, "mamba_ssm_ssd") for n in (1, 5, 12, 16, 17, 100, 128)] == [16, 16, 16, 16, 32, 128, 128]
    assert [kernel_state_size(n, "triton") for n in (1, 3, 12, 16, 17)] == [1, 3, 12, 16, 17]  # a loop over N
    assert [kernel_state_size(n, "cuda") for n in (3, 12, 13, 100, 200)] == [4, 12, 16, 128, 256]
    assert [kernel_state_size(n, r) for n in (5, 12) for r in ("torch", "mamba_ssm_scan")] == [5, 5, 12, 12]
    with pytest.raises(ValueError, match="runtime must be one of"):
        kernel_state_size(4, "tpu")


@pytest.mark.parametrize("rounding, rank, kept, kernel", [
    ("auto", 12, 16, 16),  # mamba_ssm's SSD computes 16 anyway: keep them
    ("exact", 12, 12, 16),  # what was asked, and the report says what it costs
    ("multiple16", 20, 32, 32),
    ("pow2", 5, 8, 16),
    ("auto", 20, 32, 32),  # rounds up to N: nothing to cut
])
def test_rounding_on_mamba_ssm_ssd(monkeypatch, rounding, rank, kept, kernel):
    monkeypatch.setattr(Mamba2Adapter, "runtime", lambda self: "mamba_ssm_ssd")  # as on a GPU with mamba_ssm
    model = tiny_mamba2(state_size=32)
    report = cm.compress_(model, cm.CompressConfig(mode="rank", rank=rank, rounding=rounding, estimator="mean_lti"),
                          [random_ids(2, 16)])
    assert [d.state_after for d in report.layers] == [kept, kept]
    assert [d.kernel_state_after for d in report.layers] == [kernel, kernel]
    assert report.to_dict()["layers"][0]["kernel_state"] == kernel
    assert report.changed == (kept < 32)
    line = str(report).splitlines()[2].split()
    assert line[2:5] == ["32", str(kept), str(kernel)]


def test_auto_is_exact_on_a_cpu():
    model = tiny_mamba2(state_size=32)
    report = cm.compress_(model, cm.CompressConfig(mode="rank", rank=12, estimator="mean_lti"), [random_ids(2, 16)])
    assert [(d.state_after, d.kernel_state_after) for d in report.layers] == [(12, 12), (12, 12)]
    with pytest.raises(ValueError, match="CompressConfig.rounding must be one of"):
        cm.CompressConfig(rounding="pow3")
    assert torch.isfinite(model(random_ids(2, 8)).logits).all()
