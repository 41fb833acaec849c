// The causal linear scan in chunks on Hopper's warpgroup products (wgmma, sm_90a): the scan
// of chunk_mma.cu, the same arithmetic and arguments, in two thirds of its instructions
// (Nsight Compute at (16, 2048, 16, 128) bf16: 65.9 M against 100.7 M).
//
//   S_t = e^{g_t} S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t          (g_t = 0 without a gate)
//
// For a chunk of C = 64 steps entering with state S, with G_i = g_1 + ... + g_i inside it:
//
//   o_i    = e^{G_i} q_i^T S + sum_{j <= i} e^{G_i - G_j} (q_i . k_j) v_j
//   S_exit = e^{G_C} S + sum_j e^{G_C - G_j} k_j v_j^T
//
// Work split: one block per (leading index, tile of GROUPS x 64 value columns, time
// segment) walks its segment's chunks in order, with GROUPS warpgroups that share the q and
// k tiles; warpgroup g owns 64 of the value columns. Per chunk a warpgroup issues, each a
// 64 x 64 x 16 product:
//
//   scores  P = Q K^T               (DKP/16; Q, K K-major from shared memory)
//   output  O = Q S_hi + Q S_lo     (2 DKP/16; the state's two parts MN-major)
//           O += P_hi V + P_lo V    (8; the masked, decayed scores from registers)
//   update  S += K^T V              (DKP/16; K^T and V MN-major; gated: V's rows decayed, two parts)
//
// holding its state (DKP x 64, float32) in accumulator registers for the whole segment:
// warp w of the group holds rows 64h + 16w .. 64h + 16w + 15 of each 64-key block h. Tiles
// of q, k and v are copied into shared memory with cp.async one chunk ahead of the one
// computed, in the 128-byte swizzled layout of wgmma_common.cuh.
//
// At DKP = 256 (KSPLIT) the state of 64 columns would take 128 accumulator registers per
// thread, so the block's two warpgroups split the keys of one tile of 64 value columns:
// warpgroup g holds the state's key rows 128 g .. 128 g + 127 and computes, from its keys
// alone, the scores P_g = Q_g K_g^T, O_g = Q_g S_g + P_g V and S_g += K_g^T V. Both sums
// run over the keys, so o = O_0 + O_1: warpgroup 1 hands its O_g to warpgroup 0 through
// shared memory (float32), which adds and writes the rows. With a gate the two share the
// decayed values (each computes half of their rows) and, for the shared memory, one q tile
// (the next chunk's is copied once both warpgroups' products have read this one's).
//
// Precision is chunk_mma.cu's: q, k and v enter the products as stored; the intermediates
// that enter a product in the storage type (the decayed scores, the state, the decayed
// values) are split in two parts x = hi + lo (with SPLIT); float16 scales the scores and the
// state by powers of two so that both parts stay in range.
//
// Compile-time parameters (-D): ELEM_HALF (float16, else bfloat16), DKP (keys padded to a
// multiple of 64, at most 128), GROUPS (warpgroups, each 64 value columns), GATED, HAS_SIN,
// WRITE_O (0: the states only, for the first pass of the time-segmented scan), SPLIT, WIDE_O
// (outputs in float32, the accumulators unrounded).
// Compiled for sm_90a. Strides and layouts as in chunk_mma.cu.

