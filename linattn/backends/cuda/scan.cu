// Causal scans with the state held in registers: the linear scan and the delta rule.
//
//   linear:  S_t = (e^{gk_t} e^{gv_t}^T) . S_{t-1} + k_t v_t^T,           o_t = S_t^T q_t
//   delta:   S~_t = e^{g_t} S_{t-1},  u_t = beta_t . (v_t - S~_t^T k_t),
//            S_t = S~_t + k_t u_t^T,                                     o_t = S_t^T q_t
//
// Work split: one block per (leading index, tile of VB value columns, time segment).
// Each group of NC value columns is owned by KSPLIT neighbouring lanes of one warp;
// lane ks holds the KPT state rows ks*KPT .. ks*KPT+KPT-1 of its NC columns in
// registers, so a step's update needs no communication and its readout sum over Dk is
// a shuffle over the KSPLIT lanes. Holding NC columns lets each q, k value read from
// shared memory (four at a time) feed 2·NC fused multiply-adds. Steps are staged through shared memory TC at a time: q, k (and the
// per-key decay, already exponentiated) for all Dk rows, v (and the per-value decay)
// for the block's columns. Every load converts to the accumulation type ACC (float, or
// double for double inputs), so half and bfloat16 data are read as they are stored and
// nothing is accumulated in reduced precision; no tensor cores are used (no TF32).
//
// Compile-time parameters (-D): ELEM, ACC (and ACC_DOUBLE), KPT, KSPLIT, NC, VB, TC, VW and VWC
// (elements per staging load of rows and of value columns), GK_MODE (0 none,
// 1 one per step, 2 per key), HAS_GV, HAS_SIN, WRITE_O, WIDE_O (the linear scan's outputs in
// ACC, unrounded), and for the delta rule
// DELTA (compile the delta rule instead of the linear scan), BETA_MODE (1 per step,
// 2 per value column), HAS_G and WRITE_R (also write the residuals r_t = v_t - S~_t^T k_t,
// float32 (n_lead, T, Dv), for the gradients in delta_grad.cu).
//
// Strides are in elements; the last axis of every operand is contiguous. A time stride
// may be negative (a reversed view). Leading axes are three (b, h, g); a stride of 0
// broadcasts.

#include "scan_common.cuh"

#ifndef DELTA

extern "C" __global__ void __launch_bounds__(NT)
linear_scan(const ELEM* q, const ELEM* k, const ELEM* v, const ELEM* gk, const ELEM* gv, const ACC* s_in,
            OUT_ELEM* o, ACC* s_out, GEOMETRY_ARGS,
            i64 gk0, i64 gk1, i64 gk2, i64 gkt, i64 gv0, i64 gv1, i64 gv2, i64 gvt) {
    __shared__ __align__(16) ACC sq[TC][KROW];
    __shared__ __align__(16) ACC sk[TC][KROW];
#if GK_MODE == 2
    __shared__ __align__(16) ACC sgk[TC][KROW];
#elif GK_MODE == 1
    __shared__ ACC sg1[TC];
#endif
    __shared__ ACC sv[TC][VB];
#if HAS_GV
    __shared__ ACC sgv[TC][VB];
#endif
    __shared__ ACC so[TC][VB];

    GEOMETRY_SETUP
#if GK_MODE
    const ELEM* gkb = gk + Lead{gk0, gk1, gk2}.at(a0, a1, a2);
#endif
#if HAS_GV
    const ELEM* gvb = gv + Lead{gv0, gv1, gv2}.at(a0, a1, a2);
#endif

    for (i64 t0 = tb; t0 < te; t0 += TC) {
        const int tc = (int)min((i64)TC, te - t0);
        __syncthreads();
        if (WRITE_O) stage_rows<false>(sq, qb, qt, t0, tc, Dk);
        stage_rows<false>(sk, kb, kt, t0, tc, Dk);
        stage_cols<false>(sv, vb, vt, t0, tc, c0, Dv);
#if GK_MODE == 2
        stage_rows<true>(sgk, gkb, gkt, t0, tc, Dk);
#elif GK_MODE == 1
        for (int t = threadIdx.x; t < TC; t += NT) sg1[t] = t < tc ? exp_acc(to_acc(gkb[(t0 + t) * gkt])) : (ACC)1;
#endif
#if HAS_GV
        stage_cols<true>(sgv, gvb, gvt, t0, tc, c0, Dv);
#endif
        __syncthreads();
        for (int t = 0; t < tc; ++t) {
            const ACC* kr = &sk[t][ks * KSEG];
            const ACC* qr = &sq[t][ks * KSEG];
            ACC vj[NC], acc[NC];
#if HAS_GV
            ACC dv[NC];
#endif
#pragma unroll
            for (int c = 0; c < NC; ++c) {
                vj[c] = sv[t][cl + c];
                acc[c] = (ACC)0;
#if HAS_GV
                dv[c] = sgv[t][cl + c];
#endif
            }
#if GK_MODE == 1
            const ACC ds = sg1[t];
#endif
#pragma unroll
            for (int i4 = 0; i4 < KPT; i4 += 4) {
                const Quad k4 = load4(kr + i4);
                const Quad q4 = load4(qr + i4);
#if GK_MODE == 2
                const Quad g4 = load4(&sgk[t][ks * KSEG] + i4);
#endif
#pragma unroll
                for (int j = 0; j < 4; ++j) {
#pragma unroll
                    for (int c = 0; c < NC; ++c) {
                        ACC& s_ = S[i4 + j][c];
#if GK_MODE == 2 && HAS_GV
                        s_ = s_ * (g4.v[j] * dv[c]) + k4.v[j] * vj[c];
#elif GK_MODE == 2
                        s_ = s_ * g4.v[j] + k4.v[j] * vj[c];
#elif GK_MODE == 1 && HAS_GV
                        s_ = s_ * (ds * dv[c]) + k4.v[j] * vj[c];
#elif GK_MODE == 1
                        s_ = s_ * ds + k4.v[j] * vj[c];
#elif HAS_GV
                        s_ = s_ * dv[c] + k4.v[j] * vj[c];
#else
                        s_ += k4.v[j] * vj[c];
#endif
                        if (WRITE_O) acc[c] += q4.v[j] * s_;
                    }
                }
            }
            if (WRITE_O) {
#pragma unroll
                for (int c = 0; c < NC; ++c) {
                    const ACC r = lane_sum(acc[c]);
                    if (ks == 0) so[t][cl + c] = r;
                }
            }
        }
        WRITE_OUTPUTS
    }
    WRITE_STATE
}

