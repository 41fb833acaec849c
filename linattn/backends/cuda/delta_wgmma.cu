// The delta rule's chunked scan on Hopper's warpgroup products (wgmma, sm_90a): the scan of
// delta_chunk.cu (its arithmetic, arguments and A from delta_chunk_prepare), with every
// product a 64 x 64 x 16 warpgroup product instead of mma.sync tiles.
//
//   S_t = e^{g_t} (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,   o_t = S_t^T q_t   (g_t = 0 ungated)
//
// For a chunk of C = 64 steps entering with state S, with G_i = g_0 + ... + g_i inside it and
// A = (I + L)^{-1} diag(b) from delta_chunk_prepare:
//
//   R = V - e^{G} ⊙ K S,   U = A R,
//   o_i = e^{G_i} q_i^T S + sum_{j <= i} e^{G_i - G_j} (q_i . k_j) u_j,
//   S_exit = e^{G_C} S + K^T (U ⊙ e^{G_C - G}).
//
// Work split: one block per (leading index, tile of GROUPS x 64 value columns) walks the
// chunks in order, with GROUPS warpgroups that share the q, k and A tiles; warpgroup g owns
// 64 of the value columns and holds their state (DKP x 64, float32) in accumulator
// registers. Per chunk a warpgroup issues, each a 64 x 64 x 16 product:
//
//   O = Q S_hi + Q S_lo,  X = K S_hi + K S_lo     (2 x 2 DKP/16; the state's parts MN-major)
//   P = Q K^T                                      (DKP/16; the scores, masked and decayed after)
//   U = A_hi R_hi + A_hi R_lo + A_lo R_hi          (12; R = V - e^{G} ⊙ X through shared memory)
//   O += P_hi U_hi + P_hi U_lo + P_lo U_hi         (12; P's parts from registers)
//   S += K^T W_hi + K^T W_lo                       (2 DKP/16; W = U ⊙ e^{G_C - G}, or U ungated)
//
// The group's four 8 KB work tiles hold the entering state's two parts (2 KB of them), then R once
// the products that read the state are done, then U and W (W where R was, once U = A R is
// done); each reuse waits at a barrier of the warpgroup. Tiles of q, k, v and A are copied
// with cp.async one chunk ahead, in the 128-byte swizzled layout of wgmma_common.cuh.
//
// At DKP = 256 (KSPLIT) a warpgroup's state of 64 columns would take 128 accumulator registers
// per thread, so the block's two warpgroups split the keys of one tile of 64 value columns, as
// the linear scan's do (chunk_wgmma.cu): warpgroup g holds the state's key rows 128 g .. 128 g +
// 127 and computes from its keys alone O_g = Q_g S_g, X_g = K_g S_g and the scores P_g = Q_g K_g^T.
// The sums run over the keys: warpgroup 1 hands X_1 to warpgroup 0 through shared memory
// (float32), which forms R = V - e^{G} ⊙ (X_0 + X_1) into the work tiles both read; both compute
// U = A R (the same products of the same tiles: the same U), warpgroup 0 shares U and warpgroup 1
// W; each adds P_g U to its O_g and updates S_g += K_g^T W, and o = O_0 + O_1, warpgroup 1's half
// through shared memory again. For the shared memory, q and A have one chunk in flight, not two:
// the next chunk's q is copied once both warpgroups' first products are done, its A once both
// have computed U.
//
// Precision is delta_chunk.cu's: q, k and v enter the products as stored; A, R, U, W, the
// state and the decayed scores enter in two parts x = hi + lo of the storage type, and a
// product of two split operands keeps hi hi + hi lo + lo hi. float16 scales them by powers of
// two so that both parts stay in range: R, U and W per warpgroup, the scores per warp, the
// state per block (A's scale, per chunk, comes with it from delta_chunk_prepare).
//
// Compile-time parameters (-D): ELEM_HALF (float16, else bfloat16), DKP (keys padded to a
// multiple of 64, at most 128, or 256 with GROUPS = 2: KSPLIT), GROUPS (warpgroups, each 64
// value columns, or at DKP = 256 the same 64), GATED, HAS_SIN.
// Compiled for sm_90a. Strides and layouts as in delta_chunk.cu.

