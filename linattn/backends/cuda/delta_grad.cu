// Gradients of the delta rule scan (scan.cu's delta_scan), in two passes over time.
//
// The forward: S~_t = e^{g_t} S_{t-1},  r_t = v_t - S~_t^T k_t,  u_t = beta_t r_t,
//              S_t = S~_t + k_t u_t^T,  o_t = S_t^T q_t.
//
// delta_grad_reverse walks t from T-1 down to 0 (its operands are time-reversed views),
// with D the cotangent of S_t, from D = dS_T:
//
//     D += q_t do_t^T;  du_t = D^T k_t;  dk_t = D u_t;  dp_t = -beta_t du_t;
//     D <- e^{g_t} (D + k_t dp_t^T)
//
// and leaves D = dS_0, the initial state's cotangent. u_t comes from the residuals r_t
// that scan.cu's delta_scan writes with WRITE_R. delta_grad_forward then re-runs the
// forward from S_0 and, reading du_t back,
//
//     dk_t += S~_t dp_t,   dq_t = S_t do_t.
//
// The launcher derives the rest elementwise: dv = beta du, dbeta = du . r (summed over the
// value columns for one beta per step), dg_t = <dS_T, S_T> + sum_{s>=t} (q_s.dq_s - v_s.dv_s).
//
// Work split as in scan.cu: a block per (leading index, tile of VB value columns), each
// thread KPT state rows of NC columns. dk and dq sum over the value columns, which several
// threads and blocks hold: a thread sums its NC columns, a warp its column groups (by
// shuffles), the block its warps (in shared memory, in a fixed order: the result is
// deterministic), and each block writes its tile's sum to its own slice of a float32
// (col_block, lead, T, Dk) array, which the launcher sums over the column blocks (one
// block holds all of them where its threads allow). The forward pass adds its part of dk
// to the reverse pass's, in place.
//
// Compile-time parameters (-D): those of scan.cu (ELEM, ACC, ACC_DOUBLE, KPT, KSPLIT, NC,
// VB, TC, VW, VWC), BETA_MODE (1 per step, 2 per value column), HAS_G, HAS_SIN (a state to
// start from: dS_T for the reverse pass, S_0 for the forward one). NT is a multiple of 32.
// Operand strides are in elements (three leading, then time); the float32 scratch arrays
// (r, du: (lead, T, Dv); dk, dq: (col_block, lead, T, Dk)) take a lead and a time stride,
// and the partial sums a column-block stride too.

#include "scan_common.cuh"

#define NWARPS (NT / 32)
#define FULL_MASK 0xffffffffu

// The sum over the column groups of a warp: lanes that hold the same rows are KSPLIT apart.
__device__ __forceinline__ ACC group_sum(ACC x) {
#pragma unroll
    for (int off = KSPLIT; off < 32; off <<= 1) x += __shfl_xor_sync(FULL_MASK, x, off);
    return x;
}

// Stage a tile of a float32/float64 scratch array (lead row `base`, time stride ts) into sh[TC][VB].
__device__ __forceinline__ void stage_scratch(ACC (*sh)[VB], const ACC* base, i64 ts, i64 t0, int tc, int c0,
                                              int Dv) {
    for (int idx = threadIdx.x; idx < TC * VB; idx += NT) {
        const int t = idx / VB, c = idx - t * VB;
        sh[t][c] = t < tc && c0 + c < Dv ? base[(t0 + t) * ts + c0 + c] : (ACC)0;
    }
}

// Per-step operands: beta (one per step, or per value column) and the decay e^{g_t}.
#if BETA_MODE == 2
#define BETA_TILE __shared__ ACC sb[TC][VB];
#define STAGE_BETA stage_cols<false>(sb, bb, bt, t0, tc, c0, Dv);
#define BETA_AT(t, c) sb[t][c]
#else
#define BETA_TILE __shared__ ACC sb1[TC];
#define STAGE_BETA for (int t = threadIdx.x; t < TC; t += NT) sb1[t] = t < tc ? to_acc(bb[(t0 + t) * bt]) : (ACC)0;
#define BETA_AT(t, c) sb1[t]
#endif
#if HAS_G
#define GATE_TILE __shared__ ACC sg1[TC];
#define STAGE_GATE \
    for (int t = threadIdx.x; t < TC; t += NT) sg1[t] = t < tc ? exp_acc(to_acc(gb[(t0 + t) * gt])) : (ACC)1;
