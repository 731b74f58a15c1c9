// Fused decode + matrix product for FP8 E4M3FN and BF16 weights held as ECF8 frames (FORMAT.md is
// normative), and its uncompressed twin: the same kernel reading the weight's bytes directly.
//
//     Y[b, n] = scale * sum_k W[n, k] * X[b, k]                 (per-tensor scale)
//     Y[b, n] = scale * sum_kb S[n / 128, kb] * sum_{k in kb} W * X   (and 128 x 128 block scales)
//
// Layout assumptions
// - W is N x K in C order, K a multiple of 512: every 512-element group (FORMAT.md §3) of every
//   chunk lies in one row, and lane l's 16-element run of a group holds W[n, k .. k + 15] with
//   k = (group's first column) + 16 l. Each 128-column scale block holds 8 whole runs.
// - Elements are E4M3 (ELEM_BYTES 1: raw runs of 8 bytes, plain runs of 16) or BF16 (ELEM_BYTES
//   2: raw runs of 16 bytes, plain runs of 32); block scales are E4M3's (DeepSeek's recipe).
// - One warp handles one chunk, exactly as the decoder (ecf8_decode.cu) does: the weights are
//   decoded into registers and never written to memory.
// - X is B x K float32, row-major, 16-byte aligned (the caller converts bf16/fp8/fp16 activations
//   exactly), read in the group-permuted copy Xp that ecf8_fused_permute_x makes (see run_dot).
//   S is float32 [ceil(N / 128), ceil(K / 128)], row-major.
// - Arithmetic is float32: each weight is converted exactly (E4M3 -> f16 -> f32; BF16 -> f32 by
//   a 16-bit shift), each lane
//   accumulates its runs of one row in order (k ascending within a run, runs in group order), the
//   warp adds its lanes by a fixed butterfly, and the chunks' row partials are added in chunk order
//   by ecf8_fused_reduce. The order depends only on (N, K, chunk size), never on timing, so the
//   result is deterministic and the decoding kernel equals its twin bit for bit.
// - P (partials, a caller's workspace) holds B x nchunks x J floats, J = rows one chunk can touch
//   (host-computed). Y is B x N float32. Where the chunk size is a multiple of K, every row lies
//   in one chunk: the product kernel then writes Y itself (y set), P and the reduction unused.

#define ECF8_DEVICE_CODE_ONLY
#include "ecf8_decode.cu"

#ifndef ECF8_FUSED_WARPS
#define ECF8_FUSED_WARPS 8
#endif
#ifndef ECF8_FUSED_AHEAD
#define ECF8_FUSED_AHEAD 1    // groups of weight bytes loaded ahead of the one being multiplied
#endif
constexpr int AHEAD = ECF8_FUSED_AHEAD;

// Mirrors ecf8.fused.FUSED_DESC_DTYPE: the decoder's TensorDesc fields plus the product's. It is
// fixed per weight (uploaded once); X, P and Y are launch arguments, so a CUDA graph can capture
// launches without uploading anything.
struct FusedDesc {
    TensorDesc t;      // t.out unused; t.words/raw/... unused by the twin, which reads `weights`
    u64 weights;       // const u8*: the uncompressed weight bytes (twin only)
    u64 scales;        // const float*: block scales (block mode only)
    u64 rows;          // N
    u64 cols;          // K
    u64 rows_per_chunk;// J
    u64 scale_cols;    // ceil(K / 128)
};

// Four E4M3 bytes of w as floats (exact: E4M3 -> f16 by the hardware converter, then f16 -> f32).
__device__ __forceinline__ void e4m3x4_to_f32(u32 w, float (&f)[4]) {
    u32 lo, hi;
    asm("{\n\t.reg .b16 a, b;\n\tmov.b32 {a, b}, %2;\n\t"
        "cvt.rn.f16x2.e4m3x2 %0, a;\n\tcvt.rn.f16x2.e4m3x2 %1, b;\n\t}"
        : "=r"(lo), "=r"(hi) : "r"(w));
    asm("{\n\t.reg .f16 a, b;\n\tmov.b32 {a, b}, %2;\n\tcvt.f32.f16 %0, a;\n\tcvt.f32.f16 %1, b;\n\t}"
        : "=f"(f[0]), "=f"(f[1]) : "r"(lo));
    asm("{\n\t.reg .f16 a, b;\n\tmov.b32 {a, b}, %2;\n\tcvt.f32.f16 %0, a;\n\tcvt.f32.f16 %1, b;\n\t}"
        : "=f"(f[2]), "=f"(f[3]) : "r"(hi));
}

