// Shared by the 16-bit tensor-core chunked kernels (chunk_mma.cu, chunk_wgmma.cu,
// delta_chunk.cu, gla_chunk.cu): 16-bit types,
// mma.sync m16n8k16 with float32 accumulation, ldmatrix, two-part (hi + lo)
// operands, power-of-two scales for float16, and the per-chunk work the kernels repeat —
// the chunk's cumulative log-gates and decay factors, and the causal decayed scores.
//
// The including file defines, before including this: ELEM_HALF (float16, else bfloat16),
// CH (steps per chunk, 64), DKP (keys padded to 16), QKS (shared row stride of q and k
// tiles, in elements), GATED (a log-gate per step) and SCALED (float16: keep two-part
// values in range by powers of two).

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "chunk_common.cuh"

#if ELEM_HALF
typedef __half ELEM;
typedef __half2 ELEM2;
#define MMA_TYPES "f16.f16"
__device__ __forceinline__ float to_f(ELEM x) { return __half2float(x); }
__device__ __forceinline__ ELEM from_f(float x) { return __float2half_rn(x); }
__device__ __forceinline__ ELEM2 make2(float x, float y) { return __floats2half2_rn(x, y); }
__device__ __forceinline__ float2 from2(ELEM2 x) { return __half22float2(x); }
#else
typedef __nv_bfloat16 ELEM;
typedef __nv_bfloat162 ELEM2;
#define MMA_TYPES "bf16.bf16"
__device__ __forceinline__ float to_f(ELEM x) { return __bfloat162float(x); }
__device__ __forceinline__ ELEM from_f(float x) { return __float2bfloat16_rn(x); }
__device__ __forceinline__ ELEM2 make2(float x, float y) { return __floats2bfloat162_rn(x, y); }
__device__ __forceinline__ float2 from2(ELEM2 x) { return __bfloat1622float2(x); }
#endif

__device__ __forceinline__ u32 pack2(float x, float y) {  // x in the low half: the lower column
    ELEM2 h = make2(x, y);
    return *reinterpret_cast<u32*>(&h);
}

__device__ __forceinline__ float2 unpack2(u32 r) { return from2(*reinterpret_cast<ELEM2*>(&r)); }

// (x, y) = hi + lo, each a pair in the storage type.
__device__ __forceinline__ void split2(float x, float y, u32& hi, u32& lo) {
    hi = pack2(x, y);
    const float2 h = unpack2(hi);
    lo = pack2(x - h.x, y - h.y);
}

// A warp's 16 accumulator rows of N 8-column tiles (d[t][0..1]: row gid, columns 8t + 2 tig, +1;
// d[t][2..3]: row gid + 8), times `scale`, to float32 rows t0 + (0..15) of `out` (columns from
// `col` of `cols`, the first at out) unrounded, 8 bytes per store: WIDE_O's outputs. Rows at or
// past t_end are not written.
template <int N>
__device__ __forceinline__ void store_rows_float(const float (&d)[N][4], float scale, float* out, i64 stride,
                                                 i64 t0, i64 t_end, int col, int cols) {
    const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
#pragma unroll
    for (int t = 0; t < N; ++t)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const i64 r = t0 + gid + 8 * h;
            const int c = 8 * t + 2 * tig;
            if (r < t_end && col + c < cols)
                *reinterpret_cast<float2*>(out + r * stride + c) = make_float2(d[t][2 * h] * scale,
                                                                               d[t][2 * h + 1] * scale);
        }
}

// d += a b: a 16x16 tile of A (row-major fragments), a 16x8 tile of B (column fragments).
__device__ __forceinline__ void mma(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32." MMA_TYPES ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 tiles of 16-bit values; lane l gives the address of row l%8 of tile l/8.
__device__ __forceinline__ void ldsm(u32 (&r)[4], u32 address) {  // `address`: a shared-memory address
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address) : "memory");
}
__device__ __forceinline__ void ldsm(u32 (&r)[4], const ELEM* p) { ldsm(r, shared_address(p)); }

