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
    # N <= 16: one-tile chunks (no re-walk, no scratch), 32-channel blocks (one per thread), 96 channel
    # splits, and time splits that fill whole waves of 16 one-warp programs (the 128-register cap):
    # 768 x 8 = 6144 programs, 47 per SM.
    assert p16["tiles_per_chunk"] == 1 and p16["scratch_bytes"] == 0 and p16["BLOCK_D"] == 32
    assert p16["d_splits"] == 96 and p16["n_splits"] == 8
    # The register cap (16 warps per SM) where it compiles without spills; state splits run uncapped.
    assert p16["maxnreg"] == ss._BWD_MAXNREG == 128
    # N = 128: 8 tiles per 64-step chunk; the tile-start scratch caps the time splits below what would
    # fill the GPU, and state splits (warps on disjoint states of the same channels) make up the rest.
    assert p128["tiles_per_chunk"] == 8 and p128["num_warps"] == 1 and p128["scratch_bytes"] > 0
    uncapped, _ = ss._time_splits(8 * p128["d_splits"], 1, 2048 // 64, "cpu", None)
    assert p128["n_splits"] < uncapped, "the N = 128 backward's time splits are no longer capped: update bench/README"
    assert p128["n_state_splits"] > 1 and p128["maxnreg"] is None


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


@pytest.mark.requires_triton
def test_register_caps_give_the_residency_the_plan_counts_on():
    """The launchers' register caps and the occupancy calculator of bench/static agree on how many
    programs an SM holds (the plan's waves), and the backward's cap gives 4 warps per scheduler."""
    from compressm_mamba.kernels import selective_scan as ss
    from static.toolchain import blocks_per_sm

    for cap in (ss._BWD_MAXNREG, ss._FWD_MAXNREG, ss._FWD_LOCAL_MAXNREG):
        for warps in (1, 2, 4):
            assert ss._resident_blocks(cap, warps) == blocks_per_sm(90, 32 * warps, cap, 0), (cap, warps)
    assert ss._resident_blocks(ss._BWD_MAXNREG, 1) == 16
    assert (ss._resident_blocks(ss._FWD_MAXNREG, 1), ss._resident_blocks(ss._FWD_LOCAL_MAXNREG, 1)) == (28, 32)


@pytest.mark.requires_triton
def test_time_splits_fill_whole_waves():
    """768 one-warp programs on 132 SMs, 28 resident: the least splits that reach 32 warps per SM
    (6: 35 programs per SM, a wave of 28 and a latency-bound tail of 7) lose to 8 (47 = 28 + 19);
    without a residency the old rule stands; an explicit n_splits is kept; the cap still binds."""
    from compressm_mamba.kernels import selective_scan as ss

    assert ss._time_splits(768, 1, 256, "cpu", None) == (6, 43)
    assert ss._time_splits(768, 1, 256, "cpu", None, resident=28) == (8, 32)
    # 16 resident (the backward's cap): 6 splits leave 35 = 16 + 16 + 3 per SM; 8 give 47 = 16 + 16 + 15.
    assert ss._time_splits(768, 1, 256, "cpu", None, resident=16)[0] == 8
    assert ss._time_splits(768, 1, 256, "cpu", 5, resident=28) == (5, 52)
    assert ss._time_splits(768, 1, 256, "cpu", None, cap=4, resident=28)[0] <= 4
