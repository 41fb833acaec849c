// The causal linear scan with a log-gate per key (GLA; RWKV-6 and HGRN before their
// extras), in chunks, on tensor cores (mma.sync m16n8k16, float32 accumulation).
//
//   S_t = diag(e^{g_t}) S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t       (g_t in R^Dk)
//
// For a chunk of C = 64 steps entering with state S, with G_i = g_0 + ... + g_i inside it
// (per key, so every product below is elementwise over the keys):
//
//   o_i    = (q_i ⊙ e^{G_i})^T S + sum_{j <= i} P_ij v_j,   P_ij = sum_d q_id k_jd e^{G_id - G_jd},
//   S_exit = diag(e^{G_C}) S + sum_j (k_j ⊙ e^{G_C - G_j}) v_j^T.
//
// Two kernels. gla_chunk_prepare computes P for every chunk at once (P does not depend on
// S). The chunk's rows and columns fall in four blocks of 16 steps. Below the diagonal
// blocks (j in block c, i in a later block) each decay splits at the last step e of block
// c into factors of one side each, e^{G_i - G_j} = e^{G_i - G_e} e^{G_e - G_j}, both <= 1
// where the gates are <= 0: the decayed queries and keys are formed in shared memory and
// multiplied on tensor cores. Inside a diagonal block the split is at the block's first
// step, e^{G_i - G_j} = e^{Γ_i} e^{-Γ_j}, whose second factor is >= 1: it is used where
// every |Γ| <= 30 (8 for float16, and k e^{-Γ} must fit the type), as it is for gates of
// GLA's size; a block with stronger gates sums its 136 scores on the CUDA cores instead,
// with e^{G_i - G_j} = prod_{j < t <= i} e^{g_t}, a product of at most 15 factors <= 1.
// P is stored in two parts (64 x 64 per chunk).
//
// Both kernels form every decay as a product of the steps' factors e^{g_t} (an expf per
// step and key, then running products forwards and backwards), never as the exponential
// of a difference of cumulative sums: a product of factors cancels no digits (a difference
// of two long float32 sums would lose a mild gate's digits behind a strong one), and over a
// chunk it is within 64 roundings of float32 (plus expf's two ulp per factor) of the exact
// decay, far inside the two-part operands' 2^-16 (and float16's 2^-22).
//
// gla_chunk_scan walks each (leading index, tile of value columns, time segment) through
// its chunks in order, the state in registers. Per chunk it forms q ⊙ e^{G} and k ⊙ e^{G_C - G}
// in shared memory, then O = (q ⊙ e^{G}) S, O += P V, and the update. With few leading indices
// and a long T the launcher splits T into segments (segments.cu's three passes): a first
// launch without outputs (WRITE_O 0: neither q nor P is read) gives each segment's own final
// state from zero and its log-decay per key, sum_t g_t (summed in float64 over the chunks),
// segments.cu joins them into each segment's entering state, and a second launch computes
// the outputs from those.
//
// Precision, as in chunk_mma.cu: q, k and v enter the products as stored; every
// intermediate that enters a product — the decayed queries and keys, P, the state — is
// split into two parts x = hi + lo in the storage type, and a product of two split
// operands keeps the three terms hi hi + hi lo + lo hi, so each product is exact to about
// 2^-16 (bfloat16) or 2^-22 (float16) of its terms. For float16, P (a scale per chunk,
// stored with it) and the state are scaled by powers of two so that both parts stay in
// range; the decayed queries and keys are no larger than the stored ones.
//
// Past 128 keys the launcher splits the keys in two parts and runs both kernels for each:
// the recurrence decays each key's row of the state on its own, so the state's rows fall
// apart by key, S = [S_0; S_1], and so do the outputs, o = o_0 + o_1, each part's o with
// its own P (the sum over its keys). The first part's scan writes o_0 in float32 (O_PART 1),
// the second adds its own to it and rounds once (O_PART 2).
//
// Compile-time parameters (-D): ELEM_HALF (float16, else bfloat16), DKP (keys padded to a
// multiple of 16, at most 128); gla_chunk_scan also: VB (value columns per group of four
// warps), GROUPS, WM (warps along the state's rows in the update), HAS_SIN, TIME_SEGMENTS
// (0: one pass over all of T), WRITE_O, SEGS (threads per pair of keys for the decays, a
// power of two, SEGS x DKP / 2 <= the block's threads), O_PART (0: the outputs; 1: the
// first key part's outputs into o_part, float32; 2: the outputs with o_part added);
// gla_chunk_prepare: PREPARE.
//
// Strides are in elements; the last axis of every operand is contiguous, every row starts
// on 16 bytes, and Dk, Dv are multiples of 8 (the launcher checks). A time stride may be
// negative (a reversed view); a leading stride of 0 broadcasts. P (two parts) is (leading
// index, chunk, C, C), C-contiguous; o_part (leading index, step, Dv), C-contiguous and
// indexed by the kernel's steps; the exit states s_out + (leading index, time segment)
// s_lead + (key, Dv) (s_lead = Dk Dv, or the whole state's rows times Dv for a key part).

