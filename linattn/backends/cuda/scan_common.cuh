// Shared by the CUDA-core scan kernels (scan.cu, delta_grad.cu): types, staging of tiles
// through shared memory, and the launch geometry. The including file is compiled with the
// -D parameters that scan.cu lists (ELEM, ACC, ACC_DOUBLE, KPT, KSPLIT, NC, VB, TC, VW, VWC).

#include "elem_common.cuh"

// The outputs' type: with WIDE_O the accumulation type (a 16-bit scan's sums unrounded, for
// gradients that sum them further), else the storage type.
#ifndef WIDE_O
#define WIDE_O 0
#endif
#if WIDE_O
#define OUT_ELEM ACC
#else
#define OUT_ELEM ELEM
#endif

#define NT ((VB / NC) * KSPLIT)
#define KSEG (KPT + 4)            // a lane's rows in shared memory, padded against bank conflicts
#define KROW (KSPLIT * KSEG)

struct Quad { ACC v[4]; };  // four consecutive shared-memory values, loaded in one or two instructions

__device__ __forceinline__ Quad load4(const ACC* p) {
    Quad r;
#if ACC_DOUBLE
    const double2 a = *reinterpret_cast<const double2*>(p), b = *reinterpret_cast<const double2*>(p + 2);
    r.v[0] = a.x; r.v[1] = a.y; r.v[2] = b.x; r.v[3] = b.y;
#else
    const float4 a = *reinterpret_cast<const float4*>(p);
    r.v[0] = a.x; r.v[1] = a.y; r.v[2] = a.z; r.v[3] = a.w;
#endif
    return r;
}

struct Lead {  // strides of the three leading axes
    i64 s0, s1, s2;
    __device__ __forceinline__ i64 at(i64 a, i64 b, i64 c) const { return a * s0 + b * s1 + c * s2; }
};