#define CH 64
#define NWARPS (4 * GROUPS)
#define NTHREADS (NWARPS * 32)
#define QKS (DKP + 8)  // unused here: mma_common.cuh's mma.sync score helper reads it
#define KB (DKP / 64)  // 64-key blocks
#define KSPLIT (DKP > 128)          // the two warpgroups split the keys (GROUPS = 2)
#define KBG (KSPLIT ? KB / 2 : KB)  // 64-key blocks of a warpgroup's state
#define VT (KSPLIT ? 1 : GROUPS)    // 64-column value tiles of a block
#define VBB (VT * 64)
#define BUFS (KSPLIT ? 1 : 2)       // chunks of q and of A in flight
#define OS 72          // row stride of the output staging rows (+16 bytes against bank conflicts)
#define SCALED ELEM_HALF
// Byte offsets of the tiles (8 KB each) from the first.
#define Q_AT 0
#define K_AT (Q_AT + BUFS * KB * TILE_BYTES)
#define V_AT (K_AT + 2 * KB * TILE_BYTES)
#define A_AT (V_AT + 2 * VT * TILE_BYTES)      // [BUFS chunks][hi, lo]
#define WORK_AT (A_AT + 2 * BUFS * TILE_BYTES) // [GROUPS][4]: the state (hi: KBG tiles, lo: KBG), or R, U, W
#define END_AT (WORK_AT + 4 * GROUPS * TILE_BYTES)
// Tiles of a group's work area: R and W (hi, lo) at 0 and 1, U at 2 and 3. KSPLIT: R and U in
// warpgroup 0's, W (GATED) in warpgroup 1's.
#define R_TILE 0
#define U_TILE 2
#define W_TILE (GATED ? 0 : U_TILE)
// Output staging: 16 rows of OS per warp; with KSPLIT, warpgroup 1's partial K S, then its partial
// outputs (float32, 16 x 64 per warp in accumulator order), whose slots warpgroup 0's warps then
// stage in.
#define STAGE_BYTES (KSPLIT ? 4 * 16 * 64 * 4 : NWARPS * 16 * OS * 2)
#if KSPLIT && (GROUPS != 2 || DKP != 256)
#error "KSPLIT needs DKP = 256 and GROUPS = 2"
#endif

#include "mma_common.cuh"
#include "wgmma_common.cuh"

extern "C" __global__ void __launch_bounds__(NTHREADS, 1)
delta_chunk_scan_wg(DELTA_CHUNK_PARAMS) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    // Swizzled tiles start on 1024 bytes (the launcher adds the slack).
    ELEM* tiles = reinterpret_cast<ELEM*>(smem_raw + ((1024 - (shared_address(smem_raw) & 1023)) & 1023));
    ELEM* sq = tiles + Q_AT / 2;      // [BUFS][KB] tiles: one or two chunks in flight
    ELEM* sk = tiles + K_AT / 2;      // [2][KB]
    ELEM* sv = tiles + V_AT / 2;      // [2][VT]
    ELEM* sa = tiles + A_AT / 2;      // [BUFS][2]: A's hi and lo parts
    // (then, from WORK_AT, [GROUPS][4] work tiles)
    ELEM* so = tiles + END_AT / 2;    // [NWARPS][16][OS] output staging (KSPLIT: [4][16 x 64] float32)
    float* sg = reinterpret_cast<float*>(so + STAGE_BYTES / 2);  // [2][CH] log-gates
    double* sG = reinterpret_cast<double*>(sg + 2 * CH);          // [NWARPS][CH] cumulative log-gates
    [[maybe_unused]] float* sE = reinterpret_cast<float*>(sG + NWARPS * CH);  // [NWARPS][CH] e^{G_i}
    [[maybe_unused]] float* sW = sE + NWARPS * CH;                           // [NWARPS][CH] e^{G_C - G_j}
    [[maybe_unused]] float* sC = sW + NWARPS * CH;                           // [NWARPS][2 CH] score factors
    [[maybe_unused]] float* sred = sC + 2 * NWARPS * CH;                     // [3][NWARPS] per-warp maxima

    // The warp, its warpgroup and its place there, known to the compiler as warp-uniform (a shuffle).
    const int warp = __shfl_sync(FULL, threadIdx.x >> 5, 0), lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    const int group = warp >> 2, gw = warp & 3;
    // The group's value tile, its first key block and the first of its 64 columns (the block's from c0).
    const int vtile = KSPLIT ? 0 : group, kb0 = KSPLIT ? group * KBG : 0;
    const int c0 = (blockIdx.x % col_blocks) * VBB, cg = c0 + vtile * 64;
    DELTA_CHUNK_GEOMETRY  // A and its scales belong to the leading index of k, b and g (0 strides broadcast)
    ELEM* ob = o + la * os0 + lb * os1 + lc * os2 + cg;

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
        if (d < Dk && cg + c < Dv) S[h][t][e] = s_in[la * ss0 + lb * ss1 + lc * ss2 + d * srow + (cg + c) * scol];
