// Gramian token sums (frozen / ltv estimators): launch parameters and the host entry point.
//
// Host-only header (bindings.cpp includes it).  Contract: kernels/gramians.py `gramian_sums`, whose
// float64 specification is compressm_mamba/reference/gramians.py `gramian_statistics(...).sums`.
//
// Layouts (all contiguous, checked in bindings.cpp):
//   delta: (batch, dim, L) of input_t;  A: (dim, N) fp32;  B, C: (batch, ngroups, N, L) of input_t;
//   delta_bias: (dim,) fp32;  mask: (batch, L) bool (1 byte per token, false = padding);
//   P_sum, Q_sum: (dim, N, N) fp32, every entry written by the kernel (no zero fill needed).
#pragma once

#include <cuda_runtime_api.h>

#include "static_switch.h"

// Output tile shapes with a compiled kernel, as (side of the N x N tile, side of each thread's
// micro-tile), ascending by tile side.  N <= side picks the first that fits; larger N are tiled
// with the last.  COMPRESSM_MAMBA_FAST_COMPILE_CHECK keeps only the last, the one with the most
// registers per thread (see selective_scan.h; the shared-memory budget of every shape is still
// checked at compile time): a build with it still computes correctly, with 64 x 64 tiles.
#define COMPRESSM_GRAM_ALL_TILES(X) X(4, 1) X(8, 1) X(16, 2) X(32, 2) X(64, 4)
#ifdef COMPRESSM_MAMBA_FAST_COMPILE_CHECK
#define COMPRESSM_GRAM_FOR_EACH_TILE(X) X(64, 4)
#else
#define COMPRESSM_GRAM_FOR_EACH_TILE(X) COMPRESSM_GRAM_ALL_TILES(X)
#endif


struct GramianParams {
  int batch = 0, dim = 0, seqlen = 0, dstate = 0, ngroups = 1, dim_per_group = 0;
  bool ltv = true;             // estimator: true = "ltv", false = "frozen"
  bool constant_rows = false;  // every row of A is constant (Mamba2 heads): only A[:, 0] is read
  bool has_delta_bias = false, delta_softplus = false, has_mask = false;

  const void* delta_ptr = nullptr;
  const float* A_ptr = nullptr;
  const void* B_ptr = nullptr;
  const void* C_ptr = nullptr;
  const float* delta_bias_ptr = nullptr;   // has_delta_bias
  const unsigned char* mask_ptr = nullptr;  // has_mask

  float* P_ptr = nullptr;
  float* Q_ptr = nullptr;
};

// One kernel launch on `stream`, checked, never synchronising.  Instantiated for float, c10::Half
// and c10::BFloat16 in the per-dtype .cu files.
template <typename input_t>
void gramian_sums_cuda(const GramianParams& params, cudaStream_t stream);
