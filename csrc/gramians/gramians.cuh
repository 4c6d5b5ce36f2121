// Token sums of the `frozen` and `ltv` Gramian estimators (METHOD.md §3, docs/ltv_closed_form.md).
//
// Per channel d and token t (specification: compressm_mamba/reference/gramians.py):
//   dt_t = softplus?(delta_t + bias_d),  a_t = exp(dt_t A_d),  e_t = -expm1(dt_t A_d),
//   b_t = dt_t B_t[g],  c_t = C_t[g],  g = d / (dim / ngroups);
//   a padding token (mask false) is removed: dt = 0 (so a = 1, e = 0, b = 0) and c = 0, not summed.
//   frozen: P_sum = sum_t (b_t b_t^T) / (e_i + e_j - e_i e_j)   (0 where the denominator is 0)
//   ltv:    P_t = (a_t a_t^T) * P_{t-1} + b_t b_t^T,  Q_t = (a_{t+1} a_{t+1}^T) * Q_{t+1} + c_t c_t^T,
//           P_sum = sum over real tokens of P_t, Q_sum likewise (per sequence, summed over the batch).
//
// One launch.  Grid (channel blocks, upper-triangle output tiles); a block of 256 threads owns kChans
// channels and one kBN x kBN tile (ti <= tj) of their N x N outputs, each thread a kM x kM micro-tile
// in fp32 registers.  The batch and the tokens are walked inside the block, so there are no atomics
// and no host synchronisation, and the result is bit-reproducible.  Tokens go through shared memory
// in tiles of kT: first the per-token scalars (dt, keep), then the per-(state, token) factors of the
// tile's kBN rows and kBN columns (global reads contiguous along L), then the update.
//
// - ltv, general A: entry (i, j) of P_t depends only on entry (i, j) of P_{t-1}, so each thread runs
//   the recurrences of its own entries, P forward in time, then Q backward.
// - constant_rows (A_i = A for all i, Mamba2 heads): every per-token factor is a scalar, so
//   P_sum = sum_s p_s B_s B_s^T and Q_sum = sum_s q_s C_s C_s^T.  ltv: p_s = dt_s^2 w_s,
//   w_s = keep_s + exp(2 A dt_{s+1}) w_{s+1}; q_s = keep_s v_s, v_s = keep_s + exp(2 A dt_s) v_{s-1}
//   (one thread per channel runs these scalar scans over each tile); frozen: p_s = dt_s^2 / den_s,
//   q_s = keep_s / den_s, den_s = 2 e_s - e_s^2.  Rows are staged pre-scaled by sqrt(p_s) / sqrt(q_s)
//   and the update is one multiply-add per entry and token.
//
// Symmetry: only entries i <= j are stored from a tile, each also at (j, i), so every one of the N^2
// outputs is written exactly once and P, Q are exactly symmetric.
#pragma once

#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "gramians.h"

