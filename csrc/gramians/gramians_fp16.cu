// Gramian token-sum kernels for fp16 inputs (one file per dtype keeps each nvcc job small).
#include "gramians.cuh"

template void gramian_sums_cuda<c10::Half>(const GramianParams& params, cudaStream_t stream);