#define CH 64
#define NWARPS (4 * GROUPS)
#define NTHREADS (NWARPS * 32)
#define QKS (DKP + 8)  // unused here: mma_common.cuh's mma.sync score helper reads it
#define KB (DKP / 64)  // 64-key blocks
#define KSPLIT (DKP > 128)          // the two warpgroups split the keys (GROUPS = 2)
#define KBG (KSPLIT ? KB / 2 : KB)  // 64-key blocks of a warpgroup's state
#define VT (KSPLIT ? 1 : GROUPS)    // 64-column value tiles of a block
#define VBB (VT * 64)
#define Q_BUFS (KSPLIT && GATED ? 1 : 2)  // chunks of q in flight
#define OS 72          // row stride of the output staging rows (+16 bytes against bank conflicts)
#define SCALED ELEM_HALF
// Byte offsets of the tiles (8 KB each) from the first.
#define Q_AT 0
#define K_AT (Q_AT + Q_BUFS * KB * TILE_BYTES)
#define V_AT (K_AT + 2 * KB * TILE_BYTES)
#define HI_AT (V_AT + 2 * VT * TILE_BYTES)
#define LO_AT (HI_AT + GROUPS * KBG * TILE_BYTES)
#define VW_AT (LO_AT + GROUPS * KBG * TILE_BYTES)
#define END_AT (VW_AT + (GATED ? 2 * VT * TILE_BYTES : 0))
// Output staging: 16 rows of OS per warp; with KSPLIT, warpgroup 1's partial outputs (float32,
// 16 x 64 per warp in accumulator order), whose slots warpgroup 0's warps then stage in.
#define STAGE_BYTES (KSPLIT ? 4 * 16 * 64 * 4 : NWARPS * 16 * OS * 2)
#if KSPLIT && (GROUPS != 2 || DKP != 256)
#error "KSPLIT needs DKP = 256 and GROUPS = 2"
#endif

#include "mma_common.cuh"
#include "wgmma_common.cuh"

