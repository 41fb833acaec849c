// The delta rule in chunks, on tensor cores (mma.sync m16n8k16, float32 accumulation).
//
//   S_t = e^{g_t} (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,   o_t = S_t^T q_t   (g_t = 0 ungated)
//
// For a chunk of C = 64 steps entering with state S, with G_i = g_0 + ... + g_i inside it
// (the WY/UT form of linattn.delta_scan's chunked form):
//
//   L_ij   = b_i (k_i . k_j) e^{G_i - G_j} [j < i],    A = (I + L)^{-1},
//   U_free = A diag(b) V,    W = A diag(b e^{G}) K,    U = U_free - W S,
//   o_i    = e^{G_i} q_i^T S + sum_{j <= i} e^{G_i - G_j} (q_i . k_j) u_j,
//   S_exit = e^{G_C} S + sum_j e^{G_C - G_j} k_j u_j^T.
//
// Two kernels. delta_chunk_prepare runs on every chunk at once (nothing in it depends on
// S): L by tensor cores, A by forward substitution in float32 (a thread per column), then
// W and U_free by tensor cores. delta_chunk_scan walks each (leading index, tile of value
// columns) through its chunks in order, as chunk_linear_scan does with V replaced by U:
// one pass over the entering state gives both Q S and W S, U goes to shared memory, and
// the scores times U and the state update follow.
//
// Precision: q, k and v enter the products as stored. Every intermediate that enters a
// product — A diag(b), A diag(b e^G), W, U, the state, the decayed scores and keys — is
// split into two parts x = hi + lo in the storage type, and a product of two split
// operands keeps the three terms hi hi + hi lo + lo hi, so that each product is exact to
// about 2^-16 (bfloat16) or 2^-22 (float16) of its terms: a float32-accumulated delta rule
// of the stored inputs. For float16 the split operands are scaled by powers of two
// (exact) so that both parts stay in float16's range; W's scale, one per chunk, is stored
// with it.
//
// Compile-time parameters (-D): ELEM_HALF (float16, else bfloat16), DKP (keys padded to a
// multiple of 16, at most 128), GATED (a log-gate per step); delta_chunk_prepare: DVP
// (values padded to a multiple of 16); delta_chunk_scan: VB (value columns per group of
// four warps), GROUPS, WM (warps along the state's rows in the update), HAS_SIN.
//
// Strides are in elements; the last axis of every operand is contiguous, every row starts
// on 16 bytes, and Dk, Dv are multiples of 8 (the launcher checks). A leading stride of 0
// broadcasts. W (two parts) and U_free are (leading index, chunks x C, Dk | Dv), C-contiguous.

#define CH 64
#define QKS (DKP + 8)   // shared-memory row stride of q, k and W tiles (+16 bytes against bank conflicts)
#define AS (CH + 8)     // ... of the A tiles
#define LS (CH + 4)     // ... of L (float32; rows on 16 bytes, read as broadcasts)
#define SCALED ELEM_HALF

#include "mma_common.cuh"

#ifdef DVP
#define VSP (DVP + 8)
#define PTHREADS 128

// One block of four warps per (chunk, leading index of k, v, b, g).
extern "C" __global__ void __launch_bounds__(PTHREADS)
delta_chunk_prepare(const ELEM* __restrict__ k, const ELEM* __restrict__ v, const ELEM* __restrict__ beta,
                    const ELEM* __restrict__ g, ELEM* __restrict__ w_hi, ELEM* __restrict__ w_lo,
                    float* __restrict__ w_scale, float* __restrict__ u_free, i64 T, int Dk, int Dv, i64 n1, i64 n2,
                    i64 ks0, i64 ks1, i64 ks2, i64 kts, i64 vs0, i64 vs1, i64 vs2, i64 vts,
                    i64 bs0, i64 bs1, i64 bs2, i64 bts, i64 gs0, i64 gs1, i64 gs2, i64 gts) {
    extern __shared__ __align__(16) unsigned char smem[];
    ELEM* sk = reinterpret_cast<ELEM*>(smem);               // [CH][QKS]
    ELEM* sv = sk + CH * QKS;                                 // [CH][VSP]
    ELEM* su_hi = sv + CH * VSP;                              // [CH][AS]  A diag(b), two parts
    ELEM* su_lo = su_hi + CH * AS;
    ELEM* sw_hi = su_lo + CH * AS;                            // [CH][AS]  A diag(b e^G), two parts
    ELEM* sw_lo = sw_hi + CH * AS;
    float* sL = reinterpret_cast<float*>(sw_lo + CH * AS);   // [CH][LS]
    float* sb = sL + CH * LS;                                 // [CH] b
    float* sg = sb + CH;                                      // [CH] g
    float* sE = sg + CH;                                      // [CH] e^{G_i}
    float* sK = sE + CH;                                      // [CH] (unused here: the keys' decays)
    float* sred = sK + CH;                                    // [2][4] per-warp maxima
    double* sG = reinterpret_cast<double*>(sred + 8);        // [CH] G

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    const int chunk = blockIdx.x, n_chunks = gridDim.x, row0 = 16 * warp;
    const i64 lead = blockIdx.y, la = lead / (n1 * n2), lb = (lead / n2) % n1, lc = lead % n2;
    const i64 t0 = (i64)chunk * CH, valid = min((i64)CH, T - t0);
    stage_tile<CH, DKP, PTHREADS>(sk, QKS, k + la * ks0 + lb * ks1 + lc * ks2 + t0 * kts, kts, valid, Dk);
    stage_tile<CH, DVP, PTHREADS>(sv, VSP, v + la * vs0 + lb * vs1 + lc * vs2 + t0 * vts, vts, valid, Dv);
    copy_commit();
    if (threadIdx.x < CH) {
        const bool ok = threadIdx.x < valid;
        sb[threadIdx.x] = ok ? to_f(beta[la * bs0 + lb * bs1 + lc * bs2 + (t0 + threadIdx.x) * bts]) : 0.f;
#if GATED
        sg[threadIdx.x] = ok ? to_f(g[la * gs0 + lb * gs1 + lc * gs2 + (t0 + threadIdx.x) * gts]) : 0.f;
#endif
    }
    __syncthreads();
#if GATED
    if (warp == 0) chunk_decays(sg, 0, sG, sE, sK, nullptr, false);
#endif
    copy_wait();
    __syncthreads();

    // L: this warp's rows of b_i (k_i . k_j) e^{G_i - G_j}, j < i.
    {
        float sc[8][4];
        causal_scores(sc, sk, sk, warp, sG, nullptr, false);
#pragma unroll
        for (int t = 0; t < 8; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = row0 + gid + (e >> 1) * 8, j = t * 8 + 2 * tig + (e & 1);
                sL[i * LS + j] = j < i ? sb[i] * sc[t][e] : 0.f;
            }
    }
    __syncthreads();

    // A = (I + L)^{-1} by forward substitution, column c by thread c: x_i = [i = c] - sum_{j<i} L_ij x_j,
    // the sum in four partial sums (a chain of i/4 dependent steps, not i).
    float amax[2] = {0.f, 0.f};
    float x[CH];
    const int c = threadIdx.x;
    if (c < CH) {
#pragma unroll
        for (int i = 0; i < CH; ++i) {
            float acc[4] = {i == c ? 1.f : 0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int j = 0; j < i; ++j) acc[j & 3] -= sL[i * LS + j] * x[j];
            x[i] = i < c ? 0.f : (acc[0] + acc[1]) + (acc[2] + acc[3]);  // 0 above the diagonal (even where L is inf)
        }
#if GATED
        const float e = sE[c];
#else
        const float e = 1.f;
#endif
#pragma unroll
        for (int i = 0; i < CH; ++i) {
            amax[0] = fmaxf(amax[0], fabsf(x[i] * sb[c]));
            amax[1] = fmaxf(amax[1], fabsf(x[i] * sb[c] * e));
        }
    }
    float scale_u = 1.f, scale_w = 1.f;
#if SCALED
    amax[0] = warp_max(amax[0]);
    amax[1] = warp_max(amax[1]);
    if (lane == 0) {
        sred[warp] = amax[0];
        sred[4 + warp] = amax[1];
    }
    __syncthreads();
    scale_u = pow2_scale(max_of<4>(sred));
    scale_w = pow2_scale(max_of<4>(sred + 4));
#endif
    if (c < CH) {
#if GATED
        const float e = sE[c];
#else
        const float e = 1.f;
#endif
        const float bu = sb[c] * scale_u, bw = sb[c] * e * scale_w;
#pragma unroll
        for (int i = 0; i < CH; ++i) {
            const float u = x[i] * bu, w = x[i] * bw;
            const ELEM uh = from_f(u), wh = from_f(w);
            su_hi[i * AS + c] = uh;
            su_lo[i * AS + c] = from_f(u - to_f(uh));
            sw_hi[i * AS + c] = wh;
            sw_lo[i * AS + c] = from_f(w - to_f(wh));
        }
    }
    __syncthreads();

    // rows [row0, row0 + 16) of (A_hi + A_lo) x B, B a tile (row stride bs) of CH rows, 16 NP columns from col.
    auto product = [&](float (*acc)[4], const ELEM* a_hi, const ELEM* a_lo, const ELEM* b_tile, int bs, int col,
                       int np_count) {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            if (kk > warp) continue;  // A is lower-triangular
            u32 ah[4], al[4];
            ldsm(ah, a_hi + (row0 + (lane & 15)) * AS + kk * 16 + (lane >> 4) * 8);
            ldsm(al, a_lo + (row0 + (lane & 15)) * AS + kk * 16 + (lane >> 4) * 8);
#pragma unroll
            for (int np = 0; np < 4; ++np) {
                if (np >= np_count) continue;
                u32 b[4];
                ldsm_t(b, b_tile + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * bs + col + np * 16 + (lane >> 4) * 8);
                mma(acc[2 * np], ah, b[0], b[1]);
                mma(acc[2 * np + 1], ah, b[2], b[3]);
                mma(acc[2 * np], al, b[0], b[1]);
                mma(acc[2 * np + 1], al, b[2], b[3]);
            }
        }
    };
    const i64 rows_out = (lead * n_chunks + chunk) * (i64)CH + row0 + gid;  // this thread's first output row

    // W = A diag(b e^G) K, stored negated (U = U_free + (-W) S) in two parts, times a power of two for float16.
    {
        float acc[DKP / 8][4];
#pragma unroll
        for (int t = 0; t < DKP / 8; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[t][e] = 0.f;
#pragma unroll
        for (int col = 0; col < DKP; col += 64) product(acc + col / 8, sw_hi, sw_lo, sk, QKS, col, min(4, (DKP - col) / 16));
        float out_scale = -1.f / scale_w;
#if SCALED
        float m = 0.f;
#pragma unroll
        for (int t = 0; t < DKP / 8; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) m = fmaxf(m, fabsf(acc[t][e]));
        m = warp_max(m);
        __syncthreads();  // every warp is done with sred
        if (lane == 0) sred[warp] = m / scale_w;
        __syncthreads();
        const float ws = pow2_scale(max_of<4>(sred));
        if (threadIdx.x == 0) w_scale[lead * n_chunks + chunk] = ws;
        out_scale *= ws;
#endif
#pragma unroll
        for (int t = 0; t < DKP / 8; ++t)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int d = t * 8 + 2 * tig;
                if (d >= Dk) continue;
                u32 hi, lo;
                split2(acc[t][2 * h] * out_scale, acc[t][2 * h + 1] * out_scale, hi, lo);
                const i64 at = (rows_out + h * 8) * Dk + d;
                *reinterpret_cast<u32*>(w_hi + at) = hi;
                *reinterpret_cast<u32*>(w_lo + at) = lo;
            }
    }

    // U_free = A diag(b) V in float32, 64 value columns at a time.
#pragma unroll
    for (int col = 0; col < DVP; col += 64) {
        float acc[8][4];
#pragma unroll
        for (int t = 0; t < 8; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[t][e] = 0.f;
        product(acc, su_hi, su_lo, sv, VSP, col, min(4, (DVP - col) / 16));
        const float unscale = 1.f / scale_u;
#pragma unroll
        for (int t = 0; t < 8; ++t)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int cc = col + t * 8 + 2 * tig;
                if (cc >= Dv) continue;
                *reinterpret_cast<float2*>(u_free + (rows_out + h * 8) * Dv + cc) =
                    make_float2(acc[t][2 * h] * unscale, acc[t][2 * h + 1] * unscale);
            }
    }
}
#endif  // DVP

#ifdef VB
#define NWARPS (4 * GROUPS)   // GROUPS sets of four warps, each owning VB of the block's value columns
#define NTHREADS (NWARPS * 32)
#define VBB (GROUPS * VB)      // the block's value columns
#define VS (VBB + 8)           // shared row stride of the U and state tiles
#define WN (4 / WM)
#define MT (DKP / 16 / WM)     // state row tiles (16) per warp
#define NT (VB / 8 / WN)       // state column tiles (8) per warp
#define ONT (VB / 8)           // output (and U) column tiles per warp

extern "C" __global__ void __launch_bounds__(NTHREADS, 1)
delta_chunk_scan(const ELEM* __restrict__ q, const ELEM* __restrict__ k, const ELEM* __restrict__ w_hi,
                 const ELEM* __restrict__ w_lo, const float* __restrict__ w_scale, const float* __restrict__ u_free,
                 const ELEM* __restrict__ g, const float* __restrict__ s_in, ELEM* __restrict__ o,
                 float* __restrict__ s_out, i64 T, int Dk, int Dv, i64 n1, i64 n2, int col_blocks,
                 i64 qs0, i64 qs1, i64 qs2, i64 qts, i64 ks0, i64 ks1, i64 ks2, i64 kts,
                 i64 os0, i64 os1, i64 os2, i64 ots, i64 gs0, i64 gs1, i64 gs2, i64 gts,
                 i64 ls0, i64 ls1, i64 ls2,
                 i64 ss0, i64 ss1, i64 ss2, i64 sseg, i64 srow, i64 scol) {
    extern __shared__ __align__(16) unsigned char smem[];
    ELEM* sq = reinterpret_cast<ELEM*>(smem);              // [2][CH][QKS]  (two chunks in flight)
    ELEM* sk = sq + 2 * CH * QKS;                           // [2][CH][QKS]
    ELEM* swh = sk + 2 * CH * QKS;                          // [CH][QKS]  -W, two parts (loaded during the previous chunk)
    ELEM* swl = swh + CH * QKS;
    ELEM* suh = swl + CH * QKS;                             // [CH][VS]   U, two parts
    ELEM* sul = suh + CH * VS;
    ELEM* shi = sul + CH * VS;                              // [DKP][VS]  the entering state, two parts
    ELEM* slo = shi + DKP * VS;
    float* sg = reinterpret_cast<float*>(slo + DKP * VS);   // [2][CH]    log-gates
    double* sG = reinterpret_cast<double*>(sg + 2 * CH);   // [NWARPS][CH] in-chunk cumulative log-gates
    [[maybe_unused]] float* sE = reinterpret_cast<float*>(sG + NWARPS * CH);  // [NWARPS][CH] e^{G_i}
    [[maybe_unused]] float* sK = sE + NWARPS * CH;          // [NWARPS][CH] e^{G_C - G_j}, the keys' decays
    [[maybe_unused]] float* sC = sK + NWARPS * CH;          // [NWARPS][CH] the score decays' factors
    [[maybe_unused]] float* sred = sC + NWARPS * CH;        // [2][NWARPS] per-warp max |S|, max |U|

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    const int c0 = (blockIdx.x % col_blocks) * VBB;
    const int gw = warp & 3, cg = (warp >> 2) * VB, row0 = 16 * gw;
    const i64 lead = blockIdx.x / col_blocks;
    const i64 la = lead / (n1 * n2), lb = (lead / n2) % n1, lc = lead % n2;
    const int n_chunks = (int)((T + CH - 1) / CH);
    const ELEM* qb = q + la * qs0 + lb * qs1 + lc * qs2;
    const ELEM* kb = k + la * ks0 + lb * ks1 + lc * ks2;
    // W, its scales and U_free belong to the leading index of k, v, b and g (ls: its strides, 0 broadcasts).
    const i64 kv_lead = la * ls0 + lb * ls1 + lc * ls2, rows = (i64)n_chunks * CH;
    const ELEM* whb = w_hi + kv_lead * rows * Dk;
    const ELEM* wlb = w_lo + kv_lead * rows * Dk;
    [[maybe_unused]] const float* wsb = w_scale + kv_lead * n_chunks;
    const float* ub = u_free + kv_lead * rows * Dv + c0 + cg + 2 * tig;
    [[maybe_unused]] const ELEM* gb = g + la * gs0 + lb * gs1 + lc * gs2;
    ELEM* ob = o + la * os0 + lb * os1 + lc * os2 + c0 + cg + 2 * tig;

    // This warp's tile of the state: rows d_base + [0, 16 MT), columns c_base + [0, 8 NT).
    const int d_base = (gw % WM) * MT * 16, c_base = cg + (gw / WM) * NT * 8;
    float S[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int d = d_base + mt * 16 + gid + (e >> 1) * 8, c = c0 + c_base + nt * 8 + 2 * tig + (e & 1);
                float x = 0.f;
#if HAS_SIN
                if (d < Dk && c < Dv) x = s_in[la * ss0 + lb * ss1 + lc * ss2 + d * srow + c * scol];
#endif
                S[mt][nt][e] = x;
            }

    auto load_qk = [&](int n, int buf) {
        const i64 t0 = (i64)n * CH;
        stage_tile<CH, DKP, NTHREADS>(sq + buf * CH * QKS, QKS, qb + t0 * qts, qts, T - t0, Dk);
        stage_tile<CH, DKP, NTHREADS>(sk + buf * CH * QKS, QKS, kb + t0 * kts, kts, T - t0, Dk);
        copy_commit();
    };
    auto load_w = [&](int n) {  // W has every chunk's rows (zeros past T)
        const i64 t0 = (i64)n * CH;
        stage_tile<CH, DKP, NTHREADS>(swh, QKS, whb + t0 * Dk, Dk, CH, Dk);
        stage_tile<CH, DKP, NTHREADS>(swl, QKS, wlb + t0 * Dk, Dk, CH, Dk);
        copy_commit();
    };
    [[maybe_unused]] auto load_gate = [&](int n) -> float {
        const i64 t = (i64)n * CH + threadIdx.x;
        return threadIdx.x < CH && t < T ? to_f(gb[t * gts]) : 0.f;
    };
    [[maybe_unused]] auto state_max = [&]() -> float {
        float m = 0.f;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) m = fmaxf(m, fabsf(S[mt][nt][e]));
        return warp_max(m);
    };
    // The state times `scale` into shared memory (two parts), the B operand of the next chunk's Q S and W S.
    auto share_state = [&](float scale) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int d = d_base + mt * 16 + gid + h * 8, c = c_base + nt * 8 + 2 * tig;
                    u32 hi, lo;
                    split2(S[mt][nt][2 * h] * scale, S[mt][nt][2 * h + 1] * scale, hi, lo);
                    *reinterpret_cast<u32*>(shi + d * VS + c) = hi;
                    *reinterpret_cast<u32*>(slo + d * VS + c) = lo;
                }
    };

    float state_scale = 1.f;  // the shared state holds S * state_scale
    load_qk(0, 0);
    load_w(0);
#if GATED
    float g_next = load_gate(0);
    if (threadIdx.x < CH) sg[threadIdx.x] = g_next;
#endif
#if SCALED
    {
        const float m = state_max();  // a warp-wide reduction: every lane takes part
        if (lane == 0) sred[warp] = m;
    }
    __syncthreads();
    state_scale = pow2_scale(max_of<NWARPS>(sred));
#endif
    share_state(state_scale);

    for (int n = 0; n < n_chunks; ++n) {
        const int buf = n & 1;
        const i64 t0 = (i64)n * CH;
        copy_wait();
        __syncthreads();  // chunk n (q, k, W) is in shared memory, and so is the state entering it
        if (n + 1 < n_chunks) load_qk(n + 1, buf ^ 1);
        const ELEM* qt = sq + buf * CH * QKS;
        const ELEM* kt = sk + buf * CH * QKS;
#if GATED
        if (n + 1 < n_chunks) g_next = load_gate(n + 1);
        double* G = sG + warp * CH;  // each warp its own copy: no block barrier needed
        const bool factored = chunk_decays(sg + buf * CH, row0, G, sE + warp * CH, sK + warp * CH, sC + warp * CH,
                                           true);
#endif

        // One pass over the shared state: O = Q (S s) and U = U_free - W S, this warp's 16 rows.
        float O[ONT][4], U[ONT][4];
        float w_s = 1.f;
#if SCALED
        w_s = wsb[n];
#endif
        const float pre = w_s * state_scale;  // the product W S comes out scaled by this
#pragma unroll
        for (int t = 0; t < ONT; ++t)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const bool ok = c0 + cg + t * 8 + 2 * tig < Dv;
                const float2 x = ok ? *reinterpret_cast<const float2*>(ub + (t0 + row0 + gid + h * 8) * Dv + t * 8)
                                    : make_float2(0.f, 0.f);
                U[t][2 * h] = x.x * pre;
                U[t][2 * h + 1] = x.y * pre;
                O[t][2 * h] = 0.f;
                O[t][2 * h + 1] = 0.f;
            }
#pragma unroll
        for (int kk = 0; kk < DKP / 16; ++kk) {
            u32 aq[4], awh[4], awl[4];
            const int a_off = (row0 + (lane & 15)) * QKS + kk * 16 + (lane >> 4) * 8;
            ldsm(aq, qt + a_off);
            ldsm(awh, swh + a_off);
            ldsm(awl, swl + a_off);
#pragma unroll
            for (int np = 0; np < VB / 16; ++np) {
                const int off = (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * VS + cg + np * 16 + (lane >> 4) * 8;
                u32 b[4];
                ldsm_t(b, shi + off);
                mma(O[2 * np], aq, b[0], b[1]);
                mma(O[2 * np + 1], aq, b[2], b[3]);
                mma(U[2 * np], awh, b[0], b[1]);
                mma(U[2 * np + 1], awh, b[2], b[3]);
                mma(U[2 * np], awl, b[0], b[1]);
                mma(U[2 * np + 1], awl, b[2], b[3]);
                ldsm_t(b, slo + off);
                mma(O[2 * np], aq, b[0], b[1]);
                mma(O[2 * np + 1], aq, b[2], b[3]);
                mma(U[2 * np], awh, b[0], b[1]);
                mma(U[2 * np + 1], awh, b[2], b[3]);
            }
        }

        // U into shared memory (two parts), times a power of two that keeps the block's U in float16's range.
        float u_scale = 1.f;
        {
            const float unscale = 1.f / pre;
#pragma unroll
            for (int t = 0; t < ONT; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) U[t][e] *= unscale;
#if SCALED
            float m = 0.f;
#pragma unroll
            for (int t = 0; t < ONT; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) m = fmaxf(m, fabsf(U[t][e]));
            m = warp_max(m);
            if (lane == 0) sred[NWARPS + warp] = m;
            __syncthreads();
            u_scale = pow2_scale(max_of<NWARPS>(sred + NWARPS));
#endif
#pragma unroll
            for (int t = 0; t < ONT; ++t)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int at = (row0 + gid + h * 8) * VS + cg + t * 8 + 2 * tig;
                    u32 hi, lo;
                    split2(U[t][2 * h] * u_scale, U[t][2 * h + 1] * u_scale, hi, lo);
                    *reinterpret_cast<u32*>(suh + at) = hi;
                    *reinterpret_cast<u32*>(sul + at) = lo;
                }
        }
        __syncthreads();  // U is whole, and every warp is done with this chunk's W
        if (n + 1 < n_chunks) load_w(n + 1);

        // O = e^{G_i} Q S + (decayed scores) U, through the scales of the two-part operands.
        float sc[8][4];
#if GATED
        causal_scores(sc, qt, kt, gw, G, sC + warp * CH, factored);
#else
        causal_scores(sc, qt, kt, gw, nullptr, nullptr, false);
#endif
        const float score_scale = score_scale_of(sc);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float f = score_scale * u_scale / state_scale;
#if GATED
            f *= sE[warp * CH + row0 + gid + h * 8];
#endif
#pragma unroll
            for (int t = 0; t < ONT; ++t) {
                O[t][2 * h] *= f;
                O[t][2 * h + 1] *= f;
            }
        }
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            if (kk > gw) continue;
            u32 ah[4], al[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const float* s = sc[2 * kk + (r >> 1)] + (r & 1) * 2;
                split2(s[0] * score_scale, s[1] * score_scale, ah[r], al[r]);
            }
#pragma unroll
            for (int np = 0; np < VB / 16; ++np) {
                const int off = (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * VS + cg + np * 16 + (lane >> 4) * 8;
                u32 b[4];
                ldsm_t(b, suh + off);
                mma(O[2 * np], ah, b[0], b[1]);
                mma(O[2 * np + 1], ah, b[2], b[3]);
                mma(O[2 * np], al, b[0], b[1]);
                mma(O[2 * np + 1], al, b[2], b[3]);
                ldsm_t(b, sul + off);
                mma(O[2 * np], ah, b[0], b[1]);
                mma(O[2 * np + 1], ah, b[2], b[3]);
            }
        }
        {
            const float unscale = 1.f / (score_scale * u_scale);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const i64 t = t0 + row0 + gid + h * 8;
                if (t >= T) continue;
#pragma unroll
                for (int tt = 0; tt < ONT; ++tt)
                    if (c0 + cg + tt * 8 + 2 * tig < Dv)
                        *reinterpret_cast<u32*>(ob + t * ots + tt * 8) =
                            pack2(O[tt][2 * h] * unscale, O[tt][2 * h + 1] * unscale);
            }
        }

        // The update of this warp's state tile: S <- e^{G_C} S + (K ⊙ e^{G_C - G})^T U.
        {
            float d = u_scale;  // the shared U holds U * u_scale
#if GATED
            d *= expf((float)G[CH - 1]);
#endif
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) S[mt][nt][e] *= d;
        }
#pragma unroll
        for (int kk = 0; kk < CH / 16; ++kk) {
            u32 ah[MT][4];
#if GATED
            u32 al[MT][4];
            const float* wj = sK + warp * CH + kk * 16 + 2 * tig;
            const float w[4] = {wj[0], wj[1], wj[8], wj[9]};
#endif
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                ldsm_t(ah[mt], kt + (kk * 16 + (lane & 7) + (lane >> 4) * 8) * QKS + d_base + mt * 16 +
                                   ((lane >> 3) & 1) * 8);
#if GATED
#pragma unroll
                for (int r = 0; r < 4; ++r) {  // registers 0, 1: columns j, j+1; 2, 3: j+8, j+9
                    const float2 x = unpack2(ah[mt][r]);
                    split2(x.x * w[(r >> 1) * 2], x.y * w[(r >> 1) * 2 + 1], ah[mt][r], al[mt][r]);
                }
#endif
            }
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                const int off = (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * VS + c_base + np * 16 + (lane >> 4) * 8;
                u32 b[4];
                ldsm_t(b, suh + off);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma(S[mt][2 * np], ah[mt], b[0], b[1]);
                    mma(S[mt][2 * np + 1], ah[mt], b[2], b[3]);
#if GATED
                    mma(S[mt][2 * np], al[mt], b[0], b[1]);
                    mma(S[mt][2 * np + 1], al[mt], b[2], b[3]);
#endif
                }
                ldsm_t(b, sul + off);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma(S[mt][2 * np], ah[mt], b[0], b[1]);
                    mma(S[mt][2 * np + 1], ah[mt], b[2], b[3]);
                }
            }
        }
#if SCALED
        {
            const float unscale = 1.f / u_scale;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) S[mt][nt][e] *= unscale;
            const float m = state_max();
            if (lane == 0) sred[warp] = m;
        }
#endif
        __syncthreads();  // every warp is done with the shared state, U and chunk n's gates
#if GATED
        if (n + 1 < n_chunks && threadIdx.x < CH) sg[(buf ^ 1) * CH + threadIdx.x] = g_next;
#endif
        if (n + 1 < n_chunks) {
#if SCALED
            state_scale = pow2_scale(max_of<NWARPS>(sred));
#endif
            share_state(state_scale);
        }
    }

    // The exit state: s_out[lead][Dk][Dv].
    float* sb = s_out + lead * Dk * (i64)Dv;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int d = d_base + mt * 16 + gid + (e >> 1) * 8, c = c0 + c_base + nt * 8 + 2 * tig + (e & 1);
                if (d < Dk && c < Dv) sb[(i64)d * Dv + c] = S[mt][nt][e];
            }
}
#endif  // VB
