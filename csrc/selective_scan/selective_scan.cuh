// Selective scan kernels (Mamba1 layout), forward and backward, templated on the state size.
//
// The float64 specification is compressm_mamba/reference/selective_scan.py; the gradient formulas
// are those of kernels/selective_scan.py (the Triton twin of these kernels):
//   h_t = a_t h_{t-1} + dt_t u_t B_t,  a_t = exp(dt_t A),  y_t = <C_t, h_t> + D u_t,  out = y silu(z)
//   g_t = dL/dh_t = a_{t+1} g_{t+1} + dy_t C_t
//   du = dt <g, B> + dy D,   ddt = u <g, B> + sum_n g a h_{t-1} A,   dA += g a h_{t-1} dt,
//   dB_t += g dt u (summed over the group's channels),   dC_t += h_t dy,   dD += dy u,
//   ddelta = ddt * sigmoid(delta + bias) under softplus,   ddelta_bias += ddelta.
//
// Work layout.  A block of 128 threads owns one (batch, group) and kChans consecutive channels of
// that group (blocks never straddle a group, so a block reads one B/C row per step).  Each channel's
// N states are spread over kLanes consecutive lanes of a warp, kStates <= 8 states per thread, state
// n = lane + k * kLanes (interleaved, so lanes read consecutive shared-memory words).  The state
// lives in registers; time is walked sequentially in tiles: every tile's inputs are staged in shared
// memory with loads that are contiguous along L, computed, and the tile's outputs are written back
// contiguous along L.  All arithmetic is fp32, all global offsets int64.
//
// Edges: channels past the group, states past N (the kernel's kNState rounds N up) and steps past L
// are staged as u = dt = B = C = dout = 0 and A = 0.  Then a = 1 and the state, the gradient carry
// and every contribution stay exactly 0 / unchanged there, and nothing is stored for them.
//
// Backward.  The forward stores the state before every chunk of kScanChunk = 64 steps.  The
// backward walks chunks in reverse: it recomputes the state at the start of every sub-tile of kBwdT
// = 8 steps of the chunk (kept per thread in local memory), then, sub-tile by sub-tile in reverse,
// recomputes the sub-tile's 8 states into registers and runs the reverse recurrence over them.
// Sums over channels (dB, dC) are reduced inside each warp (reduce-scatter), across the block's
// warps with shared-memory atomics and across blocks with fp32 global atomics into zeroed
// accumulators, so dB and dC are not bit-reproducible run to run (they are when every group has a
// single channel).  Per-block partials (the Triton kernel's choice) would be deterministic, but
// (batch, groups, blocks, L, N) fp32 is gigabytes at N = 256, where a block holds 4 channels.  Sums over time and batch (dA, dD,
// ddelta_bias) are per-(batch, channel) partials summed by the caller: deterministic.
#pragma once

#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "selective_scan.h"