#endif
    });

    // This thread's 16-byte pieces of a chunk's tiles, as in chunk_wgmma.cu: key columns kc .. kc + 7
    // of rows kr + K_ROWS it (q and k), value columns vc .. vc + 7 of rows vr + V_ROWS it, and
    // columns ac .. ac + 7 of rows ar + A_ROWS it of A's two parts (its chunk's 8 KB, contiguous).
    constexpr int KEY_PIECES = DKP / 8, COL_PIECES = VBB / 8;
    constexpr int K_ROWS = NTHREADS / KEY_PIECES, V_ROWS = NTHREADS / COL_PIECES, A_ROWS = NTHREADS / 8;
    const int kr = threadIdx.x / KEY_PIECES, kc = (threadIdx.x % KEY_PIECES) * 8;
    const int vr = threadIdx.x / COL_PIECES, vc = (threadIdx.x % COL_PIECES) * 8;
    const int ar = threadIdx.x / 8, ac = (threadIdx.x % 8) * 8;
    const int k_at = (kc / 64) * WG_TILE + swizzled(kr, kc % 64), v_at = (vc / 64) * WG_TILE + swizzled(vr, vc % 64);
    const int a_at = swizzled(ar, ac);
    const bool k_cols = kc < Dk, v_cols = c0 + vc < Dv;
    const ELEM* q_next = qb + kr * qts + kc;  // the next chunk's first rows
    const ELEM* k_next = kb + kr * kts + kc;
    const ELEM* v_next = vb + vr * vts + vc;
    // With a gate the row loops are not unrolled: unrolled, the compiler kept a 64-bit offset per
    // row step and stride for the whole kernel and spilled registers (H100, bf16, (16, 2048, 16,
    // 128): 0.84 -> 0.75 ms with this and the `piece` addresses below). Without one, unrolled is faster.
    // Chunk n's A into A buffer `buf`, and (BUFS = 1) its q tiles into the q buffer: with
    // BUFS = 1 called on their own, once the buffers are free.
    auto load_a = [&](int n, int buf) {
        const i64 a_from = (i64)n * CH * CH + ar * CH + ac;
#pragma unroll
        for (int it = 0; it < CH / A_ROWS; ++it) {
            const int at = 2 * buf * WG_TILE + a_at + it * A_ROWS * 64;
            copy16(sa + at, ahb + a_from + it * A_ROWS * CH, true);
            copy16(sa + WG_TILE + at, alb + a_from + it * A_ROWS * CH, true);
        }
    };
    [[maybe_unused]] auto load_q = [&](int n) {
        const i64 t0 = (i64)n * CH;
        const ELEM* qp = q_next;
#pragma unroll 1
        for (int it = 0; it < CH / K_ROWS; ++it, qp += K_ROWS * qts) {
            const bool ok = k_cols && t0 + kr + it * K_ROWS < T;
            copy16(sq + k_at + it * K_ROWS * 64, ok ? qp : qb, ok);
        }
        q_next += CH * qts;
    };
    auto load_chunk = [&](int n, int buf) {
        const i64 t0 = (i64)n * CH;
        if (BUFS == 1 && n == 0) {
            load_q(0);
            load_a(0, 0);
        }
        const ELEM* qp = q_next;
        const ELEM* kp = k_next;
#if GATED
#pragma unroll 1
#else
#pragma unroll
#endif
        for (int it = 0; it < CH / K_ROWS; ++it, qp += K_ROWS * qts, kp += K_ROWS * kts) {
            const bool ok = k_cols && t0 + kr + it * K_ROWS < T;
            const int at = buf * KB * WG_TILE + k_at + it * K_ROWS * 64;
            if (BUFS == 2) copy16(sq + at, ok ? qp : qb, ok);
            copy16(sk + at, ok ? kp : kb, ok);
        }
        const ELEM* vp = v_next;
#if GATED
#pragma unroll 1
#else
#pragma unroll
#endif
        for (int it = 0; it < CH / V_ROWS; ++it, vp += V_ROWS * vts) {
            const bool ok = v_cols && t0 + vr + it * V_ROWS < T;
            copy16(sv + buf * VT * WG_TILE + v_at + it * V_ROWS * 64, ok ? vp : vb, ok);
        }
        if (BUFS == 2) load_a(n, buf);
        copy_commit();
        if (BUFS == 2) q_next += CH * qts;
        k_next += CH * kts;
        v_next += CH * vts;
    };
    [[maybe_unused]] auto load_gate = [&](int n) { return chunk_gate(gb, (i64)n * CH + threadIdx.x, T, gts); };

    // A 64 x 64 tile held as this warp's 16 rows in accumulator layout, times `scale` and a factor
    // per row (f0: rows gid, f1: rows gid + 8 of the warp's 16), into two swizzled tiles of the
    // group's work area (hi, lo: tile indices), as a B operand whose rows are K: per pair of
    // 8-column tiles j, one stmatrix of four 8 x 8 tiles per part. Tile i holds columns 8 (2j + i / 2),
    // rows 8 (i % 2) of the warp's 16; lane l addresses row l % 8 of tile l / 8, whose 16 bytes are
    // one swizzled piece: `piece[j]` bytes into a tile. The same addresses give ldmatrix (not
    // transposed) the warp's rows of a tile in accumulator layout. Shared addresses as 32-bit
    // integers plus compile-time tile offsets, so that the compiler keeps four of them, not one
    // per tile (it spilled those).
    const int st_row = 16 * gw + 8 * ((lane >> 3) & 1) + (lane & 7), st_col = lane >> 4;
    u32 piece[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) piece[j] = 2 * (st_row * 64 + (((2 * j + st_col) ^ lane) & 7) * 8);
    const u32 tiles_at = shared_address(tiles);
    const u32 work_shared = tiles_at + WORK_AT + group * 4 * TILE_BYTES;
    auto share_rows = [&](const float (&x)[8][4], float f0, float f1, int hi_tile, int lo_tile) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            u32 h[4], l[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float* y = x[2 * j + i / 2] + 2 * (i % 2);
                const float f = (i % 2) ? f1 : f0;
                split2(y[0] * f, y[1] * f, h[i], l[i]);
            }
            stsm(work_shared + hi_tile * TILE_BYTES + piece[j], h);
            stsm(work_shared + lo_tile * TILE_BYTES + piece[j], l);
        }
    };
    // The state times `scale` into the group's work tiles: key block h's hi part in tile h, lo in KBG + h.
    auto share_state = [&](float scale) {
#pragma unroll
        for (int h = 0; h < KBG; ++h) share_rows(S[h], scale, scale, h, KBG + h);
    };
    [[maybe_unused]] auto state_max = [&]() {
        float m = 0.f;
        for_each_state([&](int h, int t, int e, int, int) { m = fmaxf(m, fabsf(S[h][t][e])); });
        return warp_max(m);
    };
    // The power of two that keeps the group's values of magnitude up to m (this warp's) in float16's
    // range, through per-warp slots; a barrier of the warpgroup.
    [[maybe_unused]] auto group_scale = [&](float m, float* slots) {
        m = warp_max(m);
        if (lane == 0) slots[warp] = m;
        group_barrier(group);
        return pow2_scale(max_of<4>(slots + 4 * group));
    };
    [[maybe_unused]] auto tile_max = [&](const float (&x)[8][4], float f0, float f1) {
        float m = 0.f;
#pragma unroll
        for (int t = 0; t < 8; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) m = fmaxf(m, fabsf(x[t][e] * ((e >> 1) ? f1 : f0)));
        return m;
    };

    // The products' descriptors count from the first tile (in 16-byte units).
    const u32 base16 = shared_address(tiles) >> 4;
    const u32 work_at = WORK_AT + group * 4 * TILE_BYTES;  // the group's state
    // R and U, and W, as the products read them: in the group's work tiles, or (KSPLIT) R and U in
    // warpgroup 0's and W in warpgroup 1's, which each writes at its own R_TILE, U_TILE, W_TILE.
    const u32 ru_at = KSPLIT ? WORK_AT : work_at;
    const u32 w_at = (KSPLIT && GATED ? WORK_AT + 4 * TILE_BYTES : ru_at) + W_TILE * TILE_BYTES;
    const int row_a = 16 * gw + gid, row_b = row_a + 8;  // this thread's rows of a chunk
    [[maybe_unused]] float* slot = reinterpret_cast<float*>(so) + gw * 16 * 64;  // KSPLIT: warp gw's rows, both groups

    // e^{G_i} (row_decay) and e^{G_C - G_i} (key_decay) of this thread's rows h = 0, 1 of the chunk, read
    // from chunk_decays' tables where they are used rather than held in registers through the chunk.
    auto row_decay = [&](int h) { return GATED ? sE[warp * CH + (h ? row_b : row_a)] : 1.f; };
    [[maybe_unused]] auto key_decay = [&](int h) { return GATED ? sW[warp * CH + (h ? row_b : row_a)] : 1.f; };
    float state_scale = 1.f;  // the shared state holds S * state_scale
    load_chunk(0, 0);