#define DECAY_AT(t) sg1[t]
#else
#define GATE_TILE
#define STAGE_GATE
#define DECAY_AT(t) ((ACC)1)
#endif

#define GRAD_SETUP                                                                                    \
    const int ks = threadIdx.x % KSPLIT, warp = threadIdx.x / 32, lane = threadIdx.x % 32;          \
    const int cl = (threadIdx.x / KSPLIT) * NC;                                                       \
    const int c0 = blockIdx.y * VB;                                                                   \
    const int col = c0 + cl;                                                                          \
    const i64 l = blockIdx.x;                                                                         \
    const i64 a2 = l % L2, a1 = (l / L2) % L1, a0 = l / (L2 * L1);                                   \
    const ELEM* bb = beta + Lead{b0, b1, b2}.at(a0, a1, a2);                                          \
    [[maybe_unused]] const ELEM* gb = g + Lead{g0, g1, g2}.at(a0, a1, a2);                           \
    LOAD_STATE(0)

// A row sum of the step's partials (part[KPT] per thread) into red[t][warp][...], summed
// over the warp's column groups.
#define REDUCE_ROWS(red, part, t)                                                                     \
    _Pragma("unroll") for (int i = 0; i < KPT; ++i) part[i] = group_sum(part[i]);                    \
    if (lane < KSPLIT) {                                                                              \
        _Pragma("unroll") for (int i = 0; i < KPT; ++i) red[t][warp][ks * KSEG + i] = part[i];      \
    }

// The block's sums over its warps, for the tile's steps, into out (this block's slice);
// with ADD, added to what out holds.
template <bool ADD>
__device__ __forceinline__ void write_row_sums(ACC* out, const ACC (*red)[NWARPS][KROW], i64 ts, i64 t0, int tc,
                                               int Dk) {
    for (int idx = threadIdx.x; idx < TC * Dk; idx += NT) {
        const int t = idx / Dk, d = idx - t * Dk;
        if (t >= tc) continue;
        ACC s = ADD ? out[(t0 + t) * ts + d] : (ACC)0;
#pragma unroll
        for (int w = 0; w < NWARPS; ++w) s += red[t][w][(d / KPT) * KSEG + d % KPT];
        out[(t0 + t) * ts + d] = s;
    }
}

#define SCRATCH_ARGS i64 rl, i64 rt, i64 pc, i64 pl, i64 pt