#else  // DELTA

extern "C" __global__ void __launch_bounds__(NT)
delta_scan(const ELEM* q, const ELEM* k, const ELEM* v, const ELEM* beta, const ELEM* g, const ACC* s_in,
           ELEM* o, ACC* s_out, GEOMETRY_ARGS,
           i64 b0, i64 b1, i64 b2, i64 bt, i64 g0, i64 g1, i64 g2, i64 gt, ACC* r_out) {
    __shared__ __align__(16) ACC sq[TC][KROW];
    __shared__ __align__(16) ACC sk[TC][KROW];
    __shared__ ACC sv[TC][VB];
#if BETA_MODE == 2
    __shared__ ACC sb[TC][VB];
#else
    __shared__ ACC sb1[TC];
#endif
#if HAS_G
    __shared__ ACC sg1[TC];
#endif
    __shared__ ACC so[TC][VB];

    GEOMETRY_SETUP
    const ELEM* bb = beta + Lead{b0, b1, b2}.at(a0, a1, a2);
#if HAS_G
    const ELEM* gb = g + Lead{g0, g1, g2}.at(a0, a1, a2);
#endif

    for (i64 t0 = tb; t0 < te; t0 += TC) {
        const int tc = (int)min((i64)TC, te - t0);
        __syncthreads();
        if (WRITE_O) stage_rows<false>(sq, qb, qt, t0, tc, Dk);
        stage_rows<false>(sk, kb, kt, t0, tc, Dk);
        stage_cols<false>(sv, vb, vt, t0, tc, c0, Dv);
#if BETA_MODE == 2
        stage_cols<false>(sb, bb, bt, t0, tc, c0, Dv);
#else
        for (int t = threadIdx.x; t < TC; t += NT) sb1[t] = t < tc ? to_acc(bb[(t0 + t) * bt]) : (ACC)0;
#endif
#if HAS_G
        for (int t = threadIdx.x; t < TC; t += NT) sg1[t] = t < tc ? exp_acc(to_acc(gb[(t0 + t) * gt])) : (ACC)1;
#endif
        __syncthreads();
        for (int t = 0; t < tc; ++t) {
            const ACC* kr = &sk[t][ks * KSEG];
            const ACC* qr = &sq[t][ks * KSEG];
#if HAS_G
            const ACC decay = sg1[t];
#endif
            ACC pred[NC], u[NC], acc[NC];
#pragma unroll
            for (int c = 0; c < NC; ++c) pred[c] = acc[c] = (ACC)0;
#pragma unroll
            for (int i4 = 0; i4 < KPT; i4 += 4) {
                const Quad k4 = load4(kr + i4);
#pragma unroll
                for (int j = 0; j < 4; ++j) {
#pragma unroll
                    for (int c = 0; c < NC; ++c) {
#if HAS_G
                        S[i4 + j][c] *= decay;
#endif
                        pred[c] += k4.v[j] * S[i4 + j][c];
                    }
                }
            }
#pragma unroll
            for (int c = 0; c < NC; ++c) {
#if BETA_MODE == 2
                const ACC bj = sb[t][cl + c];
#else
                const ACC bj = sb1[t];
#endif
                const ACC r = sv[t][cl + c] - lane_sum(pred[c]);  // the residual v_t - S~_t^T k_t
                u[c] = bj * r;
#if WRITE_R
                if (ks == 0 && col + c < Dv) r_out[((i64)l * T + t0 + t) * Dv + col + c] = r;
#endif
            }
#pragma unroll
            for (int i4 = 0; i4 < KPT; i4 += 4) {
                const Quad k4 = load4(kr + i4);
                const Quad q4 = load4(qr + i4);
#pragma unroll
                for (int j = 0; j < 4; ++j) {
#pragma unroll
                    for (int c = 0; c < NC; ++c) {
                        S[i4 + j][c] += k4.v[j] * u[c];
                        if (WRITE_O) acc[c] += q4.v[j] * S[i4 + j][c];
                    }
                }
            }
            if (WRITE_O) {
#pragma unroll
                for (int c = 0; c < NC; ++c) {
                    const ACC r = lane_sum(acc[c]);
                    if (ks == 0) so[t][cl + c] = r;
                }
            }
        }
        WRITE_OUTPUTS
    }
    WRITE_STATE
}

#endif  // DELTA