__device__ __forceinline__ ACC lane_sum(ACC x) {
#pragma unroll
    for (int off = KSPLIT / 2; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
    return x;
}

// Staging loads VW elements at once (16 bytes when the launcher found every row aligned,
// else 1) and fully unrolls the loop, so that all of a thread's loads of a tile are in
// flight together instead of one global-memory latency per element.
template <int W>
__device__ __forceinline__ void load_vec(ELEM (&out)[W], const ELEM* p) {
    if (W * sizeof(ELEM) == 16) {
        const uint4 raw = *reinterpret_cast<const uint4*>(p);
        const ELEM* e = reinterpret_cast<const ELEM*>(&raw);
#pragma unroll
        for (int j = 0; j < W; ++j) out[j] = e[j];
    } else {
#pragma unroll
        for (int j = 0; j < W; ++j) out[j] = p[j];
    }
}

// Stage rows [t0, t0 + tc) of a (T, Dk) operand into sh[TC][KROW] (zeros past Dk or tc).
// With EXP the value stored is e^x (and 1 where nothing is loaded).
// Loads per thread in flight at once while staging (bounds the registers they take).
#define BATCH (sizeof(ELEM) == 2 ? 2 : 4)

template <bool EXP>
__device__ __forceinline__ void stage_rows(ACC (*sh)[KROW], const ELEM* base, i64 ts, i64 t0, int tc, int Dk) {
    constexpr int PER_ROW = KSPLIT * KPT / VW;
    constexpr int ITERS = (TC * PER_ROW + NT - 1) / NT;
    for (int first = 0; first < ITERS; first += BATCH) {
        ELEM raw[BATCH][VW];
        bool live[BATCH];
#pragma unroll
        for (int b = 0; b < BATCH; ++b) {
            const int idx = threadIdx.x + (first + b) * NT, t = idx / PER_ROW, r = (idx % PER_ROW) * VW;
            live[b] = first + b < ITERS && idx < TC * PER_ROW && t < tc && r < Dk;
            if (live[b]) load_vec<VW>(raw[b], base + (t0 + t) * ts + r);
        }
#pragma unroll
        for (int b = 0; b < BATCH; ++b) {
            const int idx = threadIdx.x + (first + b) * NT, t = idx / PER_ROW, r = (idx % PER_ROW) * VW;
            if (first + b < ITERS && idx < TC * PER_ROW) {
#pragma unroll
                for (int j = 0; j < VW; ++j) {
                    ACC x = EXP ? (ACC)1 : (ACC)0;
                    if (live[b] && (VW == 1 || r + j < Dk)) {
                        x = to_acc(raw[b][j]);
                        if (EXP) x = exp_acc(x);
                    }
                    sh[t][((r + j) / KPT) * KSEG + ((r + j) % KPT)] = x;
                }
            }
        }
    }
}

// Stage rows [t0, t0 + tc) of the block's value columns of a (T, Dv) operand into sh[TC][VB].
template <bool EXP>
__device__ __forceinline__ void stage_cols(ACC (*sh)[VB], const ELEM* base, i64 ts, i64 t0, int tc, int c0, int Dv) {
    constexpr int PER_ROW = VB / VWC;
    constexpr int ITERS = (TC * PER_ROW + NT - 1) / NT;
    for (int first = 0; first < ITERS; first += BATCH) {
        ELEM raw[BATCH][VWC];
        bool live[BATCH];
#pragma unroll
        for (int b = 0; b < BATCH; ++b) {
            const int idx = threadIdx.x + (first + b) * NT, t = idx / PER_ROW, c = (idx % PER_ROW) * VWC;
            live[b] = first + b < ITERS && idx < TC * PER_ROW && t < tc && c0 + c < Dv;
            if (live[b]) load_vec<VWC>(raw[b], base + (t0 + t) * ts + c0 + c);
        }
#pragma unroll
        for (int b = 0; b < BATCH; ++b) {
            const int idx = threadIdx.x + (first + b) * NT, t = idx / PER_ROW, c = (idx % PER_ROW) * VWC;
            if (first + b < ITERS && idx < TC * PER_ROW) {
#pragma unroll
                for (int j = 0; j < VWC; ++j) {
                    ACC x = EXP ? (ACC)1 : (ACC)0;
                    if (live[b] && (VWC == 1 || c0 + c + j < Dv)) {
                        x = to_acc(raw[b][j]);
                        if (EXP) x = exp_acc(x);
                    }
                    sh[t][c + j] = x;
                }
            }
        }
    }
}

// The geometry every launch shares. Leading index l = blockIdx.x over (L0, L1, L2);
// value tile blockIdx.y; time segment blockIdx.z of seg_len steps.
#define GEOMETRY_ARGS                                                                                 \
    i64 T, int Dk, int Dv, i64 L1, i64 L2, i64 seg_len,                                            \
    i64 q0, i64 q1, i64 q2, i64 qt, i64 k0, i64 k1, i64 k2, i64 kt, i64 v0, i64 v1, i64 v2, i64 vt,  \
    i64 o0, i64 o1, i64 o2, i64 ot,                                                                 \
    i64 si0, i64 si1, i64 si2, i64 sip, i64 sir, i64 sic

#define GEOMETRY_SETUP                                                                                \
    const int ks = threadIdx.x % KSPLIT;                                                              \
    const int cl = (threadIdx.x / KSPLIT) * NC;  /* the thread's first column within the tile */    \
    const int c0 = blockIdx.y * VB;                                                                   \
    const int col = c0 + cl;                                                                          \
    const i64 l = blockIdx.x;                                                                         \
    const i64 a2 = l % L2, a1 = (l / L2) % L1, a0 = l / (L2 * L1);                                   \
    const i64 tb = (i64)blockIdx.z * seg_len;                                                         \
    const i64 te = min(T, tb + seg_len);                                                              \
    const ELEM* qb = q + Lead{q0, q1, q2}.at(a0, a1, a2);                                             \
    const ELEM* kb = k + Lead{k0, k1, k2}.at(a0, a1, a2);                                             \
    const ELEM* vb = v + Lead{v0, v1, v2}.at(a0, a1, a2);                                             \
    OUT_ELEM* ob = o + Lead{o0, o1, o2}.at(a0, a1, a2);                                               \
    LOAD_STATE(blockIdx.z * sip)

// The thread's state registers S[KPT][NC] from s_in (at the leading index's offset plus
// `offset`, strides sir, sic), or zeros without HAS_SIN.
#define LOAD_STATE(offset)                                                                            \
    ACC S[KPT][NC];                                                                                   \
    _Pragma("unroll") for (int i = 0; i < KPT; ++i) {                                                \
        const int row = ks * KPT + i;                                                                 \
        _Pragma("unroll") for (int c = 0; c < NC; ++c) {                                             \
            S[i][c] = (ACC)0;                                                                         \
            if (HAS_SIN && row < Dk && col + c < Dv)                                                  \
                S[i][c] = s_in[Lead{si0, si1, si2}.at(a0, a1, a2) + (offset) + row * sir + (col + c) * sic]; \
        }                                                                                             \
    }

// The state leaving the segment: s_out is contiguous (n_lead, segments, Dk, Dv).
#define WRITE_STATE                                                                                   \
    {                                                                                                 \
        ACC* dst = s_out + ((i64)blockIdx.x * gridDim.z + blockIdx.z) * Dk * Dv;                        \
        _Pragma("unroll") for (int i = 0; i < KPT; ++i) {                                            \
            const int row = ks * KPT + i;                                                             \
            _Pragma("unroll") for (int c = 0; c < NC; ++c)                                           \
                if (row < Dk && col + c < Dv) dst[(i64)row * Dv + col + c] = S[i][c];                 \
        }                                                                                             \
    }

#define WRITE_OUTPUTS                                                                                 \
    if (WRITE_O) {                                                                                    \
        __syncthreads();                                                                              \
        for (int idx = threadIdx.x; idx < TC * VB; idx += NT) {                                       \
            int t = idx / VB, c = idx - t * VB;                                                       \
            if (t < tc && c0 + c < Dv) store(ob + (t0 + t) * ot + c0 + c, so[t][c]);                   \
        }                                                                                             \
    }
