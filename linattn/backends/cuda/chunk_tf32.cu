// The causal linear scan in chunks on float32 data, on tensor cores to float32 accuracy.
//
//   S_t = S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t
//
// For a chunk of C = 64 steps entering with state S, P the chunk's scores q_i . k_j masked
// to j <= i:
//
//   O^T    = S^T Q^T + V^T P^T
//   S_exit = S + K^T V
//
// Precision (3xTF32). Every product x y of the scan is three TF32 products (mma.sync
// m16n8k8, float32 accumulation) of two-part operands, x = hi + lo with hi = tf32(x)
// rounded to nearest and lo = x - hi (exact in float32; the tensor core reads its leading
// 11 bits):
//
//   x y ~ hi_x hi_y + hi_x lo_y + lo_x hi_y
//
// |lo| <= 2^-11 |x|, lo enters truncated to 2^-10 of itself, and the dropped lo_x lo_y is
// at most 2^-22 |x y|: each product is within about 5 * 2^-22 |x y| of x y (a few float32
// roundings), where one TF32 product (what float32 "chunk" kernels on TF32 compute) is off
// by up to 2^-10. The tensor core rounds its float32 accumulation toward zero, a bias that
// grows with the number of products accumulated into one register; so a chunk's K^T V is
// accumulated from zero, two blocks of 8 steps at a time, and added to the state by float32
// additions (rounded to nearest), and no output or score accumulates more than
// 3 (Dk / 8 + 8) products.
//
// Work split: one block of NW warps per (leading index, tile of VB = 16 NW value columns,
// time segment) walks its segment's chunks in order. Warp w owns value columns 16w ..
// 16w + 15: their state S^T (16 x DKP) in accumulator registers for the whole segment, and
// their outputs. Per chunk: the warps compute the ten 16 x 16 tiles of P on and below the
// diagonal between them and share them through shared memory; then each warp forms its
// columns' O^T = S^T Q^T + V^T P^T and updates its state, S^T += V^T K.
//
// Fragments. ldmatrix moves 32-bit words only untransposed (.trans swaps 16-bit
// elements), so it loads the operands whose contracted index runs along a shared-memory
// row: q and k for the scores, q for S^T Q^T. The rest are read a word (or, for P, two)
// per load, with the contracted steps permuted inside each block of 8 — fragment column
// t < 4 is step 2t, column t + 4 is step 2t + 1 — and the state's keys kept permuted in
// its registers (register column 2t holds key t, 2t + 1 key t + 4), so that the state's
// accumulator fragments are S^T Q^T's A fragments as they stand. With the row strides
// below every load is free of bank conflicts.
//
// Compile-time parameters (-D): DKP (keys padded to a multiple of 8, at most 128), NW
// (warps per block: 4, 2 or 1), HAS_SIN, WRITE_O (0: the states only, for the first pass
// of the time-segmented scan).
//
// Strides are in elements; the last axis of every operand is contiguous, every row starts
// on 16 bytes, and Dk, Dv are multiples of 4 (the launcher checks). A time stride may be
// negative (a reversed view); a leading stride of 0 broadcasts.

#define CH 64                // chunk length
#define NTHREADS (32 * NW)
#define VB (16 * NW)         // value columns per block
#define QKS (DKP + 4)        // row stride of q and k in shared memory, in words (4 mod 8)
#define VS (VB + 4)          // ... of v (4 mod 8)
#define PS (CH + 8)          // ... of the scores (8 mod 32: the pair reads)
#define ND (DKP / 8)         // the state's key tiles (8) per warp

typedef float ELEM;

#include "chunk_common.cuh"

// x = hi + lo: hi = x rounded to TF32 (to nearest, ties away from zero: half an ulp of the
// 10-bit fraction added to the magnitude's bits, the 13 low bits cleared; two integer
// instructions, where cvt.rna.tf32.f32 costs more), lo = x - hi. A finite x whose rounding
// overflows becomes infinite, as cvt.rna would make it; inputs that large overflow the scan.
__device__ __forceinline__ void split(float x, u32& hi, u32& lo) {
    hi = (__float_as_uint(x) + 0x1000u) & 0xffffe000u;
    lo = __float_as_uint(x - __uint_as_float(hi));
}

template <int N>
__device__ __forceinline__ void split(const u32 (&x)[N], u32 (&hi)[N], u32 (&lo)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) split(__uint_as_float(x[i]), hi[i], lo[i]);
}

// d += a b: a 16x8 tile of A (row fragments), an 8x8 tile of B (column fragments), TF32.
__device__ __forceinline__ void mma(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// d += (a_hi + a_lo)(b_hi + b_lo) without the lo x lo term.
__device__ __forceinline__ void mma3(float (&d)[4], const u32 (&ah)[4], const u32 (&al)[4], u32 bh0, u32 bh1,
                                     u32 bl0, u32 bl1) {
    mma(d, al, bh0, bh1);
    mma(d, ah, bl0, bl1);
    mma(d, ah, bh0, bh1);
}

// Four 8 x 4 tiles of 32-bit words (ldmatrix's 8 x 8 tiles of 16-bit values): lane l gives
// the address of row l % 8 of tile l / 8 and receives word l % 4 of row l / 4 of each.
__device__ __forceinline__ void ldsm(u32 (&r)[4], const float* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(shared_address(p)) : "memory");
}