#if GATED
    ELEM g_next = load_gate(0);
    if (threadIdx.x < CH) sg[threadIdx.x] = to_f(g_next);
#endif
#if SCALED
    state_scale = block_pow2_scale<NWARPS>(state_max(), sred, warp);
#endif
    share_state(state_scale);

    for (int n = 0; n < n_chunks; ++n) {
        const int buf = n & 1;
        copy_wait();
        fence_async_shared();
        __syncthreads();  // chunk n is in shared memory, and so is the state entering it
        if (n + 1 < n_chunks) load_chunk(n + 1, buf ^ 1);
        // This chunk's q and k tiles at the group's first key block, from Q_AT and K_AT; its A from A_AT.
        const u32 q_tiles = ((BUFS == 2 ? buf * KB : 0) + kb0) * TILE_BYTES, k_tiles = (buf * KB + kb0) * TILE_BYTES;
        const u32 a_tiles = A_AT + 2 * (BUFS == 2 ? buf : 0) * TILE_BYTES;
#if GATED
        if (n + 1 < n_chunks) g_next = load_gate(n + 1);
        double* G = sG + warp * CH;  // each warp its own copy: no block barrier needed
        const int factored = chunk_decays(sg + buf * CH, 16 * gw, G, sE + warp * CH, sW + warp * CH,
                                          sC + warp * 2 * CH, true);
#endif

        // O = Q S, X = K S (the state's parts), then the scores P = Q K^T: three commit groups.
        float O[8][4], X[8][4], P[8][4];
        auto times_state = [&](float (&d)[8][4], u32 a_tiles) {  // d = A S for the q or k tiles at a_tiles
#pragma unroll
            for (int kk = 0; kk < 4 * KBG; ++kk) {  // the state's key rows 16 kk .. 16 kk + 15
                const u64 a = tile_descriptor<false>(base16, a_tiles + (kk / 4) * TILE_BYTES + (kk % 4) * K_STEP);
                const u32 at = work_at + (kk / 4) * TILE_BYTES + (kk % 4) * MN_STEP;
                wgmma_ss<0, 1>(d, a, tile_descriptor<true>(base16, at), kk > 0);
                wgmma_ss<0, 1>(d, a, tile_descriptor<true>(base16, at + KBG * TILE_BYTES), true);
            }
            wgmma_commit();
        };
        wgmma_fence();
        times_state(O, Q_AT + q_tiles);
        times_state(X, K_AT + k_tiles);
#pragma unroll
        for (int kk = 0; kk < 4 * KBG; ++kk) {  // 16 keys: block kk / 4, 32 bytes into its rows per step
            const u32 at = (kk / 4) * TILE_BYTES + (kk % 4) * K_STEP;
            wgmma_ss<0, 0>(P, tile_descriptor<false>(base16, Q_AT + q_tiles + at),
                           tile_descriptor<false>(base16, K_AT + k_tiles + at), kk > 0);
        }
        wgmma_commit();
        wgmma_wait<KSPLIT ? 0 : 1>();  // KSPLIT: the scores too, before this chunk's q is replaced
        wgmma_pin(O);
        wgmma_pin(X);

        // R = V - e^{G} ⊙ K S into the work tiles, once every warp of the group is done with the state
        // (KSPLIT: by warpgroup 0, with warpgroup 1's K S added, once every warp of the block is).
        float r_scale = 1.f;
#if KSPLIT
        if (group == 1) put_partial(slot, X, 1.f);
        __syncthreads();  // warpgroup 1's K S is in shared memory; both groups are done with their states and q
        if (n + 1 < n_chunks) {
            load_q(n + 1);
            copy_commit();
        }
        if (group == 0) {
            add_partial(X, 1.f, slot);
#else
        {
#endif
            const float f[2] = {row_decay(0) / state_scale, row_decay(1) / state_scale};
            const u32 v_shared = tiles_at + V_AT + (buf * VT + vtile) * TILE_BYTES;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                u32 r[4];
                ldsm(r, v_shared + piece[j]);
#pragma unroll
                for (int i = 0; i < 4; ++i) {  // as share_rows' registers: X[2j + i / 2], rows gid + 8 (i % 2)
                    const float2 x = unpack2(r[i]);
                    float* y = X[2 * j + i / 2] + 2 * (i % 2);
                    y[0] = x.x - f[i % 2] * y[0];
                    y[1] = x.y - f[i % 2] * y[1];
                }
            }
#if SCALED
            r_scale = group_scale(tile_max(X, 1.f, 1.f), sred);
#else
            if (!KSPLIT) group_barrier(group);
#endif
            share_rows(X, r_scale, r_scale, R_TILE, R_TILE + 1);
            fence_async_shared();
        }
#if KSPLIT
        __syncthreads();  // R is whole
#if SCALED
        if (group == 1) r_scale = pow2_scale(max_of<4>(sred));  // warpgroup 0's
#endif
#else
        group_barrier(group);  // R is whole
#endif

        // U = A R (three products of two parts per 16 steps).
        float U[8][4];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            const u64 ah = tile_descriptor<false>(base16, a_tiles + kk * K_STEP);
            const u64 al = tile_descriptor<false>(base16, a_tiles + TILE_BYTES + kk * K_STEP);
            const u32 at = ru_at + R_TILE * TILE_BYTES + kk * MN_STEP;
            wgmma_ss<0, 1>(U, ah, tile_descriptor<true>(base16, at), kk > 0);
            wgmma_ss<0, 1>(U, ah, tile_descriptor<true>(base16, at + TILE_BYTES), true);
            wgmma_ss<0, 1>(U, al, tile_descriptor<true>(base16, at), true);
        }
        wgmma_commit();

        // Meanwhile the scores: masked, decayed, split in two parts as A operands.
        wgmma_wait<1>();
        wgmma_pin(P);