#define CH 64
#define QKS (DKP + 8)   // shared-memory row stride of the q, k and g tiles (+16 bytes against bank conflicts)
#define PS (CH + 8)     // ... of the P tiles
#define GATED 0         // mma_common.cuh's per-step gate helpers are not used here
#define SCALED ELEM_HALF

#include "mma_common.cuh"

// Pairs of 16-bit values (keys d, d+1) as floats, and back in two parts.
__device__ __forceinline__ float2 pair_at(const ELEM* tile, int at) {
    return unpack2(*reinterpret_cast<const u32*>(tile + at));
}

__device__ __forceinline__ void split_pair(ELEM* hi, ELEM* lo, int at, float x, float y) {
    u32 h, l;
    split2(x, y, h, l);
    *reinterpret_cast<u32*>(hi + at) = h;
    *reinterpret_cast<u32*>(lo + at) = l;
}

#ifdef PREPARE
#define PTHREADS 512
#define QROWS 112       // decayed queries: blocks 1-3 against block 0 (rows 0-47), 2-3 against 1 (48-79), 3 against 2
                        // (80-95); block 0 against itself (96-111)
#define KROWS 112       // decayed keys: blocks 0-2 to their last step (rows 0-47), every block from its first (48-111)
#define AS (DKP + 4)    // row stride of the float32 e^{g} tile
#define FS (CH + 4)     // ... of the float32 P tile
#define DS 17           // ... of a warp's diagonal scores
// A diagonal block takes the factored form e^{G_i - G_j} = e^{Γ_i} e^{-Γ_j} (Γ the log-decay from
// the block's first step) where every e^{Γ} lies in [e^{-MILD}, e^{MILD}] and every k e^{-Γ} fits
// the storage type.
#if ELEM_HALF
#define MILD 8.0
#define ELEM_MAX 65504.f
#else
#define MILD 30.0
#define ELEM_MAX 3.0e38f
#endif

// Row offset of the decayed queries of block c + 1 against column block c (rows 16 (c+1) .. 63).
__device__ __forceinline__ int query_rows(int c) { return c == 0 ? 0 : (c == 1 ? 48 : 80); }

