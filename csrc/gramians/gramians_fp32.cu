// Gramian token-sum kernels for fp32 inputs (one file per dtype keeps each nvcc job small).
#include "gramians.cuh"

template void gramian_sums_cuda<float>(const GramianParams& params, cudaStream_t stream);
