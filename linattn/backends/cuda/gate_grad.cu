// The gradient of a gated scan's log-gates (linattn.scan.causal_scan_vjp), in two passes:
//
//   r_t  = a_t ⊙ b_t − c_t ⊙ d_t           (ROW_SUM: summed over the row's D entries, W = 1; else W = D)
//   dG_t = e + Σ_{t' ≥ t} r_{t'}           (per column, a suffix sum over time; e = 0 without END)
//
// e.g. a, b, c, d = q, dq, k, dk for the key gates. gate_grad_rows forms r in the
// accumulation type (float32 for narrower data) into a scratch array (n_lead, T, W), reading
// each operand once (and with ROUND_B, ROUND_D writing b, d rounded to ELEM, C-contiguous
// (n_lead, T, D): the gradients the caller returns, rounded once); gate_grad_suffix sums r from
// the last step to the first in float64 and writes dG in the gradients' type, C-contiguous
// (n_lead, T, W).
//
// Compile-time parameters (-D): ELEM (the type of a and c), GRAD (of b, d and dG: ELEM, or for
// 16-bit data float32, the scans' unrounded outputs), ACC (float, or double for float64 data),
// ROW_SUM, END, ROUND_B, ROUND_D, VEC (elements per load: 4 where every row of every operand starts
// on 4 elements, else 1). Strides are in elements; leading axes are three (0 broadcasts), the
// last axis is contiguous.

#include "elem_common.cuh"

#define ROW_THREADS 256
#define ROW_WARPS (ROW_THREADS / 32)
#define WARP_ROWS 4                           // rows a warp has in flight at once
#define BLOCK_ROWS (ROW_WARPS * WARP_ROWS)    // rows of a block of gate_grad_rows
#define SUFFIX_THREADS 1024

// A row of an operand: its address, the three leading strides and the time stride at `s`.
template <typename E>
__device__ __forceinline__ const E* row(const E* p, const i64* s, i64 a0, i64 a1, i64 a2, i64 t) {
    return p + a0 * s[0] + a1 * s[1] + a2 * s[2] + t * s[3];
}

// x rounded once to the storage type.
__device__ __forceinline__ void store_rounded(float* p, double x) { *p = (float)x; }
__device__ __forceinline__ void store_rounded(double* p, double x) { *p = x; }
__device__ __forceinline__ void store_rounded(__half* p, double x) { *p = __double2half(x); }
__device__ __forceinline__ void store_rounded(__nv_bfloat16* p, double x) { *p = __double2bfloat16(x); }

// V consecutive elements from p (aligned to V elements), converted to ACC.
template <int V, typename E>
__device__ __forceinline__ void load_vec(ACC (&out)[V], const E* p) {
    if constexpr (V * sizeof(E) == 8) {
        const uint2 raw = *reinterpret_cast<const uint2*>(p);
        const E* e = reinterpret_cast<const E*>(&raw);
#pragma unroll
        for (int j = 0; j < V; ++j) out[j] = to_acc(e[j]);
    } else if constexpr (V * sizeof(E) % 16 == 0) {
        uint4 raw[V * sizeof(E) / 16];
#pragma unroll
        for (int i = 0; i < V * (int)sizeof(E) / 16; ++i) raw[i] = reinterpret_cast<const uint4*>(p)[i];
        const E* e = reinterpret_cast<const E*>(raw);
#pragma unroll
        for (int j = 0; j < V; ++j) out[j] = to_acc(e[j]);
    } else {
#pragma unroll
        for (int j = 0; j < V; ++j) out[j] = to_acc(p[j]);
    }
}

// V consecutive values to p (aligned to V elements) in the storage type, rounded once.
template <int V>
__device__ __forceinline__ void store_vec(ELEM* p, const ACC (&x)[V]) {
    if constexpr (V * sizeof(ELEM) == 8) {
        ELEM e[V];
#pragma unroll
        for (int j = 0; j < V; ++j) store(e + j, x[j]);
        *reinterpret_cast<uint2*>(p) = *reinterpret_cast<const uint2*>(e);
    } else {
#pragma unroll
        for (int j = 0; j < V; ++j) store(p + j, x[j]);
    }
}

