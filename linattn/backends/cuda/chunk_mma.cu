// The causal linear scan in chunks, on tensor cores (mma.sync m16n8k16, float32 accumulation).
//
//   S_t = e^{g_t} S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t          (g_t = 0 without a gate)
//
// For a chunk of C = 64 steps entering with state S, with G_i = g_1 + ... + g_i inside it:
//
//   o_i    = e^{G_i} q_i^T S + sum_{j <= i} e^{G_i - G_j} (q_i . k_j) v_j
//   S_exit = e^{G_C} S + sum_j e^{G_C - G_j} k_j v_j^T
//
// Work split: one block per (leading index, tile of GROUPS x VB value columns, time segment)
// walks its segment's chunks in order, with GROUPS groups of four warps that share the q
// and k tiles. Warp w of a group computes output rows 16w .. 16w+15 of the group's VB
// columns (its scores against the chunk's columns j <= i only, then scores x V and Q x S);
// for the update the group's state (DKP x VB, float32) is split into WM x (4/WM) tiles,
// one per warp, held in the accumulator registers for the whole segment. Tiles of q, k
// and v are copied into shared memory with cp.async one chunk ahead of the one computed.
// With Q_SINGLE (Dk = 256, where two q tiles do not fit beside two groups' state) q has
// one tile: the warps that read rows 16w .. 16w+15 (warp w of each group) copy the next
// chunk's rows themselves once both are done with them (after O = Q S), so the copy
// overlaps scores x V and the update.
//
// Precision: q, k and v enter the products as stored (exactly). The intermediates that
// enter a product in the storage type — the decayed scores, the state, the decayed keys —
// are split into two parts x = hi + lo (with SPLIT, the default), so each product is
// exact to about 2^-16 (bfloat16) or 2^-22 (float16) of its terms and the result is a
// float32-accumulated scan of the stored inputs, not a reduced-precision one. For float16
// the scores and the state are scaled by powers of two (exact) so that both parts stay in
// float16's range.
//
// Compile-time parameters (-D): ELEM_HALF (float16, else bfloat16), DKP (keys padded to a
// multiple of 16), VB (value columns per group of warps, a multiple of 16), GROUPS, WM (warps along the
// state's rows in the update), GATED (a log-gate per step), HAS_SIN, WRITE_O (0: the
// states only, for the first pass of the time-segmented scan), SPLIT, Q_SINGLE, WIDE_O (outputs in
// float32, the accumulators unrounded).
//
// Strides are in elements; the last axis of every operand is contiguous, every row starts
// on 16 bytes, and Dk, Dv are multiples of 8 (the launcher checks). A time stride may be
// negative (a reversed view); a leading stride of 0 broadcasts.

#define CH 64                  // chunk length
#define NWARPS (4 * GROUPS)   // GROUPS sets of four warps, each owning VB of the block's value columns
#define NTHREADS (NWARPS * 32)
#define QKS (DKP + 8)          // shared-memory row stride of q and k tiles (+16 bytes against bank conflicts)
#define VBB (GROUPS * VB)      // the block's value columns
#define VS (VBB + 8)           // ... of v, output and state tiles
#define WN (4 / WM)
#define MT (DKP / 16 / WM)     // state row tiles (16) per warp
#define NT (VB / 8 / WN)       // state column tiles (8) per warp
#define ONT (VB / 8)           // output column tiles per warp
#define SCALED ELEM_HALF       // float16: two-part values kept in range by powers of two
#define QBUFS (2 - Q_SINGLE)   // q tiles in flight

#include "mma_common.cuh"

