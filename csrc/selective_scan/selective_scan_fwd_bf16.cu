// Selective scan forward kernels for bf16 inputs (one file per dtype keeps each nvcc job small).
#include "selective_scan.cuh"

template void selective_scan_fwd_cuda<c10::BFloat16>(const SelectiveScanFwdParams& params, cudaStream_t stream);