// One block of sixteen warps per (chunk, leading index).
extern "C" __global__ void __launch_bounds__(PTHREADS, 1)
gla_chunk_prepare(const ELEM* __restrict__ q, const ELEM* __restrict__ k, const ELEM* __restrict__ g,
                  ELEM* __restrict__ p_hi, ELEM* __restrict__ p_lo, float* __restrict__ p_scale, i64 T, int Dk,
                  i64 n1, i64 n2, i64 qs0, i64 qs1, i64 qs2, i64 qts, i64 ks0, i64 ks1, i64 ks2, i64 kts,
                  i64 gs0, i64 gs1, i64 gs2, i64 gts) {
    extern __shared__ __align__(16) unsigned char smem[];
    ELEM* sq = reinterpret_cast<ELEM*>(smem);   // [CH][QKS]
    ELEM* sk = sq + CH * QKS;                    // [CH][QKS]
    ELEM* sg = sk + CH * QKS;                    // [CH][QKS]
    ELEM* sqh = sg + CH * QKS;                   // [QROWS][QKS]  decayed queries, two parts
    ELEM* sql = sqh + QROWS * QKS;
    ELEM* skh = sql + QROWS * QKS;               // [KROWS][QKS]  decayed keys, two parts
    ELEM* skl = skh + KROWS * QKS;
    float* sp = reinterpret_cast<float*>(skl + KROWS * QKS);  // [CH][FS]  P
    float* shalf = sp + CH * FS;                  // [4][2][DKP]   each half block's product of e^{g} per key
    int* smild = reinterpret_cast<int*>(shalf + 8 * DKP);     // [4]       whether a diagonal block is factored
    [[maybe_unused]] float* sred = reinterpret_cast<float*>(smild + 4);  // [16] per-warp max |P|
    float* sa = reinterpret_cast<float*>(sqh);   // [CH][AS]      e^{g}, once the products are done
    float* sd = sa + CH * AS;                     // [8][16][DS]   the diagonal blocks' partial scores

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    const int chunk = blockIdx.x;
    const i64 lead = blockIdx.y, la = lead / (n1 * n2), lb = (lead / n2) % n1, lc = lead % n2;
    const i64 t0 = (i64)chunk * CH, valid = min((i64)CH, T - t0);
    stage_tile<CH, DKP, PTHREADS>(sq, QKS, q + la * qs0 + lb * qs1 + lc * qs2 + t0 * qts, qts, valid, Dk);
    stage_tile<CH, DKP, PTHREADS>(sk, QKS, k + la * ks0 + lb * ks1 + lc * ks2 + t0 * kts, kts, valid, Dk);
    stage_tile<CH, DKP, PTHREADS>(sg, QKS, g + la * gs0 + lb * gs1 + lc * gs2 + t0 * gts, gts, valid, Dk);
    copy_commit();
    for (int p = threadIdx.x; p < CH * FS; p += PTHREADS) sp[p] = 0.f;
    if (threadIdx.x < 4) smild[threadIdx.x] = 1;
    copy_wait();
    __syncthreads();

    // The decayed operands, keys (d, d+1) of half h (8 steps) of block b by one thread, from
    // the steps' factors a_t = e^{g_t}: each half block's product of them, then with e^{β_b}
    // block b's product and e^{Γ_i} = a_{16b} ... a_i the decay from the block's first step
    // to i (a running product), the queries q_i e^{Γ_i} e^{β_{c+1} + ... + β_{b-1}} against
    // each earlier block c, the keys k_j e^{-Γ_j} of the diagonal, and (a running product
    // backwards) the keys k_j e^{β_b - Γ_j} = k_j a_{j+1} ... a_{16b+15} to the block's last
    // step. Products of factors, not differences of sums: no digits cancel, and each decay is
    // within a few float32 roundings per step of e^{G_i - G_j}. (Two threads per block and pair
    // of keys: sixteen warps hide the latency of the exponentials that one thread chains.)
    const int d = 2 * (threadIdx.x % (DKP / 2)), bh = threadIdx.x / (DKP / 2), b = bh & 3, h = bh >> 2;
    // e^{β_c} of key d + x (x = 0, 1): the product of its two halves'.
    auto block_decay = [&](int c, int x) { return shalf[2 * c * DKP + d + x] * shalf[(2 * c + 1) * DKP + d + x]; };
    float a0[8], a1[8];  // this thread's steps' factors e^{g}
    if (bh < 8) {
        float p0 = 1.f, p1 = 1.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float2 gv = pair_at(sg, (16 * b + 8 * h + i) * QKS + d);
            a0[i] = expf(gv.x);
            a1[i] = expf(gv.y);
            p0 *= a0[i];
            p1 *= a1[i];
        }
        *reinterpret_cast<float2*>(shalf + (2 * b + h) * DKP + d) = make_float2(p0, p1);
    }
    __syncthreads();
    if (bh < 8) {
        float F0[3], F1[3];  // e^{β_{c+1} + ... + β_{b-1}} for c < b
#pragma unroll
        for (int c = 0; c < 3; ++c) {
            F0[c] = F1[c] = 1.f;
            for (int cc = c + 1; cc < b; ++cc) {
                F0[c] *= block_decay(cc, 0);
                F1[c] *= block_decay(cc, 1);
            }
        }
        // The factored diagonal where every e^{Γ} is within [e^{-MILD}, e^{MILD}] (its
        // reciprocal then neither overflows nor loses digits to the fast division).
        const float mild_high = expf(MILD), mild_low = expf(-MILD);
        float e0 = h ? shalf[2 * b * DKP + d] : 1.f, e1 = h ? shalf[2 * b * DKP + d + 1] : 1.f;  // the first half's
        bool mild = true;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int jj = 8 * h + i, at = (16 * b + jj) * QKS + d;
            const float2 qv = pair_at(sq, at), kv = pair_at(sk, at);
            e0 *= a0[i];
            e1 *= a1[i];
#pragma unroll
            for (int c = 0; c < 3; ++c)
                if (c < b)
                    split_pair(sqh, sql, (query_rows(c) + 16 * (b - c - 1) + jj) * QKS + d, qv.x * e0 * F0[c],
                               qv.y * e1 * F1[c]);
            if (b == 0) split_pair(sqh, sql, (96 + jj) * QKS + d, qv.x * e0, qv.y * e1);
            const float x = kv.x * __fdividef(1.f, e0), y = kv.y * __fdividef(1.f, e1);
            mild = mild && e0 >= mild_low && e0 <= mild_high && e1 >= mild_low && e1 <= mild_high &&
                   fabsf(x) < ELEM_MAX && fabsf(y) < ELEM_MAX;
            split_pair(skh, skl, (48 + 16 * b + jj) * QKS + d, x, y);
        }
        if (!mild) smild[b] = 0;  // (every writer writes 0)
        if (b < 3) {
            float s0 = h ? 1.f : shalf[(2 * b + 1) * DKP + d], s1 = h ? 1.f : shalf[(2 * b + 1) * DKP + d + 1];
#pragma unroll
            for (int i = 7; i >= 0; --i) {
                const int at = (16 * b + 8 * h + i) * QKS + d;
                const float2 kv = pair_at(sk, at);
                split_pair(skh, skl, at, kv.x * s0, kv.y * s1);
                s0 *= a0[i];
                s1 *= a1[i];
            }
        }
    }
    __syncthreads();
    const bool all_mild = smild[0] && smild[1] && smild[2] && smild[3];

    // Warps 0-5 each take one of the six pairs (row block b, column block c < b) below the
    // diagonal; warps 6-9 one factored diagonal block each (masked to j <= i). Three products
    // of two parts each, into P.
    if (warp < 10 && (warp < 6 || smild[warp - 6])) {
        const int diag = warp < 6 ? -1 : warp - 6;  // the diagonal block, or -1
        const int rb = diag >= 0 ? diag : (warp < 3 ? 3 : (warp < 5 ? 2 : 1));
        const int cb = diag >= 0 ? diag : (warp < 3 ? warp : (warp < 5 ? warp - 3 : 0));
        const int qrow = diag == 0 ? 96 : (diag > 0 ? query_rows(diag - 1) : query_rows(cb) + 16 * (rb - cb - 1));
        const int krow = diag >= 0 ? 48 + 16 * diag : 16 * cb;
        float acc[2][4] = {};
#pragma unroll
        for (int kk = 0; kk < DKP / 16; ++kk) {
            u32 ah[4], al[4], bh[4], bl[4];
            const int a_off = (qrow + (lane & 15)) * QKS + kk * 16 + (lane >> 4) * 8;
            const int b_off = (krow + (lane & 7) + (lane >> 4) * 8) * QKS + kk * 16 + ((lane >> 3) & 1) * 8;
            ldsm(ah, sqh + a_off);
            ldsm(al, sql + a_off);
            ldsm(bh, skh + b_off);
            ldsm(bl, skl + b_off);
            mma16(acc[0], acc[1], ah, bh);
            mma16(acc[0], acc[1], ah, bl);
            mma16(acc[0], acc[1], al, bh);
        }
#pragma unroll
        for (int t = 0; t < 2; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int ii = gid + (e >> 1) * 8, jj = 8 * t + 2 * tig + (e & 1);
                sp[(16 * rb + ii) * FS + 16 * cb + jj] = diag < 0 || jj <= ii ? acc[t][e] : 0.f;
            }
    }
    // A diagonal block outside the factored form's range (strong or growing gates): warp w < 8
    // takes block b = w % 4 and the key groups (of 8) of slots 2 (w / 4) and 2 (w / 4) + 1;
    // lane (jj, slot) sums column j = 16 b + jj against every row i >= j of the block, with
    // the decay carried as the running product w_i = w_{i-1} e^{g_i} of factors <= 1.
    if (!all_mild) {
        __syncthreads();  // the decayed tiles are free: e^{g} and the diagonal scores take their place
        for (int p = threadIdx.x; p < CH * DKP / 2; p += PTHREADS) {
            const int i = p / (DKP / 2), d = 2 * (p % (DKP / 2));
            const float2 gv = pair_at(sg, i * QKS + d);
            *reinterpret_cast<float2*>(sa + i * AS + d) = make_float2(expf(gv.x), expf(gv.y));
        }
        __syncthreads();
        const int b = warp & 3;
        if (warp < 8 && !smild[b]) {  // eight warps: two per block
            const int jj = lane & 15, slot = 2 * (warp >> 2) + (lane >> 4), j = 16 * b + jj;
            float acc[16];
#pragma unroll
            for (int ii = 0; ii < 16; ++ii) acc[ii] = 0.f;
            for (int d0 = 8 * slot; d0 < DKP; d0 += 32) {
                float kj[8], w[8];
                {
                    const uint4 raw = *reinterpret_cast<const uint4*>(sk + j * QKS + d0);
                    const u32 r[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
                    for (int x = 0; x < 4; ++x) {
                        const float2 f = unpack2(r[x]);
                        kj[2 * x] = f.x;
                        kj[2 * x + 1] = f.y;
                    }
                }
#pragma unroll
                for (int x = 0; x < 8; ++x) w[x] = 1.f;
#pragma unroll
                for (int ii = 0; ii < 16; ++ii) {
                    const int i = 16 * b + ii;
                    const uint4 raw = *reinterpret_cast<const uint4*>(sq + i * QKS + d0);
                    const float4 a0 = *reinterpret_cast<const float4*>(sa + i * AS + d0);
                    const float4 a1 = *reinterpret_cast<const float4*>(sa + i * AS + d0 + 4);
                    const u32 r[4] = {raw.x, raw.y, raw.z, raw.w};
                    const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
                    float sum = 0.f;
#pragma unroll
                    for (int x = 0; x < 4; ++x) {
                        const float2 f = unpack2(r[x]);
                        if (ii > jj) {
                            w[2 * x] *= a[2 * x];
                            w[2 * x + 1] *= a[2 * x + 1];
                        }
                        sum = fmaf(f.x * kj[2 * x], w[2 * x], sum);
                        sum = fmaf(f.y * kj[2 * x + 1], w[2 * x + 1], sum);
                    }
                    if (ii >= jj) acc[ii] += sum;
                }
            }
            float* mine = sd + warp * 16 * DS;
#pragma unroll
            for (int ii = 0; ii < 16; ++ii) {
                const float x = acc[ii] + __shfl_xor_sync(FULL, acc[ii], 16);
                if (lane < 16) mine[ii * DS + jj] = x;  // 0 above the diagonal (ii < jj)
            }
        }
        __syncthreads();
        for (int p = threadIdx.x; p < 4 * 256; p += PTHREADS) {  // the two warps' halves, in a fixed order
            const int bb = p / 256, ii = (p / 16) % 16, jj = p % 16;
            if (!smild[bb])
                sp[(16 * bb + ii) * FS + 16 * bb + jj] = sd[(bb * 16 + ii) * DS + jj] + sd[((bb + 4) * 16 + ii) * DS + jj];
        }
    }
    __syncthreads();  // P is whole

    // P in two parts (times the chunk's power of two for float16), 64 x 64.
    float scale = 1.f;
#if SCALED
    {
        float m = 0.f;
        for (int p = threadIdx.x; p < CH * CH; p += PTHREADS) m = fmaxf(m, fabsf(sp[(p / CH) * FS + p % CH]));
        m = warp_max(m);
        if (lane == 0) sred[warp] = m;
        __syncthreads();
        scale = pow2_scale(max_of<PTHREADS / 32>(sred));
        if (threadIdx.x == 0) p_scale[lead * gridDim.x + chunk] = scale;
    }
#endif
    const i64 at = (lead * gridDim.x + chunk) * (i64)(CH * CH);
    for (int p = threadIdx.x; p < CH * CH / 2; p += PTHREADS) {
        const int i = p / (CH / 2), j = 2 * (p % (CH / 2));
        split_pair(p_hi + at, p_lo + at, i * CH + j, sp[i * FS + j] * scale, sp[i * FS + j + 1] * scale);
    }
}
#endif  // PREPARE

