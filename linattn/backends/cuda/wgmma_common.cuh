// Hopper's warpgroup products (wgmma, sm_90a) for the chunked kernels: tiles in shared memory
// in the 128-byte swizzled layout the tensor cores read, their descriptors, the m64n64k16
// product with A from shared memory or from registers, and the fences that order them.
//
// A tile holds 64 rows of 64 16-bit values (128 bytes a row, 8 KB), in atoms of eight rows
// (1024 bytes, aligned to 1024): the 16-byte piece c of row r is stored at piece c ^ (r % 8),
// so that eight consecutive rows' pieces fall in different banks. The same tile serves as a
// K-major operand (its rows are the product's M or N index, the 64 values along K) and as an
// MN-major one (its rows run along K, the 64 values along M or N): the descriptor says which.
//
// A warpgroup (four consecutive warps from a multiple of four) issues each product together.
// Accumulator layout of a 64 x 64 float32 result: warp w of the group holds rows 16w .. 16w+15,
// as in mma.sync's m16n8 tiles: d[t][e] is row 16w + gid + 8 (e / 2), column 8t + 2 tig + e % 2.
//
// The including file defines MMA_TYPES and includes mma_common.cuh first.

typedef unsigned long long u64;

#define WG_TILE 4096  // elements of one swizzled 64 x 64 tile

// The element offset of (r, c) in a swizzled tile (c < 64).
__device__ __forceinline__ int swizzled(int r, int c) { return r * 64 + ((((c >> 3) ^ r) & 7) << 3) + (c & 7); }

// A shared-memory matrix descriptor with 128-byte swizzling for the tile `bytes` past the
// one at 16-byte unit `base16` of shared memory (both multiples of 16 bytes; shared memory
// ends below 256 KB, so the 14-bit address field holds the sum). MN: an MN-major operand,
// whose rows are the K index, the 64 columns M or N (LBO 1024 bytes: the next 64 columns,
// which one product never reaches); else K-major, the 16 values of K from the start of each
// row (LBO unused for swizzled K-major tiles). SBO: 1024 bytes from one 8-row atom to the next.
template <bool MN>
__device__ __forceinline__ u64 tile_descriptor(u32 base16, u32 bytes) {
    const u32 lo = (base16 + (bytes >> 4)) | ((MN ? 1024u : 16u) >> 4) << 16;
    const u32 hi = (1024u >> 4) | (1u << 30);  // SBO; bits 62-63 = 1: 128-byte swizzle
    return ((u64)hi << 32) | lo;
}

// Steps along K of 16: 32 bytes into a K-major tile's rows, 16 rows down an MN-major one.
#define K_STEP 32
#define MN_STEP 2048
#define TILE_BYTES 8192

// Four 8 x 8 tiles of 16-bit values from registers into shared memory, ldmatrix's inverse:
// register i of lane l holds row l / 4, columns 2 (l % 4) and +1 of tile i; lane l gives the
// address of row l % 8 of tile l / 8.
// (`address`: a shared-memory address.)
__device__ __forceinline__ void stsm(u32 address, const u32 (&r)[4]) {
    asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};"
                 ::"r"(address), "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3]) : "memory");
}
__device__ __forceinline__ void stsm(ELEM* p, const u32 (&r)[4]) { stsm(shared_address(p), r); }

// The two warpgroups that split the keys (KSPLIT) add their partial 64 x 64 results through a
// float32 slot of 16 x 64 per warp, in accumulator order (element (t, e) of lane l at
// (4 t + e) 32 + l: 32 consecutive words per store, no bank conflicts): one warpgroup's warp
// puts its rows times `scale`, the other's warp with the same rows adds them to its own times `scale`.
__device__ __forceinline__ void put_partial(float* slot, const float (&d)[8][4], float scale) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int t = 0; t < 8; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) slot[(4 * t + e) * 32 + lane] = d[t][e] * scale;
}
__device__ __forceinline__ void add_partial(float (&d)[8][4], float scale, const float* slot) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int t = 0; t < 8; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) d[t][e] = d[t][e] * scale + slot[(4 * t + e) * 32 + lane];
}

// A warp's 16 rows of a 64-column tile in accumulator layout (d[t][e]: row gid + 8 (e / 2),
// column 8t + 2 tig + e % 2) times `scale`, written in the storage type to rows t0 .. t0 + 15 of
// `out` (row stride `stride`, those below t_end), columns col .. col + 63 (those below `cols`):
// into the warp's staging rows `stage` (row stride `stage_stride`) by one stmatrix per pair of
// 8-column tiles, lane l addressing row st_row = 8 (l / 8 % 2) + l % 8 of 8-column tile
// t + st_col, st_col = l / 16 (as the kernels share their states), then to global memory 16 bytes
// per store.
__device__ __forceinline__ void store_rows(const float (&d)[8][4], float scale, ELEM* stage, int stage_stride,
                                           int st_row, int st_col, ELEM* out, i64 stride, i64 t0, i64 t_end,
                                           int col, int cols) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int t = 0; t < 8; t += 2) {
        u32 r[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float* x = d[t + i / 2] + 2 * (i % 2);
            r[i] = pack2(x[0] * scale, x[1] * scale);
        }
        stsm(stage + st_row * stage_stride + (t + st_col) * 8, r);
    }
    __syncwarp();
#pragma unroll
    for (int it = 0; it < 4; ++it) {
        const int p = lane + it * 32, r = p / 8, c = (p % 8) * 8;
        if (t0 + r < t_end && col + c < cols)
            *reinterpret_cast<uint4*>(out + (t0 + r) * stride + c) =
                *reinterpret_cast<const uint4*>(stage + r * stage_stride + c);
    }
}

#define WG_D32(d)                                                                                                  \
    "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]),      \
        "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]),  \
        "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]),  \
        "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),  \
        "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
#define WG_REGS32                                                                                                  \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, "   \
    "%23, %24, %25, %26, %27, %28, %29, %30, %31}"

// d (+)= A B for a 64 x 64 x 16 product, A and B from shared memory; TA, TB: operand MN-major
// (1) or K-major (0). accumulate = false overwrites d.
template <int TA, int TB>
__device__ __forceinline__ void wgmma_ss(float (&d)[8][4], u64 a, u64 b, bool accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." MMA_TYPES " " WG_REGS32
                 ", %32, %33, p, 1, 1, %35, %36;\n}\n"
                 : WG_D32(d)
                 : "l"(a), "l"(b), "r"((int)accumulate), "n"(TA), "n"(TB));
}

// d += A B, A the warp's 16 x 16 fragments in registers (mma.sync's A layout), B from shared memory.
template <int TB>
__device__ __forceinline__ void wgmma_rs(float (&d)[8][4], const u32 (&a)[4], u64 b) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32." MMA_TYPES " " WG_REGS32
                 ", {%32, %33, %34, %35}, %36, 1, 1, 1, %37;\n"
                 : WG_D32(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(TB));
}

// Registers written since the last products may feed the next ones.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Wait until at most N committed groups of products are still running.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Keep the compiler from moving an accumulator across the asynchronous products.
__device__ __forceinline__ void wgmma_pin(float (&d)[8][4]) {
#pragma unroll
    for (int t = 0; t < 8; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[t][e])::"memory");
}

// Shared memory written by ordinary stores (or cp.async) that the products read next: each
// writing thread fences before the barrier that publishes the writes.
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// A barrier among the 128 threads of warpgroup `group` (ids 1..: 0 is __syncthreads).
__device__ __forceinline__ void group_barrier(int group) {
    asm volatile("bar.sync %0, 128;" ::"r"(1 + group) : "memory");
}
