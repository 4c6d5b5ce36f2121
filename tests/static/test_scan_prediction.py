"""The launch plans bench/static_report.py's scan PREDICTIONS model (no GPU, nothing launched).

The Triton rows take their plan from the launchers themselves (captured launches); the CUDA rows
from ``perf_model.our_cuda_traits``, a Python mirror of csrc/selective_scan's ScanTraits and of the
binding's slot count: these checks fail when the C++ changes and the mirror does not.
"""

from __future__ import annotations

import re

import pytest
import torch

from static import perf_model
from static.toolchain import repo_root

CSRC = repo_root() / "csrc"


@pytest.mark.requires_triton
def test_triton_backward_plan_at_the_reference_shape():
    from compressm_mamba.kernels import selective_scan as ss

    def plan(N):
        chunk = ss.default_chunk_size(N)
        inputs = 4 * 8 * 3072 * 2048 * 2 + 2 * 8 * N * 2048 * 2 + 4 * 8 * 3072 * N * (2048 // chunk)
        return ss.backward_plan(8, 3072, 2048, N, 1, torch.bfloat16, torch.bfloat16, chunk, inputs, "cpu")

    p16, p128 = plan(16), plan(128)
    # N <= 16: one-tile chunks (no re-walk, no scratch), 64-channel blocks, 48 channel splits.
    assert p16["tiles_per_chunk"] == 1 and p16["scratch_bytes"] == 0 and p16["BLOCK_D"] == 64
    assert p16["d_splits"] == 48 and p16["n_splits"] > 1
    # N = 128: 8 tiles per 64-step chunk; the tile-start scratch caps the time splits below what would
    # fill the GPU: few programs (768 at the reference shape), which the occupancy term charges.
    assert p128["tiles_per_chunk"] == 8 and p128["num_warps"] == 1 and p128["scratch_bytes"] > 0
    uncapped, _ = ss._time_splits(8 * p128["d_splits"], 1, 2048 // 64, "cpu", None)
    assert p128["n_splits"] < uncapped, "the N = 128 backward's time splits are no longer capped: update bench/README"


def test_cuda_traits_mirror_the_headers():
    header = (CSRC / "selective_scan" / "selective_scan.h").read_text()
    cuh = (CSRC / "selective_scan" / "selective_scan.cuh").read_text()
    bindings = (CSRC / "bindings.cpp").read_text()
    assert re.search(r"constexpr int kScanChunk = 64;", header)
    assert re.search(r"constexpr int kScanThreads = 128;", header)
    assert "int lanes = 2;" in header and "n / (2 * lanes) >= 6" in header
    assert "pow2_floor(2730 / kChans - 1), pow2_floor(2304 / kBP)" in cuh
    assert "kBwdT = kNState >= 256 ? 4 : 8" in cuh
    assert "std::max<int64_t>(1, input_bytes / slot_bytes)" in bindings
    # The lanes x states table of selective_scan.h's comment.
    for N, lanes, states in ((4, 2, 2), (12, 2, 6), (16, 2, 8), (24, 4, 6), (96, 16, 6), (128, 16, 8), (256, 32, 8)):
        t = perf_model.our_cuda_traits(N, 2048)
        assert (t["kLanes"], t["kStates"]) == (lanes, states), N
    # The backward's slot bound at the reference shape (selective_scan.cuh: 384 blocks at (8, 1)).
    for N in (12, 16, 128):
        t = perf_model.our_cuda_traits(N, 2048)
        assert t["n_slots"] == 48 and t["n_slices"] == 3072 // t["kChans"]
    assert perf_model.our_cuda_traits(16, 2048)["kFwdT"] == 32 and perf_model.our_cuda_traits(128, 2048)["kFwdT"] == 16