extern "C" __global__ void __launch_bounds__(NTHREADS, 1)
chunk_linear_scan(LINEAR_CHUNK_PARAMS) {
    extern __shared__ __align__(16) unsigned char smem[];
    ELEM* sq = reinterpret_cast<ELEM*>(smem);              // [QBUFS][CH][QKS]
    ELEM* sk = sq + QBUFS * CH * QKS;                       // [2][CH][QKS]  (two chunks in flight)
    ELEM* sv = sk + 2 * CH * QKS;                           // [2][CH][VS]
    ELEM* shi = sv + 2 * CH * VS;                           // [DKP][VS]  the entering state, hi part
    ELEM* slo = shi + DKP * VS;                             // [DKP][VS]  ... lo part
    ELEM* so = slo + DKP * VS;                              // [CH][VS]   outputs, staged for 16-byte stores
    float* sg = reinterpret_cast<float*>(so + CH * VS);     // [2][CH]    log-gates
    double* sG = reinterpret_cast<double*>(sg + 2 * CH);   // [NWARPS][CH] in-chunk cumulative log-gates
    [[maybe_unused]] float* sE = reinterpret_cast<float*>(sG + NWARPS * CH);  // [NWARPS][CH] e^{G_i}
    [[maybe_unused]] float* sW = sE + NWARPS * CH;          // [NWARPS][CH] e^{G_C - G_j}, the keys' decays
    [[maybe_unused]] float* sC = sW + NWARPS * CH;          // [NWARPS][2 CH] the scores' decay factors
    [[maybe_unused]] float* sred = sC + 2 * NWARPS * CH;    // [NWARPS] per-warp max |S|

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    const int c0 = (blockIdx.x % col_blocks) * VBB;
    const int gw = warp & 3, cg = (warp >> 2) * VB;  // the warp's place in its group; the group's columns
    LINEAR_CHUNK_GEOMETRY
    [[maybe_unused]] OUT_ELEM* ob = o + la * os0 + lb * os1 + lc * os2 + c0;

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
                if (d < Dk && c < Dv) x = s_in[la * ss0 + lb * ss1 + lc * ss2 + blockIdx.y * sseg + d * srow + c * scol];
#endif
                S[mt][nt][e] = x;
            }

    auto load_chunk = [&](int n, int buf) {
        const i64 t0 = t_begin + (i64)n * CH;
        constexpr int ROW_PIECES = DKP / 8, COL_PIECES = VBB / 8;
#pragma unroll
        for (int it = 0; it < (CH * ROW_PIECES + NTHREADS - 1) / NTHREADS; ++it) {
            const int p = threadIdx.x + it * NTHREADS, r = p / ROW_PIECES, c = (p % ROW_PIECES) * 8;
            if (CH * ROW_PIECES % NTHREADS != 0 && p >= CH * ROW_PIECES) break;
            const bool ok = t0 + r < t_end && c < Dk;
#if WRITE_O && !Q_SINGLE
            copy16(sq + (buf * CH + r) * QKS + c, qb + (ok ? (t0 + r) * qts + c : 0), ok);
#endif
            copy16(sk + (buf * CH + r) * QKS + c, kb + (ok ? (t0 + r) * kts + c : 0), ok);
        }
#pragma unroll
        for (int it = 0; it < (CH * COL_PIECES + NTHREADS - 1) / NTHREADS; ++it) {
            const int p = threadIdx.x + it * NTHREADS, r = p / COL_PIECES, c = (p % COL_PIECES) * 8;
            if (CH * COL_PIECES % NTHREADS != 0 && p >= CH * COL_PIECES) break;
            const bool ok = t0 + r < t_end && c0 + c < Dv;
            copy16(sv + (buf * CH + r) * VS + c, vb + (ok ? (t0 + r) * vts + c : 0), ok);
        }
        copy_commit();
    };
    // Q_SINGLE: chunk n's q rows 16 gw .. 16 gw + 15, copied by the GROUPS warps that read them.
    [[maybe_unused]] auto load_q_rows = [&](int n) {
        const i64 t0 = t_begin + (i64)n * CH + 16 * gw;
        constexpr int ROW_PIECES = DKP / 8, READERS = 32 * GROUPS;
        const int me = (warp >> 2) * 32 + lane;
#pragma unroll
        for (int it = 0; it < 16 * ROW_PIECES / READERS; ++it) {
            const int p = me + it * READERS, r = p / ROW_PIECES, c = (p % ROW_PIECES) * 8;
            const bool ok = t0 + r < t_end && c < Dk;
            copy16(sq + (16 * gw + r) * QKS + c, qb + (ok ? (t0 + r) * qts + c : 0), ok);
        }
        copy_commit();
    };
    [[maybe_unused]] auto load_gate = [&](int n) {
        return chunk_gate(gb, t_begin + (i64)n * CH + threadIdx.x, t_end, gts);
    };
    [[maybe_unused]] float state_scale = 1.f;  // the shared state holds S * state_scale
