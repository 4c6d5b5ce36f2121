// Selective scan kernels (Mamba1 layout), forward and backward, templated on the state size.
//
// The float64 specification is compressm_mamba/reference/selective_scan.py; the blocking, the order
// of every sum and the recomputation schedule below are mirrored step for step by the pure-torch
// emulation tests/cuda_scan_emulation.py, which tests/ops/test_cuda_scan_emulation.py checks
// against the reference on CPU.  Design rationale and costs: csrc/README.md.
//   h_t = a_t h_{t-1} + dt_t u_t B_t,  a_t = exp(dt_t A) = exp2(dt_t A log2 e),  y_t = <C_t, h_t>,
//   out = (y + D u) silu(z)
//   g_t = dL/dh_t = a_{t+1} g_{t+1} + dy_t C_t,  dy = dout silu(z)
//   du = dt <g, B> + dy D,   ddt = u <g, B> + sum_n g a h_{t-1} A,   dA += g a h_{t-1} dt,
//   dB_t += g dt u,  dC_t += h_t dy  (summed over the group's channels),  dD += dy u,
//   ddelta = ddt * sigmoid(delta + bias) under softplus,   ddelta_bias += ddelta.
//
// Work layout.  128 threads; a channel's states are spread over kLanes (2..32) consecutive lanes,
// kStates (<= 8) contiguous states per thread (state n = lane_in_channel * kStates + k), so a thread reads its
// B / C values of a step with one or two vector shared-memory loads.  A block owns a slice of kChans
// consecutive channels of one (batch, group) (slices never straddle a group: one B / C row per
// step).  Time is walked in tiles: the tile's inputs are staged in shared memory by 4-element vector
// loads along L, and everything that is per element rather than per state (softplus, dt * u,
// dout * silu(z), the output gating, du / ddelta / dz) is computed there, once per element, by
// threads that each own distinct elements; the state loops only do per-state work.
//
// exp.  a = exp2(dt * A2) with A2 = A log2(e) folded in once per thread, one MUFU.EX2
// (ex2.approx.ftz, relative error < 2^-22 by the PTX ISA; the emulation test injects that error and
// stays within the fp32 tolerances, twice over).  The backward evaluates it three times per element-state (the
// checkpoint sweep, the sub-tile recompute, the reverse step) -- 2 instructions each -- rather than
// holding 64 more registers of history (where they fit, N <= 8, the recomputed factors are kept).
//
// Backward and determinism.  Grid (n_slots, ngroups, batch): block `slot` owns the slices slot,
// slot + n_slots, ...  It walks the chunks of kScanChunk steps in reverse and, in each, its slices in
// order (a slice's gradient carry and sums go through global memory from one chunk to the next),
// staging the chunk's dt and dt u once for both passes: from the chunk's checkpoint it
// recomputes the state at the start of every sub-tile of kBwdT steps (local memory), then, sub-tile
// by sub-tile in reverse, recomputes the sub-tile's states into registers and runs the reverse
// recurrence over them.  dB / dC of a step (sums over channels) are
// reduced inside each warp (reduce-scatter), written per warp to shared memory (no atomics), summed
// over the 4 warps in warp order, and added to the slot's own fp32 partial (batch, group, slot, L, N)
// -- the slot's first slice stores, the next ones add, in slice order; chunk-outer keeps that
// read-add-write within a 64-step window that stays in L2.  The caller sums the partials
// over slots.  No atomics anywhere: every output is bit-reproducible.  Sums over time and batch (dA,
// dD, ddelta_bias) are per-(batch, channel) partials summed by the caller.
//
// Edges: channels past the group, states past N and steps past L are staged as dt = dt u = dy = B = C
// = 0 and A = 0; then a = 1 and the state, the gradient carry and every contribution stay exactly 0
// there, and nothing is stored for them.  All arithmetic is fp32, all global offsets int64.
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

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kVec = 4;  // elements per vector load / store along L

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
  static constexpr int kLanes = scan_lanes_per_channel(kNState);  // threads per channel
  static constexpr int kStates = kNState / kLanes;                // states per thread
  static constexpr int kThreads = kScanThreads;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kChans = kThreads / kLanes;  // channels per block (a slice)
  // B / C tiles are [step][state] with this pitch: a multiple of 4 floats, so a thread's states of a
  // step are 8- or 16-byte aligned for vector shared-memory loads.
  static constexpr int kBP = kNState + 4;
  // Forward tile: three channel tiles of kChans x (kFwdT + 1) within 32 KiB, B / C within 18 KiB.
  static constexpr int kFwdT =
      const_min(kScanChunk, const_min(pow2_floor(2730 / kChans - 1), pow2_floor(2304 / kBP)));
  // Backward sub-tile: its kBwdT x kStates states stay in registers (64 at most); 4 steps at N = 256
  // keep the per-warp dB / dC tiles within the shared-memory budget.
  static constexpr int kBwdT = kNState >= 256 ? 4 : 8;
  static constexpr int kSubTiles = kScanChunk / kBwdT;
  static_assert(kLanes <= 32 && (kLanes & (kLanes - 1)) == 0, "lanes per channel must be a power of two <= 32");
  static_assert(kNState % kLanes == 0 && kStates >= 1 && kStates <= 8, "bad state split");
  // Keep the sub-tile's decay factors in registers too (one exp2 less per element-state in the
  // backward) where they fit without lowering occupancy: kStates * kBwdT <= 16 (N <= 8).
  static constexpr bool kBwdKeepA = kStates * kBwdT <= 16;
  // Backward blocks per SM the register allocation must allow (<= 168 registers): the grid has at
  // most B * G * 48 blocks at the reference shape (the slot bound, 384 at (8, 1)), 2.9 per SM.
  static constexpr int kBwdMinBlocks = 3;
  static_assert(kFwdT >= kVec && kScanChunk % kFwdT == 0 && kScanChunk % kBwdT == 0 && kBwdT % kVec == 0,
                "tiles must be whole vectors and divide the checkpoint chunk");
};