#ifdef VB
#define NWARPS (4 * GROUPS)   // GROUPS sets of four warps, each owning VB of the block's value columns
#define NTHREADS (NWARPS * 32)
#define VBB (GROUPS * VB)      // the block's value columns
#define VS (VBB + 8)           // shared row stride of the v and state tiles
#define WN (4 / WM)
#define MT (DKP / 16 / WM)     // state row tiles (16) per warp
#define NT (VB / 8 / WN)       // state column tiles (8) per warp
#define ONT (VB / 8)           // output column tiles per warp

#ifndef O_PART
#define O_PART 0
#endif

#define PART_LINES ((VBB + 31) / 32)  // 128-byte lines of a row of the block's float32 first-part outputs

#define OUT_ROWS (WRITE_O ? CH : 0)    // the tiles only the outputs need (q, its decayed parts, P, the shared
#define OUT_KEYS (WRITE_O ? DKP : 0)   // state) take no shared memory in the first pass

extern "C" __global__ void __launch_bounds__(NTHREADS, 1)
gla_chunk_scan(const ELEM* __restrict__ q, const ELEM* __restrict__ k, const ELEM* __restrict__ v,
               const ELEM* __restrict__ g, const ELEM* __restrict__ p_hi, const ELEM* __restrict__ p_lo,
               const float* __restrict__ p_scale, const float* __restrict__ s_in, ELEM* __restrict__ o,
               float* __restrict__ s_out, float* __restrict__ o_part, i64 s_lead, i64 T, int Dk, int Dv,
               i64 n1, i64 n2, int col_blocks,
               i64 qs0, i64 qs1, i64 qs2, i64 qts, i64 ks0, i64 ks1, i64 ks2, i64 kts,
               i64 vs0, i64 vs1, i64 vs2, i64 vts, i64 os0, i64 os1, i64 os2, i64 ots,
               i64 gs0, i64 gs1, i64 gs2, i64 gts, i64 ss0, i64 ss1, i64 ss2, i64 sseg, i64 srow, i64 scol,
               i64 seg_len, float* __restrict__ g_sum) {
    extern __shared__ __align__(16) unsigned char smem[];
    ELEM* sq = reinterpret_cast<ELEM*>(smem);              // [CH][QKS]   q, k, g as stored (the next chunk's
    ELEM* sk = sq + OUT_ROWS * QKS;                         // [CH][QKS]   arrive while this one is computed)
    ELEM* sg = sk + CH * QKS;                               // [CH][QKS]
    ELEM* sqh = sg + CH * QKS;                              // [CH][QKS]   q ⊙ e^{G}, two parts
    ELEM* sql = sqh + OUT_ROWS * QKS;
    ELEM* skh = sql + OUT_ROWS * QKS;                       // [CH][QKS]   k ⊙ e^{G_C - G}, two parts
    ELEM* skl = skh + CH * QKS;
    ELEM* sv = skl + CH * QKS;                              // [CH][VS]    v
    ELEM* sph = sv + CH * VS;                               // [CH][PS]    P, two parts
    ELEM* spl = sph + OUT_ROWS * PS;
    ELEM* shi = spl + OUT_ROWS * PS;                        // [DKP][VS]   the entering state, two parts
    ELEM* slo = shi + OUT_KEYS * VS;
    float* spart = reinterpret_cast<float*>(slo + OUT_KEYS * VS);  // [SEGS][DKP] each row part's product of e^{g}
    float* sdec = spart + SEGS * DKP;                              // [DKP]       e^{G_C}
    [[maybe_unused]] float* sred = sdec + DKP;                     // [NWARPS]    per-warp max |S|
    [[maybe_unused]] float* ssum = sred + NWARPS;                  // [SEGS][DKP] (first pass) each row part's sum of g

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    const int c0 = (blockIdx.x % col_blocks) * VBB;
    const int gw = warp & 3, cg = (warp >> 2) * VB;
    [[maybe_unused]] const int row0 = 16 * gw;  // the warp's first output row
    const i64 lead = blockIdx.x / col_blocks;
    const i64 la = lead / (n1 * n2), lb = (lead / n2) % n1, lc = lead % n2;
#if TIME_SEGMENTS
    const int segment = blockIdx.y;
    const i64 t_begin = segment * seg_len, t_end = min(T, t_begin + seg_len);
#else  // one pass: constants the compiler folds into the addresses and bounds
    const int segment = 0;
    const i64 t_begin = 0, t_end = T;
#endif
    const int n_chunks = (int)((t_end - t_begin + CH - 1) / CH), all_chunks = (int)((T + CH - 1) / CH);
    [[maybe_unused]] const ELEM* qb = q + la * qs0 + lb * qs1 + lc * qs2;
    const ELEM* kb = k + la * ks0 + lb * ks1 + lc * ks2;
    const ELEM* vb = v + la * vs0 + lb * vs1 + lc * vs2 + c0;
    const ELEM* gb = g + la * gs0 + lb * gs1 + lc * gs2;
    // P of the time segment's first chunk (P holds every chunk of T for each leading index).
    const i64 p_at = lead * all_chunks * (i64)(CH * CH) + t_begin * CH;
    [[maybe_unused]] const ELEM* phb = p_hi + p_at;
    [[maybe_unused]] const ELEM* plb = p_lo + p_at;
    [[maybe_unused]] const float* psb = p_scale + p_at / (CH * CH);
    [[maybe_unused]] ELEM* ob = o + la * os0 + lb * os1 + lc * os2 + c0 + cg + 2 * tig;
    [[maybe_unused]] float* opb = o_part + lead * T * Dv + c0 + cg + 2 * tig;

    // This warp's tile of the state: rows d_base + [0, 16 MT), columns c_base + [0, 8 NT).
    const int d_base = (gw % WM) * MT * 16, c_base = cg + (gw / WM) * NT * 8;
    float S[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                [[maybe_unused]] const int d = d_base + mt * 16 + gid + (e >> 1) * 8;
                [[maybe_unused]] const int c = c0 + c_base + nt * 8 + 2 * tig + (e & 1);
                float x = 0.f;
#if HAS_SIN
                if (d < Dk && c < Dv)
                    x = s_in[la * ss0 + lb * ss1 + lc * ss2 + segment * sseg + d * srow + c * scol];
#endif
                S[mt][nt][e] = x;
            }

    // Chunk n's copies in two groups: q, k and g as stored (free once the chunk before has
    // formed its decayed tiles), then v and P (free once it has made its products). Each
    // arrives while the chunk before computes, in one buffer. Rows past the segment are zeros.
    auto load_gates = [&](int n) {
        const i64 t0 = t_begin + (i64)n * CH;
#if WRITE_O
        stage_tile<CH, DKP, NTHREADS>(sq, QKS, qb + t0 * qts, qts, t_end - t0, Dk);
#endif
        stage_tile<CH, DKP, NTHREADS>(sk, QKS, kb + t0 * kts, kts, t_end - t0, Dk);
        stage_tile<CH, DKP, NTHREADS>(sg, QKS, gb + t0 * gts, gts, t_end - t0, Dk);
        copy_commit();
    };
    auto load_values = [&](int n) {
        const i64 t0 = t_begin + (i64)n * CH;
        stage_tile<CH, VBB, NTHREADS>(sv, VS, vb + t0 * vts, vts, t_end - t0, Dv - c0);
#if WRITE_O
        stage_tile<CH, CH, NTHREADS>(sph, PS, phb + (i64)n * CH * CH, CH, CH, CH);
        stage_tile<CH, CH, NTHREADS>(spl, PS, plb + (i64)n * CH * CH, CH, CH, CH);
#endif
        copy_commit();
    };

    [[maybe_unused]] float state_scale = 1.f;  // the shared state holds S * state_scale
    load_gates(0);
    load_values(0);
#if WRITE_O
#if SCALED
    state_scale = block_pow2_scale<NWARPS>(state_max(S), sred, warp);  // state_max: warp-wide, every lane
#endif
    share_state(S, state_scale, shi, slo, VS, d_base, c_base, true);
#endif
    [[maybe_unused]] double log_decay0 = 0.0, log_decay1 = 0.0;  // (first pass, seg 0) the time segment's sum of g

    // The decays: thread (seg, keys d, d+1) over steps [seg CH / SEGS, (seg + 1) CH / SEGS) of the
    // chunk, its row part (not a time segment).
    const int key = 2 * (threadIdx.x % (DKP / 2)), seg = threadIdx.x / (DKP / 2);
    const bool gate_thread = seg < SEGS;
    constexpr int SEG_ROWS = CH / SEGS;

    for (int n = 0; n < n_chunks; ++n) {
        [[maybe_unused]] const i64 t0 = t_begin + (i64)n * CH;
        copy_wait_but_last();
        __syncthreads();  // chunk n's q, k and g are in shared memory, and so is the state entering it
#if WRITE_O && O_PART == 2
        // The first key part's outputs of this chunk's steps and the block's columns into L2, a 128-byte
        // line each, while the decays are formed (a chunk earlier was slower in float16: stop 28).
        for (int i = threadIdx.x; i < CH * PART_LINES; i += NTHREADS) {
            const i64 t = t0 + i / PART_LINES;
            const int c = c0 + (i % PART_LINES) * 32;
            if (t < t_end && c < Dv) prefetch_l2(o_part + (lead * T + t) * Dv + c);
        }
#endif

        // q ⊙ e^{G} and k ⊙ e^{G_C - G} in two parts; e^{G_C}. The decays are products of the
        // steps' factors a_t = e^{g_t}: e^{G_i} = a_0 ... a_i forward, e^{G_C - G_j} = a_{j+1} ... a_{C-1}
        // backward, each thread over its row part from the products of the parts before and after
        // it. First each a_t, kept (as float32) in the slots of skh and skl that this thread fills
        // last, and each part's product (first pass: and its sum of g).
        float part0 = 1.f, part1 = 1.f;
        if (gate_thread) {
            [[maybe_unused]] float sum0 = 0.f, sum1 = 0.f;
#pragma unroll 4
            for (int r = 0; r < SEG_ROWS; ++r) {
                const int at = (seg * SEG_ROWS + r) * QKS + key;
                const float2 x = pair_at(sg, at);
                const float a0 = expf(x.x), a1 = expf(x.y);
                *reinterpret_cast<float*>(skh + at) = a0;
                *reinterpret_cast<float*>(skl + at) = a1;
                part0 *= a0;
                part1 *= a1;
#if !WRITE_O
                sum0 += x.x;
                sum1 += x.y;
#endif
            }
            *reinterpret_cast<float2*>(spart + seg * DKP + key) = make_float2(part0, part1);
#if !WRITE_O
            *reinterpret_cast<float2*>(ssum + seg * DKP + key) = make_float2(sum0, sum1);
#endif
        }
        __syncthreads();
        if (gate_thread) {
            float before0 = 1.f, before1 = 1.f, after0 = 1.f, after1 = 1.f;
#pragma unroll
            for (int s = 0; s < SEGS; ++s) {
                const float2 x = *reinterpret_cast<const float2*>(spart + s * DKP + key);
                if (s < seg) {
                    before0 *= x.x;
                    before1 *= x.y;
                } else if (s > seg) {
                    after0 *= x.x;
                    after1 *= x.y;
                }
            }
            if (seg == 0) *reinterpret_cast<float2*>(sdec + key) = make_float2(part0 * after0, part1 * after1);
#if WRITE_O
#pragma unroll 4
            for (int r = 0; r < SEG_ROWS; ++r) {
                const int at = (seg * SEG_ROWS + r) * QKS + key;
                before0 *= *reinterpret_cast<const float*>(skh + at);
                before1 *= *reinterpret_cast<const float*>(skl + at);
                const float2 qv = pair_at(sq, at);
                split_pair(sqh, sql, at, qv.x * before0, qv.y * before1);
            }
#else
            if (seg == 0)
#pragma unroll
                for (int s = 0; s < SEGS; ++s) {
                    const float2 x = *reinterpret_cast<const float2*>(ssum + s * DKP + key);
                    log_decay0 += x.x;
                    log_decay1 += x.y;
                }
#endif
#pragma unroll 4
            for (int r = SEG_ROWS - 1; r >= 0; --r) {
                const int at = (seg * SEG_ROWS + r) * QKS + key;
                const float a0 = *reinterpret_cast<const float*>(skh + at);
                const float a1 = *reinterpret_cast<const float*>(skl + at);
                const float2 kv = pair_at(sk, at);
                split_pair(skh, skl, at, kv.x * after0, kv.y * after1);
                after0 *= a0;
                after1 *= a1;
            }
        }
        copy_wait();
        __syncthreads();  // the decayed tiles are whole, v and P are in; the stored q, k, g are free
        if (n + 1 < n_chunks) load_gates(n + 1);

#if WRITE_O
        // O = (q ⊙ e^{G}) (S s): this warp's 16 rows, three products of two parts each. The second part of
        // the keys starts O from the first part's outputs, in the products' units (times s, a power of
        // two): its loads are all issued here, waited for once, and found in L2 (prefetched at the chunk's start).
        float O[ONT][4];
#pragma unroll
        for (int tt = 0; tt < ONT; ++tt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float2 x = make_float2(0.f, 0.f);
#if O_PART == 2
                const i64 t = t0 + row0 + gid + h * 8;
                if (t < t_end && c0 + cg + tt * 8 + 2 * tig < Dv) {
                    x = *reinterpret_cast<const float2*>(opb + t * Dv + tt * 8);
                    x = make_float2(x.x * state_scale, x.y * state_scale);
                }
#endif
                O[tt][2 * h] = x.x;
                O[tt][2 * h + 1] = x.y;
            }
#pragma unroll
        for (int kk = 0; kk < DKP / 16; ++kk) {
            u32 ah[4], al[4];
            const int a_off = (row0 + (lane & 15)) * QKS + kk * 16 + (lane >> 4) * 8;
            ldsm(ah, sqh + a_off);
            ldsm(al, sql + a_off);
            mma_two_parts(O, ah, al, shi, slo, VS, kk * 16, cg);
        }

        // O += (P p) V over the column blocks kk <= gw, through the two scales.
        float p = 1.f;
#if SCALED
        p = psb[n];
#endif
        {
            const float f = p / state_scale;
#pragma unroll
            for (int t = 0; t < ONT; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) O[t][e] *= f;
        }
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            if (kk > gw) continue;
            u32 ah[4], al[4];
            const int a_off = (row0 + (lane & 15)) * PS + kk * 16 + (lane >> 4) * 8;
            ldsm(ah, sph + a_off);
            ldsm(al, spl + a_off);
#pragma unroll
            for (int np = 0; np < VB / 16; ++np) {
                u32 b[4];
                ldsm_t(b, sv + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * VS + cg + np * 16 + (lane >> 4) * 8);
                mma16(O[2 * np], O[2 * np + 1], ah, b);
                mma16(O[2 * np], O[2 * np + 1], al, b);
            }
        }
        {
            const float unscale = 1.f / p;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const i64 t = t0 + row0 + gid + h * 8;
                if (t >= t_end) continue;
#pragma unroll
                for (int tt = 0; tt < ONT; ++tt) {
                    if (c0 + cg + tt * 8 + 2 * tig >= Dv) continue;
                    const float x = O[tt][2 * h] * unscale, y = O[tt][2 * h + 1] * unscale;
                    if (O_PART == 1)
                        *reinterpret_cast<float2*>(opb + t * Dv + tt * 8) = make_float2(x, y);
                    else
                        *reinterpret_cast<u32*>(ob + t * ots + tt * 8) = pack2(x, y);
                }
            }
        }