extern "C" __global__ void __launch_bounds__(NTHREADS, 1)
chunk_linear_scan_wg(LINEAR_CHUNK_PARAMS) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    // Swizzled tiles start on 1024 bytes (the launcher adds the slack).
    ELEM* tiles = reinterpret_cast<ELEM*>(smem_raw + ((1024 - (shared_address(smem_raw) & 1023)) & 1023));
    ELEM* sq = tiles + Q_AT / 2;    // [Q_BUFS][KB] tiles: one or two chunks in flight
    ELEM* sk = tiles + K_AT / 2;    // [2][KB] tiles
    ELEM* sv = tiles + V_AT / 2;    // [2][VT] tiles
    ELEM* shi = tiles + HI_AT / 2;  // [GROUPS][KBG] tiles: the entering state (64 KBG x 64), hi part
    ELEM* slo = tiles + LO_AT / 2;  // ... lo part
    ELEM* svw = tiles + VW_AT / 2;  // [VT][2] tiles: decayed values, hi and lo (GATED)
    ELEM* so = tiles + END_AT / 2;  // [NWARPS][16][OS] output staging (KSPLIT: [4][16 x 64] float32)
    [[maybe_unused]] float* sred = reinterpret_cast<float*>(so + STAGE_BYTES / 2);  // [NWARPS] per-warp max |S|
    float* sg = sred + NWARPS;                                   // [2][CH] log-gates (GATED, as the rest)
    double* sG = reinterpret_cast<double*>(sg + 2 * CH);         // [NWARPS][CH] cumulative log-gates
    [[maybe_unused]] float* sE = reinterpret_cast<float*>(sG + NWARPS * CH);  // [NWARPS][CH] e^{G_i}
    [[maybe_unused]] float* sW = sE + NWARPS * CH;                           // [NWARPS][CH] e^{G_C - G_j}
    [[maybe_unused]] float* sC = sW + NWARPS * CH;                           // [NWARPS][2 CH] score factors

    // The warp, its warpgroup and its place there, known to the compiler as warp-uniform (a shuffle).
    const int warp = __shfl_sync(FULL, threadIdx.x >> 5, 0), lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    const int group = warp >> 2, gw = warp & 3;
    [[maybe_unused]] const int gt = threadIdx.x & 127;  // the thread in its warpgroup
    // The group's value tile, its first key block and the first of its 64 columns (the block's from c0).
    const int vtile = KSPLIT ? 0 : group, kb0 = KSPLIT ? group * KBG : 0;
    const int c0 = (blockIdx.x % col_blocks) * VBB, cg = c0 + vtile * 64;
    LINEAR_CHUNK_GEOMETRY
    [[maybe_unused]] OUT_ELEM* ob = o + la * os0 + lb * os1 + lc * os2 + cg;
    ELEM* group_hi = shi + group * KBG * WG_TILE;
    ELEM* group_lo = slo + group * KBG * WG_TILE;

    // The group's state: S[h] holds key rows 64 (kb0 + h) + 16 gw + gid + 8 (e / 2), columns cg + 8t + 2 tig + e % 2.
    float S[KBG][8][4];
    auto for_each_state = [&](auto f) {
#pragma unroll
        for (int h = 0; h < KBG; ++h)
#pragma unroll
            for (int t = 0; t < 8; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    f(h, t, e, 64 * (kb0 + h) + 16 * gw + gid + (e >> 1) * 8, 8 * t + 2 * tig + (e & 1));
    };
    for_each_state([&](int h, int t, int e, [[maybe_unused]] int d, [[maybe_unused]] int c) {
        S[h][t][e] = 0.f;
#if HAS_SIN
        if (d < Dk && cg + c < Dv)
            S[h][t][e] = s_in[la * ss0 + lb * ss1 + lc * ss2 + blockIdx.y * sseg + d * srow + (cg + c) * scol];
#endif
    });

    // This thread's 16-byte pieces of a chunk's tiles: key columns kc .. kc + 7 of rows kr + K_ROWS it
    // (q and k), value columns vc .. vc + 7 of rows vr + V_ROWS it. The row steps are multiples of
    // 8, so every piece keeps its first row's swizzled column; the sources walk down the rows.
    constexpr int KEY_PIECES = DKP / 8, COL_PIECES = VBB / 8;
    constexpr int K_ROWS = NTHREADS / KEY_PIECES, V_ROWS = NTHREADS / COL_PIECES;
    const int kr = threadIdx.x / KEY_PIECES, kc = (threadIdx.x % KEY_PIECES) * 8;
    const int vr = threadIdx.x / COL_PIECES, vc = (threadIdx.x % COL_PIECES) * 8;
    const int k_at = (kc / 64) * WG_TILE + swizzled(kr, kc % 64), v_at = (vc / 64) * WG_TILE + swizzled(vr, vc % 64);
    const bool k_cols = kc < Dk, v_cols = c0 + vc < Dv;
    [[maybe_unused]] const ELEM* q_next = qb + (t_begin + kr) * qts + kc;  // the next chunk's first rows
    const ELEM* k_next = kb + (t_begin + kr) * kts + kc;
    const ELEM* v_next = vb + (t_begin + vr) * vts + vc;
    // Chunk n's q tiles into q buffer `buf` (Q_BUFS = 1: called on its own, once the buffer is free).
    [[maybe_unused]] auto load_q = [&](int n, int buf) {
        const i64 t0 = t_begin + (i64)n * CH;
#pragma unroll
        for (int it = 0; it < CH / K_ROWS; ++it) {
            const bool ok = k_cols && t0 + kr + it * K_ROWS < t_end;
            copy16(sq + buf * KB * WG_TILE + k_at + it * K_ROWS * 64, ok ? q_next + it * K_ROWS * qts : qb, ok);
        }
        q_next += CH * qts;
    };
    auto load_chunk = [&](int n, int buf) {
        const i64 t0 = t_begin + (i64)n * CH;
#if WRITE_O
        if (Q_BUFS == 1 && n == 0) load_q(0, 0);
#endif
#pragma unroll
        for (int it = 0; it < CH / K_ROWS; ++it) {
            const bool ok = k_cols && t0 + kr + it * K_ROWS < t_end;
            const int at = buf * KB * WG_TILE + k_at + it * K_ROWS * 64;
#if WRITE_O
            if (Q_BUFS == 2) copy16(sq + at, ok ? q_next + it * K_ROWS * qts : qb, ok);
#endif
            copy16(sk + at, ok ? k_next + it * K_ROWS * kts : kb, ok);
        }
#pragma unroll
        for (int it = 0; it < CH / V_ROWS; ++it) {
            const bool ok = v_cols && t0 + vr + it * V_ROWS < t_end;
            copy16(sv + buf * VT * WG_TILE + v_at + it * V_ROWS * 64, ok ? v_next + it * V_ROWS * vts : vb, ok);
        }
        copy_commit();
        if (Q_BUFS == 2) q_next += CH * qts;
        k_next += CH * kts;
        v_next += CH * vts;
    };
    [[maybe_unused]] auto load_gate = [&](int n) {
        return chunk_gate(gb, t_begin + (i64)n * CH + threadIdx.x, t_end, gts);
    };
    // The group's state times `scale` into its shared tiles, as the next chunk's B operand:
    // per 64-key block and pair of 8-column tiles, one stmatrix of four 8 x 8 tiles per part.
    // Tile i holds columns 8 (t + i / 2), rows 8 (i % 2) of the warp's 16; lane l addresses row
    // l % 8 of tile l / 8, whose 16 bytes are one swizzled piece.
    const int st_row = 16 * gw + 8 * ((lane >> 3) & 1) + (lane & 7), st_col = lane >> 4;
    [[maybe_unused]] auto share_state = [&](float scale) {
#pragma unroll
        for (int h = 0; h < KBG; ++h)
#pragma unroll
            for (int t = 0; t < 8; t += 2) {
                u32 hi[4], lo[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const float* x = S[h][t + i / 2] + 2 * (i % 2);
                    if (SPLIT) split2(x[0] * scale, x[1] * scale, hi[i], lo[i]);
                    else hi[i] = pack2(x[0] * scale, x[1] * scale);
                }
                const int at = h * WG_TILE + st_row * 64 + (((t + st_col) ^ lane) & 7) * 8;
                stsm(group_hi + at, hi);
                if (SPLIT) stsm(group_lo + at, lo);
            }
    };
    [[maybe_unused]] auto state_max = [&]() {
        float m = 0.f;
        for_each_state([&](int h, int t, int e, int, int) { m = fmaxf(m, fabsf(S[h][t][e])); });
        return warp_max(m);
    };

    // The products' descriptors count from the first tile (in 16-byte units).
    const u32 base16 = shared_address(tiles) >> 4;
    const u32 state_at = group * KBG * TILE_BYTES;  // the group's state tiles, from HI_AT and LO_AT

    [[maybe_unused]] float state_scale = 1.f;  // the shared state holds S * state_scale
    load_chunk(0, 0);
#if GATED
    ELEM g_next = load_gate(0);
    if (threadIdx.x < CH) sg[threadIdx.x] = to_f(g_next);
#endif
#if WRITE_O
#if SCALED
    state_scale = block_pow2_scale<NWARPS>(state_max(), sred, warp);
#endif
    share_state(state_scale);
#endif

    for (int n = 0; n < n_chunks; ++n) {
        const int buf = n & 1;
        copy_wait();
        fence_async_shared();
        __syncthreads();  // chunk n is in shared memory, and so is the state entering it
        if (n + 1 < n_chunks) load_chunk(n + 1, buf ^ 1);
        [[maybe_unused]] const ELEM* vt = sv + (buf * VT + vtile) * WG_TILE;
        // This chunk's k tiles from K_AT and q tiles from Q_AT, both at the group's first key block.
        const u32 k_tiles = (buf * KB + kb0) * TILE_BYTES, q_tiles = ((Q_BUFS == 2 ? buf * KB : 0) + kb0) * TILE_BYTES;
        const u32 v_at = V_AT + (buf * VT + vtile) * TILE_BYTES;
        u32 upd_at = v_at;  // the update's B operand: V, or (GATED) its decayed rows, hi then lo
#if GATED
        if (n + 1 < n_chunks) g_next = load_gate(n + 1);
        double* G = sG + warp * CH;  // each warp its own copy: no block barrier needed
        [[maybe_unused]] const int factored = chunk_decays(sg + buf * CH, 16 * gw, G, sE + warp * CH,
                                                           sW + warp * CH, sC + warp * 2 * CH, WRITE_O);
        {   // V's rows times the keys' decays e^{G_C - G_j}: 512 16-byte pieces per tile, over the group's
            // threads (KSPLIT: the block's, for the tile both groups read).
            constexpr int VW_THREADS = KSPLIT ? NTHREADS : 128;
            ELEM* vw_hi = svw + 2 * vtile * WG_TILE;
            ELEM* vw_lo = vw_hi + WG_TILE;
#pragma unroll
            for (int it = 0; it < 512 / VW_THREADS; ++it) {
                const int p = (KSPLIT ? (int)threadIdx.x : gt) + it * VW_THREADS, r = p / 8;
                const int at = r * 64 + (p % 8) * 8;  // the same piece, swizzled or not
                const float w = sW[warp * CH + r];
                const uint4 x = *reinterpret_cast<const uint4*>(vt + at);
                const u32* xs = reinterpret_cast<const u32*>(&x);
                uint4 hi, lo;
                u32* hs = reinterpret_cast<u32*>(&hi);
                u32* ls = reinterpret_cast<u32*>(&lo);
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const float2 y = unpack2(xs[i]);
                    if (SPLIT) split2(y.x * w, y.y * w, hs[i], ls[i]);
                    else hs[i] = pack2(y.x * w, y.y * w);
                }
                *reinterpret_cast<uint4*>(vw_hi + at) = hi;
                if (SPLIT) *reinterpret_cast<uint4*>(vw_lo + at) = lo;
            }
            fence_async_shared();
            if (!KSPLIT) group_barrier(group);  // KSPLIT: the block barrier after the first products
            upd_at = VW_AT + 2 * vtile * TILE_BYTES;
        }
#endif

#if WRITE_O
        float P[8][4], O[8][4];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4 * KBG; ++kk) {  // 16 keys: block kk / 4, 32 bytes into its rows per step
            const u32 at = (kk / 4) * TILE_BYTES + (kk % 4) * K_STEP;
            wgmma_ss<0, 0>(P, tile_descriptor<false>(base16, Q_AT + q_tiles + at),
                           tile_descriptor<false>(base16, K_AT + k_tiles + at), kk > 0);
        }
        wgmma_commit();