// Static shared memory of the kernels below (fp32 words), checked for every state size even when
// only some are compiled: a kernel over 48 KiB would not launch.
template <int kNState>
constexpr int fwd_smem_words() {
  using T = ScanTraits<kNState>;
  return 3 * T::kChans * (T::kFwdT + 1) + 2 * T::kFwdT * T::kBP;
}
template <int kNState>
constexpr int bwd_smem_words() {
  using T = ScanTraits<kNState>;
  return 4 * T::kChans * (T::kBwdT + 1) + 2 * T::kChans * (kScanChunk + 1) + 2 * T::kBwdT * T::kBP +
         2 * T::kWarps * T::kBwdT * kNState + 2 * T::kThreads;
}
#define COMPRESSM_SCAN_CHECK_SMEM(K)                                                          \
  static_assert(4 * fwd_smem_words<K>() <= 48 * 1024 && 4 * bwd_smem_words<K>() <= 48 * 1024, \
                "selective scan: static shared memory over 48 KiB");
COMPRESSM_SCAN_ALL_NSTATES(COMPRESSM_SCAN_CHECK_SMEM)
#undef COMPRESSM_SCAN_CHECK_SMEM

// 2^x with one MUFU.EX2 (flushes results below 2^-126 to 0, which a decay factor may do).
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// torch.nn.functional.softplus (threshold 20); log1pf keeps tiny exp(x) accurate.
__device__ __forceinline__ float softplus_f(float x) { return x > 20.f ? x : log1pf(exp2_approx(x * kLog2e)); }

// 1 / (1 + e^-x); IEEE division, so that e^-x = inf gives exactly 0.
__device__ __forceinline__ float sigmoid_f(float x) { return 1.f / (1.f + exp2_approx(-x * kLog2e)); }

template <typename T>
struct alignas(kVec * sizeof(T)) Vec {
  T x[kVec];
};

// Elements [idx, idx + kVec) of a row with `remaining` elements left from idx, as fp32; 0 past the
// row's end.  One vector load when the row is aligned (vec_ok) and whole here.
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, int64_t idx, int remaining, bool vec_ok, float (&v)[kVec]) {
  if (vec_ok && remaining >= kVec) {
    const Vec<T> w = *reinterpret_cast<const Vec<T>*>(p + idx);
#pragma unroll
    for (int e = 0; e < kVec; ++e) v[e] = static_cast<float>(w.x[e]);
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e) v[e] = e < remaining ? static_cast<float>(p[idx + e]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, int64_t idx, int remaining, bool vec_ok, const float (&v)[kVec]) {
  if (vec_ok && remaining >= kVec) {
    Vec<T> w;
#pragma unroll
    for (int e = 0; e < kVec; ++e) w.x[e] = static_cast<T>(v[e]);
    *reinterpret_cast<Vec<T>*>(p + idx) = w;
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      if (e < remaining) p[idx + e] = static_cast<T>(v[e]);
    }
  }
}

// A thread's kStates contiguous fp32 values of one shared-memory row, with float4 / float2 loads.
template <int kStates>
__device__ __forceinline__ void load_states(const float* row, float (&v)[kStates]) {
  if constexpr (kStates % 4 == 0) {
#pragma unroll
    for (int k = 0; k < kStates; k += 4) {
      const float4 w = *reinterpret_cast<const float4*>(row + k);
      v[k] = w.x;
      v[k + 1] = w.y;
      v[k + 2] = w.z;
      v[k + 3] = w.w;
    }
  } else if constexpr (kStates % 2 == 0) {
#pragma unroll
    for (int k = 0; k < kStates; k += 2) {
      const float2 w = *reinterpret_cast<const float2*>(row + k);
      v[k] = w.x;
      v[k + 1] = w.y;
    }
  } else {
#pragma unroll
    for (int k = 0; k < kStates; ++k) v[k] = row[k];
  }
}

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
// offsets sum the whole slice and only lanes with those bits 0 keep `writer`.  Deterministic: the
// order of every addition depends only on the lane ids.
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