#if GATED
        mask_scores<true>(P, gw, G, sC + warp * 2 * CH, factored);
#else
        mask_scores<true>(P, gw, nullptr, nullptr, false);
#endif
        const float score_scale = score_scale_of(P);
        u32 ph[4][4], pl[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const float* s = P[2 * kk + (r >> 1)] + (r & 1) * 2;
                split2(s[0] * score_scale, s[1] * score_scale, ph[kk][r], pl[kk][r]);
            }
        wgmma_wait<0>();
        wgmma_pin(U);
        {
            float unscale = 1.f / r_scale;
#if SCALED
            unscale /= asb[n];
#endif
#pragma unroll
            for (int t = 0; t < 8; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) U[t][e] *= unscale;
        }

        // U and W = U ⊙ e^{G_C - G} into the work tiles (W where R was: after every warp's U = A R;
        // KSPLIT: U by warpgroup 0, W by warpgroup 1 in its own tiles, each from the same U).
        float u_scale = 1.f, w_scale = 1.f;
#if SCALED
        {
            float m[2] = {tile_max(U, 1.f, 1.f), tile_max(U, key_decay(0), key_decay(1))};
            m[0] = warp_max(m[0]);
            m[1] = warp_max(m[1]);
            if (lane == 0) {
                sred[NWARPS + warp] = m[0];
                sred[2 * NWARPS + warp] = m[1];
            }
            group_barrier(group);
            u_scale = pow2_scale(max_of<4>(sred + NWARPS + 4 * group));
            w_scale = GATED ? pow2_scale(max_of<4>(sred + 2 * NWARPS + 4 * group)) : u_scale;
        }
