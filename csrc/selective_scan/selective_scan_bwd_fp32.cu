// Selective scan backward kernels for fp32 inputs (one file per dtype keeps each nvcc job small).
#include "selective_scan.cuh"

template void selective_scan_bwd_cuda<float>(const SelectiveScanBwdParams& params, cudaStream_t stream);