// Where a block's threads sit for one slice: batch b, group g, first channel j0 (within the group)
// of the slice; thread's channel c (in the slice), lane within the channel, global channel d.
struct Coords {
  int b, g, j0, c, lane, warp_lane;
  bool chan_ok;
  int d;
};

template <typename Traits>
__device__ __forceinline__ Coords slice_coords(const SelectiveScanFwdParams& p, int slice) {
  Coords co;
  co.b = blockIdx.z;
  co.g = blockIdx.y;
  co.j0 = slice * Traits::kChans;
  co.c = threadIdx.x / Traits::kLanes;
  co.lane = threadIdx.x % Traits::kLanes;
  co.warp_lane = threadIdx.x % 32;
  co.chan_ok = co.j0 + co.c < p.dim_per_group;
  co.d = co.g * p.dim_per_group + co.j0 + co.c;
  return co;
}

// Offset of element t of channel-row (b, g * dim_per_group + jj).
__device__ __forceinline__ int64_t row_offset(const SelectiveScanFwdParams& p, int b, int g, int jj) {
  return (static_cast<int64_t>(b) * p.dim + g * p.dim_per_group + jj) * p.seqlen;
}

// Stages the slice's per-channel values of steps [t0, t0 + kT): dt (bias and softplus applied) and
// dt * u, as fp32 tiles of pitch kT + 1 (odd: a column of channels hits distinct banks).  One thread
// per 4-element vector of a row; entries past L or past the group are 0.
template <typename Traits, int kT, typename input_t>
__device__ __forceinline__ void stage_channels(const SelectiveScanFwdParams& p, const Coords& co, int t0,
                                               float* s_dt, float* s_dtu) {
  constexpr int kPitch = kT + 1, kVecs = kT / kVec;
  const input_t* u = static_cast<const input_t*>(p.u_ptr);
  const input_t* delta = static_cast<const input_t*>(p.delta_ptr);
  for (int i = threadIdx.x; i < Traits::kChans * kVecs; i += Traits::kThreads) {
    const int cc = i / kVecs, t = t0 + (i % kVecs) * kVec, jj = co.j0 + cc;
    const int remaining = jj < p.dim_per_group ? p.seqlen - t : 0;
    float uv[kVec] = {}, xv[kVec] = {};
    float bias = 0.f;
    if (remaining > 0) {
      const int64_t idx = row_offset(p, co.b, co.g, jj) + t;
      load_vec(u, idx, remaining, p.vec_ok, uv);
      load_vec(delta, idx, remaining, p.vec_ok, xv);
      if (p.has_delta_bias) bias = p.delta_bias_ptr[co.g * p.dim_per_group + jj];
    }
    float* dst_dt = s_dt + cc * kPitch + (i % kVecs) * kVec;
    float* dst_dtu = s_dtu + cc * kPitch + (i % kVecs) * kVec;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      float dt = 0.f;
      if (e < remaining) {
        dt = xv[e] + bias;
        if (p.delta_softplus) dt = softplus_f(dt);
      }
      dst_dt[e] = dt;
      dst_dtu[e] = dt * uv[e];
    }
  }
}

// Stages B (and C when kWithC) of steps [t0, t0 + kT) as [step][state] tiles of pitch kBP; states
// past N and steps past L are 0.
template <typename Traits, int kT, typename input_t, bool kWithC>
__device__ __forceinline__ void stage_bc(const SelectiveScanFwdParams& p, const Coords& co, int t0, float* s_B,
                                         float* s_C) {
  constexpr int kVecs = kT / kVec;
  const input_t* B = static_cast<const input_t*>(p.B_ptr);
  const input_t* C = static_cast<const input_t*>(p.C_ptr);
  const int64_t plane = (static_cast<int64_t>(co.b) * p.ngroups + co.g) * p.dstate * p.seqlen;
  for (int i = threadIdx.x; i < Traits::kNState * kVecs; i += Traits::kThreads) {
    const int n = i / kVecs, tt = (i % kVecs) * kVec;
    const int remaining = n < p.dstate ? p.seqlen - (t0 + tt) : 0;
    float bv[kVec] = {}, cv[kVec] = {};
    if (remaining > 0) {
      const int64_t idx = plane + static_cast<int64_t>(n) * p.seqlen + t0 + tt;
      load_vec(B, idx, remaining, p.vec_ok, bv);
      if constexpr (kWithC) load_vec(C, idx, remaining, p.vec_ok, cv);
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      s_B[(tt + e) * Traits::kBP + n] = bv[e];
      if constexpr (kWithC) s_C[(tt + e) * Traits::kBP + n] = cv[e];
    }
  }
}

