// The causal linear scan in chunks on float32 data, on tensor cores to float32 accuracy.
//
//   S_t = S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t
//
// For a chunk of C = 32 steps entering with state S, P the chunk's scores q_i . k_j masked
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
// additions (rounded to nearest), and the scores and outputs sum the leading products
// (hi hi) and the cross products (hi lo + lo hi) in two accumulators added at the end: the
// truncation of each is relative to its own, the cross terms' 2^-10 smaller, sum, and no
// accumulator takes more than 2 (Dk / 8 + 4) products. (One accumulator for all three
// terms doubled the outputs' error, 9e-7 -> 1.6e-6 of the largest at T = 4096, Dk = 128.)
//
// Work split: one block of NW warps per (leading index, tile of VB = 16 NW value columns,
// time segment) walks its segment's chunks in order. Warp w owns value columns 16w ..
// 16w + 15: their state S^T (16 x DKP) in accumulator registers for the whole segment, and
// their outputs. Per chunk:
//   1. the block splits the chunk's q and k into hi and lo tiles in shared memory, once
//      (every warp reads all of them);
//   2. the warps compute the three 16 x 16 tiles of P on and below the diagonal between
//      them and store them (hi, lo) in shared memory;
//   3. each warp forms its columns' S^T Q^T and updates its state, S^T += V^T K;
//   4. after a barrier (P is complete, and q, k, v are read) the next chunk's loads are
//      issued, and each warp adds V^T P^T to its outputs and stores them while they land.
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

#define CH 32                // chunk length
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