#else
        if (!KSPLIT) group_barrier(group);
#endif
        if (!KSPLIT || group == 0) share_rows(U, u_scale, u_scale, U_TILE, U_TILE + 1);
#if GATED
        if (!KSPLIT || group == 1) share_rows(U, w_scale * key_decay(0), w_scale * key_decay(1), W_TILE, W_TILE + 1);
#endif
        fence_async_shared();
#if KSPLIT
        __syncthreads();  // U and W are whole; both groups are done with R and this chunk's A
        if (n + 1 < n_chunks) {
            load_a(n + 1, 0);
            copy_commit();
        }
#else
        group_barrier(group);  // U and W are whole
#endif

        // O = e^{G_i} Q S + P U, in units of score_scale u_scale; S <- e^{G_C} S + K^T W.
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const float f = score_scale * u_scale / state_scale * row_decay(h);
#pragma unroll
            for (int t = 0; t < 8; ++t) {
                O[t][2 * h] *= f;
                O[t][2 * h + 1] *= f;
            }
        }
        {
            float f = w_scale;  // the shared W holds W * w_scale
#if GATED
            f *= sE[warp * CH + CH - 1];  // e^{G_C}
#endif
            if (f != 1.f) for_each_state([&](int h, int t, int e, int, int) { S[h][t][e] *= f; });
        }
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            const u32 at = ru_at + U_TILE * TILE_BYTES + kk * MN_STEP;
            const u64 uh = tile_descriptor<true>(base16, at), ul = tile_descriptor<true>(base16, at + TILE_BYTES);
            wgmma_rs<1>(O, ph[kk], uh);
            wgmma_rs<1>(O, ph[kk], ul);
            wgmma_rs<1>(O, pl[kk], uh);
        }