// A * log2(e) of the thread's states (0 for states past N and channels past the group).
template <typename Traits>
__device__ __forceinline__ void load_A2(const SelectiveScanFwdParams& p, const Coords& co,
                                        float (&A2)[Traits::kStates]) {
#pragma unroll
  for (int k = 0; k < Traits::kStates; ++k) {
    const int n = co.lane * Traits::kStates + k;
    A2[k] = (co.chan_ok && n < p.dstate) ? p.A_ptr[static_cast<int64_t>(co.d) * p.dstate + n] * kLog2e : 0.f;
  }
}

template <int kNState, bool kHasZ, typename input_t>
__global__ void __launch_bounds__(kScanThreads) selective_scan_fwd_kernel(const SelectiveScanFwdParams p) {
  using Traits = ScanTraits<kNState>;
  constexpr int kStates = Traits::kStates, kChans = Traits::kChans;
  constexpr int kT = Traits::kFwdT, kCP = kT + 1, kBP = Traits::kBP, kVecs = kT / kVec;

  __shared__ float s_dt[kChans * kCP];
  __shared__ float s_dtu[kChans * kCP];
  __shared__ float s_y[kChans * kCP];
  __shared__ __align__(16) float s_B[kT * kBP];
  __shared__ __align__(16) float s_C[kT * kBP];

  const Coords co = slice_coords<Traits>(p, blockIdx.x);
  const int L = p.seqlen, N = p.dstate;
  const input_t* u = static_cast<const input_t*>(p.u_ptr);
  const input_t* z = static_cast<const input_t*>(p.z_ptr);
  input_t* out = static_cast<input_t*>(p.out_ptr);

  float A2[kStates], h[kStates];
  load_A2<Traits>(p, co, A2);
#pragma unroll
  for (int k = 0; k < kStates; ++k) h[k] = 0.f;
  const int64_t state_row = (static_cast<int64_t>(co.b) * p.dim + co.d) * N;  // valid when chan_ok
  const int n0 = co.lane * kStates;

  for (int t0 = 0; t0 < L; t0 += kT) {
    if (t0 % kScanChunk == 0 && co.chan_ok) {
      float* ckpt = p.checkpoints_ptr + (static_cast<int64_t>(co.b) * p.dim + co.d) * p.n_chunks * N +
                    static_cast<int64_t>(t0 / kScanChunk) * N;
#pragma unroll
      for (int k = 0; k < kStates; ++k) {
        if (n0 + k < N) ckpt[n0 + k] = h[k];
      }
    }
    __syncthreads();  // the previous tile is fully read and written back
    stage_channels<Traits, kT, input_t>(p, co, t0, s_dt, s_dtu);
    stage_bc<Traits, kT, input_t, true>(p, co, t0, s_B, s_C);
    __syncthreads();

#pragma unroll 4
    for (int tt = 0; tt < kT; ++tt) {
      const float dt = s_dt[co.c * kCP + tt];
      const float dtu = s_dtu[co.c * kCP + tt];
      float Bv[kStates], Cv[kStates];
      load_states<kStates>(s_B + tt * kBP + n0, Bv);
      load_states<kStates>(s_C + tt * kBP + n0, Cv);
      float y = 0.f;
#pragma unroll
      for (int k = 0; k < kStates; ++k) {
        h[k] = fmaf(exp2_approx(dt * A2[k]), h[k], dtu * Bv[k]);
        y = fmaf(h[k], Cv[k], y);
      }
      y = sum_channel_lanes<Traits::kLanes>(y);
      if (co.lane == 0) s_y[co.c * kCP + tt] = y;
    }
    __syncthreads();

    // out = (y + D u) silu(z), one thread per vector of a row.
    for (int i = threadIdx.x; i < kChans * kVecs; i += Traits::kThreads) {
      const int cc = i / kVecs, t = t0 + (i % kVecs) * kVec, jj = co.j0 + cc;
      if (jj >= p.dim_per_group || t >= L) continue;
      const int64_t idx = row_offset(p, co.b, co.g, jj) + t;
      const float Dv = p.has_D ? p.D_ptr[co.g * p.dim_per_group + jj] : 0.f;
      float uv[kVec], zv[kVec] = {}, o[kVec];
      load_vec(u, idx, L - t, p.vec_ok, uv);
      if constexpr (kHasZ) load_vec(z, idx, L - t, p.vec_ok, zv);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        o[e] = s_y[cc * kCP + (i % kVecs) * kVec + e] + Dv * uv[e];
        if constexpr (kHasZ) o[e] *= zv[e] * sigmoid_f(zv[e]);
      }
      store_vec(out, idx, L - t, p.vec_ok, o);
    }
  }
  if (co.chan_ok) {
#pragma unroll
    for (int k = 0; k < kStates; ++k) {
      if (n0 + k < N) p.last_state_ptr[state_row + n0 + k] = h[k];
    }
  }
}