__device__ __forceinline__ void ldsm_t(u32 (&r)[4], const ELEM* p) {  // the tiles transposed
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(shared_address(p)) : "memory");
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(FULL, x, off));
    return x;
}

// A power of two that brings m into [2^13, 2^14) (1 for 0, inf or NaN), so that a value of
// magnitude <= m and its rounding remainder both fit float16.
__device__ __forceinline__ float pow2_scale(float m) {
    if (!(m > 0.f) || isinf(m)) return 1.f;
    int e;
    frexpf(m, &e);
    return ldexpf(1.f, max(-126, min(126, 14 - e)));
}

template <int N>
__device__ __forceinline__ float max_of(const float* per_warp) {
    float m = per_warp[0];
#pragma unroll
    for (int w = 1; w < N; ++w) m = fmaxf(m, per_warp[w]);
    return m;
}

// pow2_scale of the largest m over the block's N warps (m: this warp's, the same in every lane),
// which every thread gets: each warp's m through `slots` (N floats), then a block barrier.
template <int N>
__device__ __forceinline__ float block_pow2_scale(float m, float* slots, int warp) {
    if ((threadIdx.x & 31) == 0) slots[warp] = m;
    __syncthreads();
    return pow2_scale(max_of<N>(slots));
}

// Stage rows [0, ROWS) x columns [0, COLS) of a tile into shared memory (row stride
// `shared_stride`), 16 bytes per thread and step, asynchronously: row r from `base + r *
// stride`; rows at or past `valid_rows` and columns at or past `valid_cols` become zeros.
template <int ROWS, int COLS, int THREADS>
__device__ __forceinline__ void stage_tile(ELEM* dst, int shared_stride, const ELEM* base, i64 stride,
                                           i64 valid_rows, int valid_cols) {
    constexpr int PIECES = COLS / 8;
#pragma unroll
    for (int it = 0; it < (ROWS * PIECES + THREADS - 1) / THREADS; ++it) {
        const int p = threadIdx.x + it * THREADS, r = p / PIECES, c = (p % PIECES) * 8;
        if (ROWS * PIECES % THREADS != 0 && p >= ROWS * PIECES) break;
        const bool ok = r < valid_rows && c < valid_cols;
        copy16(dst + r * shared_stride + c, base + (ok ? r * stride + c : 0), ok);
    }
}

// A pair of m16n8k16 products against a 16-column tile of B (one ldmatrix.x4.trans): columns
// 0-7 into d0, 8-15 into d1.
__device__ __forceinline__ void mma16(float (&d0)[4], float (&d1)[4], const u32 (&a)[4], const u32 (&b)[4]) {
    mma(d0, a, b[0], b[1]);
    mma(d1, a, b[2], b[3]);
}

// acc += (a_hi + a_lo) x (B_hi + B_lo) without the lo x lo term, over 8 N columns from `col`:
// a the warp's 16 x 16 A fragments, B the 16 rows from `row` of two-part tiles (row stride `stride`).
template <int N>
__device__ __forceinline__ void mma_two_parts(float (&acc)[N][4], const u32 (&ah)[4], const u32 (&al)[4],
                                              const ELEM* bh, const ELEM* bl, int stride, int row, int col) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int np = 0; np < N / 2; ++np) {
        const int off = (row + (lane & 7) + ((lane >> 3) & 1) * 8) * stride + col + np * 16 + (lane >> 4) * 8;
        u32 b[4];
        ldsm_t(b, bh + off);
        mma16(acc[2 * np], acc[2 * np + 1], ah, b);
        mma16(acc[2 * np], acc[2 * np + 1], al, b);
        ldsm_t(b, bl + off);
        mma16(acc[2 * np], acc[2 * np + 1], ah, b);
    }
}

