// Selective scan (Mamba1, selective_scan_fn layout): launch parameters and host entry points.
//
// Host-only header: bindings.cpp (built by the C++ compiler) includes it, so nothing here may need
// nvcc.  The kernels live in selective_scan.cuh; one .cu per input dtype instantiates them.
//
// Layouts (all contiguous, checked in bindings.cpp):
//   u, delta, z, out, dout, du, ddelta, dz: (batch, dim, L) of input_t (fp32 / fp16 / bf16)
//   A: (dim, N) fp32;  D, delta_bias: (dim,) fp32;  B, C, dB, dC: (batch, ngroups, N, L) of input_t
//   last_state: (batch, dim, N) fp32;  checkpoints: (batch, dim, n_chunks, N) fp32, the state before
//   the first step of every chunk of kScanChunk steps (n_chunks = ceil(L / kScanChunk))
// Channel d uses group d / (dim / ngroups).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "static_switch.h"

// Steps between two forward checkpoints; the backward recomputes states from them.  Fixed (not a
// runtime argument) so that the checkpoint tensor's shape is a function of L alone, which the fake
// (meta) implementation in compressm_mamba/ops/_cuda.py mirrors.
constexpr int kScanChunk = 64;

// State sizes with a compiled kernel, ascending.  Any other N in [1, 256] runs on the next larger
// one with the extra states masked (they stay exactly zero).  COMPRESSM_MAMBA_FAST_COMPILE_CHECK
// keeps two sizes that cover both thread layouts (several states per thread across 2 lanes, and a
// whole warp per channel): tests/ops/test_cuda_compile.py defines it so that compile-checking every
// .cu on a 2-core machine stays within minutes.  A build with it still computes correctly (every N
// rounds up to 12 or 256), only slower.
// The fast list still has every size's shared-memory budget checked at compile time
// (COMPRESSM_SCAN_ALL_NSTATES in selective_scan.cuh).
#define COMPRESSM_SCAN_ALL_NSTATES(X) X(4) X(8) X(12) X(16) X(24) X(32) X(48) X(64) X(96) X(128) X(256)
#ifdef COMPRESSM_MAMBA_FAST_COMPILE_CHECK
#define COMPRESSM_SCAN_FOR_EACH_NSTATE(X) X(12) X(256)
#else
#define COMPRESSM_SCAN_FOR_EACH_NSTATE(X) COMPRESSM_SCAN_ALL_NSTATES(X)
#endif
constexpr int kScanMaxNState = 256;


struct SelectiveScanFwdParams {
  int batch = 0, dim = 0, seqlen = 0, dstate = 0, ngroups = 1, dim_per_group = 0, n_chunks = 0;
  bool has_D = false, has_z = false, has_delta_bias = false, delta_softplus = false;

  // Inputs.  input_t pointers are void* so that this struct stays dtype-agnostic.
  const void* u_ptr = nullptr;
  const void* delta_ptr = nullptr;
  const float* A_ptr = nullptr;
  const void* B_ptr = nullptr;
  const void* C_ptr = nullptr;
  const float* D_ptr = nullptr;           // has_D
  const void* z_ptr = nullptr;            // has_z
  const float* delta_bias_ptr = nullptr;  // has_delta_bias

  // Outputs, every element written by the forward kernel.
  void* out_ptr = nullptr;
  float* last_state_ptr = nullptr;
  float* checkpoints_ptr = nullptr;
};

struct SelectiveScanBwdParams : SelectiveScanFwdParams {
  const void* dout_ptr = nullptr;
  // checkpoints_ptr (inherited) is read, not written, by the backward.

  // Per-step gradients (input_t), every element written.
  void* du_ptr = nullptr;
  void* ddelta_ptr = nullptr;  // with respect to the raw delta (before bias and softplus)
  void* dz_ptr = nullptr;      // has_z
  // fp32 accumulators, zero-filled by the caller: (batch, ngroups, N, L); the kernel adds into them.
  float* dB_ptr = nullptr;
  float* dC_ptr = nullptr;
  // fp32 per-batch partials, every element written; the caller sums them over the batch.
  float* dA_part_ptr = nullptr;      // (batch, dim, N)
  float* dD_part_ptr = nullptr;      // (batch, dim), has_D
  float* ddelta_bias_part_ptr = nullptr;  // (batch, dim), has_delta_bias
};

// Host entry points, instantiated for float, c10::Half and c10::BFloat16 in the per-dtype .cu files.
// They launch on `stream` and check the launch; they never synchronise.
template <typename input_t>
void selective_scan_fwd_cuda(const SelectiveScanFwdParams& params, cudaStream_t stream);

template <typename input_t>
void selective_scan_bwd_cuda(const SelectiveScanBwdParams& params, cudaStream_t stream);
