// The middle pass of a time-segmented scan: the state entering each segment.
//
// A segmented scan splits T into P segments of L steps. Pass 1 gives each segment's own
// final state from a zero state, local_p; this file joins them:
//
//   G_p    = sum of the log-gates over the steps of segment p      (segment_log_decay)
//   S_in,0 = S_0 (or 0),   S_in,p+1 = (e^{Gk_p} e^{Gv_p}^T) . S_in,p + local_p   (segment_prefix)
//
// and pass 3 computes each segment's outputs from S_in,p. The state after the last
// segment is the scan's final state.
//
// Compile-time parameters (-D): ELEM (the gates' type), ACC (accumulation: float or
// double), GK_MODE (0 none, 1 one per step, 2 per key row), HAS_GV, HAS_SIN.
// Strides are in elements; leading axes are three (a stride of 0 broadcasts).

#include "elem_common.cuh"

#define SUM_THREADS 256

// out[l, p, d] = sum over t in [p L, min(T, (p + 1) L)) of g[l, t, d], for a (.., T, D) gate.
// Block (l, p, column tile): `cols` columns (min(D, 32)) times SUM_THREADS / cols lanes of
// steps, reduced through shared memory.
extern "C" __global__ void __launch_bounds__(SUM_THREADS)
segment_log_decay(const ELEM* __restrict__ g, ACC* __restrict__ out, i64 T, int D, i64 n1, i64 n2, i64 L,
                  i64 gs0, i64 gs1, i64 gs2, i64 gts) {
    __shared__ ACC partial[SUM_THREADS];
    const int cols = D < 32 ? D : 32, lanes = SUM_THREADS / cols;
    const int c = threadIdx.x % cols, lane = threadIdx.x / cols, d = blockIdx.z * cols + c;
    const i64 l = blockIdx.x, P = gridDim.y, p = blockIdx.y;
    const i64 a2 = l % n2, a1 = (l / n2) % n1, a0 = l / (n2 * n1);
    const ELEM* base = g + a0 * gs0 + a1 * gs1 + a2 * gs2;
    const i64 t0 = p * L, t1 = min(T, t0 + L);
    ACC sum = (ACC)0;
    if (lane < lanes && d < D)
        for (i64 t = t0 + lane; t < t1; t += lanes) sum += to_acc(base[t * gts + d]);
    partial[threadIdx.x] = sum;
    __syncthreads();
    if (lane == 0 && d < D) {
        for (int j = 1; j < lanes; ++j) sum += partial[j * cols + c];
        out[(l * P + p) * D + d] = sum;
    }
}

// Block (l, tile of 256 state entries); one thread per entry (row r, column c), walking the P segments:
// entering[l, p] = S_in,p, last[l] = S_in,P. gk_sum (n_lead, P, Dk or 1), gv_sum
// (n_lead, P, Dv) are segment_log_decay's sums; local and entering are (n_lead, P, Dk, Dv).
extern "C" __global__ void __launch_bounds__(256)
segment_prefix(const ACC* __restrict__ local, const ACC* __restrict__ gk_sum, const ACC* __restrict__ gv_sum,
               const ACC* __restrict__ s_in, ACC* __restrict__ entering, ACC* __restrict__ last, int P, int Dk,
               int Dv, i64 n1, i64 n2, i64 si0, i64 si1, i64 si2, i64 sir, i64 sic) {
    const i64 l = blockIdx.x, idx = (i64)blockIdx.y * blockDim.x + threadIdx.x, per = (i64)Dk * Dv;
    if (idx >= per) return;
    const int r = (int)(idx / Dv), c = (int)(idx % Dv);
    (void)r, (void)c;  // not every variant reads both
    ACC s = (ACC)0;
#if HAS_SIN
    const i64 a2 = l % n2, a1 = (l / n2) % n1, a0 = l / (n2 * n1);
    s = s_in[a0 * si0 + a1 * si1 + a2 * si2 + r * sir + c * sic];
#endif
    for (int p = 0; p < P; ++p) {
        const i64 at = (l * P + p) * per + idx;
        entering[at] = s;
        ACC decay = (ACC)1;
#if GK_MODE == 1
        decay = exp_acc(gk_sum[l * P + p]);
#elif GK_MODE == 2
        decay = exp_acc(gk_sum[(l * P + p) * Dk + r]);
#endif
#if HAS_GV
        decay *= exp_acc(gv_sum[(l * P + p) * Dv + c]);
#endif
        s = decay * s + local[at];
    }
    last[l * per + idx] = s;
}