#pragma unroll
        for (int kk = 0; kk < 4 * KBG; ++kk) {  // the state's key rows 16 kk .. 16 kk + 15
            const u64 a = tile_descriptor<false>(base16, Q_AT + q_tiles + (kk / 4) * TILE_BYTES + (kk % 4) * K_STEP);
            const u32 at = state_at + (kk / 4) * TILE_BYTES + (kk % 4) * MN_STEP;
            wgmma_ss<0, 1>(O, a, tile_descriptor<true>(base16, HI_AT + at), kk > 0);
            if (SPLIT) wgmma_ss<0, 1>(O, a, tile_descriptor<true>(base16, LO_AT + at), true);
        }
        wgmma_commit();
        wgmma_wait<1>();
        wgmma_pin(P);
#if GATED
        mask_scores<true>(P, gw, G, sC + warp * 2 * CH, factored);
#else
        mask_scores<true>(P, gw, nullptr, nullptr, false);
#endif
        const float score_scale = score_scale_of(P);
        u32 ah[4][4];
        [[maybe_unused]] u32 al[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const float* s = P[2 * kk + (r >> 1)] + (r & 1) * 2;
                if (SPLIT) split2(s[0] * score_scale, s[1] * score_scale, ah[kk][r], al[kk][r]);
                else ah[kk][r] = pack2(s[0] * score_scale, s[1] * score_scale);
            }
        wgmma_wait<0>();
        wgmma_pin(O);