extern "C" __global__ void __launch_bounds__(NT)
delta_grad_reverse(const ELEM* q, const ELEM* k, const ELEM* dout, const ACC* res, const ELEM* beta, const ELEM* g,
                   const ACC* s_in, ACC* du_out, ACC* dk_out, ACC* s_out, i64 T, int Dk, int Dv, i64 L1, i64 L2,
                   i64 q0, i64 q1, i64 q2, i64 qt, i64 k0, i64 k1, i64 k2, i64 kt, i64 d0, i64 d1, i64 d2, i64 dt,
                   i64 b0, i64 b1, i64 b2, i64 bt, i64 g0, i64 g1, i64 g2, i64 gt,
                   i64 si0, i64 si1, i64 si2, i64 sir, i64 sic, SCRATCH_ARGS) {
    __shared__ __align__(16) ACC sq[TC][KROW];
    __shared__ __align__(16) ACC sk[TC][KROW];
    __shared__ ACC sdo[TC][VB];
    __shared__ ACC sr[TC][VB];
    __shared__ ACC sdu[TC][VB];
    __shared__ ACC red[TC][NWARPS][KROW];
    BETA_TILE
    GATE_TILE

    GRAD_SETUP  // S here is D, the cotangent of the state, from dS_T
    const ELEM* qb = q + Lead{q0, q1, q2}.at(a0, a1, a2);
    const ELEM* kb = k + Lead{k0, k1, k2}.at(a0, a1, a2);
    const ELEM* db = dout + Lead{d0, d1, d2}.at(a0, a1, a2);
    const ACC* rb = res + l * rl;
    ACC* dub = du_out + l * rl;
    ACC* dkb = dk_out + blockIdx.y * pc + l * pl;

    for (i64 t0 = 0; t0 < T; t0 += TC) {
        const int tc = (int)min((i64)TC, T - t0);
        __syncthreads();
        stage_rows<false>(sq, qb, qt, t0, tc, Dk);
        stage_rows<false>(sk, kb, kt, t0, tc, Dk);
        stage_cols<false>(sdo, db, dt, t0, tc, c0, Dv);
        stage_scratch(sr, rb, rt, t0, tc, c0, Dv);
        STAGE_BETA
        STAGE_GATE
        __syncthreads();
        for (int t = 0; t < tc; ++t) {
            const ACC* kr = &sk[t][ks * KSEG];
            const ACC* qr = &sq[t][ks * KSEG];
            ACC dov[NC], acc[NC], u[NC], dp[NC], part[KPT];
#pragma unroll
            for (int c = 0; c < NC; ++c) {
                dov[c] = sdo[t][cl + c];
                acc[c] = (ACC)0;
            }
#pragma unroll
            for (int i4 = 0; i4 < KPT; i4 += 4) {  // D += q_t do_t^T; du_t = D^T k_t
                const Quad k4 = load4(kr + i4), q4 = load4(qr + i4);
#pragma unroll
                for (int j = 0; j < 4; ++j)
#pragma unroll
                    for (int c = 0; c < NC; ++c) {
                        S[i4 + j][c] += q4.v[j] * dov[c];
                        acc[c] += k4.v[j] * S[i4 + j][c];
                    }
            }
#pragma unroll
            for (int c = 0; c < NC; ++c) {
                const ACC bj = BETA_AT(t, cl + c), du = lane_sum(acc[c]);
                u[c] = bj * sr[t][cl + c];
                dp[c] = -bj * du;
                if (ks == 0) sdu[t][cl + c] = du;
            }
            const ACC decay = DECAY_AT(t);
#pragma unroll
            for (int i4 = 0; i4 < KPT; i4 += 4) {  // dk_t = D u_t; D <- e^{g_t} (D + k_t dp_t^T)
                const Quad k4 = load4(kr + i4);
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    ACC s = (ACC)0;
#pragma unroll
                    for (int c = 0; c < NC; ++c) {
                        s += S[i4 + j][c] * u[c];
                        S[i4 + j][c] = decay * (S[i4 + j][c] + k4.v[j] * dp[c]);
                    }
                    part[i4 + j] = s;
                }
            }
            REDUCE_ROWS(red, part, t)
        }
        __syncthreads();
        for (int idx = threadIdx.x; idx < TC * VB; idx += NT) {
            const int t = idx / VB, c = idx - t * VB;
            if (t < tc && c0 + c < Dv) dub[(t0 + t) * rt + c0 + c] = sdu[t][c];
        }
        write_row_sums<false>(dkb, red, pt, t0, tc, Dk);
    }
    // dS_0 into s_out (n_lead, Dk, Dv)
    ACC* dst = s_out + (i64)blockIdx.x * Dk * Dv;
#pragma unroll
    for (int i = 0; i < KPT; ++i) {
        const int row = ks * KPT + i;
#pragma unroll
        for (int c = 0; c < NC; ++c)
            if (row < Dk && col + c < Dv) dst[(i64)row * Dv + col + c] = S[i][c];
    }
}