// Four consecutive words of a tile into hi parts (in place) and lo parts (the same place in `lo`).
__device__ __forceinline__ void split_in_place(float* hi, float* lo) {
    const float4 x = *reinterpret_cast<const float4*>(hi);
    uint4 h, l;
    split(x.x, h.x, l.x);
    split(x.y, h.y, l.y);
    split(x.z, h.z, l.z);
    split(x.w, h.w, l.w);
    *reinterpret_cast<uint4*>(hi) = h;
    *reinterpret_cast<uint4*>(lo) = l;
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

// The same into two accumulators, the leading term's and the cross terms': dh += a_hi b_hi,
// dx += a_lo b_hi + a_hi b_lo (dh + dx is the sum). Two chains of dependent products
// instead of one, and the small cross terms summed apart from the large, so that the tensor
// core's truncation of each sum is relative to the smaller of them.
__device__ __forceinline__ void mma3(float (&dh)[4], float (&dx)[4], const u32 (&ah)[4], const u32 (&al)[4], u32 bh0,
                                     u32 bh1, u32 bl0, u32 bl1) {
    mma(dx, al, bh0, bh1);
    mma(dx, ah, bl0, bl1);
    mma(dh, ah, bh0, bh1);
}

template <int N>
__device__ __forceinline__ void add_into(float (&d)[N][4], const float (&x)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) d[i][e] += x[i][e];
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
    float* sqh = reinterpret_cast<float*>(smem);  // [CH][QKS] q, hi parts
    float* sql = sqh + CH * QKS;                   // [CH][QKS] ... lo parts
    float* skh = sql + CH * QKS;                   // [CH][QKS] k, hi parts
    float* skl = skh + CH * QKS;                   // [CH][QKS] ... lo parts
    float* sv = skl + CH * QKS;                    // [CH][VS]
    [[maybe_unused]] float* sph = sv + CH * VS;    // [CH][PS] the scores' hi parts, masked (tiles on and below the diagonal)
    [[maybe_unused]] float* spl = sph + CH * PS;   // [CH][PS] ... lo parts

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

    constexpr int ROW_PIECES = DKP / 4, COL_PIECES = VB / 4;  // 16 bytes each
    auto load_chunk = [&](int n) {
        const i64 t0 = t_begin + (i64)n * CH;
#pragma unroll 4
        for (int p = threadIdx.x; p < CH * ROW_PIECES; p += NTHREADS) {
            const int r = p / ROW_PIECES, c = (p % ROW_PIECES) * 4;
            const bool ok = t0 + r < t_end && c < Dk;
#if WRITE_O
            copy16(sqh + r * QKS + c, qb + (ok ? (t0 + r) * qts + c : 0), ok);
#endif
            copy16(skh + r * QKS + c, kb + (ok ? (t0 + r) * kts + c : 0), ok);
        }
#pragma unroll 4
        for (int p = threadIdx.x; p < CH * COL_PIECES; p += NTHREADS) {
            const int r = p / COL_PIECES, c = (p % COL_PIECES) * 4;
            const bool ok = t0 + r < t_end && c0 + c < Dv;
            copy16(sv + r * VS + c, vb + (ok ? (t0 + r) * vts + c : 0), ok);
        }
        copy_commit();
    };

    if (n_chunks > 0) load_chunk(0);
    for (int n = 0; n < n_chunks; ++n) {
        copy_wait();
        __syncthreads();  // chunk n is in shared memory, and every warp is done with chunk n - 1's scores
#pragma unroll 4
        for (int p = threadIdx.x; p < CH * ROW_PIECES; p += NTHREADS) {
            const int at = p / ROW_PIECES * QKS + (p % ROW_PIECES) * 4;
#if WRITE_O
            split_in_place(sqh + at, sql + at);
#endif
            split_in_place(skh + at, skl + at);
        }
        __syncthreads();  // q and k are split

#if WRITE_O
        // The score tiles (r, c), c <= r, numbered row by row (0: (0, 0); 1, 2: (1, 0), (1, 1)),
        // shared out evenly: this warp's are [first, last).
        const int first = (3 * warp + NW / 2) / NW, last = (3 * (warp + 1) + NW / 2) / NW;
        for (int s = first; s < last; ++s) {
            const int r = s > 0, c = s - r;
            float acc[2][4] = {}, accx[2][4] = {};
#pragma unroll 4
            for (int kk = 0; kk < DKP / 8; ++kk) {
                u32 ah[4], al[4], bh[4], bl[4];
                const int at = (16 * r + ((lane >> 3) & 1) * 8 + (lane & 7)) * QKS + 8 * kk + (lane >> 4) * 4;
                ldsm(ah, sqh + at);
                ldsm(al, sql + at);
                ldsm_b(bh, skh, 16 * c, 8 * kk);
                ldsm_b(bl, skl, 16 * c, 8 * kk);
                mma3(acc[0], accx[0], ah, al, bh[0], bh[1], bl[0], bl[1]);
                mma3(acc[1], accx[1], ah, al, bh[2], bh[3], bl[2], bl[3]);
            }
            add_into(acc, accx);
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int t = 0; t < 2; ++t) {
                    const int i = 16 * r + gid + 8 * h, j = 16 * c + 8 * t + 2 * tig;
                    const float x0 = j > i ? 0.f : acc[t][2 * h];  // on the diagonal tile, j <= i only
                    const float x1 = j + 1 > i ? 0.f : acc[t][2 * h + 1];
                    uint2 hi, lo;
                    split(x0, hi.x, lo.x);
                    split(x1, hi.y, lo.y);
                    *reinterpret_cast<uint2*>(sph + i * PS + j) = hi;
                    *reinterpret_cast<uint2*>(spl + i * PS + j) = lo;
                }
        }

        // O^T = S^T Q^T (rows: the warp's value columns; columns: the chunk's steps, in OT[it]
        // steps 8 it .. 8 it + 7): the state's fragments are the A fragments as they stand.
        float OT[CH / 8][4] = {}, OTx[CH / 8][4] = {};
#pragma unroll
        for (int nd = 0; nd < ND; ++nd) {
            const u32 a[4] = {__float_as_uint(S[nd][0]), __float_as_uint(S[nd][2]), __float_as_uint(S[nd][1]),
                              __float_as_uint(S[nd][3])};
            u32 ah[4], al[4];
            split(a, ah, al);
#pragma unroll
            for (int ip = 0; ip < CH / 16; ++ip) {
                u32 bh[4], bl[4];
                ldsm_b(bh, sqh, 16 * ip, 8 * nd);
                ldsm_b(bl, sql, 16 * ip, 8 * nd);
                mma3(OT[2 * ip], OTx[2 * ip], ah, al, bh[0], bh[1], bl[0], bl[1]);
                mma3(OT[2 * ip + 1], OTx[2 * ip + 1], ah, al, bh[2], bh[3], bl[2], bl[3]);
            }
        }
#endif

        // A = V^T (the warp's value columns; steps 8 jb .. 8 jb + 7 permuted) serves V^T K
        // and V^T P^T.
        u32 vh[CH / 8][4], vl[CH / 8][4];
#pragma unroll
        for (int jb = 0; jb < CH / 8; ++jb) {
            const float* vr = sv + (8 * jb + 2 * tig) * VS + cw + gid;
            const u32 a[4] = {__float_as_uint(vr[0]), __float_as_uint(vr[8]), __float_as_uint(vr[VS]),
                              __float_as_uint(vr[VS + 8])};
            split(a, vh[jb], vl[jb]);
        }

        // V^T K into the state, over the chunk's steps 8 at a time, in pairs. B = K: steps
        // permuted as V's; register column n holds key 8 nd + n / 2 + 4 (n % 2).
#pragma unroll
        for (int jp = 0; jp < CH / 16; ++jp) {
            const int kr = (16 * jp + 2 * tig) * QKS + (gid >> 1) + 4 * (gid & 1);
#pragma unroll
            for (int nd = 0; nd < ND; ++nd) {
                float dS[4] = {};  // one accumulator: six products, then a float32 addition to the state
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int at = kr + 8 * h * QKS + 8 * nd;
                    mma3(dS, dS, vh[2 * jp + h], vl[2 * jp + h], __float_as_uint(skh[at]), __float_as_uint(skh[at + QKS]),
                         __float_as_uint(skl[at]), __float_as_uint(skl[at + QKS]));
                }
#pragma unroll
                for (int e = 0; e < 4; ++e) S[nd][e] += dS[e];
            }
        }

        __syncthreads();  // the scores are in shared memory; every warp is done with chunk n's q, k and v tiles
        if (n + 1 < n_chunks) load_chunk(n + 1);

#if WRITE_O
        // V^T P^T into O^T: P^T is zero above its diagonal blocks.
#pragma unroll
        for (int jb = 0; jb < CH / 8; ++jb)
#pragma unroll
            for (int it = jb; it < CH / 8; ++it) {
                const int at = (8 * it + gid) * PS + 8 * jb + 2 * tig;
                const uint2 ph = *reinterpret_cast<const uint2*>(sph + at), pl = *reinterpret_cast<const uint2*>(spl + at);
                mma3(OT[it], OTx[it], vh[jb], vl[jb], ph.x, ph.y, pl.x, pl.y);
            }
        add_into(OT, OTx);

        {  // The warp's outputs: element e of OT[it] is step 8 it + 2 tig + e % 2, column cw + gid + 8 (e / 2).
            const i64 t0 = t_begin + (i64)n * CH;
#pragma unroll
            for (int it = 0; it < CH / 8; ++it)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int i = 8 * it + 2 * tig + (e & 1), c = state_col(e);
                    if (t0 + i < t_end && c0 + c < Dv) ob[(t0 + i) * ots + c] = OT[it][e];
                }
        }
#endif
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
