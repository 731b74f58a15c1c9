// Fused decode + matrix product on tensor cores (mma.sync) for BF16 and FP8 E4M3FN weights held
// as ECF8 frames (FORMAT.md is normative), and its uncompressed twin: the same kernel reading the
// weight's bytes directly. A prototype beside ecf8, not part of the library (bench/NOTES.md,
// "Tensor cores"): compiled by mma.py with cuda/ on the include path.
//
//     Y[b, n] = scale * sum_k W[n, k] * X[b, k]      X of the weight's own type, Y float32
//
// Layout assumptions
// - W is N x K in C order, K a multiple of 512 (the chunk size C is a power of two >= 512).
//   Every warp owns a span of L = lcm(C, K) consecutive elements (host-computed: `span`), which
//   starts on a chunk and on a row: whole chunks (decoded in order, one warp a chunk at a time as
//   in ecf8_decode.cu) and L / K whole rows. Warp w of block b owns elements (8 b + w) L .. + L - 1,
//   so at step s (its s-th 512-element group) all 8 warps of a block sit at the same columns
//   (512 s) mod K of 8 different rows. (A large L means few warps: 4096 x 14336 at C = 8192 has
//   L = 4 rows, 1024 warps; at C = 2048, L = 1 row, 4096 warps.)
// - Each step every warp puts its group (lane l: the run of 16 elements k .. k + 15, k = 16 l) in
//   a shared 8-row tile (rows padded by 16 bytes, so ldmatrix reads 8 rows without bank
//   conflicts), the block synchronizes, and warp w multiplies the tile's columns 64 w .. 64 w + 63
//   (64 ELEM_BYTES bytes: 32-byte k-slices of 16 BF16 or 32 E4M3 weights) by X on tensor cores:
//   W is the B operand (n = the 8 tile rows, ldmatrix), X the A operand (m = 16 batch rows a
//   tile, MT tiles; rows >= batch read as zero), f32 accumulators. Two tiles alternate, so one
//   barrier a step suffices.
// - A row band ends where (512 (s + 1)) mod K = 0: the 8 warps' accumulators are added in warp
//   order through shared memory and Y[b, row] = (0 + sum) * scale is written. So the arithmetic
//   (each mma's products and sums, the warp order) depends only on (N, K, C, batch), never on
//   timing: the decoding kernel equals its twin bit for bit. The tensor cores' own accumulation
//   is not float32's round-to-nearest sum, so results are not claimed equal to cuBLAS's.
// - X is B x K elements of W's type (BF16, or E4M3 quantized by the caller), row-major, rows
//   4-byte aligned; Y is B x N float32. The A fragments of m16n8k16 (BF16) and m16n8k32 (E4M3)
//   take the same bytes of a 32-byte k-slice: lane (g, t) = (l / 4, l % 4) reads bytes 4 t and
//   16 + 4 t of batch rows g and g + 8.

#define ECF8_DEVICE_CODE_ONLY
#include "ecf8_decode.cu"

#define ECF8_MMA_WARPS 8      // warps (tile rows) per block; mma.MMA_WARPS

// Mirrors ecf8.fused.FUSED_DESC_DTYPE (as ecf8_fused.cu's FusedDesc): a FusedWeight's or
// PlainWeight's descriptor is passed as it is.
struct MmaDesc {
    TensorDesc t;
    u64 weights;       // const u8*: the uncompressed weight bytes (twin only)
    u64 scales;        // unused here
    u64 rows;          // N
    u64 cols;          // K
    u64 rows_per_chunk;
    u64 scale_cols;
};

template <int ELEM_BYTES> struct MmaKind;
template <> struct MmaKind<1> { static constexpr int EXP = 4, MAN = 3; };
template <> struct MmaKind<2> { static constexpr int EXP = 8, MAN = 7; };