#pragma unroll
        for (int h = 0; h < KBG; ++h)
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                const u64 a = tile_descriptor<true>(base16, K_AT + k_tiles + h * TILE_BYTES + kk * MN_STEP);
                const u32 at = w_at + kk * MN_STEP;
                wgmma_ss<1, 1>(S[h], a, tile_descriptor<true>(base16, at), true);
                wgmma_ss<1, 1>(S[h], a, tile_descriptor<true>(base16, at + TILE_BYTES), true);
            }
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_pin(O);
#pragma unroll
        for (int h = 0; h < KBG; ++h) wgmma_pin(S[h]);
        if (w_scale != 1.f) {
            const float f = 1.f / w_scale;
            for_each_state([&](int h, int t, int e, int, int) { S[h][t][e] *= f; });
        }

        // Unscaled by multiplying: both scales are powers of two with normal reciprocals (see chunk_wgmma.cu).
        const float unscale = 1.f / (score_scale * u_scale);
#if KSPLIT
        if (group == 1) put_partial(slot, O, unscale);
#else
        store_rows(O, unscale, so + warp * 16 * OS, OS, st_row - 16 * gw, st_col, ob, ots, (i64)n * CH + 16 * gw,
                   T, cg, Dv);
#endif
#if SCALED
        {
            const float m = state_max();
            if (lane == 0) sred[warp] = m;
        }
#endif
        __syncthreads();  // every warp is done with the work tiles and chunk n's gates
#if KSPLIT
        if (group == 0) {  // o = O_0 + O_1, staged in the slot just read
            add_partial(O, unscale, slot);
            __syncwarp();
            store_rows(O, 1.f, reinterpret_cast<ELEM*>(slot), OS, st_row - 16 * gw, st_col, ob, ots,
                       (i64)n * CH + 16 * gw, T, cg, Dv);
        }
#endif
#if GATED
        if (n + 1 < n_chunks && threadIdx.x < CH) sg[(buf ^ 1) * CH + threadIdx.x] = to_f(g_next);
#endif
        if (n + 1 < n_chunks) {
#if SCALED
            state_scale = pow2_scale(max_of<NWARPS>(sred));
#endif
            share_state(state_scale);
        }
    }

    // The exit state: s_out[lead][Dk][Dv].
    float* out = s_out + lead * Dk * (i64)Dv;
    for_each_state([&](int h, int t, int e, int d, int c) {
        if (d < Dk && cg + c < Dv) out[(i64)d * Dv + cg + c] = S[h][t][e];
    });
}