#if KSPLIT && GATED
        __syncthreads();  // both groups' decayed values are written, and this chunk's q is read
        if (n + 1 < n_chunks) {
            load_q(n + 1, 0);
            copy_commit();
        }
#endif
        // O = Q x (S state_scale), rescaled by e^{G_i} score_scale / state_scale; then O += P V.
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float f = score_scale / state_scale;
#if GATED
            f *= sE[warp * CH + 16 * gw + gid + h * 8];
#endif
#pragma unroll
            for (int t = 0; t < 8; ++t) {
                O[t][2 * h] *= f;
                O[t][2 * h + 1] *= f;
            }
        }
#endif  // WRITE_O

#if GATED
        {
            const float decay = sE[warp * CH + CH - 1];  // e^{G_C}, chunk_decays' E
            for_each_state([&](int h, int t, int e, int, int) { S[h][t][e] *= decay; });
        }
#endif
        wgmma_fence();
#if WRITE_O
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            const u64 b = tile_descriptor<true>(base16, v_at + kk * MN_STEP);
            wgmma_rs<1>(O, ah[kk], b);
            if (SPLIT) wgmma_rs<1>(O, al[kk], b);
        }
#endif
        // The update: S <- e^{G_C} S + K^T (V ⊙ e^{G_C - G}), K^T one 64-key block at a time.