#if WRITE_O && Q_SINGLE
    load_q_rows(0);
#endif
    load_chunk(0, 0);
#if GATED
    ELEM g_next = load_gate(0);
    if (threadIdx.x < CH) sg[threadIdx.x] = to_f(g_next);
#endif
#if WRITE_O
#if SCALED
    state_scale = block_pow2_scale<NWARPS>(state_max(S), sred, warp);  // state_max: warp-wide, every lane
#endif
    share_state(S, state_scale, shi, slo, VS, d_base, c_base, SPLIT);
#endif

    for (int n = 0; n < n_chunks; ++n) {
        const int buf = n & 1;
        copy_wait();
        __syncthreads();  // chunk n is in shared memory, and so is the state entering it
        if (n + 1 < n_chunks) load_chunk(n + 1, buf ^ 1);
        [[maybe_unused]] const ELEM* qt = sq + (QBUFS - 1) * buf * CH * QKS;
        const ELEM* kt = sk + buf * CH * QKS;
        const ELEM* vt = sv + buf * CH * VS;
#if GATED
        if (n + 1 < n_chunks) g_next = load_gate(n + 1);
        double* G = sG + warp * CH;  // each warp its own copy: no block barrier needed
        [[maybe_unused]] const int factored = chunk_decays(sg + buf * CH, 16 * gw, G, sE + warp * CH,
                                                           sW + warp * CH, sC + warp * 2 * CH, WRITE_O);
#endif

#if WRITE_O
        const int row0 = gw * 16;
        float sc[8][4];
#if GATED
        causal_scores(sc, qt, kt, gw, G, sC + warp * 2 * CH, factored);
#else
        causal_scores(sc, qt, kt, gw, nullptr, nullptr, false);
#endif
        const float score_scale = score_scale_of(sc);
        // O = Q x (S state_scale), then rescaled by e^{G_i} score_scale / state_scale.
        float O[ONT][4];
#pragma unroll
        for (int t = 0; t < ONT; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) O[t][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < DKP / 16; ++kk) {
            u32 a[4];
            ldsm(a, qt + (row0 + (lane & 15)) * QKS + kk * 16 + (lane >> 4) * 8);
#pragma unroll
            for (int np = 0; np < VB / 16; ++np) {
                const int off = (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * VS + cg + np * 16 + (lane >> 4) * 8;
                u32 b[4];
                ldsm_t(b, shi + off);
                mma16(O[2 * np], O[2 * np + 1], a, b);
#if SPLIT
                ldsm_t(b, slo + off);
                mma16(O[2 * np], O[2 * np + 1], a, b);
#endif
            }
        }
#if Q_SINGLE
        if (n + 1 < n_chunks) {  // both readers of these q rows are done with them: the next chunk's may come
            if (GROUPS > 1) asm volatile("bar.sync %0, %1;" ::"r"(1 + gw), "r"(32 * GROUPS) : "memory");
            else __syncwarp();
            load_q_rows(n + 1);
        }
#endif
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float f = score_scale / state_scale;
#if GATED
            f *= sE[warp * CH + row0 + gid + h * 8];
#endif
#pragma unroll
            for (int t = 0; t < ONT; ++t) {
                O[t][2 * h] *= f;
                O[t][2 * h + 1] *= f;
            }
        }
        // O += (scores score_scale) x V over the column blocks kk <= warp.
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            if (kk <= gw) {
                u32 ah[4];
                [[maybe_unused]] u32 al[4];
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const float* s = sc[2 * kk + (r >> 1)] + (r & 1) * 2;
#if SPLIT
                    split2(s[0] * score_scale, s[1] * score_scale, ah[r], al[r]);
#else
                    ah[r] = pack2(s[0] * score_scale, s[1] * score_scale);
#endif
                }
#pragma unroll
                for (int np = 0; np < VB / 16; ++np) {
                    u32 b[4];
                    ldsm_t(b, vt + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * VS + cg + np * 16 + (lane >> 4) * 8);
                    mma16(O[2 * np], O[2 * np + 1], ah, b);
#if SPLIT
                    mma16(O[2 * np], O[2 * np + 1], al, b);
#endif
                }
            }
        }
        // Stage this warp's 16 output rows, then write them in 16-byte pieces (float32 rows: directly).