extern "C" __global__ void __launch_bounds__(NT)
delta_grad_forward(const ELEM* k, const ELEM* v, const ELEM* dout, const ACC* du, const ELEM* beta, const ELEM* g,
                   const ACC* s_in, ACC* dk_out, ACC* dq_out, i64 T, int Dk, int Dv, i64 L1, i64 L2,
                   i64 k0, i64 k1, i64 k2, i64 kt, i64 v0, i64 v1, i64 v2, i64 vt, i64 d0, i64 d1, i64 d2, i64 dt,
                   i64 b0, i64 b1, i64 b2, i64 bt, i64 g0, i64 g1, i64 g2, i64 gt,
                   i64 si0, i64 si1, i64 si2, i64 sir, i64 sic, SCRATCH_ARGS) {
    __shared__ __align__(16) ACC sk[TC][KROW];
    __shared__ ACC sv[TC][VB];
    __shared__ ACC sdo[TC][VB];
    __shared__ ACC sdu[TC][VB];
    __shared__ ACC red_k[TC][NWARPS][KROW];
    __shared__ ACC red_q[TC][NWARPS][KROW];
    BETA_TILE
    GATE_TILE

    GRAD_SETUP  // S from S_0
    const ELEM* kb = k + Lead{k0, k1, k2}.at(a0, a1, a2);
    const ELEM* vb = v + Lead{v0, v1, v2}.at(a0, a1, a2);
    const ELEM* db = dout + Lead{d0, d1, d2}.at(a0, a1, a2);
    const ACC* dub = du + l * rl;
    ACC* dkb = dk_out + blockIdx.y * pc + l * pl;
    ACC* dqb = dq_out + blockIdx.y * pc + l * pl;

    for (i64 t0 = 0; t0 < T; t0 += TC) {
        const int tc = (int)min((i64)TC, T - t0);
        __syncthreads();
        stage_rows<false>(sk, kb, kt, t0, tc, Dk);
        stage_cols<false>(sv, vb, vt, t0, tc, c0, Dv);
        stage_cols<false>(sdo, db, dt, t0, tc, c0, Dv);
        stage_scratch(sdu, dub, rt, t0, tc, c0, Dv);
        STAGE_BETA
        STAGE_GATE
        __syncthreads();
        for (int t = 0; t < tc; ++t) {
            const ACC* kr = &sk[t][ks * KSEG];
            const ACC decay = DECAY_AT(t);
            ACC pred[NC], u[NC], dp[NC], dov[NC], part_k[KPT], part_q[KPT];
#pragma unroll
            for (int c = 0; c < NC; ++c) pred[c] = (ACC)0;
#pragma unroll
            for (int i4 = 0; i4 < KPT; i4 += 4) {  // S~_t = e^{g_t} S_{t-1}; S~_t^T k_t
                const Quad k4 = load4(kr + i4);
#pragma unroll
                for (int j = 0; j < 4; ++j)
#pragma unroll
                    for (int c = 0; c < NC; ++c) {
                        S[i4 + j][c] *= decay;
                        pred[c] += k4.v[j] * S[i4 + j][c];
                    }
            }
#pragma unroll
            for (int c = 0; c < NC; ++c) {
                const ACC bj = BETA_AT(t, cl + c);
                u[c] = bj * (sv[t][cl + c] - lane_sum(pred[c]));
                dp[c] = -bj * sdu[t][cl + c];
                dov[c] = sdo[t][cl + c];
            }
#pragma unroll
            for (int i4 = 0; i4 < KPT; i4 += 4) {  // dk_t += S~_t dp_t; S_t = S~_t + k_t u_t^T; dq_t = S_t do_t
                const Quad k4 = load4(kr + i4);
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    ACC sk_ = (ACC)0, sq_ = (ACC)0;
#pragma unroll
                    for (int c = 0; c < NC; ++c) {
                        sk_ += S[i4 + j][c] * dp[c];
                        S[i4 + j][c] += k4.v[j] * u[c];
                        sq_ += S[i4 + j][c] * dov[c];
                    }
                    part_k[i4 + j] = sk_;
                    part_q[i4 + j] = sq_;
                }
            }
            REDUCE_ROWS(red_k, part_k, t)
            REDUCE_ROWS(red_q, part_q, t)
        }
        __syncthreads();
        write_row_sums<true>(dkb, red_k, pt, t0, tc, Dk);  // onto the reverse pass's part of dk
        write_row_sums<false>(dqb, red_q, pt, t0, tc, Dk);
    }
}