template <int kNState, bool kHasZ, typename input_t>
__global__ void __launch_bounds__(kScanThreads, ScanTraits<kNState>::kBwdMinBlocks) selective_scan_bwd_kernel(const SelectiveScanBwdParams p) {
  using Traits = ScanTraits<kNState>;
  constexpr int kLanes = Traits::kLanes, kStates = Traits::kStates, kChans = Traits::kChans;
  constexpr int kWarps = Traits::kWarps, kThreads = Traits::kThreads;
  constexpr int kT = Traits::kBwdT, kCP = kT + 1, kBP = Traits::kBP, kVecs = kT / kVec;
  constexpr int kCPc = kScanChunk + 1;  // pitch of the chunk-wide dt / dt u tiles
  constexpr int kOut = scatter_size(kStates, kLanes);
  constexpr bool kKeepA = Traits::kBwdKeepA;
  static_assert(kChans * kVecs <= kThreads, "one write-back vector per thread");

  __shared__ float s_dtc[kChans * kCPc];   // dt of the chunk (staged once per chunk, read by both passes)
  __shared__ float s_dtuc[kChans * kCPc];  // dt u of the chunk
  __shared__ float s_dy[kChans * kCP];     // dy = dout silu(z) of the sub-tile
  __shared__ float s_y[kChans * kCP];      // y - D u of the step (kHasZ: dz needs it)
  __shared__ float s_gB[kChans * kCP];     // <g, B>
  __shared__ float s_gAh[kChans * kCP];    // sum_n g a h_{t-1} A2 (log2 units)
  __shared__ __align__(16) float s_B[kT * kBP];
  __shared__ __align__(16) float s_C[kT * kBP];
  __shared__ float s_dB[kWarps * kT * kNState];  // [warp][step][state]: each warp's channel sums
  __shared__ float s_dC[kWarps * kT * kNState];
  __shared__ float s_acc[2 * kThreads];  // dD / ddelta_bias per write-back vector, per (chunk, slice)

  const int L = p.seqlen, N = p.dstate, slot = blockIdx.x;
  const int warp = threadIdx.x / 32;
  const input_t* u = static_cast<const input_t*>(p.u_ptr);
  const input_t* delta = static_cast<const input_t*>(p.delta_ptr);
  const input_t* z = static_cast<const input_t*>(p.z_ptr);
  const input_t* dout = static_cast<const input_t*>(p.dout_ptr);
  input_t* du_out = static_cast<input_t*>(p.du_ptr);
  input_t* ddelta_out = static_cast<input_t*>(p.ddelta_ptr);
  input_t* dz_out = static_cast<input_t*>(p.dz_ptr);
  const int64_t part_plane =
      ((static_cast<int64_t>(blockIdx.z) * p.ngroups + blockIdx.y) * p.n_slots + slot) * L * N;
  // The write-back role: thread i < kChans * kVecs owns vector (i % kVecs) of channel i / kVecs of
  // every sub-tile; it stages that vector's dy and later writes its du / ddelta / dz.
  const int wb_c = threadIdx.x / kVecs, wb_v = (threadIdx.x % kVecs) * kVec;
  const bool wb_thread = threadIdx.x < kChans * kVecs;

  // Chunks outer, slices inner: the slot's dB / dC partial is read-added-written only within the
  // current chunk's 64 x N window, which stays in L2 while the block walks its slices.  A slice's
  // carries between chunks (gradient carry, dA / dD / ddelta_bias sums) go through global memory.
  for (int chunk = p.n_chunks - 1; chunk >= 0; --chunk) {
    const bool first_chunk = chunk == p.n_chunks - 1;  // the first one walked
    const int tc0 = chunk * kScanChunk;
    const int n_sub = (const_min(tc0 + kScanChunk, L) - tc0 + kT - 1) / kT;
    for (int slice = slot; slice < p.n_slices; slice += p.n_slots) {
      const bool first_slice = slice == slot;
      const Coords co = slice_coords<Traits>(p, slice);
      const int n0 = co.lane * kStates;
      const int64_t state_row = (static_cast<int64_t>(co.b) * p.dim + co.d) * N;  // valid when chan_ok
      float A2[kStates];
      load_A2<Traits>(p, co, A2);
      const int wb_j = co.j0 + wb_c;
      const bool wb_ok = wb_thread && wb_j < p.dim_per_group;
      const int wb_d = co.g * p.dim_per_group + wb_j;
      const float wb_D = (wb_ok && p.has_D) ? p.D_ptr[wb_d] : 0.f;
      const float wb_bias = (wb_ok && p.has_delta_bias) ? p.delta_bias_ptr[wb_d] : 0.f;

      float g_carry[kStates], dA_acc[kStates];
#pragma unroll
      for (int k = 0; k < kStates; ++k) {
        const bool ok = !first_chunk && co.chan_ok && n0 + k < N;
        g_carry[k] = ok ? p.g_carry_ptr[state_row + n0 + k] : 0.f;
        dA_acc[k] = ok ? p.dA_part_ptr[state_row + n0 + k] : 0.f;
      }
      float dD_acc = 0.f, dbias_acc = 0.f;  // this chunk's, of the thread's write-back vector
      // State at the start of each sub-tile of the chunk (dynamically indexed: local memory).
      float sub_h[Traits::kSubTiles][kStates];

      // The chunk's dt and dt u, once for both passes (softplus is the costliest per-element step).
      __syncthreads();
      stage_channels<Traits, kScanChunk, input_t>(p, co, tc0, s_dtc, s_dtuc);

      // Pass 1: from the chunk's checkpoint, the state before every sub-tile.
      float h[kStates];
      const float* ckpt = p.checkpoints_ptr + (static_cast<int64_t>(co.b) * p.dim + co.d) * p.n_chunks * N +
                          static_cast<int64_t>(chunk) * N;
#pragma unroll
      for (int k = 0; k < kStates; ++k) h[k] = (co.chan_ok && n0 + k < N) ? ckpt[n0 + k] : 0.f;
      for (int s = 0; s < n_sub; ++s) {
#pragma unroll
        for (int k = 0; k < kStates; ++k) sub_h[s][k] = h[k];
        if (s == n_sub - 1) break;  // the state after the chunk's last sub-tile is not needed
        __syncthreads();
        stage_bc<Traits, kT, input_t, false>(p, co, tc0 + s * kT, s_B, nullptr);
        __syncthreads();
#pragma unroll
        for (int tt = 0; tt < kT; ++tt) {
          const int ci = co.c * kCPc + s * kT + tt;
          const float dt = s_dtc[ci], dtu = s_dtuc[ci];
          float Bv[kStates];
          load_states<kStates>(s_B + tt * kBP + n0, Bv);
#pragma unroll
          for (int k = 0; k < kStates; ++k) h[k] = fmaf(exp2_approx(dt * A2[k]), h[k], dtu * Bv[k]);
        }
      }

      // Pass 2: sub-tiles in reverse.
      for (int s = n_sub - 1; s >= 0; --s) {
        const int t0 = tc0 + s * kT;
        __syncthreads();
        // dy of the write-back vector (0 past L and past the group).
        const int wb_t = t0 + wb_v;
        const int wb_rem = wb_ok ? L - wb_t : 0;
        const int64_t wb_idx = wb_ok ? row_offset(p, co.b, co.g, wb_j) + wb_t : 0;
        if (wb_thread) {
          float dov[kVec] = {}, zv[kVec] = {};
          if (wb_rem > 0) {
            load_vec(dout, wb_idx, wb_rem, p.vec_ok, dov);
            if constexpr (kHasZ) load_vec(z, wb_idx, wb_rem, p.vec_ok, zv);
          }
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            float dy = dov[e];
            if constexpr (kHasZ) dy *= zv[e] * sigmoid_f(zv[e]);
            s_dy[wb_c * kCP + wb_v + e] = dy;
          }
        }
        stage_bc<Traits, kT, input_t, true>(p, co, t0, s_B, s_C);
        __syncthreads();

        // hist[tt] = state before step t0 + tt (and its decay factor when kept); hc ends as the state
        // after the sub-tile's last step.
        float hist[kT][kStates], hist_a[kKeepA ? kT : 1][kStates], hc[kStates];
#pragma unroll
        for (int k = 0; k < kStates; ++k) hc[k] = sub_h[s][k];
#pragma unroll
        for (int tt = 0; tt < kT; ++tt) {
          const int ci = co.c * kCPc + s * kT + tt;
          const float dt = s_dtc[ci], dtu = s_dtuc[ci];
          float Bv[kStates];
          load_states<kStates>(s_B + tt * kBP + n0, Bv);
#pragma unroll
          for (int k = 0; k < kStates; ++k) {
            const float a = exp2_approx(dt * A2[k]);
            if constexpr (kKeepA) hist_a[tt][k] = a;
            hist[tt][k] = hc[k];
            hc[k] = fmaf(a, hc[k], dtu * Bv[k]);
          }
        }

#pragma unroll
        for (int tt = kT - 1; tt >= 0; --tt) {
          const int ci = co.c * kCP + tt, cic = co.c * kCPc + s * kT + tt;
          const float dt = s_dtc[cic], dtu = s_dtuc[cic], dy = s_dy[ci];
          float Bv[kStates], Cv[kStates];
          load_states<kStates>(s_B + tt * kBP + n0, Bv);
          load_states<kStates>(s_C + tt * kBP + n0, Cv);
          if constexpr (kHasZ) {
            float y = 0.f;
#pragma unroll
            for (int k = 0; k < kStates; ++k) y = fmaf(hc[k], Cv[k], y);
            y = sum_channel_lanes<kLanes>(y);
            if (co.lane == 0) s_y[ci] = y;
          }
          float gB = 0.f, gAh = 0.f, vb[kStates], vc[kStates];
#pragma unroll
          for (int k = 0; k < kStates; ++k) {
            const float gk = fmaf(dy, Cv[k], g_carry[k]);
            float a;
            if constexpr (kKeepA) {
              a = hist_a[tt][k];
            } else {
              a = exp2_approx(dt * A2[k]);
            }
            const float ga = gk * a;
            const float gah = ga * hist[tt][k];
            gB = fmaf(gk, Bv[k], gB);
            gAh = fmaf(gah, A2[k], gAh);
            dA_acc[k] = fmaf(gah, dt, dA_acc[k]);
            vb[k] = gk * dtu;
            vc[k] = hc[k] * dy;
            g_carry[k] = ga;
            hc[k] = hist[tt][k];
          }
          gB = sum_channel_lanes<kLanes>(gB);
          gAh = sum_channel_lanes<kLanes>(gAh);
          if (co.lane == 0) {
            s_gB[ci] = gB;
            s_gAh[ci] = gAh;
          }

          // dB_t, dC_t of this step: sums over the warp's channels, one row per warp.
          int k0 = 0, k0c = 0;
          bool writer = true, writer_c = true;
          reduce_scatter_channels<kStates, kLanes>(vb, co.warp_lane, k0, writer);
          reduce_scatter_channels<kStates, kLanes>(vc, co.warp_lane, k0c, writer_c);
          if (writer) {
#pragma unroll
            for (int i = 0; i < kOut; ++i) {
              s_dB[(warp * kT + tt) * kNState + n0 + k0 + i] = vb[i];
              s_dC[(warp * kT + tt) * kNState + n0 + k0 + i] = vc[i];
            }
          }
        }
        __syncthreads();

        // Per-element gradients of the write-back vector; its dD / ddelta_bias sums.
        if (wb_rem > 0) {
          float uv[kVec], xv[kVec], dov[kVec], zv[kVec] = {}, du[kVec], ddl[kVec], dz[kVec];
          load_vec(u, wb_idx, wb_rem, p.vec_ok, uv);
          load_vec(delta, wb_idx, wb_rem, p.vec_ok, xv);
          if constexpr (kHasZ) {  // reloaded (cache hits) rather than held in registers over the scan
            load_vec(dout, wb_idx, wb_rem, p.vec_ok, dov);
            load_vec(z, wb_idx, wb_rem, p.vec_ok, zv);
          }
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            const int si = wb_c * kCP + wb_v + e;
            const float gB = s_gB[si], dy = s_dy[si];
            du[e] = s_dtc[wb_c * kCPc + s * kT + wb_v + e] * gB + dy * wb_D;
            float ddt = uv[e] * gB + kLn2 * s_gAh[si];
            if (p.delta_softplus) ddt *= sigmoid_f(xv[e] + wb_bias);
            ddl[e] = ddt;
            dz[e] = 0.f;
            if constexpr (kHasZ) {
              const float sz = sigmoid_f(zv[e]);
              dz[e] = dov[e] * (s_y[si] + wb_D * uv[e]) * sz * (1.f + zv[e] * (1.f - sz));
            }
            if (e < wb_rem) {
              dD_acc += dy * uv[e];
              dbias_acc += ddt;
            }
          }
          store_vec(du_out, wb_idx, wb_rem, p.vec_ok, du);
          store_vec(ddelta_out, wb_idx, wb_rem, p.vec_ok, ddl);
          if constexpr (kHasZ) store_vec(dz_out, wb_idx, wb_rem, p.vec_ok, dz);
        }

        // dB / dC of the sub-tile: the warps' rows summed in warp order, added to the slot's partial.
        for (int i = threadIdx.x; i < kT * kNState; i += kThreads) {
          const int tt = i / kNState, n = i % kNState, t = t0 + tt;
          if (n >= N || t >= L) continue;
          float sb = 0.f, sc = 0.f;
#pragma unroll
          for (int w = 0; w < kWarps; ++w) {
            sb += s_dB[(w * kT + tt) * kNState + n];
            sc += s_dC[(w * kT + tt) * kNState + n];
          }
          const int64_t idx = part_plane + static_cast<int64_t>(t) * N + n;
          if (first_slice) {
            p.dB_part_ptr[idx] = sb;
            p.dC_part_ptr[idx] = sc;
          } else {
            p.dB_part_ptr[idx] += sb;
            p.dC_part_ptr[idx] += sc;
          }
        }
      }

      // The slice's carries to the next (earlier) chunk; dD / ddelta_bias: this chunk's write-back
      // vectors of a channel summed in vector order, added to the running sums.
      if (co.chan_ok) {
#pragma unroll
        for (int k = 0; k < kStates; ++k) {
          if (n0 + k < N) {
            p.g_carry_ptr[state_row + n0 + k] = g_carry[k];
            p.dA_part_ptr[state_row + n0 + k] = dA_acc[k];
          }
        }
      }
      __syncthreads();
      s_acc[threadIdx.x] = dD_acc;
      s_acc[kThreads + threadIdx.x] = dbias_acc;
      __syncthreads();
      if (threadIdx.x < kChans && co.j0 + threadIdx.x < p.dim_per_group) {
        float sD = 0.f, sb = 0.f;
#pragma unroll
        for (int v = 0; v < kVecs; ++v) {
          sD += s_acc[threadIdx.x * kVecs + v];
          sb += s_acc[kThreads + threadIdx.x * kVecs + v];
        }
        const int64_t bd = static_cast<int64_t>(co.b) * p.dim + co.g * p.dim_per_group + co.j0 + threadIdx.x;
        if (p.has_D) p.dD_part_ptr[bd] = first_chunk ? sD : p.dD_part_ptr[bd] + sD;
        if (p.has_delta_bias) p.ddelta_bias_part_ptr[bd] = first_chunk ? sb : p.ddelta_bias_part_ptr[bd] + sb;
      }
    }
  }

  // L = 0: no chunk wrote the per-channel sums; they are zero.
  if (p.n_chunks == 0) {
    for (int slice = slot; slice < p.n_slices; slice += p.n_slots) {
      const Coords co = slice_coords<Traits>(p, slice);
      if (co.chan_ok) {
        for (int k = 0; k < kStates; ++k) {
          if (co.lane * kStates + k < N) p.dA_part_ptr[(static_cast<int64_t>(co.b) * p.dim + co.d) * N + co.lane * kStates + k] = 0.f;
        }
        if (co.lane == 0 && p.has_D) p.dD_part_ptr[static_cast<int64_t>(co.b) * p.dim + co.d] = 0.f;
        if (co.lane == 0 && p.has_delta_bias) p.ddelta_bias_part_ptr[static_cast<int64_t>(co.b) * p.dim + co.d] = 0.f;
      }
    }
  }
}