#pragma unroll
        for (int h = 0; h < KBG; ++h)
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                const u64 a = tile_descriptor<true>(base16, K_AT + k_tiles + h * TILE_BYTES + kk * MN_STEP);
                wgmma_ss<1, 1>(S[h], a, tile_descriptor<true>(base16, upd_at + kk * MN_STEP), true);
#if GATED
                if (SPLIT) wgmma_ss<1, 1>(S[h], a, tile_descriptor<true>(base16, upd_at + TILE_BYTES + kk * MN_STEP), true);
#endif
            }
        wgmma_commit();
        wgmma_wait<0>();
#pragma unroll
        for (int h = 0; h < KBG; ++h) wgmma_pin(S[h]);

#if WRITE_O
        wgmma_pin(O);
#if KSPLIT
        // Unscaled by multiplying: score_scale is a power of two with a normal reciprocal, so the
        // product is the quotient (32 divisions per thread and chunk had float16 take 1.5-1.7x
        // bfloat16's time here, where bfloat16's scale is the constant 1).
        const float unscale = 1.f / score_scale;
        float* slot = reinterpret_cast<float*>(so) + gw * 16 * 64;  // warp gw's rows, both groups
        if (group == 1) put_partial(slot, O, unscale);
#elif WIDE_O
        store_rows_float(O, 1.f / score_scale, ob, ots, t_begin + (i64)n * CH + 16 * gw, t_end, cg, Dv);
#else
        store_rows(O, 1.f / score_scale, so + warp * 16 * OS, OS, st_row - 16 * gw, st_col, ob, ots,
                   t_begin + (i64)n * CH + 16 * gw, t_end, cg, Dv);
#endif
#if SCALED
        {
            const float m = state_max();
            if (lane == 0) sred[warp] = m;
        }
#endif
#endif
        __syncthreads();  // every warp is done with the shared state and chunk n's gates
#if WRITE_O && KSPLIT
        if (group == 0) {  // o = O_0 + O_1, staged in the slot just read
            add_partial(O, unscale, slot);
            __syncwarp();
#if WIDE_O
            store_rows_float(O, 1.f, ob, ots, t_begin + (i64)n * CH + 16 * gw, t_end, cg, Dv);
#else
            store_rows(O, 1.f, reinterpret_cast<ELEM*>(slot), OS, st_row - 16 * gw, st_col, ob, ots,
                       t_begin + (i64)n * CH + 16 * gw, t_end, cg, Dv);
#endif
        }
#endif
#if GATED
        if (n + 1 < n_chunks && threadIdx.x < CH) sg[(buf ^ 1) * CH + threadIdx.x] = to_f(g_next);
#endif
#if WRITE_O
        if (n + 1 < n_chunks) {
#if SCALED
            state_scale = pow2_scale(max_of<NWARPS>(sred));
#endif
            share_state(state_scale);
        }
#endif
    }

    // The exit state: s_out[lead][segment][Dk][Dv].
    float* out = s_out + ((lead * gridDim.y + blockIdx.y) * Dk) * (i64)Dv;
    for_each_state([&](int h, int t, int e, int d, int c) {
        if (d < Dk && cg + c < Dv) out[(i64)d * Dv + cg + c] = S[h][t][e];
    });
}