// The two 8-column B fragments (b[0], b[1] and b[2], b[3]) of rows `row` .. row + 15 of a
// row-major tile (stride QKS), contracted over its words from `word` (8 of them).
__device__ __forceinline__ void ldsm_b(u32 (&b)[4], const float* tile, int row, int word) {
    const int lane = threadIdx.x & 31;
    ldsm(b, tile + (row + (lane >> 4) * 8 + (lane & 7)) * QKS + word + ((lane >> 3) & 1) * 4);
}

extern "C" __global__ void __launch_bounds__(NTHREADS)
chunk_linear_scan_tf32(LINEAR_CHUNK_PARAMS) {
    extern __shared__ __align__(16) unsigned char smem[];
    float* sq = reinterpret_cast<float*>(smem);  // [CH][QKS]
    float* sk = sq + CH * QKS;                   // [CH][QKS]
    float* sv = sk + CH * QKS;                   // [CH][VS]
    [[maybe_unused]] float* sp = sv + CH * VS;   // [CH][PS]   the scores, masked (tiles on and below the diagonal)

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    const int c0 = (blockIdx.x % col_blocks) * VB;
    LINEAR_CHUNK_GEOMETRY
    [[maybe_unused]] float* ob = o + la * os0 + lb * os1 + lc * os2 + c0;

    // The warp's state S^T in accumulator layout: element e of S[nd] is value column
    // cw + gid + 8 (e / 2) and key 8 nd + tig + 4 (e % 2) (keys permuted, see the header).
    const int cw = 16 * warp;
    auto state_col = [&](int e) { return cw + gid + 8 * (e >> 1); };
    auto state_key = [&](int nd, int e) { return 8 * nd + tig + 4 * (e & 1); };
    float S[ND][4];
#pragma unroll
    for (int nd = 0; nd < ND; ++nd)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int d = state_key(nd, e), c = c0 + state_col(e);
            float x = 0.f;
#if HAS_SIN
            if (d < Dk && c < Dv) x = s_in[la * ss0 + lb * ss1 + lc * ss2 + blockIdx.y * sseg + d * srow + c * scol];
#endif
            S[nd][e] = x;
        }

    auto load_chunk = [&](int n) {
        const i64 t0 = t_begin + (i64)n * CH;
        constexpr int ROW_PIECES = DKP / 4, COL_PIECES = VB / 4;  // 16 bytes each; both tiles are whole rounds
#pragma unroll 8
        for (int it = 0; it < CH * ROW_PIECES / NTHREADS; ++it) {
            const int p = threadIdx.x + it * NTHREADS, r = p / ROW_PIECES, c = (p % ROW_PIECES) * 4;
            const bool ok = t0 + r < t_end && c < Dk;
#if WRITE_O
            copy16(sq + r * QKS + c, qb + (ok ? (t0 + r) * qts + c : 0), ok);
#endif
            copy16(sk + r * QKS + c, kb + (ok ? (t0 + r) * kts + c : 0), ok);
        }
#pragma unroll 8
        for (int it = 0; it < CH * COL_PIECES / NTHREADS; ++it) {
            const int p = threadIdx.x + it * NTHREADS, r = p / COL_PIECES, c = (p % COL_PIECES) * 4;
            const bool ok = t0 + r < t_end && c0 + c < Dv;
            copy16(sv + r * VS + c, vb + (ok ? (t0 + r) * vts + c : 0), ok);
        }
        copy_commit();
    };

    for (int n = 0; n < n_chunks; ++n) {
        load_chunk(n);
        copy_wait();
        __syncthreads();  // chunk n is in shared memory

#if WRITE_O
        // The score tiles (r, c), c <= r, numbered row by row (0: (0, 0); 1, 2: (1, 0), (1, 1);
        // ...), shared out evenly: this warp's are [first, last).
        const int first = (10 * warp + NW / 2) / NW, last = (10 * (warp + 1) + NW / 2) / NW;
        for (int s = first; s < last; ++s) {
            const int r = s < 1 ? 0 : s < 3 ? 1 : s < 6 ? 2 : 3, c = s - r * (r + 1) / 2;
            float acc[2][4] = {};
#pragma unroll 4
            for (int kk = 0; kk < DKP / 8; ++kk) {
                u32 a[4], ah[4], al[4], b[4], bh[4], bl[4];
                ldsm(a, sq + (16 * r + ((lane >> 3) & 1) * 8 + (lane & 7)) * QKS + 8 * kk + (lane >> 4) * 4);
                ldsm_b(b, sk, 16 * c, 8 * kk);
                split(a, ah, al);
                split(b, bh, bl);
                mma3(acc[0], ah, al, bh[0], bh[1], bl[0], bl[1]);
                mma3(acc[1], ah, al, bh[2], bh[3], bl[2], bl[3]);
            }
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int t = 0; t < 2; ++t) {
                    const int i = 16 * r + gid + 8 * h, j = 16 * c + 8 * t + 2 * tig;
                    float2 x = make_float2(acc[t][2 * h], acc[t][2 * h + 1]);
                    if (j > i) x.x = 0.f;  // on the diagonal tile, j <= i only
                    if (j + 1 > i) x.y = 0.f;
                    *reinterpret_cast<float2*>(sp + i * PS + j) = x;
                }
        }
        __syncthreads();  // the scores are in shared memory

        // O^T = S^T Q^T (rows: the warp's value columns; columns: the chunk's steps, in OT[it]
        // steps 8 it .. 8 it + 7): the state's fragments are the A fragments as they stand.
        float OT[8][4] = {};