namespace compressm_mamba {
namespace gram {

enum Pass { kPassP = 0, kPassQ = 1, kPassFrozen = 2 };

template <int kBN_, int kM_, bool kLtv_, bool kConstRows_>
struct GramTraits {
  static constexpr int kBN = kBN_;  // side of the output tile
  static constexpr int kM = kM_;    // side of a thread's micro-tile
  static constexpr bool kLtv = kLtv_, kConstRows = kConstRows_;
  static constexpr int kSide = kBN / kM;
  static constexpr int kTileThreads = kSide * kSide;
  static constexpr int kThreads = 256;
  static constexpr int kChans = kThreads / kTileThreads;  // channels per block
  // Staged factors per (state, token): frozen needs e, b, c; ltv a and b (P) or a and c (Q);
  // constant rows the scaled B and C.
  static constexpr int kArrays = (!kConstRows && !kLtv) ? 3 : 2;
  static constexpr int kT = kArrays == 3 ? 16 : 32;  // tokens per tile
  static constexpr int kRows = 2 * kBN;              // the tile's rows, then its columns
  static constexpr int kRowPitch = kRows + 1;        // odd: staging writes along t hit distinct banks
  static constexpr int kChanPitch = kT * kRowPitch + 1;
  static constexpr int kArrayPitch = kChans * kChanPitch;
  static constexpr int kTokens = kChans * kT;
  static_assert(kBN % kM == 0 && kThreads % kTileThreads == 0, "bad tile shape");
  static_assert(sizeof(float) * (kArrays * kArrayPitch + (kConstRows ? 5 : 2) * kTokens +
                                 (kConstRows ? 1 : kChans * kRows)) <= 48 * 1024,
                "static shared memory over 48 KiB");
};

// Instantiating the traits of every compiled tile shape checks their shared-memory budget, even
// when COMPRESSM_MAMBA_FAST_COMPILE_CHECK compiles only some kernels.
#define COMPRESSM_GRAM_CHECK_TRAITS(BN, M)                                                        \
  static_assert(GramTraits<BN, M, true, true>::kT + GramTraits<BN, M, true, false>::kT +           \
                        GramTraits<BN, M, false, true>::kT + GramTraits<BN, M, false, false>::kT > \
                    0,                                                                           \
                "unreachable");
COMPRESSM_GRAM_ALL_TILES(COMPRESSM_GRAM_CHECK_TRAITS)
#undef COMPRESSM_GRAM_CHECK_TRAITS

__device__ __forceinline__ float softplus_f(float x) { return x > 20.f ? x : log1pf(expf(x)); }

template <typename T>
__device__ __forceinline__ float load_float(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

struct TileCoords {
  int row0, col0;  // first output row / column of the tile
  int d0;          // first channel of the block
  int c;           // this thread's channel within the block
  int ri, cj;      // this thread's micro-tile within the tile
  int r;           // this thread's index within its channel's tile
};

struct GramSmem {
  float* A;      // [chan][row]: A of the tile's rows and columns (general A only)
  float* dt;     // [chan][token]
  float* keep;   // [chan][token]: 1 for a real token, 0 for padding or past L
  float* a2;     // [chan][token]: exp(2 A dt) (constant rows, ltv)
  float* scale;  // [2][chan][token]: sqrt(p_s), sqrt(q_s) (constant rows)
  float* rows;   // [array][chan][token][row]
};

// One sweep over the tokens of sequence bb: P forward / Q backward (general ltv), P backward / Q
// forward (constant-rows ltv), or both sums at once (frozen).
template <class Tr, typename input_t, int kPass>
__device__ __forceinline__ void sweep(const GramianParams& p, const TileCoords& tc, const GramSmem& sm, int bb,
                                      float (&accP)[Tr::kM][Tr::kM], float (&accQ)[Tr::kM][Tr::kM]) {
  constexpr int kM = Tr::kM, kT = Tr::kT, kBN = Tr::kBN, kChans = Tr::kChans, kRows = Tr::kRows;
  constexpr int kRowPitch = Tr::kRowPitch, kChanPitch = Tr::kChanPitch, kArr = Tr::kArrayPitch;
  constexpr bool kConst = Tr::kConstRows;
  constexpr bool kReverse = kConst ? kPass == kPassP : kPass == kPassQ;
  const int L = p.seqlen, N = p.dstate;
  const input_t* delta = static_cast<const input_t*>(p.delta_ptr);
  const input_t* B = static_cast<const input_t*>(p.B_ptr);
  const input_t* C = static_cast<const input_t*>(p.C_ptr);

  float st[kM][kM];  // general ltv: this thread's entries of P_t (or Q_t)
  float an_i[kM], an_j[kM];  // general ltv Q: a_{t+1} of the rows and columns
#pragma unroll
  for (int m = 0; m < kM; ++m) {
    an_i[m] = an_j[m] = 1.f;
#pragma unroll
    for (int n = 0; n < kM; ++n) st[m][n] = 0.f;
  }
  float carry_w = 0.f, carry_a2 = 1.f;  // constant-rows ltv scan carry (scan thread only)

  const int n_tiles_t = (L + kT - 1) / kT;
  for (int it = 0; it < n_tiles_t; ++it) {
    const int t0 = (kReverse ? n_tiles_t - 1 - it : it) * kT;
    __syncthreads();  // the previous tile is fully consumed
    for (int i = threadIdx.x; i < Tr::kTokens; i += Tr::kThreads) {
      const int cc = i / kT, tt = i % kT, t = t0 + tt, dd = tc.d0 + cc;
      float dt = 0.f, keep = 0.f;
      if (dd < p.dim && t < L) {
        keep = (!p.has_mask || p.mask_ptr[static_cast<int64_t>(bb) * L + t] != 0) ? 1.f : 0.f;
        if (keep != 0.f) {
          float x = load_float(delta, (static_cast<int64_t>(bb) * p.dim + dd) * L + t);
          if (p.has_delta_bias) x += p.delta_bias_ptr[dd];
          dt = p.delta_softplus ? softplus_f(x) : x;
        }
      }
      sm.dt[i] = dt;
      sm.keep[i] = keep;
      if constexpr (kConst) {
        const float A0 = dd < p.dim ? p.A_ptr[static_cast<int64_t>(dd) * N] : 0.f;
        if constexpr (Tr::kLtv) {
          sm.a2[i] = expf(2.f * A0 * dt);
        } else {
          const float e = -expm1f(dt * A0);
          const float den = e + e - e * e;
          const bool pos = den > 0.f;
          sm.scale[i] = pos ? fabsf(dt) / sqrtf(den) : 0.f;
          sm.scale[Tr::kTokens + i] = (pos && keep != 0.f) ? 1.f / sqrtf(den) : 0.f;
        }
      }
    }
    __syncthreads();
    if constexpr (kConst && Tr::kLtv) {
      if (tc.r == 0) {
        // The channel's scalar weights over the tile, in the sweep's direction.
        for (int k = 0; k < kT; ++k) {
          const int i = tc.c * kT + (kReverse ? kT - 1 - k : k);
          if constexpr (kPass == kPassP) {
            const float w = sm.keep[i] + carry_a2 * carry_w;  // w_s = keep_s + a2_{s+1} w_{s+1}
            sm.scale[i] = fabsf(sm.dt[i]) * sqrtf(w);
            carry_w = w;
            carry_a2 = sm.a2[i];
          } else {
            const float v = sm.keep[i] + sm.a2[i] * carry_w;  // v_s = keep_s + a2_s v_{s-1}
            sm.scale[i] = sqrtf(sm.keep[i] * v);
            carry_w = v;
          }
        }
      }
      __syncthreads();
    }

    for (int i = threadIdx.x; i < kChans * kRows * kT; i += Tr::kThreads) {
      const int cc = i / (kRows * kT), rem = i % (kRows * kT), rr = rem / kT, tt = rem % kT;
      const int t = t0 + tt, dd = tc.d0 + cc;
      const int n = rr < kBN ? tc.row0 + rr : tc.col0 + rr - kBN;
      const bool ok = dd < p.dim && n < N && t < L;
      const int64_t idx =
          ok ? ((static_cast<int64_t>(bb) * p.ngroups + dd / p.dim_per_group) * N + n) * L + t : 0;
      const int tok = cc * kT + tt;
      float* dst = sm.rows + cc * kChanPitch + tt * kRowPitch + rr;
      if constexpr (kConst) {
        if constexpr (kPass == kPassP) {
          dst[0] = ok ? sm.scale[tok] * load_float(B, idx) : 0.f;
        } else if constexpr (kPass == kPassQ) {
          dst[0] = ok ? sm.scale[tok] * load_float(C, idx) : 0.f;
        } else {
          dst[0] = ok ? sm.scale[tok] * load_float(B, idx) : 0.f;
          dst[kArr] = ok ? sm.scale[Tr::kTokens + tok] * load_float(C, idx) : 0.f;
        }
      } else {
        // Rows past N have A = 0: a = 1, e = 0 and zero b / c, so they stay 0.
        const float dtA = sm.dt[tok] * sm.A[cc * kRows + rr];
        if constexpr (kPass == kPassFrozen) {
          dst[0] = -expm1f(dtA);
          dst[kArr] = ok ? sm.dt[tok] * load_float(B, idx) : 0.f;
          dst[2 * kArr] = ok ? sm.keep[tok] * load_float(C, idx) : 0.f;
        } else if constexpr (kPass == kPassP) {
          dst[0] = expf(dtA);
          dst[kArr] = ok ? sm.dt[tok] * load_float(B, idx) : 0.f;
        } else {
          dst[0] = expf(dtA);
          dst[kArr] = ok ? sm.keep[tok] * load_float(C, idx) : 0.f;
        }
      }
    }
    __syncthreads();

    const float* base = sm.rows + tc.c * kChanPitch;
#pragma unroll 2
    for (int k = 0; k < kT; ++k) {
      const int tt = kReverse ? kT - 1 - k : k;
      const float* x = base + tt * kRowPitch;
      float xi[kM], xj[kM], yi[kM], yj[kM];
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        xi[m] = x[tc.ri + m];
        xj[m] = x[kBN + tc.cj + m];
        if constexpr (Tr::kArrays > 1 && (!kConst || kPass == kPassFrozen)) {
          yi[m] = x[kArr + tc.ri + m];
          yj[m] = x[kArr + kBN + tc.cj + m];
        }
      }
      if constexpr (kConst) {
#pragma unroll
        for (int m = 0; m < kM; ++m) {
#pragma unroll
          for (int n = 0; n < kM; ++n) {
            if constexpr (kPass == kPassP) {
              accP[m][n] += xi[m] * xj[n];
            } else if constexpr (kPass == kPassQ) {
              accQ[m][n] += xi[m] * xj[n];
            } else {
              accP[m][n] += xi[m] * xj[n];
              accQ[m][n] += yi[m] * yj[n];
            }
          }
        }
      } else if constexpr (kPass == kPassFrozen) {
        float zi[kM], zj[kM];
#pragma unroll
        for (int m = 0; m < kM; ++m) {
          zi[m] = x[2 * kArr + tc.ri + m];
          zj[m] = x[2 * kArr + kBN + tc.cj + m];
        }
#pragma unroll
        for (int m = 0; m < kM; ++m) {
#pragma unroll
          for (int n = 0; n < kM; ++n) {
            // 1 - a_i a_j without cancellation; a zero denominator is the dt -> 0 limit, term 0.
            const float den = xi[m] + xj[n] - xi[m] * xj[n];
            const float inv = den > 0.f ? 1.f / den : 0.f;
            accP[m][n] += yi[m] * yj[n] * inv;
            accQ[m][n] += zi[m] * zj[n] * inv;
          }
        }
      } else {
        const float keep = sm.keep[tc.c * kT + tt];
#pragma unroll
        for (int m = 0; m < kM; ++m) {
#pragma unroll
          for (int n = 0; n < kM; ++n) {
            if constexpr (kPass == kPassP) {
              st[m][n] = xi[m] * xj[n] * st[m][n] + yi[m] * yj[n];
              accP[m][n] += keep * st[m][n];
            } else {
              // Q_t = (a_{t+1} a_{t+1}^T) * Q_{t+1} + c_t c_t^T: the decay of token t applies one
              // step later (to Q_{t-1}).
              st[m][n] = an_i[m] * an_j[n] * st[m][n] + yi[m] * yj[n];
              accQ[m][n] += keep * st[m][n];
            }
          }
        }
        if constexpr (kPass == kPassQ) {
#pragma unroll
          for (int m = 0; m < kM; ++m) {
            an_i[m] = xi[m];
            an_j[m] = xj[m];
          }
        }
      }
    }
  }
}

template <typename input_t, int kBN, int kM, bool kLtv, bool kConstRows>
__global__ void __launch_bounds__(256) gramian_sums_kernel(const GramianParams p) {
  using Tr = GramTraits<kBN, kM, kLtv, kConstRows>;
  constexpr int kChans = Tr::kChans, kRows = Tr::kRows;
  __shared__ float s_A[kConstRows ? 1 : kChans * kRows];
  __shared__ float s_dt[Tr::kTokens];
  __shared__ float s_keep[Tr::kTokens];
  __shared__ float s_a2[kConstRows ? Tr::kTokens : 1];
  __shared__ float s_scale[kConstRows ? 2 * Tr::kTokens : 1];
  __shared__ float s_rows[Tr::kArrays * Tr::kArrayPitch];

  const int N = p.dstate;
  const int n_tiles = (N + kBN - 1) / kBN;
  int u = blockIdx.y, ti = 0;
  while (u >= n_tiles - ti) {
    u -= n_tiles - ti;
    ++ti;
  }
  TileCoords tc;
  tc.row0 = ti * kBN;
  tc.col0 = (ti + u) * kBN;
  tc.d0 = blockIdx.x * kChans;
  tc.c = threadIdx.x / Tr::kTileThreads;
  tc.r = threadIdx.x % Tr::kTileThreads;
  tc.ri = (tc.r / Tr::kSide) * kM;
  tc.cj = (tc.r % Tr::kSide) * kM;
  const GramSmem sm{s_A, s_dt, s_keep, s_a2, s_scale, s_rows};

  if constexpr (!kConstRows) {
    for (int i = threadIdx.x; i < kChans * kRows; i += Tr::kThreads) {
      const int cc = i / kRows, rr = i % kRows, dd = tc.d0 + cc;
      const int n = rr < kBN ? tc.row0 + rr : tc.col0 + rr - kBN;
      s_A[i] = (dd < p.dim && n < N) ? p.A_ptr[static_cast<int64_t>(dd) * N + n] : 0.f;
    }
  }  // read after the first sweep's barriers

  float accP[kM][kM], accQ[kM][kM];
#pragma unroll
  for (int m = 0; m < kM; ++m) {
#pragma unroll
    for (int n = 0; n < kM; ++n) accP[m][n] = accQ[m][n] = 0.f;
  }
  for (int bb = 0; bb < p.batch; ++bb) {
    if constexpr (kLtv) {
      sweep<Tr, input_t, kPassP>(p, tc, sm, bb, accP, accQ);
      sweep<Tr, input_t, kPassQ>(p, tc, sm, bb, accP, accQ);
    } else {
      sweep<Tr, input_t, kPassFrozen>(p, tc, sm, bb, accP, accQ);
    }
  }

  const int dd = tc.d0 + tc.c;
  if (dd >= p.dim) return;
  const int64_t base = static_cast<int64_t>(dd) * N * N;
#pragma unroll
  for (int m = 0; m < kM; ++m) {
#pragma unroll
    for (int n = 0; n < kM; ++n) {
      const int gi = tc.row0 + tc.ri + m, gj = tc.col0 + tc.cj + n;
      if (gi < N && gj < N && gi <= gj) {
        p.P_ptr[base + static_cast<int64_t>(gi) * N + gj] = accP[m][n];
        p.Q_ptr[base + static_cast<int64_t>(gi) * N + gj] = accQ[m][n];
        if (gi != gj) {
          p.P_ptr[base + static_cast<int64_t>(gj) * N + gi] = accP[m][n];
          p.Q_ptr[base + static_cast<int64_t>(gj) * N + gi] = accQ[m][n];
        }
      }
    }
  }
}

template <typename input_t, int kBN, int kM>
void launch(const GramianParams& p, cudaStream_t stream) {
  constexpr int kChans = GramTraits<kBN, kM, true, false>::kChans;
  const int n_tiles = (p.dstate + kBN - 1) / kBN;
  const int n_upper = n_tiles * (n_tiles + 1) / 2;
  TORCH_CHECK(n_upper <= 65535, "gramian_sums: N = ", p.dstate, " needs too many output tiles");
  const dim3 grid((p.dim + kChans - 1) / kChans, n_upper);
  COMPRESSM_BOOL_SWITCH(p.ltv, kLtv, [&] {
    COMPRESSM_BOOL_SWITCH(p.constant_rows, kConstRows, [&] {
      gramian_sums_kernel<input_t, kBN, kM, kLtv, kConstRows><<<grid, 256, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace gram
}  // namespace compressm_mamba

template <typename input_t>
void gramian_sums_cuda(const GramianParams& params, cudaStream_t stream) {
  if (params.dim == 0 || params.dstate == 0) return;
#define COMPRESSM_GRAM_CASE(BN, M)                                 \
  if (params.dstate <= BN) {                                       \
    compressm_mamba::gram::launch<input_t, BN, M>(params, stream); \
    return;                                                        \
  }
  COMPRESSM_GRAM_FOR_EACH_TILE(COMPRESSM_GRAM_CASE)
#undef COMPRESSM_GRAM_CASE
  // Larger N: 64 x 64 tiles, the last entry of both tile lists.
  compressm_mamba::gram::launch<input_t, 64, 4>(params, stream);
}