// Block: BLOCK_ROWS steps of one leading index (blockIdx.x = lead * row_blocks + tile); warp w
// takes WARP_ROWS of them at once, its lanes VEC entries of each at a time along the row. With
// ROW_SUM the lanes' partial sums meet by shuffles (a fixed order: deterministic).
extern "C" __global__ void __launch_bounds__(ROW_THREADS)
gate_grad_rows(const ELEM* __restrict__ a, const GRAD* __restrict__ b, const ELEM* __restrict__ c,
               const GRAD* __restrict__ d, ACC* __restrict__ r, ELEM* __restrict__ b_out, ELEM* __restrict__ d_out,
               i64 T, int D, i64 n1, i64 n2, i64 row_blocks,
               i64 as0, i64 as1, i64 as2, i64 ats, i64 bs0, i64 bs1, i64 bs2, i64 bts, i64 cs0, i64 cs1, i64 cs2,
               i64 cts, i64 ds0, i64 ds1, i64 ds2, i64 dts) {
    const i64 sa[4] = {as0, as1, as2, ats}, sb[4] = {bs0, bs1, bs2, bts}, sc[4] = {cs0, cs1, cs2, cts},
              sd[4] = {ds0, ds1, ds2, dts};
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const i64 l = blockIdx.x / row_blocks, t0 = (blockIdx.x % row_blocks) * BLOCK_ROWS + warp * WARP_ROWS;
    const i64 a2 = l % n2, a1 = (l / n2) % n1, a0 = l / (n2 * n1);
    ACC sum[WARP_ROWS];
#pragma unroll
    for (int i = 0; i < WARP_ROWS; ++i) sum[i] = (ACC)0;
    for (int j = lane * VEC; j < D; j += 32 * VEC) {
#pragma unroll
        for (int i = 0; i < WARP_ROWS; ++i) {
            const i64 t = t0 + i;
            if (t >= T) break;
            ACC x[4][VEC];
            load_vec(x[0], row(a, sa, a0, a1, a2, t) + j);
            load_vec(x[1], row(b, sb, a0, a1, a2, t) + j);
            load_vec(x[2], row(c, sc, a0, a1, a2, t) + j);
            load_vec(x[3], row(d, sd, a0, a1, a2, t) + j);
#if ROUND_B
            store_vec(b_out + (l * T + t) * D + j, x[1]);
#endif
#if ROUND_D
            store_vec(d_out + (l * T + t) * D + j, x[3]);
#endif
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                const ACC v = x[0][e] * x[1][e] - x[2][e] * x[3][e];
#if ROW_SUM
                sum[i] += v;
#else
                r[(l * T + t) * D + j + e] = v;
#endif
            }
        }
    }
#if ROW_SUM
#pragma unroll
    for (int i = 0; i < WARP_ROWS; ++i) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) sum[i] += __shfl_xor_sync(0xffffffffu, sum[i], off);
        if (lane == 0 && t0 + i < T) r[l * T + t0 + i] = sum[i];
    }
#endif
}

// Block (l, tile of `cols` = min(W, 32) columns): the block's threads are S = SUFFIX_THREADS / cols
// segments of L = ceil(T / S) steps times the columns. Each thread sums its segment (float64);
// a suffix scan over the segments' sums in shared memory gives each segment what follows it;
// then each thread walks its segment from its last step to its first, writing
// dG_t = e + (what follows the segment) + (its steps from t on).
extern "C" __global__ void __launch_bounds__(SUFFIX_THREADS)
gate_grad_suffix(const ACC* __restrict__ r, const ACC* __restrict__ end, GRAD* __restrict__ out, i64 T, int W,
                 i64 n1, i64 n2, i64 es0, i64 es1, i64 es2) {
    __shared__ double after[SUFFIX_THREADS];
    const int cols = W < 32 ? W : 32, S = SUFFIX_THREADS / cols;
    const int c = threadIdx.x % cols, s = threadIdx.x / cols, w = blockIdx.y * cols + c;
    const i64 l = blockIdx.x, L = (T + S - 1) / S;
    const bool live = s < S && w < W;
    const i64 first = min(T, s * L), stop = min(T, first + L);
    const ACC* rows = r + l * T * W + w;
    double total = 0.0;
    if (live)
#pragma unroll 4
        for (i64 t = first; t < stop; ++t) total += (double)rows[t * W];
    after[threadIdx.x] = total;
    __syncthreads();
    for (int off = 1; off < S; off <<= 1) {  // Hillis–Steele: after[s] becomes the sum over segments >= s
        const double later = s + off < S ? after[threadIdx.x + off * cols] : 0.0;
        __syncthreads();
        after[threadIdx.x] += later;
        __syncthreads();
    }
    if (!live) return;
    double acc = s + 1 < S ? after[threadIdx.x + cols] : 0.0;
#if END
    const i64 a2 = l % n2, a1 = (l / n2) % n1, a0 = l / (n2 * n1);
    acc += (double)end[a0 * es0 + a1 * es1 + a2 * es2 + w];
#endif
    GRAD* o = out + l * T * W + w;
#pragma unroll 4
    for (i64 t = stop - 1; t >= first; --t) {
        acc += (double)rows[t * W];
        store_rounded(o + t * W, acc);
    }
}
