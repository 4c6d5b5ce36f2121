// Selective scan forward kernels for fp16 inputs (one file per dtype keeps each nvcc job small).
#include "selective_scan.cuh"

template void selective_scan_fwd_cuda<c10::Half>(const SelectiveScanFwdParams& params, cudaStream_t stream);
