// compressm_mamba._C: registers the CUDA ops with the dispatcher and checks every input.
//
//   torch.ops.compressm_mamba.selective_scan_fwd(u, delta, A, B, C, D?, z?, delta_bias?, delta_softplus)
//       -> (out, last_state, checkpoints)
//   torch.ops.compressm_mamba.selective_scan_bwd(dout, u, delta, A, B, C, D?, z?, delta_bias?,
//       delta_softplus, checkpoints) -> (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)
//   torch.ops.compressm_mamba.gramian_sums(delta, A, B, C, delta_bias?, delta_softplus, mask?, estimator,
//       constant_rows) -> (P_sum, Q_sum)
//
// Layouts are those of csrc/selective_scan/selective_scan.h and csrc/gramians/gramians.h; the ops
// layer (compressm_mamba/ops/_cuda.py) makes inputs contiguous, picks the kernel dtype, registers the
// fake (meta) implementations and wraps fwd/bwd in an autograd.Function.  An op returns a tensor for
// every output; a gradient of an absent optional input (dD, dz, ddelta_bias) is an empty tensor of
// shape (0,).  Everything runs on the current stream of the inputs' device; nothing synchronises.
//
// The module also exposes the ops as module attributes (selective_scan = selective_scan_fwd,
// selective_scan_bwd, gramian_sums), which is how compressm_mamba.ops sees that the build has them.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <pybind11/pybind11.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "gramians/gramians.h"
#include "selective_scan/selective_scan.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Device and contiguity of one named input (every error names the op and the argument).
void check_input(const Tensor& t, const char* op, const char* name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but the other inputs are on ", device);
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_dtype(const Tensor& t, const char* op, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

void check_shape(const Tensor& t, const char* op, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

// Device, contiguity, dtype and shape of one named input, in that order.
void check_tensor(const Tensor& t, const char* op, const char* name, const at::Device& device, at::ScalarType dtype,
                  at::IntArrayRef shape) {
  check_input(t, op, name, device);
  check_dtype(t, op, name, dtype);
  check_shape(t, op, name, shape);
}

void check_optional(const OptTensor& t, const char* op, const char* name, const at::Device& device,
                    at::ScalarType dtype, at::IntArrayRef shape) {
  if (t.has_value()) check_tensor(*t, op, name, device, dtype, shape);
}

struct SystemSizes {
  int64_t N, ngroups;
};

// A (dim, N) float32 and B, C (batch, ngroups, N, L) in `dtype`: the system both ops read.
SystemSizes check_system(const char* op, const at::Device& device, int64_t batch, int64_t dim, int64_t L,
                         at::ScalarType dtype, const Tensor& A, const Tensor& B, const Tensor& C) {
  check_input(A, op, "A", device);
  check_dtype(A, op, "A", at::kFloat);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == dim, op, ": A must be (dim=", dim, ", N), got shape ", A.sizes());
  const int64_t N = A.size(1);
  for (const auto& [name, t] : {std::pair<const char*, const Tensor&>{"B", B}, {"C", C}}) {
    check_input(t, op, name, device);
    check_dtype(t, op, name, dtype);
    TORCH_CHECK(t.dim() == 4 && t.size(0) == batch && t.size(2) == N && t.size(3) == L, op, ": ", name,
                " must be (batch=", batch, ", ngroups, N=", N, ", L=", L, "), got shape ", t.sizes());
  }
  TORCH_CHECK(B.sizes() == C.sizes(), op, ": B and C must have one shape, got ", B.sizes(), " and ", C.sizes());
  const int64_t ngroups = B.size(1);
  TORCH_CHECK(ngroups >= 1 && dim % ngroups == 0, op, ": dim=", dim, " is not a multiple of ngroups=", ngroups);
  return {N, ngroups};
}

void check_int_range(int64_t v, const char* op, const char* what, int64_t hi = INT_MAX) {
  TORCH_CHECK(v >= 0 && v <= hi, op, ": ", what, " = ", v, " is out of the supported range [0, ", hi, "]");
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Debug aid shared with the Triton launchers: with COMPRESSM_MAMBA_POISON=1 every output a kernel must
// write is first filled with NaN, so an element it forgets shows up in a test instead of stale memory.
bool poison_outputs() {
  const char* v = std::getenv("COMPRESSM_MAMBA_POISON");
  if (v == nullptr) return false;
  const std::string s(v);
  return s == "1" || s == "true" || s == "yes" || s == "on";
}

void poison(std::initializer_list<Tensor> outputs) {
  if (!poison_outputs()) return;
  for (const Tensor& t : outputs) {
    if (t.numel() > 0) t.fill_(std::numeric_limits<float>::quiet_NaN());
  }
}

// Whether a tensor's first element is aligned for the kernels' 4-element vector accesses.
bool vec_aligned(const Tensor& t) {
  return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % (4 * t.element_size()) == 0;
}

// Checks the scan inputs shared by the forward and the backward and fills the launch parameters.
void scan_params(const char* op, const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                 const Tensor& C, const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias,
                 bool delta_softplus, SelectiveScanFwdParams& p) {
  const at::Device device = u.device();
  check_input(u, op, "u", device);
  TORCH_CHECK(u.dim() == 3, op, ": u must be (batch, dim, L), got shape ", u.sizes());
  TORCH_CHECK(is_kernel_dtype(u.scalar_type()), op, ": u must be float32, float16 or bfloat16, got ",
              u.scalar_type());
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2);
  check_input(delta, op, "delta", device);
  check_shape(delta, op, "delta", u.sizes());
  check_dtype(delta, op, "delta", u.scalar_type());
  const auto [N, ngroups] = check_system(op, device, batch, dim, L, u.scalar_type(), A, B, C);
  TORCH_CHECK(N >= 1 && N <= kScanMaxNState, op, ": N (A.shape[1]) must be in [1, ", kScanMaxNState, "], got ", N);
  check_optional(D, op, "D", device, at::kFloat, {dim});
  check_optional(z, op, "z", device, u.scalar_type(), u.sizes());
  check_optional(delta_bias, op, "delta_bias", device, at::kFloat, {dim});
  // Grid: (channel blocks, ngroups, batch); element offsets are int64 inside the kernels.
  check_int_range(batch, op, "batch", 65535);
  check_int_range(ngroups, op, "ngroups", 65535);
  check_int_range(dim, op, "dim");
  check_int_range(L, op, "L");

  p.batch = static_cast<int>(batch);
  p.dim = static_cast<int>(dim);
  p.seqlen = static_cast<int>(L);
  p.dstate = static_cast<int>(N);
  p.ngroups = static_cast<int>(ngroups);
  p.dim_per_group = static_cast<int>(dim / ngroups);
  p.n_chunks = static_cast<int>(ceil_div(L, kScanChunk));
  p.n_slices = static_cast<int>(ceil_div(dim / ngroups, scan_channels_per_block(static_cast<int>(N))));
  p.has_D = D.has_value();
  p.has_z = z.has_value();
  p.has_delta_bias = delta_bias.has_value();
  p.delta_softplus = delta_softplus;
  p.u_ptr = u.data_ptr();
  p.delta_ptr = delta.data_ptr();
  p.A_ptr = A.data_ptr<float>();
  p.B_ptr = B.data_ptr();
  p.C_ptr = C.data_ptr();
  p.D_ptr = D.has_value() ? D->data_ptr<float>() : nullptr;
  p.z_ptr = z.has_value() ? z->data_ptr() : nullptr;
  p.delta_bias_ptr = delta_bias.has_value() ? delta_bias->data_ptr<float>() : nullptr;
  // Rows move as 4-element vectors when every row starts aligned (outputs are fresh allocations).
  p.vec_ok = L % 4 == 0 && vec_aligned(u) && vec_aligned(delta) && vec_aligned(B) && vec_aligned(C) &&
             (!z.has_value() || vec_aligned(*z));
}

std::tuple<Tensor, Tensor, Tensor> selective_scan_fwd(const Tensor& u, const Tensor& delta, const Tensor& A,
                                                      const Tensor& B, const Tensor& C, const OptTensor& D,
                                                      const OptTensor& z, const OptTensor& delta_bias,
                                                      bool delta_softplus) {
  constexpr const char* op = "selective_scan_fwd";
  SelectiveScanFwdParams p;
  scan_params(op, u, delta, A, B, C, D, z, delta_bias, delta_softplus, p);
  const c10::cuda::CUDAGuard device_guard(u.device());
  const auto f32 = u.options().dtype(at::kFloat);
  Tensor out = at::empty_like(u);
  const int64_t batch = p.batch, dim = p.dim, N = p.dstate, n_chunks = p.n_chunks;
  Tensor last_state = at::empty({batch, dim, N}, f32);
  Tensor checkpoints = at::empty({batch, dim, n_chunks, N}, f32);
  poison({out, last_state, checkpoints});
  p.out_ptr = out.data_ptr();
  p.last_state_ptr = last_state.data_ptr<float>();
  p.checkpoints_ptr = checkpoints.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  switch (u.scalar_type()) {
    case at::kFloat: selective_scan_fwd_cuda<float>(p, stream); break;
    case at::kHalf: selective_scan_fwd_cuda<at::Half>(p, stream); break;
    case at::kBFloat16: selective_scan_fwd_cuda<at::BFloat16>(p, stream); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", u.scalar_type());
  }
  return {out, last_state, checkpoints};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> selective_scan_bwd(
    const Tensor& dout, const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
    const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias, bool delta_softplus,
    const Tensor& checkpoints) {
  constexpr const char* op = "selective_scan_bwd";
  SelectiveScanBwdParams p;
  scan_params(op, u, delta, A, B, C, D, z, delta_bias, delta_softplus, p);
  const int64_t batch = p.batch, dim = p.dim, N = p.dstate, n_chunks = p.n_chunks;
  check_tensor(dout, op, "dout", u.device(), u.scalar_type(), u.sizes());
  check_tensor(checkpoints, op, "checkpoints", u.device(), at::kFloat, {batch, dim, n_chunks, N});
  p.vec_ok = p.vec_ok && vec_aligned(dout);

  const c10::cuda::CUDAGuard device_guard(u.device());
  const auto f32 = u.options().dtype(at::kFloat);
  Tensor du = at::empty_like(u);
  Tensor ddelta = at::empty_like(delta);
  Tensor dz = z.has_value() ? at::empty_like(*z) : at::empty({0}, u.options());
  // dB / dC: one fp32 partial per slot (a block walking n_slices / n_slots channel slices), summed
  // below in slot order.  As many slots as the slices ask for, but the partials stay within the size
  // of the backward's inputs (their bytes / the bytes of one slot's dB and dC).
  const int64_t ngroups = p.ngroups;
  const int64_t slot_bytes = 2 * batch * ngroups * static_cast<int64_t>(p.seqlen) * N * 4;
  int64_t input_bytes = checkpoints.nbytes() + A.nbytes() + B.nbytes() + C.nbytes();
  for (const Tensor& t : {dout, u, delta}) input_bytes += t.nbytes();
  if (z.has_value()) input_bytes += z->nbytes();
  const int64_t affordable = slot_bytes > 0 ? std::max<int64_t>(1, input_bytes / slot_bytes) : p.n_slices;
  p.n_slots = static_cast<int>(std::min<int64_t>(p.n_slices, affordable));  // 0 only when dim == 0
  Tensor dB_part = at::empty({batch, ngroups, p.n_slots, p.seqlen, N}, f32);
  Tensor dC_part = at::empty({batch, ngroups, p.n_slots, p.seqlen, N}, f32);
  Tensor dA_part = at::empty({batch, dim, N}, f32);
  Tensor g_carry = at::empty({batch, dim, N}, f32);
  Tensor dD_part = at::empty({D.has_value() ? batch : 0, dim}, f32);
  Tensor dbias_part = at::empty({delta_bias.has_value() ? batch : 0, dim}, f32);
  poison({du, ddelta, dz, dA_part, dD_part, dbias_part, dB_part, dC_part, g_carry});
  p.dout_ptr = dout.data_ptr();
  p.checkpoints_ptr = const_cast<float*>(checkpoints.data_ptr<float>());
  p.du_ptr = du.data_ptr();
  p.ddelta_ptr = ddelta.data_ptr();
  p.dz_ptr = z.has_value() ? dz.data_ptr() : nullptr;
  p.dB_part_ptr = dB_part.data_ptr<float>();
  p.dC_part_ptr = dC_part.data_ptr<float>();
  p.dA_part_ptr = dA_part.data_ptr<float>();
  p.g_carry_ptr = g_carry.data_ptr<float>();
  p.dD_part_ptr = D.has_value() ? dD_part.data_ptr<float>() : nullptr;
  p.ddelta_bias_part_ptr = delta_bias.has_value() ? dbias_part.data_ptr<float>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  switch (u.scalar_type()) {
    case at::kFloat: selective_scan_bwd_cuda<float>(p, stream); break;
    case at::kHalf: selective_scan_bwd_cuda<at::Half>(p, stream); break;
    case at::kBFloat16: selective_scan_bwd_cuda<at::BFloat16>(p, stream); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", u.scalar_type());
  }
  // Per-batch partials -> sums (a sum over an empty batch is zeros).  Same stream, no sync.
  Tensor dA = dA_part.sum(0);
  // (batch, G, slots, L, N) -> sum over slots -> (batch, G, N, L) in B's dtype.
  Tensor dB = at::empty(B.sizes(), B.options());
  Tensor dC = at::empty(C.sizes(), C.options());
  dB.copy_(dB_part.sum(2).transpose(2, 3));
  dC.copy_(dC_part.sum(2).transpose(2, 3));
  Tensor dD = D.has_value() ? dD_part.sum(0) : at::empty({0}, f32);
  Tensor ddelta_bias = delta_bias.has_value() ? dbias_part.sum(0) : at::empty({0}, f32);
  return {du, ddelta, dA, dB, dC, dD, dz, ddelta_bias};
}

std::tuple<Tensor, Tensor> gramian_sums(const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                                        const OptTensor& delta_bias, bool delta_softplus, const OptTensor& mask,
                                        c10::string_view estimator, bool constant_rows) {
  constexpr const char* op = "gramian_sums";
  TORCH_CHECK(estimator == "ltv" || estimator == "frozen", op, ": estimator must be 'ltv' or 'frozen', got '",
              std::string(estimator), "'");
  const at::Device device = delta.device();
  check_input(delta, op, "delta", device);
  TORCH_CHECK(delta.dim() == 3, op, ": delta must be (batch, dim, L), got shape ", delta.sizes());
  TORCH_CHECK(is_kernel_dtype(delta.scalar_type()), op, ": delta must be float32, float16 or bfloat16, got ",
              delta.scalar_type());
  const int64_t batch = delta.size(0), dim = delta.size(1), L = delta.size(2);
  const auto [N, ngroups] = check_system(op, device, batch, dim, L, delta.scalar_type(), A, B, C);
  check_optional(delta_bias, op, "delta_bias", device, at::kFloat, {dim});
  check_optional(mask, op, "mask", device, at::kBool, {batch, L});
  check_int_range(batch, op, "batch");
  check_int_range(dim, op, "dim");
  check_int_range(L, op, "L");
  check_int_range(N, op, "N", 1 << 14);

  GramianParams p;
  p.batch = static_cast<int>(batch);
  p.dim = static_cast<int>(dim);
  p.seqlen = static_cast<int>(L);
  p.dstate = static_cast<int>(N);
  p.ngroups = static_cast<int>(ngroups);
  p.dim_per_group = static_cast<int>(dim / ngroups);
  p.ltv = estimator == "ltv";
  p.constant_rows = constant_rows;
  p.has_delta_bias = delta_bias.has_value();
  p.delta_softplus = delta_softplus;
  p.has_mask = mask.has_value();
  p.delta_ptr = delta.data_ptr();
  p.A_ptr = A.data_ptr<float>();
  p.B_ptr = B.data_ptr();
  p.C_ptr = C.data_ptr();
  p.delta_bias_ptr = delta_bias.has_value() ? delta_bias->data_ptr<float>() : nullptr;
  p.mask_ptr = mask.has_value() ? reinterpret_cast<const unsigned char*>(mask->data_ptr<bool>()) : nullptr;

  const c10::cuda::CUDAGuard device_guard(delta.device());
  const auto f32 = delta.options().dtype(at::kFloat);
  Tensor P = at::empty({dim, N, N}, f32);
  Tensor Q = at::empty({dim, N, N}, f32);
  poison({P, Q});
  p.P_ptr = P.data_ptr<float>();
  p.Q_ptr = Q.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  switch (delta.scalar_type()) {
    case at::kFloat: gramian_sums_cuda<float>(p, stream); break;
    case at::kHalf: gramian_sums_cuda<at::Half>(p, stream); break;
    case at::kBFloat16: gramian_sums_cuda<at::BFloat16>(p, stream); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", delta.scalar_type());
  }
  return {P, Q};
}

}  // namespace

TORCH_LIBRARY(compressm_mamba, m) {
  // The fake (meta) implementations are registered in Python, in this module.
  m.set_python_module("compressm_mamba.ops._cuda");
  m.def(
      "selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? delta_bias, bool delta_softplus) -> (Tensor, Tensor, Tensor)");
  m.def(
      "selective_scan_bwd(Tensor dout, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
      "Tensor? z, Tensor? delta_bias, bool delta_softplus, Tensor checkpoints) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "gramian_sums(Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? delta_bias, bool delta_softplus, "
      "Tensor? mask, str estimator, bool constant_rows) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(compressm_mamba, CUDA, m) {
  m.impl("selective_scan_fwd", &selective_scan_fwd);
  m.impl("selective_scan_bwd", &selective_scan_bwd);
  m.impl("gramian_sums", &gramian_sums);
}

// The Python module: the registered ops as attributes, so that `hasattr(compressm_mamba._C, op)`
// tells the ops layer which ops this build has.  Loading the library above already registered them.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "compressm_mamba CUDA kernels, registered as torch.ops.compressm_mamba.*";
  pybind11::object ops = pybind11::module_::import("torch").attr("ops").attr("compressm_mamba");
  module.attr("selective_scan") = ops.attr("selective_scan_fwd");
  module.attr("selective_scan_fwd") = ops.attr("selective_scan_fwd");
  module.attr("selective_scan_bwd") = ops.attr("selective_scan_bwd");
  module.attr("gramian_sums") = ops.attr("gramian_sums");
}