#if WIDE_O
        store_rows_float(O, 1.f / score_scale, ob + cg, ots, t_begin + (i64)n * CH + row0, t_end, c0 + cg, Dv);
#else
        {
            const float unscale = 1.f / score_scale;
#pragma unroll
            for (int t = 0; t < ONT; ++t)
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    *reinterpret_cast<u32*>(so + (row0 + gid + h * 8) * VS + cg + t * 8 + 2 * tig) =
                        pack2(O[t][2 * h] * unscale, O[t][2 * h + 1] * unscale);
            __syncwarp();
            const i64 t0 = t_begin + (i64)n * CH + row0;
            constexpr int PIECES = VB / 8;
#pragma unroll
            for (int it = 0; it < 16 * PIECES / 32; ++it) {
                const int p = lane + it * 32, r = p / PIECES, c = cg + (p % PIECES) * 8;
                if (t0 + r < t_end && c0 + c < Dv)
                    *reinterpret_cast<uint4*>(ob + (t0 + r) * ots + c) =
                        *reinterpret_cast<const uint4*>(so + (row0 + r) * VS + c);
            }
        }
#endif  // WIDE_O
#endif

        // The update of this warp's state tile: S <- e^{G_C} S + (K ⊙ e^{G_C - G})^T V.
#if GATED
        scale_state(S, sE[warp * CH + CH - 1]);  // e^{G_C}, chunk_decays' E
#endif
#pragma unroll
        for (int kk = 0; kk < CH / 16; ++kk) {
            u32 ah[MT][4];
#if GATED && SPLIT
            u32 al[MT][4];
#endif
#if GATED
            const float* wj = sW + warp * CH + kk * 16 + 2 * tig;
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
                    const float wx = x.x * w[(r >> 1) * 2], wy = x.y * w[(r >> 1) * 2 + 1];
#if SPLIT
                    split2(wx, wy, ah[mt][r], al[mt][r]);
#else
                    ah[mt][r] = pack2(wx, wy);
#endif
                }
#endif
            }
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                u32 b[4];
                ldsm_t(b, vt + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * VS + c_base + np * 16 + (lane >> 4) * 8);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16(S[mt][2 * np], S[mt][2 * np + 1], ah[mt], b);
#if GATED && SPLIT
                    mma16(S[mt][2 * np], S[mt][2 * np + 1], al[mt], b);
#endif
                }
            }
        }
#if WRITE_O && SCALED
        {
            const float m = state_max(S);
            if (lane == 0) sred[warp] = m;
        }
#endif
        __syncthreads();  // every warp is done with the shared state and chunk n's gates
#if GATED
        if (n + 1 < n_chunks && threadIdx.x < CH) sg[(buf ^ 1) * CH + threadIdx.x] = to_f(g_next);
#endif
#if WRITE_O
        if (n + 1 < n_chunks) {
#if SCALED
            state_scale = pow2_scale(max_of<NWARPS>(sred));
#endif
            share_state(S, state_scale, shi, slo, VS, d_base, c_base, SPLIT);
        }
#endif
    }

    // The exit state: s_out[lead][segment][Dk][Dv].
    store_state(S, s_out + ((lead * gridDim.y + blockIdx.y) * Dk) * (i64)Dv, d_base, c0 + c_base, Dk, Dv);
}
