// Selective scan (Mamba1, selective_scan_fn layout): launch parameters, work layout, host entry points.
//
// Host-only header: bindings.cpp (built by the C++ compiler) includes it, so nothing here may need
// nvcc.  The kernels live in selective_scan.cuh; one .cu per input dtype and direction instantiates
// them.  The design (why this layout) is in csrc/README.md.
//
// Layouts (all contiguous, checked in bindings.cpp):
//   u, delta, z, out, dout, du, ddelta, dz: (batch, dim, L) of input_t (fp32 / fp16 / bf16)
//   A: (dim, N) fp32;  D, delta_bias: (dim,) fp32;  B, C: (batch, ngroups, N, L) of input_t
//   last_state: (batch, dim, N) fp32;  checkpoints: (batch, dim, n_chunks, N) fp32, the state before
//   the first step of every chunk of kScanChunk steps (n_chunks = ceil(L / kScanChunk))
//   dB_part, dC_part: (batch, ngroups, n_slots, L, N) fp32 -- per-slot partial sums, see below
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
// keeps the sizes of the reference workloads and every thread layout (2 lanes x 2 states: 4, whose
// backward also keeps its decay factors in registers; 2 x 6: 12; 2 x 8: 16; 16 x 8: 128; 32 x 8
// with the 4-step backward tile: 256): tests/ops/test_cuda_compile.py defines it so that
// compile-checking every .cu on a 2-core machine stays affordable.  A build with it still computes
// correctly (every N rounds up to a compiled size), only slower for the sizes in between.  Every
// size's shared-memory budget is checked at compile time even when it is not compiled
// (COMPRESSM_SCAN_ALL_NSTATES).
#define COMPRESSM_SCAN_ALL_NSTATES(X) X(4) X(8) X(12) X(16) X(24) X(32) X(48) X(64) X(96) X(128) X(256)
#ifdef COMPRESSM_MAMBA_FAST_COMPILE_CHECK
#define COMPRESSM_SCAN_FOR_EACH_NSTATE(X) X(4) X(12) X(16) X(128) X(256)
#else
#define COMPRESSM_SCAN_FOR_EACH_NSTATE(X) COMPRESSM_SCAN_ALL_NSTATES(X)
#endif
constexpr int kScanMaxNState = 256;
constexpr int kScanThreads = 128;  // threads per block, forward and backward

// Work layout, shared by the kernels and the binding (which sizes the backward's scratch from it).
// A channel's kNState states are spread over lanes_per_channel consecutive lanes: at least 2 (a
// block holds at most 64 channels, which keeps the backward's chunk-wide dt tiles within shared
// memory), then halve the states per thread while at least 6 remain, so a thread keeps at most 8
// states in registers (N = 4 -> 2 x 2, 12 -> 2 x 6, 16 -> 2 x 8, 24 -> 4 x 6, 96 -> 16 x 6,
// 128 -> 16 x 8, 256 -> 32 x 8).  Why not 4 lanes at N = 16 (twice the warps): the per-step work
// that is per channel, not per state, then costs 25 % more instructions per element-state, more
// than the occupancy gains in the issue-rate model (csrc/README.md).
constexpr int scan_lanes_per_channel(int n) {
  int lanes = 2;
  while (lanes < 32 && n % (2 * lanes) == 0 && n / (2 * lanes) >= 6) lanes *= 2;
  return lanes;
}

// The compiled state size that serves N (0 when none does: N out of range).
constexpr int scan_kernel_nstate(int n) {
  int chosen = 0;
#define COMPRESSM_SCAN_PICK(K) \
  if (chosen == 0 && n >= 1 && n <= K) chosen = K;
  COMPRESSM_SCAN_FOR_EACH_NSTATE(COMPRESSM_SCAN_PICK)
#undef COMPRESSM_SCAN_PICK
  return chosen;
}

// Channels of one block ("a slice" of a group's channels) for the kernel that serves N.
constexpr int scan_channels_per_block(int n) {
  const int k = scan_kernel_nstate(n);
  return k == 0 ? 0 : kScanThreads / scan_lanes_per_channel(k);
}

struct SelectiveScanFwdParams {
  int batch = 0, dim = 0, seqlen = 0, dstate = 0, ngroups = 1, dim_per_group = 0, n_chunks = 0;
  // Slices of kChans channels per group: ceil(dim_per_group / kChans).
  int n_slices = 0;
  bool has_D = false, has_z = false, has_delta_bias = false, delta_softplus = false;
  // Every (batch, channel) row of u / delta / z / dout / out / du / ddelta / dz and every (batch,
  // group, state) row of B / C starts 16-byte aligned and L is a multiple of the vector width: the
  // kernels then move rows in 4-element vectors, else element by element (same results).
  bool vec_ok = false;

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

  // Blocks per (batch, group): block `slot` walks slices slot, slot + n_slots, ... in that order,
  // so every sum below has a fixed order (deterministic).  1 <= n_slots <= n_slices; the binding
  // picks it so that dB_part / dC_part stay within the size of the backward's inputs.
  int n_slots = 0;

  // Per-step gradients (input_t), every element written.
  void* du_ptr = nullptr;
  void* ddelta_ptr = nullptr;  // with respect to the raw delta (before bias and softplus)
  void* dz_ptr = nullptr;      // has_z
  // fp32 (batch, ngroups, n_slots, L, N), every element written: slot s holds the sum over the
  // channels of its slices; the caller sums over slots (fixed order) and transposes to (N, L).
  float* dB_part_ptr = nullptr;
  float* dC_part_ptr = nullptr;
  // fp32 (batch, dim, N) scratch: a channel's gradient carry from one chunk to the one before it.
  float* g_carry_ptr = nullptr;
  // fp32 per-batch partials, every element written; the caller sums them over the batch.  Also the
  // running sums between chunks (the kernel reads back what it wrote for the later chunk).
  float* dA_part_ptr = nullptr;           // (batch, dim, N)
  float* dD_part_ptr = nullptr;           // (batch, dim), has_D
  float* ddelta_bias_part_ptr = nullptr;  // (batch, dim), has_delta_bias
};

// Host entry points, instantiated for float, c10::Half and c10::BFloat16 in the per-dtype .cu files.
// They launch on `stream` and check the launch; they never synchronise.
template <typename input_t>
void selective_scan_fwd_cuda(const SelectiveScanFwdParams& params, cudaStream_t stream);

template <typename input_t>
void selective_scan_bwd_cuda(const SelectiveScanBwdParams& params, cudaStream_t stream);