// A warp's tile of a float32 state in accumulator layout: element e of S[mt][nt] is row
// d0 + 16 mt + gid + 8 (e / 2) and column c0 + 8 nt + 2 tig + e % 2. f(mt, nt, e, row, column).
template <int TM, int TN, typename F>
__device__ __forceinline__ void for_each_state(int d0, int c0, F f) {
    const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
#pragma unroll
    for (int mt = 0; mt < TM; ++mt)
#pragma unroll
        for (int nt = 0; nt < TN; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) f(mt, nt, e, d0 + mt * 16 + gid + (e >> 1) * 8, c0 + nt * 8 + 2 * tig + (e & 1));
}

// The warp's state tile into a row-major (Dk x Dv) float32 state at `out`, rows from d0 and
// columns from c0 (within Dk x Dv only).
template <int TM, int TN>
__device__ __forceinline__ void store_state(const float (&S)[TM][TN][4], float* out, int d0, int c0, int Dk, int Dv) {
    for_each_state<TM, TN>(d0, c0, [&](int mt, int nt, int e, int d, int c) {
        if (d < Dk && c < Dv) out[(i64)d * Dv + c] = S[mt][nt][e];
    });
}

template <int TM, int TN>
__device__ __forceinline__ void scale_state(float (&S)[TM][TN][4], float f) {
    for_each_state<TM, TN>(0, 0, [&](int mt, int nt, int e, int, int) { S[mt][nt][e] *= f; });
}

// max |S| over the warp's tiles (a warp-wide reduction: every lane takes part).
template <int TM, int TN>
__device__ __forceinline__ float state_max(const float (&S)[TM][TN][4]) {
    float m = 0.f;
    for_each_state<TM, TN>(0, 0, [&](int mt, int nt, int e, int, int) { m = fmaxf(m, fabsf(S[mt][nt][e])); });
    return warp_max(m);
}

// The warp's tile times `scale` into shared memory (row stride `stride`) as the B operand of
// the next chunk's products: hi, and with `split` also lo (x = hi + lo).
template <int TM, int TN>
__device__ __forceinline__ void share_state(const float (&S)[TM][TN][4], float scale, ELEM* hi, ELEM* lo,
                                            int stride, int d0, int c0, bool split) {
    for_each_state<TM, TN>(d0, c0, [&](int mt, int nt, int e, int d, int c) {
        if (e & 1) return;  // pairs of columns, one 32-bit store per part
        const float x = S[mt][nt][e] * scale, y = S[mt][nt][e + 1] * scale;
        u32 h, l;
        if (split) {
            split2(x, y, h, l);
            *reinterpret_cast<u32*>(lo + d * stride + c) = l;
        } else {
            h = pack2(x, y);
        }
        *reinterpret_cast<u32*>(hi + d * stride + c) = h;
    });
}

// Step t's log-gate as stored (zero past t_end, and for threads past the chunk's CH), read
// one chunk ahead. The kernels convert it only where they store it, after the chunk's
// products: converting it where it is read made warps 0 and 1 wait there for global memory
// every chunk, and the block's barrier with them.
__device__ __forceinline__ ELEM chunk_gate(const ELEM* gb, i64 t, i64 t_end, i64 gts) {
    ELEM x = from_f(0.f);
    if (threadIdx.x < CH && t < t_end) x = gb[t * gts];
    return x;
}