// The element kind of ELEM_BYTES: E4M3 (1) or BF16 (2), as the decoder's Kind parameters.
template <int ELEM_BYTES> struct Weights;
template <> struct Weights<1> { static constexpr int EXP = 4, MAN = 3; };
template <> struct Weights<2> { static constexpr int EXP = 8, MAN = 7; };

// The 16 weights of a run (element bytes in o, element order) as floats, exactly.
template <int ELEM_BYTES>
__device__ __forceinline__ void run_floats(const u32 (&o)[4 * ELEM_BYTES], float (&w)[16]) {
#pragma unroll
    for (int q = 0; q < 4 * ELEM_BYTES; ++q) {
        if (ELEM_BYTES == 1) {
            float f[4];
            e4m3x4_to_f32(o[q], f);
            w[4 * q] = f[0]; w[4 * q + 1] = f[1]; w[4 * q + 2] = f[2]; w[4 * q + 3] = f[3];
        } else {
            w[2 * q] = __uint_as_float(o[q] << 16);
            w[2 * q + 1] = __uint_as_float(o[q] & 0xffff0000u);
        }
    }
}

// dot[b] = sum over the run's 16 weights w of w * X[b, k + j], j ascending, where k = col +
// 16 lane. xp holds X in the group-permuted layout (ecf8_fused_permute_x): the lane's float4 q of
// the group starting at column col sits at xp[b, col + 128 q + 4 lane], so each of the four loads
// reads 512 consecutive bytes across the warp.
template <int B>
__device__ __forceinline__ void run_dot(const float (&w)[16], const float* __restrict__ xp, u64 cols, u64 col,
                                        u32 lane, float (&dot)[B]) {
#pragma unroll
    for (int b = 0; b < B; ++b) {
        const float4* xv = (const float4*)(xp + b * cols + col) + lane;
        float s = 0.f;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const float4 v = __ldg(xv + 32 * q);
            s = fmaf(w[4 * q], v.x, s);
            s = fmaf(w[4 * q + 1], v.y, s);
            s = fmaf(w[4 * q + 2], v.z, s);
            s = fmaf(w[4 * q + 3], v.w, s);
        }
        dot[b] = s;
    }
}

// The warp's sum of acc[b] (fixed butterfly) for row `row`, j-th of the chunk, written by lane 0:
// to Y as (0 + sum) * scale when y is set (whole rows per chunk: the value ecf8_fused_reduce
// would compute), else to the chunk's partial slot j.
template <int B>
__device__ __forceinline__ void flush_row(float (&acc)[B], const FusedDesc& d, float* __restrict__ partials,
                                          float* __restrict__ y, float scale, u64 chunk, u64 row, u64 j,
                                          u32 lane) {
#pragma unroll
    for (int b = 0; b < B; ++b) {
        float v = acc[b];
#pragma unroll
        for (int m = 16; m >= 1; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
        if (lane == 0) {
            if (y) y[(u64)b * d.rows + row] = (0.f + v) * scale;
            else partials[((u64)b * d.t.nchunks + chunk) * d.rows_per_chunk + j] = v;
        }
        acc[b] = 0.f;
    }
}

// One chunk: its weights (decoded when DECODE, else read from d.weights) times X, row partials
// to P. BLOCK_SCALES: 128 x 128 scales applied per run.
template <int B, bool DECODE, bool BLOCK_SCALES, int ELEM_BYTES>
__device__ __forceinline__ void fused_chunk(const FusedDesc& d, const float* __restrict__ x,
                                            float* __restrict__ partials, float* __restrict__ y, float scale,
                                            u32 lut, u64 chunk, u32 lane, u32 ring) {
    constexpr int EXP = Weights<ELEM_BYTES>::EXP, MAN = Weights<ELEM_BYTES>::MAN, R = MAN + 1;
    const u32 lanemask_lt = (1u << lane) - 1u;
    const u64 first = chunk << d.t.chunk_log2;
    const u64 left = d.t.n - first;
    const u32 span = (u32)(left < (1ull << d.t.chunk_log2) ? left : (1ull << d.t.chunk_log2));
    const u64 row0 = first / d.cols;
    u64 row = row0, col = first - row0 * d.cols;       // the current group's row and first column
    float acc[B];
#pragma unroll
    for (int b = 0; b < B; ++b) acc[b] = 0.f;
    LaneStream s;
    const u8* raw = (const u8*)d.t.raw + ((first + (lane << 4)) >> 4) * (2 * R);
    const u8* plain = (const u8*)d.weights + (first + (lane << 4)) * ELEM_BYTES;
    if (DECODE) {
        const u32* chunk_words = (const u32*)d.t.chunk_words;
        s.start((const u32*)d.t.words, __ldg(chunk_words + chunk), __ldg(chunk_words + chunk + 1), lane, ring);
    }
    // The weight bytes of the next AHEAD groups are in flight while a group is multiplied: the raw
    // plane's 2R bytes a lane (decoded) or the plain 16 ELEM_BYTES (twin). Group g's bytes sit in
    // slot g % AHEAD.
    RawRun<R> raw_ahead[AHEAD];
    uint4 plain_ahead[AHEAD][ELEM_BYTES];
#pragma unroll
    for (int i = 0; i < AHEAD; ++i) {
        if (DECODE) raw_ahead[i] = load_raw<R>(raw + 64 * R * i, 512u * i < span);
        else {
#pragma unroll
            for (int h = 0; h < ELEM_BYTES; ++h)
                plain_ahead[i][h] = 512u * i < span ? __ldg((const uint4*)(plain + 512 * ELEM_BYTES * i) + h)
                                                    : make_uint4(0, 0, 0, 0);
        }
    }
    raw += 64 * R * AHEAD;
    plain += 512 * ELEM_BYTES * AHEAD;
    for (u32 base = 0; base < span; base += 512) {
        const bool more = base + 512 * AHEAD < span;          // warp-uniform
        u32 o[4 * ELEM_BYTES];
        if (DECODE) {
            const RawRun<R> rr = raw_ahead[0];
#pragma unroll
            for (int i = 0; i + 1 < AHEAD; ++i) raw_ahead[i] = raw_ahead[i + 1];
            raw_ahead[AHEAD - 1] = load_raw<R>(raw, more);
            u32 sym[Kind<ELEM_BYTES, EXP, MAN>::SYMBOLS];
            decode_symbols<ELEM_BYTES, EXP, MAN>(s, lut, lanemask_lt, sym);
            assemble<ELEM_BYTES, EXP, MAN>(sym, rr, o);
            raw += 64 * R;
        } else {
#pragma unroll
            for (int h = 0; h < ELEM_BYTES; ++h) {
                const uint4 q = plain_ahead[0][h];
                o[4 * h] = q.x; o[4 * h + 1] = q.y; o[4 * h + 2] = q.z; o[4 * h + 3] = q.w;
            }
#pragma unroll
            for (int i = 0; i + 1 < AHEAD; ++i)
#pragma unroll
                for (int h = 0; h < ELEM_BYTES; ++h) plain_ahead[i][h] = plain_ahead[i + 1][h];
#pragma unroll
            for (int h = 0; h < ELEM_BYTES; ++h)
                plain_ahead[AHEAD - 1][h] = more ? __ldg((const uint4*)plain + h) : make_uint4(0, 0, 0, 0);
            plain += 512 * ELEM_BYTES;
        }
        const u64 k = col + (lane << 4);
        float w[16], dot[B];
        run_floats<ELEM_BYTES>(o, w);
        run_dot<B>(w, x, d.cols, col, lane, dot);
        if (BLOCK_SCALES) {
            const float sc = __ldg((const float*)d.scales + (row >> 7) * d.scale_cols + (k >> 7));
#pragma unroll
            for (int b = 0; b < B; ++b) acc[b] = fmaf(sc, dot[b], acc[b]);
        } else {
#pragma unroll
            for (int b = 0; b < B; ++b) acc[b] += dot[b];
        }
        col += 512;
        if (col == d.cols) {                      // warp-uniform: the row ends with this group
            flush_row<B>(acc, d, partials, y, scale, chunk, row, row - row0, lane);
            ++row;
            col = 0;
        }
    }
    if (col != 0) flush_row<B>(acc, d, partials, y, scale, chunk, row, row - row0, lane);   // the chunk ends mid-row
}

template <int B, bool DECODE, bool BLOCK_SCALES, int ELEM_BYTES>
__global__ void __launch_bounds__(ECF8_FUSED_WARPS * 32)
ecf8_fused(const FusedDesc* __restrict__ desc, const float* __restrict__ x, float* __restrict__ partials,
           float* __restrict__ y, float scale) {
    extern __shared__ __align__(16) u16 luts[];
    __shared__ __align__(512) u32 rings[ECF8_FUSED_WARPS][ECF8_RING];
    const FusedDesc d = *desc;
    if (DECODE) load_tables(d.t, luts);
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u64 chunk = (u64)blockIdx.x * ECF8_FUSED_WARPS + warp;
    if (chunk < d.t.nchunks) {
        const u32 lut = DECODE ? smem_addr(luts) + ((const u8*)d.t.chunk_tables)[chunk] * (2 * ECF8_LUT_SIZE) : 0;
        fused_chunk<B, DECODE, BLOCK_SCALES, ELEM_BYTES>(d, x, partials, y, scale, lut, chunk, lane,
                                                         smem_addr(rings[warp]));
    }
    if (DECODE) cp_async_wait<0>();
}

// Xp = X with every 512-column group permuted for run_dot: float4 index r = 32 q + l of a group
// (128 float4s) takes the group's float4 4 l + q. X and Xp are n4 float4s (B x K, K % 512 == 0).
__global__ void ecf8_fused_permute_x(const float4* __restrict__ x, float4* __restrict__ xp, u64 n4) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n4) return;
    const u32 r = (u32)i & 127u;
    xp[i] = x[(i - r) + ((r & 31u) << 2) + (r >> 5)];
}

// Y[b, n] = scale * (chunk partials of row n, in chunk order); one thread per (b, n).
__global__ void ecf8_fused_reduce(const FusedDesc* __restrict__ desc, const float* __restrict__ partials,
                                  int batch, float scale, float* __restrict__ y) {
    const FusedDesc d = *desc;
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)batch * d.rows) return;
    const u64 b = i / d.rows, n = i - b * d.rows;
    const u64 c0 = (n * d.cols) >> d.t.chunk_log2, c1 = ((n + 1) * d.cols - 1) >> d.t.chunk_log2;
    const float* p = partials + b * d.t.nchunks * d.rows_per_chunk;
    float sum = 0.f;
    for (u64 c = c0; c <= c1; ++c) sum += p[c * d.rows_per_chunk + (n - ((c << d.t.chunk_log2) / d.cols))];
    y[i] = sum * scale;
}

// Instantiations, named by ecf8.fused: batch 1, 2, 4, 8; decoded and twin; E4M3 with per-tensor
// or block scales, BF16 with a per-tensor scale.
#define ECF8_FUSED_ARGS const FusedDesc*, const float*, float*, float*, float
#define ECF8_FUSED_INSTANCES(B)                                                 \
    template __global__ void ecf8_fused<B, true, false, 1>(ECF8_FUSED_ARGS);    \
    template __global__ void ecf8_fused<B, false, false, 1>(ECF8_FUSED_ARGS);   \
    template __global__ void ecf8_fused<B, true, true, 1>(ECF8_FUSED_ARGS);     \
    template __global__ void ecf8_fused<B, false, true, 1>(ECF8_FUSED_ARGS);    \
    template __global__ void ecf8_fused<B, true, false, 2>(ECF8_FUSED_ARGS);    \
    template __global__ void ecf8_fused<B, false, false, 2>(ECF8_FUSED_ARGS);
ECF8_FUSED_INSTANCES(1)
ECF8_FUSED_INSTANCES(2)
ECF8_FUSED_INSTANCES(4)
ECF8_FUSED_INSTANCES(8)
