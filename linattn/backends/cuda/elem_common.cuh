// The storage types and their conversions to and from the accumulation type ACC (a -D
// parameter: float, or double for float64 data), shared by the CUDA-core kernels.

#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef long long i64;

__device__ __forceinline__ ACC to_acc(float x) { return (ACC)x; }
__device__ __forceinline__ ACC to_acc(double x) { return (ACC)x; }
__device__ __forceinline__ ACC to_acc(__half x) { return (ACC)__half2float(x); }
__device__ __forceinline__ ACC to_acc(__nv_bfloat16 x) { return (ACC)__bfloat162float(x); }

__device__ __forceinline__ void store(float* p, ACC x) { *p = (float)x; }
__device__ __forceinline__ void store(double* p, ACC x) { *p = (double)x; }
__device__ __forceinline__ void store(__half* p, ACC x) { *p = __float2half_rn((float)x); }
__device__ __forceinline__ void store(__nv_bfloat16* p, ACC x) { *p = __float2bfloat16_rn((float)x); }

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