#if GATED
// The chunk's cumulative log-gates and the decay factors that every thread of the warp
// needs, computed by one warp for its own use (no block barrier): G_i = g_0 + ... + g_i
// in float64 (the decays are e^{G_i - G_j}, and a difference of two long float32 sums
// would lose the digits of a mild gate behind a strong one, G ~ -1e4); E_i = e^{G_i};
// K_j = e^{G_{C-1} - G_j}, the keys' decays to the chunk's end; and, with `scores`, the
// factors of the score decays (C, 2 CH floats). Below the diagonal block of the warp whose
// first row is r: e^{G_i - G_j} = e^{G_i - G_r} e^{G_r - G_j} for j < r <= i, one factor
// per row and one per column, C_j = e^{G_r - G_j} (j < r) or e^{G_j - G_r} (j >= r). On
// the diagonal blocks: e^{G_i - G_j} = C_i C_{CH + j} for b <= j <= i, b = 16 floor(j / 16)
// the block's first row, C_{CH + j} = e^{G_b - G_j}. Returns where the factored forms hold:
// 0 nowhere; 1 below the diagonal blocks, where no gate of the chunk is positive (both
// factors are <= 1, so neither overflows, and one underflows only where the product does);
// 2 on the diagonal blocks too, where besides no block spans more than DIAG_SPAN (G_b - G_j
// <= 16: the factor e^{G_b - G_j} >= 1 stays finite, and each factor's exponent, rounded to
// float32, is off by at most 2^-20, so the product is within a few 1e-6 of e^{G_i - G_j}).
#define DIAG_SPAN 16.0
__device__ __forceinline__ int chunk_decays(const float* gates, int first_row, double* G, float* E, float* K,
                                           float* C, bool scores) {
    const int lane = threadIdx.x & 31;
    const double x0 = gates[2 * lane], x1 = gates[2 * lane + 1];
    double s = x0 + x1;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const double y = __shfl_up_sync(FULL, s, off);
        if (lane >= off) s += y;
    }
    double before = __shfl_up_sync(FULL, s, 1);
    if (lane == 0) before = 0.0;
    const double last = __shfl_sync(FULL, s, 31), g0 = before + x0;
    G[2 * lane] = g0;
    G[2 * lane + 1] = s;
    E[2 * lane] = expf((float)g0);
    E[2 * lane + 1] = expf((float)s);
    K[2 * lane] = expf((float)(last - g0));
    K[2 * lane + 1] = expf((float)(last - s));
    int factored = 0;
    if (scores) {
        const double g_r = __shfl_sync(FULL, g0, first_row / 2), g_b = __shfl_sync(FULL, g0, lane & ~7);
        C[2 * lane] = expf((float)(2 * lane < first_row ? g_r - g0 : g0 - g_r));
        C[2 * lane + 1] = expf((float)(2 * lane + 1 < first_row ? g_r - s : s - g_r));
        C[CH + 2 * lane] = expf((float)(g_b - g0));
        C[CH + 2 * lane + 1] = expf((float)(g_b - s));
        if (__all_sync(FULL, x0 <= 0.0 && x1 <= 0.0)) factored = __all_sync(FULL, g_b - s <= DIAG_SPAN) ? 2 : 1;
    }
    __syncwarp();
    return factored;
}
#endif

// The warp's scores q_i . k_j (rows from 16 gw, columns 8t .. 8t+7 in sc[t]) masked to
// j <= i and, with a gate, decayed by e^{G_i - G_j}: by the factors C where `factored`
// says they hold (see chunk_decays), else by an expf per score; warp-uniform branches, so
// each path runs alone. The tiles past the diagonal block are skipped, or with ZERO_ABOVE
// set to zero. Where every decay is factored (2), the products are selects, not branches,
// so that the factors' loads issue together (Nsight Compute at (1, 8192, 96, 128) bf16: the
// branchy form spent 16% of the scalar-gated kernel's stall samples waiting on them, one
// load at a time; the gated delta scan took 4-5% less time without them).
template <bool ZERO_ABOVE>
__device__ __forceinline__ void mask_scores(float (&sc)[8][4], int gw, [[maybe_unused]] const double* G,
                                            [[maybe_unused]] const float* C, [[maybe_unused]] int factored) {
    const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3, row0 = gw * 16;
    auto row = [&](int e) { return row0 + gid + (e >> 1) * 8; };
    auto col = [&](int t, int e) { return t * 8 + 2 * tig + (e & 1); };
    // The tiles past the diagonal block, and on it j <= i only, times decay(i, j) (a select,
    // not a branch per score; past the diagonal, j > i, the decay is not used).
    auto mask_to_diagonal = [&](auto decay) {
#pragma unroll
        for (int t = 0; t < 8; ++t) {
            if (t / 2 > gw) {
                if (ZERO_ABOVE)
#pragma unroll
                    for (int e = 0; e < 4; ++e) sc[t][e] = 0.f;
            } else if (t / 2 == gw) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int i = row(e), j = col(t, e);
                    sc[t][e] = j <= i ? sc[t][e] * decay(i, j) : 0.f;
                }
            }
        }
    };