// d += a * b for one 32-byte k-slice: 16 x 8 x (16 BF16 | 32 E4M3), f32 accumulators.
template <int ELEM_BYTES>
__device__ __forceinline__ void mma_slice(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    if (ELEM_BYTES == 2)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm volatile("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 "
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldmatrix_x4(u32 addr, u32 (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
}

__device__ __forceinline__ void sts128(u32 addr, u32 a, u32 b, u32 c, u32 d) {
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" :: "r"(addr), "r"(a), "r"(b), "r"(c), "r"(d)
                 : "memory");
}

template <int MT>
struct MinMmaBlocks { static constexpr int value = MT == 1 ? 4 : 3; };

template <int MT, bool DECODE, int ELEM_BYTES>
__global__ void __launch_bounds__(ECF8_MMA_WARPS * 32, MinMmaBlocks<MT>::value)
ecf8_fused_mma(const MmaDesc* __restrict__ desc, const u8* __restrict__ x, int batch,
               float* __restrict__ y, float scale, u64 span) {
    constexpr int EXP = MmaKind<ELEM_BYTES>::EXP, MAN = MmaKind<ELEM_BYTES>::MAN, R = MAN + 1;
    constexpr u32 ROW_BYTES = 512 * ELEM_BYTES + 16;          // a tile row, padded
    constexpr int SLICE_PAIRS = ELEM_BYTES;                   // ldmatrix.x4 per step: 2 slices each
    extern __shared__ __align__(16) u16 luts[];
    __shared__ __align__(512) u32 rings[ECF8_MMA_WARPS][ECF8_RING];
    __shared__ __align__(16) u8 tiles[2][ECF8_MMA_WARPS][ROW_BYTES];
    __shared__ float partial[ECF8_MMA_WARPS][MT * 128];
    const MmaDesc d = *desc;
    if (DECODE) load_tables(d.t, luts);
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u32 lanemask_lt = (1u << lane) - 1u;
    const u64 chunk_size = 1ull << d.t.chunk_log2;
    const u64 first = ((u64)blockIdx.x * ECF8_MMA_WARPS + warp) * span;   // this warp's first element
    const u32 steps = (u32)(span >> 9);
    const u32 k_bytes = (u32)d.cols * ELEM_BYTES;                           // a row of X or W
    const u32 g = lane >> 2, t = lane & 3;
    // This warp's share of a group: bytes 64 ELEM_BYTES w .. of the tile row; ldmatrix row
    // addresses: lanes 8 i .. 8 i + 7 give rows 0-7 of matrix i (16 bytes at 16 i).
    const u32 share = warp * 64 * ELEM_BYTES;
    const u32 ld_off = (lane & 7) * ROW_BYTES + share + (lane >> 3) * 16;
    const u32 st_off = warp * ROW_BYTES + lane * 16 * ELEM_BYTES;
    float acc[MT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[m][i] = 0.f;
    LaneStream s;
    u32 lut = 0;
    u32 col = 0;                                     // the step's first column (warp-uniform)
    for (u32 step = 0; step < steps; ++step) {
        const u64 e0 = first + ((u64)step << 9);     // the warp's group
        u32 o[4 * ELEM_BYTES];
        if (e0 < d.t.n) {                            // warp-uniform
            if (DECODE) {
                if ((e0 & (chunk_size - 1)) == 0) {  // a chunk starts
                    const u64 chunk = e0 >> d.t.chunk_log2;
                    const u32* chunk_words = (const u32*)d.t.chunk_words;
                    lut = smem_addr(luts) + ((const u8*)d.t.chunk_tables)[chunk] * (2 * ECF8_LUT_SIZE);
                    s.start((const u32*)d.t.words, __ldg(chunk_words + chunk), __ldg(chunk_words + chunk + 1),
                            lane, smem_addr(rings[warp]));
                }
                const RawRun<R> rr = load_raw<R>((const u8*)d.t.raw + ((e0 + (lane << 4)) >> 4) * (2 * R), true);
                u32 sym[Kind<ELEM_BYTES, EXP, MAN>::SYMBOLS];
                decode_symbols<ELEM_BYTES, EXP, MAN>(s, lut, lanemask_lt, sym);
                assemble<ELEM_BYTES, EXP, MAN>(sym, rr, o);
            } else {
                const uint4* p = (const uint4*)((const u8*)d.weights + (e0 + (lane << 4)) * ELEM_BYTES);
#pragma unroll
                for (int h = 0; h < ELEM_BYTES; ++h) {
                    const uint4 q = __ldg(p + h);
                    o[4 * h] = q.x; o[4 * h + 1] = q.y; o[4 * h + 2] = q.z; o[4 * h + 3] = q.w;
                }
            }
        } else {
#pragma unroll
            for (int i = 0; i < 4 * ELEM_BYTES; ++i) o[i] = 0;
        }
        const u32 tile = smem_addr(tiles[step & 1]);
#pragma unroll
        for (int h = 0; h < ELEM_BYTES; ++h)
            sts128(tile + st_off + 16 * h, o[4 * h], o[4 * h + 1], o[4 * h + 2], o[4 * h + 3]);
        __syncthreads();
        // The A fragments come from X's columns col .. : this warp's bytes start at xb.
        const u32 xb = col * ELEM_BYTES + share + 4 * t;
#pragma unroll
        for (int p = 0; p < SLICE_PAIRS; ++p) {
            u32 b[4];
            ldmatrix_x4(tile + ld_off + 64 * p, b);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const u32 xo = xb + 64 * p + 32 * h;
#pragma unroll
                for (int m = 0; m < MT; ++m) {
                    const int r0 = 16 * m + (int)g, r1 = r0 + 8;
                    u32 a[4];
                    a[0] = r0 < batch ? __ldg((const u32*)(x + (u64)r0 * k_bytes + xo)) : 0u;
                    a[1] = r1 < batch ? __ldg((const u32*)(x + (u64)r1 * k_bytes + xo)) : 0u;
                    a[2] = r0 < batch ? __ldg((const u32*)(x + (u64)r0 * k_bytes + xo + 16)) : 0u;
                    a[3] = r1 < batch ? __ldg((const u32*)(x + (u64)r1 * k_bytes + xo + 16)) : 0u;
                    mma_slice<ELEM_BYTES>(acc[m], a, b[2 * h], b[2 * h + 1]);
                }
            }
        }
        col += 512;
        if (col == (u32)d.cols) {                    // the row band ends (block-uniform)
            col = 0;
#pragma unroll
            for (int m = 0; m < MT; ++m)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    partial[warp][m * 128 + i * 32 + lane] = acc[m][i];
                    acc[m][i] = 0.f;
                }
            __syncthreads();
            // Element j = m 128 + i 32 + l of a warp's partials is D[batch 16 m + g' (+8 for
            // i >= 2), tile row 2 t' + (i & 1)] with (g', t') of lane l.
            const u64 band_row = (e0 - first) / d.cols;          // the row's index in every span
            for (u32 j = threadIdx.x; j < MT * 128; j += ECF8_MMA_WARPS * 32) {
                const u32 m = j >> 7, i = (j >> 5) & 3, l = j & 31;
                const u32 bi = 16 * m + (l >> 2) + (i >= 2 ? 8 : 0);
                const u32 w = 2 * (l & 3) + (i & 1);
                const u64 row = ((u64)blockIdx.x * ECF8_MMA_WARPS + w) * (span / d.cols) + band_row;
                if ((int)bi < batch && row < d.rows) {
                    float sum = 0.f;
#pragma unroll
                    for (int v = 0; v < ECF8_MMA_WARPS; ++v) sum += partial[v][j];
                    y[(u64)bi * d.rows + row] = sum * scale;
                }
            }
        }
    }
    if (DECODE) cp_async_wait<0>();
}

// Instantiations, named by mma.py: up to 16, 32 and 64 batch rows (MT 1, 2, 4); decoded and
// twin; E4M3 (1) and BF16 (2).
#define ECF8_MMA_ARGS const MmaDesc*, const u8*, int, float*, float, u64
#define ECF8_MMA_INSTANCES(MT)                                              \
    template __global__ void ecf8_fused_mma<MT, true, 1>(ECF8_MMA_ARGS);    \
    template __global__ void ecf8_fused_mma<MT, false, 1>(ECF8_MMA_ARGS);   \
    template __global__ void ecf8_fused_mma<MT, true, 2>(ECF8_MMA_ARGS);    \
    template __global__ void ecf8_fused_mma<MT, false, 2>(ECF8_MMA_ARGS);
ECF8_MMA_INSTANCES(1)
ECF8_MMA_INSTANCES(2)
ECF8_MMA_INSTANCES(4)