namespace compressm_mamba {
namespace scan {

// Lanes per channel: halve the states per thread while at least 6 remain, so that every kernel keeps
// 4..8 states per thread (N = 4 -> 1 x 4, 12 -> 2 x 6, 16 -> 2 x 8, 96 -> 16 x 6, 256 -> 32 x 8).
constexpr int lanes_per_channel(int n) {
  int lanes = 1;
  while (lanes < 32 && n % (2 * lanes) == 0 && n / (2 * lanes) >= 6) lanes *= 2;
  return lanes;
}

constexpr int pow2_floor(int x) {
  int p = 1;
  while (2 * p <= x) p *= 2;
  return p;
}

constexpr int const_min(int a, int b) { return a < b ? a : b; }

// Size of the slice each lane keeps after reduce_scatter_channels over offsets kOff, 2 kOff, ..., 16.
constexpr int scatter_size(int size, int off) {
  for (; off < 32; off *= 2) {
    if (size % 2 == 0) size /= 2;
  }
  return size;
}

template <int kNState_>
struct ScanTraits {
  static constexpr int kNState = kNState_;
  static constexpr int kLanes = lanes_per_channel(kNState);  // threads per channel
  static constexpr int kStates = kNState / kLanes;           // states per thread
  static constexpr int kThreads = 128;
  static constexpr int kChans = kThreads / kLanes;  // channels per block
  // Forward tile: keeps the B/C tiles (2 x kFwdT x N) and the four channel tiles
  // (4 x kChans x kFwdT) at 16 KiB each at most.
  static constexpr int kFwdT = const_min(64, const_min(pow2_floor(2048 / kNState), pow2_floor(1024 / kChans)));
  // Backward sub-tile: its kBwdT x kStates states stay in registers (64 at most).
  static constexpr int kBwdT = 8;
  static constexpr int kSubTiles = kScanChunk / kBwdT;
  static_assert(kLanes <= 32 && (kLanes & (kLanes - 1)) == 0, "lanes per channel must be a power of two <= 32");
  static_assert(kNState % kLanes == 0 && kStates >= 1 && kStates <= 8, "bad state split");
  static_assert(kScanChunk % kFwdT == 0 && kScanChunk % kBwdT == 0, "tiles must divide the checkpoint chunk");
};

// Static shared memory of the kernels below (fp32 words), checked for every state size even when
// only some are compiled: a kernel over 48 KiB would not launch.
template <int kNState>
constexpr int fwd_smem_words() {
  using T = ScanTraits<kNState>;
  return 4 * T::kChans * (T::kFwdT + 1) + 2 * T::kFwdT * (kNState + 1);
}
template <int kNState>
constexpr int bwd_smem_words() {
  using T = ScanTraits<kNState>;
  return 8 * T::kChans * (T::kBwdT + 1) + 2 * T::kBwdT * (kNState + 1) + 2 * kNState * (T::kBwdT + 1);
}
#define COMPRESSM_SCAN_CHECK_SMEM(K)                                                      \
  static_assert(4 * fwd_smem_words<K>() <= 48 * 1024 && 4 * bwd_smem_words<K>() <= 48 * 1024, \
                "selective scan: static shared memory over 48 KiB");
COMPRESSM_SCAN_ALL_NSTATES(COMPRESSM_SCAN_CHECK_SMEM)
#undef COMPRESSM_SCAN_CHECK_SMEM

template <typename T>
__device__ __forceinline__ float load_float(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

template <typename T>
__device__ __forceinline__ void store_float(T* p, int64_t i, float v) {
  p[i] = static_cast<T>(v);
}

// torch.nn.functional.softplus (threshold 20): log1pf keeps tiny exp(x) accurate.
__device__ __forceinline__ float softplus_f(float x) { return x > 20.f ? x : log1pf(expf(x)); }

__device__ __forceinline__ float sigmoid_f(float x) { return 1.f / (1.f + expf(-x)); }

// Sum over the kLanes lanes of one channel (consecutive, aligned lanes).  A butterfly: every lane
// ends with the same, bitwise identical, sum (fp32 addition is commutative).
template <int kLanes>
__device__ __forceinline__ float sum_channel_lanes(float v) {
#pragma unroll
  for (int off = kLanes / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sums v[0..kSize) over the channels of a warp (the lanes that differ in the lane-id bits >= kOff)
// by recursive halving: at every offset, while the slice is even, a lane keeps one half, sends the
// other half to its partner and adds what it receives.  On return v[0..scatter_size(kSize, kOff))
// holds the sums for the state slots k0, k0 + 1, ...; where the slice had become odd the remaining
// offsets sum the whole slice and only lanes with those bits 0 keep `writer`.
template <int kSize, int kOff>
__device__ __forceinline__ void reduce_scatter_channels(float* v, int warp_lane, int& k0, bool& writer) {
  if constexpr (kOff < 32) {
    if constexpr (kSize % 2 == 0) {
      constexpr int kHalf = kSize / 2;
      const bool upper = (warp_lane & kOff) != 0;
#pragma unroll
      for (int i = 0; i < kHalf; ++i) {
        const float send = upper ? v[i] : v[i + kHalf];
        const float keep = upper ? v[i + kHalf] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, kOff);
      }
      if (upper) k0 += kHalf;
      reduce_scatter_channels<kHalf, kOff * 2>(v, warp_lane, k0, writer);
    } else {
#pragma unroll
      for (int i = 0; i < kSize; ++i) v[i] += __shfl_xor_sync(0xffffffffu, v[i], kOff);
      if (warp_lane & kOff) writer = false;
      reduce_scatter_channels<kSize, kOff * 2>(v, warp_lane, k0, writer);
    }
  }
}

// Where a block's threads sit: batch b, group g, channel d (global) of lane `slot`.
struct BlockCoords {
  int b, g, j0, c, slot, warp_lane;
  bool chan_ok;
  int d;
};

template <typename Traits>
__device__ __forceinline__ BlockCoords block_coords(const SelectiveScanFwdParams& p) {
  BlockCoords bc;
  bc.b = blockIdx.z;
  bc.g = blockIdx.y;
  bc.j0 = blockIdx.x * Traits::kChans;
  bc.c = threadIdx.x / Traits::kLanes;
  bc.slot = threadIdx.x % Traits::kLanes;
  bc.warp_lane = threadIdx.x % 32;
  bc.chan_ok = bc.j0 + bc.c < p.dim_per_group;
  bc.d = bc.g * p.dim_per_group + bc.j0 + bc.c;
  return bc;
}

// Stages the block's per-channel inputs of steps [t0, t0 + kT): u, dt (bias and softplus applied)
// and optionally sigmoid(delta + bias) (the softplus derivative), z and dout, as fp32 tiles of
// pitch kT + 1 (odd: a column of channels hits distinct banks).  Out-of-range entries are 0.
template <typename Traits, int kT, typename input_t, bool kDsp, bool kZ, bool kDout>
__device__ __forceinline__ void stage_channel_tiles(const SelectiveScanFwdParams& p, const BlockCoords& bc, int t0,
                                                    const input_t* dout, float* s_u, float* s_dt, float* s_dsp,
                                                    float* s_z, float* s_dout) {
  constexpr int kPitch = kT + 1;
  const input_t* u = static_cast<const input_t*>(p.u_ptr);
  const input_t* delta = static_cast<const input_t*>(p.delta_ptr);
  const input_t* z = static_cast<const input_t*>(p.z_ptr);
  for (int i = threadIdx.x; i < Traits::kChans * kT; i += Traits::kThreads) {
    const int cc = i / kT, tt = i % kT, t = t0 + tt, jj = bc.j0 + cc;
    float uv = 0.f, dtv = 0.f, dspv = 0.f, zv = 0.f, doutv = 0.f;
    if (jj < p.dim_per_group && t < p.seqlen) {
      const int dd = bc.g * p.dim_per_group + jj;
      const int64_t idx = (static_cast<int64_t>(bc.b) * p.dim + dd) * p.seqlen + t;
      uv = load_float(u, idx);
      float x = load_float(delta, idx);
      if (p.has_delta_bias) x += p.delta_bias_ptr[dd];
      dtv = p.delta_softplus ? softplus_f(x) : x;
      if constexpr (kDsp) dspv = p.delta_softplus ? sigmoid_f(x) : 1.f;
      if constexpr (kZ) zv = load_float(z, idx);
      if constexpr (kDout) doutv = load_float(dout, idx);
    }
    s_u[cc * kPitch + tt] = uv;
    s_dt[cc * kPitch + tt] = dtv;
    if constexpr (kDsp) s_dsp[cc * kPitch + tt] = dspv;
    if constexpr (kZ) s_z[cc * kPitch + tt] = zv;
    if constexpr (kDout) s_dout[cc * kPitch + tt] = doutv;
  }
}

// Stages B (and C) of steps [t0, t0 + kT) of the block's group as [step][state] tiles of pitch
// kNState + 1; states >= N and steps >= L are 0.  Global reads run along L.
template <typename Traits, int kT, typename input_t, bool kWithC>
__device__ __forceinline__ void stage_bc_tiles(const SelectiveScanFwdParams& p, const BlockCoords& bc, int t0,
                                               float* s_B, float* s_C) {
  constexpr int kPitch = Traits::kNState + 1;
  const input_t* B = static_cast<const input_t*>(p.B_ptr);
  const input_t* C = static_cast<const input_t*>(p.C_ptr);
  const int64_t plane = (static_cast<int64_t>(bc.b) * p.ngroups + bc.g) * p.dstate * p.seqlen;
  for (int i = threadIdx.x; i < Traits::kNState * kT; i += Traits::kThreads) {
    const int n = i / kT, tt = i % kT, t = t0 + tt;
    float bv = 0.f, cv = 0.f;
    if (n < p.dstate && t < p.seqlen) {
      const int64_t idx = plane + static_cast<int64_t>(n) * p.seqlen + t;
      bv = load_float(B, idx);
      if constexpr (kWithC) cv = load_float(C, idx);
    }
    s_B[tt * kPitch + n] = bv;
    if constexpr (kWithC) s_C[tt * kPitch + n] = cv;
  }
}

template <typename Traits>
__device__ __forceinline__ void load_A(const SelectiveScanFwdParams& p, const BlockCoords& bc,
                                       float (&A)[Traits::kStates]) {
#pragma unroll
  for (int k = 0; k < Traits::kStates; ++k) {
    const int n = bc.slot + k * Traits::kLanes;
    A[k] = (bc.chan_ok && n < p.dstate) ? p.A_ptr[static_cast<int64_t>(bc.d) * p.dstate + n] : 0.f;
  }
}

template <int kNState, bool kHasZ, typename input_t>
__global__ void __launch_bounds__(ScanTraits<kNState>::kThreads)
    selective_scan_fwd_kernel(const SelectiveScanFwdParams p) {
  using Traits = ScanTraits<kNState>;
  constexpr int kLanes = Traits::kLanes, kStates = Traits::kStates, kChans = Traits::kChans;
  constexpr int kT = Traits::kFwdT, kCP = kT + 1, kBP = kNState + 1;

  __shared__ float s_u[kChans * kCP];
  __shared__ float s_dt[kChans * kCP];
  __shared__ float s_z[kHasZ ? kChans * kCP : 1];
  __shared__ float s_out[kChans * kCP];
  __shared__ float s_B[kT * kBP];
  __shared__ float s_C[kT * kBP];

  const BlockCoords bc = block_coords<Traits>(p);
  const int L = p.seqlen, N = p.dstate;
  input_t* out = static_cast<input_t*>(p.out_ptr);

  float A[kStates], h[kStates];
  load_A<Traits>(p, bc, A);
#pragma unroll
  for (int k = 0; k < kStates; ++k) h[k] = 0.f;
  const float Dv = (bc.chan_ok && p.has_D) ? p.D_ptr[bc.d] : 0.f;
  const int64_t state_row = (static_cast<int64_t>(bc.b) * p.dim + bc.d) * N;  // valid when chan_ok

  for (int t0 = 0; t0 < L; t0 += kT) {
    if (t0 % kScanChunk == 0 && bc.chan_ok) {
      float* ckpt = p.checkpoints_ptr + (static_cast<int64_t>(bc.b) * p.dim + bc.d) * p.n_chunks * N +
                    static_cast<int64_t>(t0 / kScanChunk) * N;
#pragma unroll
      for (int k = 0; k < kStates; ++k) {
        const int n = bc.slot + k * kLanes;
        if (n < N) ckpt[n] = h[k];
      }
    }
    __syncthreads();  // the previous tile is fully read and written back
    stage_channel_tiles<Traits, kT, input_t, false, kHasZ, false>(p, bc, t0, nullptr, s_u, s_dt, nullptr, s_z,
                                                                   nullptr);
    stage_bc_tiles<Traits, kT, input_t, true>(p, bc, t0, s_B, s_C);
    __syncthreads();

#pragma unroll 2
    for (int tt = 0; tt < kT; ++tt) {
      const float dt = s_dt[bc.c * kCP + tt];
      const float uv = s_u[bc.c * kCP + tt];
      const float dtu = dt * uv;
      float y = 0.f;
#pragma unroll
      for (int k = 0; k < kStates; ++k) {
        const int n = bc.slot + k * kLanes;
        h[k] = expf(dt * A[k]) * h[k] + dtu * s_B[tt * kBP + n];
        y += h[k] * s_C[tt * kBP + n];
      }
      y = sum_channel_lanes<kLanes>(y);
      if (bc.slot == 0) {
        float o = y + Dv * uv;
        if constexpr (kHasZ) {
          const float zv = s_z[bc.c * kCP + tt];
          o *= zv * sigmoid_f(zv);
        }
        s_out[bc.c * kCP + tt] = o;
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < kChans * kT; i += Traits::kThreads) {
      const int cc = i / kT, tt = i % kT, t = t0 + tt, jj = bc.j0 + cc;
      if (jj < p.dim_per_group && t < L) {
        const int64_t idx = (static_cast<int64_t>(bc.b) * p.dim + bc.g * p.dim_per_group + jj) * L + t;
        store_float(out, idx, s_out[cc * kCP + tt]);
      }
    }
  }
  if (bc.chan_ok) {
#pragma unroll
    for (int k = 0; k < kStates; ++k) {
      const int n = bc.slot + k * kLanes;
      if (n < N) p.last_state_ptr[state_row + n] = h[k];
    }
  }
}

template <int kNState, bool kHasZ, typename input_t>
__global__ void __launch_bounds__(ScanTraits<kNState>::kThreads)
    selective_scan_bwd_kernel(const SelectiveScanBwdParams p) {
  using Traits = ScanTraits<kNState>;
  constexpr int kLanes = Traits::kLanes, kStates = Traits::kStates, kChans = Traits::kChans;
  constexpr int kT = Traits::kBwdT, kCP = kT + 1, kBP = kNState + 1;
  constexpr int kOut = scatter_size(kStates, kLanes);

  __shared__ float s_u[kChans * kCP];
  __shared__ float s_dt[kChans * kCP];
  __shared__ float s_dsp[kChans * kCP];
  __shared__ float s_dout[kChans * kCP];
  __shared__ float s_z[kHasZ ? kChans * kCP : 1];
  __shared__ float s_du[kChans * kCP];
  __shared__ float s_ddelta[kChans * kCP];
  __shared__ float s_dz[kHasZ ? kChans * kCP : 1];
  __shared__ float s_B[kT * kBP];
  __shared__ float s_C[kT * kBP];
  __shared__ float s_dB[kNState * kCP];  // [state][step]: the block's sums for the sub-tile
  __shared__ float s_dC[kNState * kCP];

  const BlockCoords bc = block_coords<Traits>(p);
  const int L = p.seqlen, N = p.dstate;
  const input_t* dout = static_cast<const input_t*>(p.dout_ptr);
  input_t* du_out = static_cast<input_t*>(p.du_ptr);
  input_t* ddelta_out = static_cast<input_t*>(p.ddelta_ptr);
  input_t* dz_out = static_cast<input_t*>(p.dz_ptr);
  const int64_t plane = (static_cast<int64_t>(bc.b) * p.ngroups + bc.g) * N * L;

  float A[kStates];
  load_A<Traits>(p, bc, A);
  const float Dv = (bc.chan_ok && p.has_D) ? p.D_ptr[bc.d] : 0.f;

  float g_carry[kStates], dA_acc[kStates];
#pragma unroll
  for (int k = 0; k < kStates; ++k) g_carry[k] = dA_acc[k] = 0.f;
  float dD_acc = 0.f, dbias_acc = 0.f;
  // State at the start of each sub-tile of the current chunk (dynamically indexed: local memory).
  float sub_h[Traits::kSubTiles][kStates];

  for (int chunk = p.n_chunks - 1; chunk >= 0; --chunk) {
    const int tc0 = chunk * kScanChunk;
    const int n_sub = (const_min(tc0 + kScanChunk, L) - tc0 + kT - 1) / kT;

    // Pass 1: from the chunk's checkpoint, the state before every sub-tile.
    float h[kStates];
    const float* ckpt = p.checkpoints_ptr + (static_cast<int64_t>(bc.b) * p.dim + bc.d) * p.n_chunks * N +
                        static_cast<int64_t>(chunk) * N;
#pragma unroll
    for (int k = 0; k < kStates; ++k) {
      const int n = bc.slot + k * kLanes;
      h[k] = (bc.chan_ok && n < N) ? ckpt[n] : 0.f;
    }
    for (int s = 0; s < n_sub; ++s) {
#pragma unroll
      for (int k = 0; k < kStates; ++k) sub_h[s][k] = h[k];
      if (s == n_sub - 1) break;  // the state after the chunk's last sub-tile is not needed
      const int t0 = tc0 + s * kT;
      __syncthreads();
      stage_channel_tiles<Traits, kT, input_t, false, false, false>(p, bc, t0, nullptr, s_u, s_dt, nullptr,
                                                                     nullptr, nullptr);
      stage_bc_tiles<Traits, kT, input_t, false>(p, bc, t0, s_B, nullptr);
      __syncthreads();
#pragma unroll
      for (int tt = 0; tt < kT; ++tt) {
        const float dt = s_dt[bc.c * kCP + tt];
        const float dtu = dt * s_u[bc.c * kCP + tt];
#pragma unroll
        for (int k = 0; k < kStates; ++k) {
          h[k] = expf(dt * A[k]) * h[k] + dtu * s_B[tt * kBP + bc.slot + k * kLanes];
        }
      }
    }

    // Pass 2: sub-tiles in reverse.
    for (int s = n_sub - 1; s >= 0; --s) {
      const int t0 = tc0 + s * kT;
      __syncthreads();
      stage_channel_tiles<Traits, kT, input_t, true, kHasZ, true>(p, bc, t0, dout, s_u, s_dt, s_dsp, s_z, s_dout);
      stage_bc_tiles<Traits, kT, input_t, true>(p, bc, t0, s_B, s_C);
      for (int i = threadIdx.x; i < kNState * kCP; i += Traits::kThreads) {
        s_dB[i] = 0.f;
        s_dC[i] = 0.f;
      }
      __syncthreads();

      // hist[tt] = h_{t0 + tt - 1}, the state before step t0 + tt; hc ends as the state after the
      // sub-tile's last step.
      float hist[kT][kStates], hc[kStates];
#pragma unroll
      for (int k = 0; k < kStates; ++k) hc[k] = sub_h[s][k];
#pragma unroll
      for (int tt = 0; tt < kT; ++tt) {
        const float dt = s_dt[bc.c * kCP + tt];
        const float dtu = dt * s_u[bc.c * kCP + tt];
#pragma unroll
        for (int k = 0; k < kStates; ++k) {
          hist[tt][k] = hc[k];
          hc[k] = expf(dt * A[k]) * hc[k] + dtu * s_B[tt * kBP + bc.slot + k * kLanes];
        }
      }

#pragma unroll
      for (int tt = kT - 1; tt >= 0; --tt) {
        const int ci = bc.c * kCP + tt;
        const float dt = s_dt[ci], uv = s_u[ci], doutv = s_dout[ci];
        float dy = doutv, dzv = 0.f;
        if constexpr (kHasZ) {
          const float zv = s_z[ci];
          const float sz = sigmoid_f(zv);
          float y = 0.f;
#pragma unroll
          for (int k = 0; k < kStates; ++k) y += hc[k] * s_C[tt * kBP + bc.slot + k * kLanes];
          y = sum_channel_lanes<kLanes>(y) + Dv * uv;
          dy = doutv * zv * sz;
          dzv = doutv * y * sz * (1.f + zv * (1.f - sz));
        }
        float gk[kStates], ak[kStates];
        float gB = 0.f, gAh = 0.f;
#pragma unroll
        for (int k = 0; k < kStates; ++k) {
          const int n = bc.slot + k * kLanes;
          gk[k] = g_carry[k] + dy * s_C[tt * kBP + n];
          ak[k] = expf(dt * A[k]);
          gB += gk[k] * s_B[tt * kBP + n];
          const float gah = gk[k] * ak[k] * hist[tt][k];
          gAh += gah * A[k];
          dA_acc[k] += gah * dt;
        }
        gB = sum_channel_lanes<kLanes>(gB);
        gAh = sum_channel_lanes<kLanes>(gAh);
        const float ddt = (uv * gB + gAh) * s_dsp[ci];
        dD_acc += dy * uv;
        dbias_acc += ddt;
        if (bc.slot == 0) {
          s_du[ci] = dt * gB + dy * Dv;
          s_ddelta[ci] = ddt;
          if constexpr (kHasZ) s_dz[ci] = dzv;
        }

        // dB_t, dC_t of this step: sums over the block's channels.
        float vb[kStates], vc[kStates];
        const float dtu = dt * uv;
#pragma unroll
        for (int k = 0; k < kStates; ++k) {
          vb[k] = gk[k] * dtu;
          vc[k] = hc[k] * dy;
        }
        int k0 = 0, k0c = 0;
        bool writer = true, writer_c = true;
        reduce_scatter_channels<kStates, kLanes>(vb, bc.warp_lane, k0, writer);
        reduce_scatter_channels<kStates, kLanes>(vc, bc.warp_lane, k0c, writer_c);
        if (writer) {
#pragma unroll
          for (int i = 0; i < kOut; ++i) {
            const int n = bc.slot + (k0 + i) * kLanes;
            atomicAdd(&s_dB[n * kCP + tt], vb[i]);
            atomicAdd(&s_dC[n * kCP + tt], vc[i]);
          }
        }

#pragma unroll
        for (int k = 0; k < kStates; ++k) {
          g_carry[k] = gk[k] * ak[k];
          hc[k] = hist[tt][k];
        }
      }
      __syncthreads();

      for (int i = threadIdx.x; i < kChans * kT; i += Traits::kThreads) {
        const int cc = i / kT, tt = i % kT, t = t0 + tt, jj = bc.j0 + cc;
        if (jj < p.dim_per_group && t < L) {
          const int64_t idx = (static_cast<int64_t>(bc.b) * p.dim + bc.g * p.dim_per_group + jj) * L + t;
          store_float(du_out, idx, s_du[cc * kCP + tt]);
          store_float(ddelta_out, idx, s_ddelta[cc * kCP + tt]);
          if constexpr (kHasZ) store_float(dz_out, idx, s_dz[cc * kCP + tt]);
        }
      }
      for (int i = threadIdx.x; i < kNState * kT; i += Traits::kThreads) {
        const int n = i / kT, tt = i % kT, t = t0 + tt;
        if (n < N && t < L) {
          const int64_t idx = plane + static_cast<int64_t>(n) * L + t;
          atomicAdd(p.dB_ptr + idx, s_dB[n * kCP + tt]);
          atomicAdd(p.dC_ptr + idx, s_dC[n * kCP + tt]);
        }
      }
    }
  }

  if (bc.chan_ok) {
    const int64_t bd = static_cast<int64_t>(bc.b) * p.dim + bc.d;
#pragma unroll
    for (int k = 0; k < kStates; ++k) {
      const int n = bc.slot + k * kLanes;
      if (n < N) p.dA_part_ptr[bd * N + n] = dA_acc[k];
    }
    if (bc.slot == 0) {
      if (p.has_D) p.dD_part_ptr[bd] = dD_acc;
      if (p.has_delta_bias) p.ddelta_bias_part_ptr[bd] = dbias_acc;
    }
  }
}

template <int kNState, typename input_t>
void launch_fwd(const SelectiveScanFwdParams& p, cudaStream_t stream) {
  using Traits = ScanTraits<kNState>;
  const dim3 grid((p.dim_per_group + Traits::kChans - 1) / Traits::kChans, p.ngroups, p.batch);
  COMPRESSM_BOOL_SWITCH(p.has_z, kHasZ, [&] {
    selective_scan_fwd_kernel<kNState, kHasZ, input_t><<<grid, Traits::kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <int kNState, typename input_t>
void launch_bwd(const SelectiveScanBwdParams& p, cudaStream_t stream) {
  using Traits = ScanTraits<kNState>;
  const dim3 grid((p.dim_per_group + Traits::kChans - 1) / Traits::kChans, p.ngroups, p.batch);
  COMPRESSM_BOOL_SWITCH(p.has_z, kHasZ, [&] {
    selective_scan_bwd_kernel<kNState, kHasZ, input_t><<<grid, Traits::kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace scan
}  // namespace compressm_mamba

// The smallest compiled state size >= N serves N (the list is ascending and ends at 256).
template <typename input_t>
void selective_scan_fwd_cuda(const SelectiveScanFwdParams& params, cudaStream_t stream) {
  TORCH_CHECK(params.dstate >= 1 && params.dstate <= kScanMaxNState, "selective scan: N must be in [1, ",
              kScanMaxNState, "], got ", params.dstate);
  if (params.batch == 0 || params.dim == 0) return;
#define COMPRESSM_SCAN_FWD_CASE(K)                                         \
  if (params.dstate <= K) {                                                \
    compressm_mamba::scan::launch_fwd<K, input_t>(params, stream);         \
    return;                                                                \
  }
  COMPRESSM_SCAN_FOR_EACH_NSTATE(COMPRESSM_SCAN_FWD_CASE)
#undef COMPRESSM_SCAN_FWD_CASE
  TORCH_CHECK(false, "selective scan: no kernel for N = ", params.dstate);
}

template <typename input_t>
void selective_scan_bwd_cuda(const SelectiveScanBwdParams& params, cudaStream_t stream) {
  TORCH_CHECK(params.dstate >= 1 && params.dstate <= kScanMaxNState, "selective scan: N must be in [1, ",
              kScanMaxNState, "], got ", params.dstate);
  if (params.batch == 0 || params.dim == 0) return;
#define COMPRESSM_SCAN_BWD_CASE(K)                                         \
  if (params.dstate <= K) {                                                \
    compressm_mamba::scan::launch_bwd<K, input_t>(params, stream);         \
    return;                                                                \
  }
  COMPRESSM_SCAN_FOR_EACH_NSTATE(COMPRESSM_SCAN_BWD_CASE)
#undef COMPRESSM_SCAN_BWD_CASE
  TORCH_CHECK(false, "selective scan: no kernel for N = ", params.dstate);
}