template <int kNState, typename input_t>
void launch_fwd(const SelectiveScanFwdParams& p, cudaStream_t stream) {
  using Traits = ScanTraits<kNState>;
  TORCH_CHECK(p.n_slices == (p.dim_per_group + Traits::kChans - 1) / Traits::kChans,
              "selective scan: n_slices does not match the kernel's channels per block");
  const dim3 grid(p.n_slices, p.ngroups, p.batch);
  COMPRESSM_BOOL_SWITCH(p.has_z, kHasZ, [&] {
    selective_scan_fwd_kernel<kNState, kHasZ, input_t><<<grid, Traits::kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <int kNState, typename input_t>
void launch_bwd(const SelectiveScanBwdParams& p, cudaStream_t stream) {
  using Traits = ScanTraits<kNState>;
  TORCH_CHECK(p.n_slices == (p.dim_per_group + Traits::kChans - 1) / Traits::kChans,
              "selective scan: n_slices does not match the kernel's channels per block");
  TORCH_CHECK(p.n_slots >= 1 && p.n_slots <= p.n_slices, "selective scan: n_slots must be in [1, n_slices]");
  const dim3 grid(p.n_slots, p.ngroups, p.batch);
  COMPRESSM_BOOL_SWITCH(p.has_z, kHasZ, [&] {
    selective_scan_bwd_kernel<kNState, kHasZ, input_t><<<grid, Traits::kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace scan
}  // namespace compressm_mamba

// The smallest compiled state size >= N serves N (scan_kernel_nstate, selective_scan.h).
template <typename input_t>
void selective_scan_fwd_cuda(const SelectiveScanFwdParams& params, cudaStream_t stream) {
  TORCH_CHECK(params.dstate >= 1 && params.dstate <= kScanMaxNState, "selective scan: N must be in [1, ",
              kScanMaxNState, "], got ", params.dstate);
  if (params.batch == 0 || params.dim == 0) return;
  const int k = scan_kernel_nstate(params.dstate);
#define COMPRESSM_SCAN_FWD_CASE(K)                                 \
  if (k == K) {                                                    \
    compressm_mamba::scan::launch_fwd<K, input_t>(params, stream); \
    return;                                                        \
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
  const int k = scan_kernel_nstate(params.dstate);
#define COMPRESSM_SCAN_BWD_CASE(K)                                 \
  if (k == K) {                                                    \
    compressm_mamba::scan::launch_bwd<K, input_t>(params, stream); \
    return;                                                        \
  }
  COMPRESSM_SCAN_FOR_EACH_NSTATE(COMPRESSM_SCAN_BWD_CASE)
#undef COMPRESSM_SCAN_BWD_CASE
  TORCH_CHECK(false, "selective scan: no kernel for N = ", params.dstate);
}
