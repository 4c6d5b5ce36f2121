// Selective scan backward kernels for bf16 inputs (one file per dtype keeps each nvcc job small).
#include "selective_scan.cuh"

template void selective_scan_bwd_cuda<c10::BFloat16>(const SelectiveScanBwdParams& params, cudaStream_t stream);
