// Selective scan forward kernels for fp32 inputs (one file per dtype keeps each nvcc job small).
#include "selective_scan.cuh"

template void selective_scan_fwd_cuda<float>(const SelectiveScanFwdParams& params, cudaStream_t stream);