#endif  // WRITE_O

        // The update of this warp's state tile: S <- diag(e^{G_C}) S + (k ⊙ e^{G_C - G})^T V.
        for_each_state<MT, NT>(d_base, 0, [&](int mt, int nt, int e, int d, int) { S[mt][nt][e] *= sdec[d]; });
#pragma unroll
        for (int kk = 0; kk < CH / 16; ++kk) {
            u32 ah[MT][4], al[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const int off = (kk * 16 + (lane & 7) + (lane >> 4) * 8) * QKS + d_base + mt * 16 + ((lane >> 3) & 1) * 8;
                ldsm_t(ah[mt], skh + off);
                ldsm_t(al[mt], skl + off);
            }
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                u32 b[4];
                ldsm_t(b, sv + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * VS + c_base + np * 16 + (lane >> 4) * 8);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16(S[mt][2 * np], S[mt][2 * np + 1], ah[mt], b);
                    mma16(S[mt][2 * np], S[mt][2 * np + 1], al[mt], b);
                }
            }
        }
#if WRITE_O && SCALED
        {
            const float m = state_max(S);
            if (lane == 0) sred[warp] = m;
        }
#endif
        __syncthreads();  // every warp is done with the shared state, the decayed tiles, v and P
        if (n + 1 < n_chunks) {
            load_values(n + 1);
#if WRITE_O
#if SCALED
            state_scale = pow2_scale(max_of<NWARPS>(sred));
#endif
            share_state(S, state_scale, shi, slo, VS, d_base, c_base, true);
#endif
        }
    }

    // The exit state: s_out + (lead, time segment) s_lead + [Dk][Dv]; (first pass) the time segment's
    // log-decays, g_sum[lead][time segment][Dk].
    const i64 at = TIME_SEGMENTS ? lead * gridDim.y + segment : lead;
    store_state(S, s_out + at * s_lead, d_base, c0 + c_base, Dk, Dv);
#if !WRITE_O
    if (gate_thread && seg == 0 && c0 == 0 && key < Dk) {
        g_sum[at * Dk + key] = (float)log_decay0;
        if (key + 1 < Dk) g_sum[at * Dk + key + 1] = (float)log_decay1;
    }
#endif
}
#endif  // VB