#if GATED
    if (factored == 2) {
        // Every decay a product of two factors, C_i C_{CH + j} on the diagonal block and
        // C_i C_j below it (rows i >= row0 > j): the row's factor times the column's, read from
        // the diagonal block's table or the other. Without branches, so that the factors' loads
        // (two rows, then a pair of columns per 8-column tile, four tiles at a time) issue
        // together before the products.
        const float row_factor[2] = {C[row(0)], C[row(2)]};
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            float2 col_factor[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int t = 4 * half + u;
                col_factor[u] = *reinterpret_cast<const float2*>(C + (t / 2 == gw ? CH : 0) + t * 8 + 2 * tig);
            }
#pragma unroll
            for (int u = 0; u < 4; ++u)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int t = 4 * half + u;
                    const float c = (e & 1) ? col_factor[u].y : col_factor[u].x;
                    const float decayed = sc[t][e] * (row_factor[e >> 1] * c);
                    const float above = ZERO_ABOVE ? 0.f : sc[t][e];
                    sc[t][e] = t / 2 > gw ? above : (col(t, e) <= row(e) ? decayed : 0.f);
                }
        }
        return;
    }
    mask_to_diagonal([&](int i, int j) { return expf((float)(G[i] - G[j])); });
    if (factored) {  // below the diagonal block (j < i)
        const float row_factor[2] = {C[row0 + gid], C[row0 + gid + 8]};
#pragma unroll
        for (int t = 0; t < 8; ++t)
            if (t / 2 < gw)
#pragma unroll
                for (int e = 0; e < 4; ++e) sc[t][e] *= row_factor[e >> 1] * C[col(t, e)];
    } else {
#pragma unroll
        for (int t = 0; t < 8; ++t)
            if (t / 2 < gw)
#pragma unroll
                for (int e = 0; e < 4; ++e) sc[t][e] *= expf((float)(G[row(e)] - G[col(t, e)]));
    }
#else
    mask_to_diagonal([](int, int) { return 1.f; });
#endif
}

// Scores of the warp's 16 rows (from `row0 = 16 gw`) against the chunk's columns j <= i:
// sc[t] holds columns 8t .. 8t+7, (q_i . k_j) e^{G_i - G_j} (without a gate, q_i . k_j),
// masked to j <= i; the tiles past the diagonal block are never computed and hold zeros.
// G, C and `factored` are chunk_decays' (unused without a gate).
__device__ __forceinline__ void causal_scores(float (&sc)[8][4], const ELEM* qt, const ELEM* kt, int gw,
                                              [[maybe_unused]] const double* G, [[maybe_unused]] const float* C,
                                              [[maybe_unused]] int factored) {
    const int lane = threadIdx.x & 31, row0 = gw * 16;
#pragma unroll
    for (int t = 0; t < 8; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[t][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < DKP / 16; ++kk) {
        u32 a[4];
        ldsm(a, qt + (row0 + (lane & 15)) * QKS + kk * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int np = 0; np < 4; ++np) {
            if (np <= gw) {
                u32 b[4];
                ldsm(b, kt + (np * 16 + (lane & 7) + (lane >> 4) * 8) * QKS + kk * 16 + ((lane >> 3) & 1) * 8);
                mma16(sc[2 * np], sc[2 * np + 1], a, b);
            }
        }
    }
    mask_scores<false>(sc, gw, G, C, factored);
}

// The power of two that keeps the warp's scores and their remainders in float16's range
// (1 for bfloat16, whose range is float32's).
__device__ __forceinline__ float score_scale_of(const float (&sc)[8][4]) {
#if SCALED
    float m = 0.f;
#pragma unroll
    for (int t = 0; t < 8; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) m = fmaxf(m, fabsf(sc[t][e]));
    return pow2_scale(warp_max(m));
#else
    return 1.f;
#endif
}
