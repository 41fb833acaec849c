// Shared by the tensor-core chunked kernels (mma_common.cuh's 16-bit ones and chunk_tf32.cu's
// float32 one): integer types, the linear and delta scan kernels' common arguments and block geometry,
// and cp.async copies from global to shared memory. The including file defines ELEM (the
// storage type) and CH (steps per chunk) before the macros are used.

typedef long long i64;
typedef unsigned int u32;

#define FULL 0xffffffffu

// The linear scan's outputs: with WIDE_O float32, its accumulators unrounded (for gradients that
// sum them further), else the storage type.
#ifndef WIDE_O
#define WIDE_O 0
#endif
#if WIDE_O
#define OUT_ELEM float
#else
#define OUT_ELEM ELEM
#endif

// The linear scan kernels (chunk_mma.cu, chunk_wgmma.cu, chunk_tf32.cu) take the same
// arguments (the launcher in _cuda_chunk.py passes one list to any) and locate their block's
// work the same way: its leading index (la, lb, lc), value columns from c0, time segment [t_begin,
// t_end) of n_chunks chunks, and its operands' bases there.
#define LINEAR_CHUNK_PARAMS                                                                                     \
    const ELEM *__restrict__ q, const ELEM *__restrict__ k, const ELEM *__restrict__ v,                           \
        const ELEM *__restrict__ g, const float *__restrict__ s_in, OUT_ELEM *__restrict__ o,                     \
        float *__restrict__ s_out, i64 T, int Dk, int Dv, i64 n1, i64 n2, i64 seg_len, int col_blocks, i64 qs0,   \
        i64 qs1, i64 qs2, i64 qts, i64 ks0, i64 ks1, i64 ks2, i64 kts, i64 vs0, i64 vs1, i64 vs2, i64 vts,        \
        i64 os0, i64 os1, i64 os2, i64 ots, i64 gs0, i64 gs1, i64 gs2, i64 gts, i64 ss0, i64 ss1, i64 ss2,        \
        i64 sseg, i64 srow, i64 scol
#define LINEAR_CHUNK_GEOMETRY                                                                                   \
    const i64 lead = blockIdx.x / col_blocks;                                                                   \
    const i64 la = lead / (n1 * n2), lb = (lead / n2) % n1, lc = lead % n2;                                     \
    const i64 t_begin = (i64)blockIdx.y * seg_len;                                                              \
    const i64 t_end = min(T, t_begin + seg_len);                                                                \
    const int n_chunks = (int)((t_end - t_begin + CH - 1) / CH);                                                \
    [[maybe_unused]] const ELEM* qb = q + la * qs0 + lb * qs1 + lc * qs2;                                       \
    const ELEM* kb = k + la * ks0 + lb * ks1 + lc * ks2;                                                        \
    const ELEM* vb = v + la * vs0 + lb * vs1 + lc * vs2 + c0;                                                   \
    [[maybe_unused]] const ELEM* gb = g + la * gs0 + lb * gs1 + lc * gs2;

// The delta rule's scan kernels (delta_chunk.cu, delta_wgmma.cu) likewise take the same
// arguments (A in two parts and its scales, from delta_chunk_prepare; ls: the strides that turn
// the leading index into that of k, b and g) and locate their block's work the same way: its
// leading index, the chunks, its operands' bases from value column c0, and A's for its k.
#define DELTA_CHUNK_PARAMS                                                                                      \
    const ELEM *__restrict__ q, const ELEM *__restrict__ k, const ELEM *__restrict__ v,                           \
        const ELEM *__restrict__ a_hi, const ELEM *__restrict__ a_lo, const float *__restrict__ a_scale,          \
        const ELEM *__restrict__ g, const float *__restrict__ s_in, ELEM *__restrict__ o,                         \
        float *__restrict__ s_out, i64 T, int Dk, int Dv, i64 n1, i64 n2, int col_blocks, i64 qs0, i64 qs1,      \
        i64 qs2, i64 qts, i64 ks0, i64 ks1, i64 ks2, i64 kts, i64 vs0, i64 vs1, i64 vs2, i64 vts, i64 os0,      \
        i64 os1, i64 os2, i64 ots, i64 gs0, i64 gs1, i64 gs2, i64 gts, i64 ls0, i64 ls1, i64 ls2, i64 ss0,      \
        i64 ss1, i64 ss2, i64 sseg, i64 srow, i64 scol
#define DELTA_CHUNK_GEOMETRY                                                                                    \
    const i64 lead = blockIdx.x / col_blocks;                                                                   \
    const i64 la = lead / (n1 * n2), lb = (lead / n2) % n1, lc = lead % n2;                                     \
    const int n_chunks = (int)((T + CH - 1) / CH);                                                              \
    const ELEM* qb = q + la * qs0 + lb * qs1 + lc * qs2;                                                        \
    const ELEM* kb = k + la * ks0 + lb * ks1 + lc * ks2;                                                        \
    const ELEM* vb = v + la * vs0 + lb * vs1 + lc * vs2 + c0;                                                   \
    const i64 kv_lead = la * ls0 + lb * ls1 + lc * ls2;                                                         \
    const ELEM* ahb = a_hi + kv_lead * n_chunks * (i64)(CH * CH);                                               \
    const ELEM* alb = a_lo + kv_lead * n_chunks * (i64)(CH * CH);                                               \
    [[maybe_unused]] const float* asb = a_scale + kv_lead * n_chunks;                                           \
    [[maybe_unused]] const ELEM* gb = g + la * gs0 + lb * gs1 + lc * gs2;

__device__ __forceinline__ u32 shared_address(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// 16 bytes from global to shared memory, asynchronously; zeros when !valid.
__device__ __forceinline__ void copy16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :: "r"(shared_address(dst)), "l"(src), "r"(valid ? 16 : 0) : "memory");
}

// Brings the 128-byte line holding p into L2 (no registers, nothing to wait for).
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }
__device__ __forceinline__ void copy_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void copy_wait() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }
// Every group but the last committed (which may still be in flight).
__device__ __forceinline__ void copy_wait_but_last() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }
