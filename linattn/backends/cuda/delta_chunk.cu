// The delta rule in chunks, on tensor cores (mma.sync m16n8k16, float32 accumulation).
//
//   S_t = e^{g_t} (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,   o_t = S_t^T q_t   (g_t = 0 ungated)
//
// For a chunk of C = 64 steps entering with state S, with G_i = g_0 + ... + g_i inside it
// (the WY/UT form of linattn.delta_scan's chunked form, with W S = A diag(b) e^{G} K S):
//
//   L_ij = b_i (k_i . k_j) e^{G_i - G_j} [j < i],    A = (I + L)^{-1} diag(b),
//   U    = A (V - e^{G} ⊙ K S)                       (the corrections u_i, C x Dv),
//   o_i  = e^{G_i} q_i^T S + sum_{j <= i} e^{G_i - G_j} (q_i . k_j) u_j,
//   S_exit = e^{G_C} S + sum_j e^{G_C - G_j} k_j u_j^T.
//
// Two kernels. delta_chunk_prepare runs on every chunk at once (A does not depend on S):
// L by tensor cores, (I + L)^{-1} by forward substitution in float32 (a thread per
// column), A stored in two parts (C x C per chunk: a quarter of what W and U_free would
// take at Dk = Dv = 128). delta_chunk_scan walks each (leading index, tile of value
// columns) through its chunks in order, the state in registers: one pass over the shared
// state gives Q S and K S, the residuals R = V - e^{G} ⊙ K S go to shared memory, U = A R,
// then the scores times U and the state update, as chunk_linear_scan does with V.
//
// Precision: q, k and v enter the products as stored. Every intermediate that enters a
// product — A, R, U, the state, the decayed scores and keys — is split into two parts
// x = hi + lo in the storage type, and a product of two split operands keeps the three
// terms hi hi + hi lo + lo hi, so that each product is exact to about 2^-16 (bfloat16) or
// 2^-22 (float16) of its terms: a float32-accumulated delta rule of the stored inputs.
// For float16 the split operands are scaled by powers of two (exact) so that both parts
// stay in float16's range; A's scale, one per chunk, is stored with it.
//
// Compile-time parameters (-D): ELEM_HALF (float16, else bfloat16), DKP (keys padded to a
// multiple of 16, at most 128 for delta_chunk_scan and 256 for delta_chunk_prepare, which also
// serves delta_wgmma.cu's key-split scan), GATED (a log-gate per step); delta_chunk_scan also: VB
// (value columns per group of four warps), GROUPS, WM (warps along the state's rows in
// the update), HAS_SIN; delta_chunk_prepare: PREPARE.
//
// Strides are in elements; the last axis of every operand is contiguous, every row starts
// on 16 bytes, and Dk, Dv are multiples of 8 (the launcher checks). A leading stride of 0
// broadcasts. A (two parts) is (leading index, chunk, C, C), C-contiguous.

#define CH 64
#define QKS (DKP + 8)   // shared-memory row stride of q, k and W tiles (+16 bytes against bank conflicts)
#define AS (CH + 8)     // ... of the A tiles
#define LS (CH + 4)     // ... of L (float32; rows on 16 bytes, read as broadcasts)
#define SCALED ELEM_HALF

#include "mma_common.cuh"

#ifdef PREPARE
#define PTHREADS 128

// One block of four warps per (chunk, leading index of k, b, g).
extern "C" __global__ void __launch_bounds__(PTHREADS)
delta_chunk_prepare(const ELEM* __restrict__ k, const ELEM* __restrict__ beta, const ELEM* __restrict__ g,
                    ELEM* __restrict__ a_hi, ELEM* __restrict__ a_lo, float* __restrict__ a_scale, i64 T, int Dk,
                    i64 n1, i64 n2, i64 ks0, i64 ks1, i64 ks2, i64 kts, i64 bs0, i64 bs1, i64 bs2, i64 bts,
                    i64 gs0, i64 gs1, i64 gs2, i64 gts) {
    extern __shared__ __align__(16) unsigned char smem[];
    ELEM* sk = reinterpret_cast<ELEM*>(smem);               // [CH][QKS]
    float* sL = reinterpret_cast<float*>(sk + CH * QKS);    // [CH][LS]
    float* sb = sL + CH * LS;                                 // [CH] b
    float* sg = sb + CH;                                      // [CH] g
    float* sE = sg + CH;                                      // [CH] (unused here: e^{G_i})
    float* sK = sE + CH;                                      // [CH] (unused here: the keys' decays)
    float* sred = sK + CH;                                    // [4] per-warp maxima
    double* sG = reinterpret_cast<double*>(sred + 4);        // [CH] G

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    const int chunk = blockIdx.x, row0 = 16 * warp;
    const i64 lead = blockIdx.y, la = lead / (n1 * n2), lb = (lead / n2) % n1, lc = lead % n2;
    const i64 t0 = (i64)chunk * CH, valid = min((i64)CH, T - t0);
    stage_tile<CH, DKP, PTHREADS>(sk, QKS, k + la * ks0 + lb * ks1 + lc * ks2 + t0 * kts, kts, valid, Dk);
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

    // (I + L)^{-1} by forward substitution, column c by thread c: x_i = [i = c] - sum_{j<i} L_ij x_j,
    // the sum in four partial sums (a chain of i/4 dependent steps, not i); then A = x b_c.
    float x[CH];
    float m = 0.f;
    const int c = threadIdx.x;
    if (c < CH) {
#pragma unroll
        for (int i = 0; i < CH; ++i) {
            float acc[4] = {i == c ? 1.f : 0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int j = 0; j < i; ++j) acc[j & 3] -= sL[i * LS + j] * x[j];
            x[i] = i < c ? 0.f : (acc[0] + acc[1]) + (acc[2] + acc[3]);  // 0 above the diagonal (even where L is inf)
        }
        const float b = sb[c];
#pragma unroll
        for (int i = 0; i < CH; ++i) {
            x[i] *= b;
            m = fmaxf(m, fabsf(x[i]));
        }
    }
    float scale = 1.f;
#if SCALED
    scale = block_pow2_scale<4>(warp_max(m), sred, warp);
    if (threadIdx.x == 0) a_scale[lead * gridDim.x + chunk] = scale;
#endif
    if (c < CH) {
        const i64 at = (lead * gridDim.x + chunk) * (i64)(CH * CH) + c;
#pragma unroll
        for (int i = 0; i < CH; ++i) {
            const float y = x[i] * scale;
            const ELEM hi = from_f(y);
            a_hi[at + i * CH] = hi;
            a_lo[at + i * CH] = from_f(y - to_f(hi));
        }
    }
}
#endif  // PREPARE

#ifdef VB
#define NWARPS (4 * GROUPS)   // GROUPS sets of four warps, each owning VB of the block's value columns
#define NTHREADS (NWARPS * 32)
#define VBB (GROUPS * VB)      // the block's value columns
#define VS (VBB + 8)           // shared row stride of the v, R/U and state tiles
#define WN (4 / WM)
#define MT (DKP / 16 / WM)     // state row tiles (16) per warp
#define NT (VB / 8 / WN)       // state column tiles (8) per warp
#define ONT (VB / 8)           // output (and R, U) column tiles per warp

extern "C" __global__ void __launch_bounds__(NTHREADS, 1)
delta_chunk_scan(DELTA_CHUNK_PARAMS) {
    extern __shared__ __align__(16) unsigned char smem[];
    ELEM* sq = reinterpret_cast<ELEM*>(smem);              // [2][CH][QKS]  (two chunks in flight)
    ELEM* sk = sq + 2 * CH * QKS;                           // [2][CH][QKS]
    ELEM* sv = sk + 2 * CH * QKS;                           // [CH][VS]     (loaded once this chunk's R is formed)
    ELEM* sah = sv + CH * VS;                               // [CH][AS]     A, two parts (loaded once A R is done)
    ELEM* sal = sah + CH * AS;
    ELEM* srh = sal + CH * AS;                              // [CH][VS]     R, then U, two parts
    ELEM* srl = srh + CH * VS;
    ELEM* shi = srl + CH * VS;                              // [DKP][VS]    the entering state, two parts
    ELEM* slo = shi + DKP * VS;
    float* sg = reinterpret_cast<float*>(slo + DKP * VS);   // [2][CH]      log-gates
    double* sG = reinterpret_cast<double*>(sg + 2 * CH);   // [NWARPS][CH] in-chunk cumulative log-gates
    float* sE = reinterpret_cast<float*>(sG + NWARPS * CH); // [NWARPS][CH] e^{G_i}
    [[maybe_unused]] float* sK = sE + NWARPS * CH;          // [NWARPS][CH] e^{G_C - G_j}, the keys' decays
    [[maybe_unused]] float* sC = sK + NWARPS * CH;          // [NWARPS][2 CH] the score decays' factors
    [[maybe_unused]] float* sred = sC + 2 * NWARPS * CH;    // [3][NWARPS] per-warp max |S|, |R|, |U|

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    const int c0 = (blockIdx.x % col_blocks) * VBB;
    const int gw = warp & 3, cg = (warp >> 2) * VB, row0 = 16 * gw;
    DELTA_CHUNK_GEOMETRY  // A and its scales belong to the leading index of k, b and g (0 strides broadcast)
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
    auto load_v = [&](int n) {
        const i64 t0 = (i64)n * CH;
        stage_tile<CH, VBB, NTHREADS>(sv, VS, vb + t0 * vts, vts, T - t0, Dv - c0);
        copy_commit();
    };
    auto load_a = [&](int n) {
        stage_tile<CH, CH, NTHREADS>(sah, AS, ahb + (i64)n * CH * CH, CH, CH, CH);
        stage_tile<CH, CH, NTHREADS>(sal, AS, alb + (i64)n * CH * CH, CH, CH, CH);
        copy_commit();
    };
    [[maybe_unused]] auto load_gate = [&](int n) {
        return chunk_gate(gb, (i64)n * CH + threadIdx.x, T, gts);
    };
    // This warp's rows of x (ONT column tiles) into the R/U tiles, two parts, times `scale`.
    auto share_rows = [&](float (&x)[ONT][4], float scale) {
#pragma unroll
        for (int t = 0; t < ONT; ++t)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int at = (row0 + gid + h * 8) * VS + cg + t * 8 + 2 * tig;
                u32 hi, lo;
                split2(x[t][2 * h] * scale, x[t][2 * h + 1] * scale, hi, lo);
                *reinterpret_cast<u32*>(srh + at) = hi;
                *reinterpret_cast<u32*>(srl + at) = lo;
            }
    };
    // The power of two that keeps the block's x (this warp's part given) in float16's range; a block barrier.
    [[maybe_unused]] auto block_scale = [&](float (&x)[ONT][4], float* slots) -> float {
        float m = 0.f;
#pragma unroll
        for (int t = 0; t < ONT; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) m = fmaxf(m, fabsf(x[t][e]));
        return block_pow2_scale<NWARPS>(warp_max(m), slots, warp);
    };

    float state_scale = 1.f;  // the shared state holds S * state_scale
    load_qk(0, 0);
    load_v(0);
    load_a(0);
#if GATED
    ELEM g_next = load_gate(0);
    if (threadIdx.x < CH) sg[threadIdx.x] = to_f(g_next);
#endif
#if SCALED
    state_scale = block_pow2_scale<NWARPS>(state_max(S), sred, warp);  // state_max: warp-wide, every lane
#endif
    share_state(S, state_scale, shi, slo, VS, d_base, c_base, true);

    for (int n = 0; n < n_chunks; ++n) {
        const int buf = n & 1;
        const i64 t0 = (i64)n * CH;
        copy_wait();
        __syncthreads();  // chunk n (q, k, v, A) is in shared memory, and so is the state entering it
        if (n + 1 < n_chunks) load_qk(n + 1, buf ^ 1);
        const ELEM* qt = sq + buf * CH * QKS;
        const ELEM* kt = sk + buf * CH * QKS;
        [[maybe_unused]] const float* E = sE + warp * CH;
#if GATED
        if (n + 1 < n_chunks) g_next = load_gate(n + 1);
        double* G = sG + warp * CH;  // each warp its own copy: no block barrier needed
        const int factored = chunk_decays(sg + buf * CH, row0, G, sE + warp * CH, sK + warp * CH,
                                          sC + warp * 2 * CH, true);
#endif

        // One pass over the shared state: O = Q (S s) and P = K (S s), this warp's 16 rows.
        float O[ONT][4], P[ONT][4];
#pragma unroll
        for (int t = 0; t < ONT; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) O[t][e] = P[t][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < DKP / 16; ++kk) {
            u32 aq[4], ak[4];
            const int a_off = (row0 + (lane & 15)) * QKS + kk * 16 + (lane >> 4) * 8;
            ldsm(aq, qt + a_off);
            ldsm(ak, kt + a_off);
#pragma unroll
            for (int np = 0; np < VB / 16; ++np) {
                const int off = (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * VS + cg + np * 16 + (lane >> 4) * 8;
                u32 b[4];
                ldsm_t(b, shi + off);
                mma16(O[2 * np], O[2 * np + 1], aq, b);
                mma16(P[2 * np], P[2 * np + 1], ak, b);
                ldsm_t(b, slo + off);
                mma16(O[2 * np], O[2 * np + 1], aq, b);
                mma16(P[2 * np], P[2 * np + 1], ak, b);
            }
        }

        // R = V - e^{G} ⊙ K S (this warp's rows; P becomes R), into shared memory.
        float r_scale = 1.f;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int i = row0 + gid + h * 8;
#if GATED
            const float f = E[i] / state_scale;
#else
            const float f = 1.f / state_scale;
#endif
#pragma unroll
            for (int t = 0; t < ONT; ++t) {
                const float2 x = unpack2(*reinterpret_cast<const u32*>(sv + i * VS + cg + t * 8 + 2 * tig));
                P[t][2 * h] = x.x - f * P[t][2 * h];
                P[t][2 * h + 1] = x.y - f * P[t][2 * h + 1];
            }
        }
#if SCALED
        r_scale = block_scale(P, sred + NWARPS);
#endif
        share_rows(P, r_scale);
        __syncthreads();  // R is whole; v is read
        if (n + 1 < n_chunks) load_v(n + 1);

        // U = A R (A lower-triangular: row blocks kk <= gw), three products of two parts each.
        float U[ONT][4];
#pragma unroll
        for (int t = 0; t < ONT; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) U[t][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            if (kk > gw) continue;
            u32 ah[4], al[4];
            const int a_off = (row0 + (lane & 15)) * AS + kk * 16 + (lane >> 4) * 8;
            ldsm(ah, sah + a_off);
            ldsm(al, sal + a_off);
            mma_two_parts(U, ah, al, srh, srl, VS, kk * 16, cg);
        }
        {
            float unscale = 1.f / r_scale;
#if SCALED
            unscale /= asb[n];
#endif
#pragma unroll
            for (int t = 0; t < ONT; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) U[t][e] *= unscale;
        }
        float u_scale = 1.f;
#if SCALED
        u_scale = block_scale(U, sred + 2 * NWARPS);  // its barrier also ends the reads of R and A
#else
        __syncthreads();  // every warp is done with R and A
#endif
        if (n + 1 < n_chunks) load_a(n + 1);
        share_rows(U, u_scale);
        __syncthreads();  // U is whole

        // O = e^{G_i} Q S + (decayed scores) U, through the scales of the two-part operands.
        float sc[8][4];
#if GATED
        causal_scores(sc, qt, kt, gw, G, sC + warp * 2 * CH, factored);
#else
        causal_scores(sc, qt, kt, gw, nullptr, nullptr, false);
#endif
        const float score_scale = score_scale_of(sc);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float f = score_scale * u_scale / state_scale;
#if GATED
            f *= E[row0 + gid + h * 8];
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
                const float* x = sc[2 * kk + (r >> 1)] + (r & 1) * 2;
                split2(x[0] * score_scale, x[1] * score_scale, ah[r], al[r]);
            }
            mma_two_parts(O, ah, al, srh, srl, VS, kk * 16, cg);
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
#if GATED
        scale_state(S, u_scale * sE[warp * CH + CH - 1]);  // the shared U holds U * u_scale
#else
        scale_state(S, u_scale);
#endif
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
                ldsm_t(b, srh + off);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16(S[mt][2 * np], S[mt][2 * np + 1], ah[mt], b);
#if GATED
                    mma16(S[mt][2 * np], S[mt][2 * np + 1], al[mt], b);
#endif
                }
                ldsm_t(b, srl + off);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16(S[mt][2 * np], S[mt][2 * np + 1], ah[mt], b);
                }
            }
        }
#if SCALED
        {
            scale_state(S, 1.f / u_scale);
            const float m = state_max(S);
            if (lane == 0) sred[warp] = m;
        }
#endif
        __syncthreads();  // every warp is done with the shared state, U and chunk n's gates
#if GATED
        if (n + 1 < n_chunks && threadIdx.x < CH) sg[(buf ^ 1) * CH + threadIdx.x] = to_f(g_next);
#endif
        if (n + 1 < n_chunks) {
#if SCALED
            state_scale = pow2_scale(max_of<NWARPS>(sred));
#endif
            share_state(S, state_scale, shi, slo, VS, d_base, c_base, true);
        }
    }

    // The exit state: s_out[lead][Dk][Dv].
    store_state(S, s_out + lead * Dk * (i64)Dv, d_base, c0 + c_base, Dk, Dv);
}
#endif  // VB