#pragma unroll
        for (int nd = 0; nd < ND; ++nd) {
            const u32 a[4] = {__float_as_uint(S[nd][0]), __float_as_uint(S[nd][2]), __float_as_uint(S[nd][1]),
                              __float_as_uint(S[nd][3])};
            u32 ah[4], al[4];
            split(a, ah, al);
#pragma unroll
            for (int ip = 0; ip < 4; ++ip) {
                u32 b[4], bh[4], bl[4];
                ldsm_b(b, sq, 16 * ip, 8 * nd);
                split(b, bh, bl);
                mma3(OT[2 * ip], ah, al, bh[0], bh[1], bl[0], bl[1]);
                mma3(OT[2 * ip + 1], ah, al, bh[2], bh[3], bl[2], bl[3]);
            }
        }
#endif

        // V^T P^T into O^T and V^T K into the state, over the chunk's steps 8 at a time, in
        // pairs: A = V^T (the warp's value columns; steps permuted) serves both.
#pragma unroll 1
        for (int jp = 0; jp < 4; ++jp) {
            u32 vh[2][4], vl[2][4];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const float* vr = sv + (16 * jp + 8 * h + 2 * tig) * VS + cw + gid;
                const u32 a[4] = {__float_as_uint(vr[0]), __float_as_uint(vr[8]), __float_as_uint(vr[VS]),
                                  __float_as_uint(vr[VS + 8])};
                split(a, vh[h], vl[h]);
            }
#if WRITE_O
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int jb = 2 * jp + h;
#pragma unroll
                for (int it = 0; it < 8; ++it) {
                    if (it >= jb) {  // P^T is zero above its diagonal blocks
                        const float2 p = *reinterpret_cast<const float2*>(sp + (8 * it + gid) * PS + 8 * jb + 2 * tig);
                        u32 bh0, bl0, bh1, bl1;
                        split(p.x, bh0, bl0);
                        split(p.y, bh1, bl1);
                        mma3(OT[it], vh[h], vl[h], bh0, bh1, bl0, bl1);
                    }
                }
            }
#endif
            // B = K: steps permuted as V's; register column n holds key 8 nd + n / 2 + 4 (n % 2).
            const float* kr = sk + (16 * jp + 2 * tig) * QKS + (gid >> 1) + 4 * (gid & 1);
#pragma unroll
            for (int nd = 0; nd < ND; ++nd) {
                float dS[4] = {};
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    u32 bh0, bl0, bh1, bl1;
                    split(kr[8 * h * QKS + 8 * nd], bh0, bl0);
                    split(kr[(8 * h + 1) * QKS + 8 * nd], bh1, bl1);
                    mma3(dS, vh[h], vl[h], bh0, bh1, bl0, bl1);
                }
#pragma unroll
                for (int e = 0; e < 4; ++e) S[nd][e] += dS[e];
            }
        }

#if WRITE_O
        {  // The warp's outputs: element e of OT[it] is step 8 it + 2 tig + e % 2, column cw + gid + 8 (e / 2).
            const i64 t0 = t_begin + (i64)n * CH;
#pragma unroll
            for (int it = 0; it < 8; ++it)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int i = 8 * it + 2 * tig + (e & 1), c = state_col(e);
                    if (t0 + i < t_end && c0 + c < Dv) ob[(t0 + i) * ots + c] = OT[it][e];
                }
        }
#endif
        __syncthreads();  // every warp is done with chunk n's tiles
    }

    // The exit state: s_out[lead][segment][Dk][Dv].
    float* out = s_out + ((lead * gridDim.y + blockIdx.y) * Dk) * (i64)Dv;
#pragma unroll
    for (int nd = 0; nd < ND; ++nd)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int d = state_key(nd, e), c = c0 + state_col(e);
            if (d < Dk && c < Dv) out[(i64)d * Dv + c] = S[nd][e];
        }
}
