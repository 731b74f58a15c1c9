// ECF8 format v1 GPU decoder (FORMAT.md is normative; section numbers below refer to it).
//
// Layout assumptions
// - One warp decodes one chunk (§3): 32 lanes, lane l owning the 16 consecutive elements
//   g*512 + 16*l .. +15 of every 512-element group g of the chunk.
// - A lane's symbols (2 exponent fields each for E4M3, 1 otherwise, §4) are decoded in steps of 2;
//   before each step every lane holding fewer than 24 bits loads the next word of the chunk's
//   stream, the loading lanes taking consecutive words in lane order (ballot + popc, §6). Words at or
//   past the chunk's end read as zero: a chunk never reads outside its own words.
// - Codes are at most 12 bits; the decode tables (host-built, one 4096-entry uint16 table per code
//   table, entry = length << 8 | symbol) are copied to shared memory by each block.
// - The raw plane packs R = M + 1 bits per element densely (§2.8); a lane's 16 elements are 2R
//   aligned bytes. The exponent stream and raw plane are 16-byte aligned, and `out` must be too.
// - Corrupt payloads (checksums off) can only yield wrong elements: every step consumes at most 24
//   bits, so a lane's bit count stays in [0, 56) whatever the words hold, and every read is bounded.
//
// One launch decodes a batch of tensors of one element kind: block b finds its tensor by binary
// search over block_starts, loads that tensor's tables, and its warps decode WARPS * chunks_per_warp
// consecutive chunks.

#define ECF8_WARPS 8
#define ECF8_LUT_BITS 12
#define ECF8_LUT_SIZE (1 << ECF8_LUT_BITS)

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// Mirrors ecf8.decoder_cuda.DESC_DTYPE: ten little-endian u64 fields.
struct TensorDesc {
    u64 words;         // const u32*: exponent stream
    u64 raw;           // const u8*: raw plane
    u64 chunk_words;   // const u32*: nchunks + 1 word offsets
    u64 chunk_tables;  // const u8*: table id per chunk
    u64 luts;          // const u16*: ntables * 4096 decode entries
    u64 out;           // element bits
    u64 n;             // elements
    u64 nchunks;
    u64 ntables;
    u64 chunk_log2;
};

template <int ELEM_BYTES, int EXP_BITS, int MAN_BITS> struct Kind {
    static constexpr int R = MAN_BITS + 1;                       // raw bits per element
    static constexpr int PER_SYMBOL = 8 / EXP_BITS;              // exponent fields per symbol
    static constexpr int SYMBOLS = 16 / PER_SYMBOL;              // symbols per lane per group
};

struct LaneStream {
    u64 buf;        // next stream bits, most significant first
    int nbits;      // valid bits in buf
    u32 cursor;     // next word slot of the chunk (same in all lanes)
    u32 end;        // the chunk's end slot
    const u32* words;

    __device__ __forceinline__ void refill(u32 lanemask_lt) {
        const bool need = nbits < 24;
        const u32 mask = __ballot_sync(0xffffffffu, need);
        if (need) {
            const u32 slot = cursor + __popc(mask & lanemask_lt);
            const u32 w = slot < end ? __ldg(words + slot) : 0u;
            buf |= (u64)w << (32 - nbits);
            nbits += 32;
        }
        cursor += __popc(mask);
    }

    __device__ __forceinline__ u32 decode(const u16* lut) {
        const u32 e = lut[buf >> (64 - ECF8_LUT_BITS)];
        const u32 len = e >> 8;
        buf <<= len;
        nbits -= (int)len;
        return e & 0xffu;
    }
};

// Nibbles 0..3 of v (16 bits) into bytes 0..3.
__device__ __forceinline__ u32 spread_nibbles(u32 v) {
    v = (v | (v << 8)) & 0x00ff00ffu;
    return (v | (v << 4)) & 0x0f0f0f0fu;
}

template <int ELEM_BYTES, int EXP_BITS, int MAN_BITS>
__device__ __forceinline__ void decode_chunk(const TensorDesc& d, const u16* lut, u64 chunk,
                                             u8* out, u32 lane) {
    typedef Kind<ELEM_BYTES, EXP_BITS, MAN_BITS> K;
    const u32 lanemask_lt = (1u << lane) - 1u;
    const u64 first = chunk << d.chunk_log2;
    const u64 left = d.n - first;
    const u64 span = left < (1ull << d.chunk_log2) ? left : (1ull << d.chunk_log2);
    const u32 groups = (u32)((span + 511) >> 9);
    const u32* chunk_words = (const u32*)d.chunk_words;
    LaneStream s;
    s.buf = 0;
    s.nbits = 0;
    s.cursor = chunk_words[chunk];
    s.end = chunk_words[chunk + 1];
    s.words = (const u32*)d.words;
    const u8* raw = (const u8*)d.raw;

    for (u32 g = 0; g < groups; ++g) {
        const u64 e0 = first + ((u64)g << 9) + (lane << 4);   // first element of this lane's run
        const bool active = e0 < d.n;
        u32 sym[K::SYMBOLS];
#pragma unroll
        for (int i = 0; i < K::SYMBOLS; i += 2) {
            s.refill(lanemask_lt);
            sym[i] = s.decode(lut);
            sym[i + 1] = s.decode(lut);
        }
        if (!active) continue;
        // Raw bits of the 16 elements: 2R bytes at run index e0 / 16.
        u32 h[K::R + 1];   // 16-bit halves
        const u8* rp = raw + (e0 >> 4) * (2 * K::R);
        if (K::R == 4) {
            const uint2 v = *(const uint2*)rp;
            h[0] = v.x & 0xffffu; h[1] = v.x >> 16; h[2] = v.y & 0xffffu; h[3] = v.y >> 16;
        } else if (K::R == 8) {
            const uint4 v = *(const uint4*)rp;
            const u32 q[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int k = 0; k < 4; ++k) { h[2 * k] = q[k] & 0xffffu; h[2 * k + 1] = q[k] >> 16; }
        } else {
#pragma unroll
            for (int k = 0; k < K::R; ++k) h[k] = ((const u16*)rp)[k];
        }
        h[K::R] = 0;
        u32 o[4 * ELEM_BYTES];   // the run's 16 * ELEM_BYTES output bytes as words
        if (EXP_BITS == 4) {
            // E4M3: 4 elements per word; byte = sign << 7 | exp << 3 | mantissa.
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const u32 x = spread_nibbles(h[k]);
                const u32 y = spread_nibbles(sym[2 * k] | (sym[2 * k + 1] << 8));
                o[k] = ((x & 0x08080808u) << 4) | (y << 3) | (x & 0x07070707u);
            }
        } else {
#pragma unroll
            for (int i = 0; i < 16; ++i) {
                const int pos = i * K::R;
                const u32 r = ((h[pos >> 4] | (h[(pos >> 4) + 1] << 16)) >> (pos & 15)) & ((1u << K::R) - 1u);
                const u32 v = ((r >> MAN_BITS) << (EXP_BITS + MAN_BITS)) | (sym[i] << MAN_BITS) |
                              (r & ((1u << MAN_BITS) - 1u));
                const int sh = (i % (4 / ELEM_BYTES)) * 8 * ELEM_BYTES;
                if (sh == 0) o[i / (4 / ELEM_BYTES)] = v; else o[i / (4 / ELEM_BYTES)] |= v << sh;
            }
        }
        u8* dst = out + e0 * ELEM_BYTES;
        if (e0 + 16 <= d.n) {
#pragma unroll
            for (int k = 0; k < ELEM_BYTES; ++k)
                ((uint4*)dst)[k] = make_uint4(o[4 * k], o[4 * k + 1], o[4 * k + 2], o[4 * k + 3]);
        } else {
            const u32 tail = (u32)(d.n - e0) * ELEM_BYTES;
#pragma unroll
            for (u32 b = 0; b < 16 * ELEM_BYTES; ++b)
                if (b < tail) dst[b] = (u8)(o[b >> 2] >> ((b & 3) * 8));
        }
    }
}

template <int ELEM_BYTES, int EXP_BITS, int MAN_BITS>
__global__ void __launch_bounds__(ECF8_WARPS * 32)
ecf8_decode(const TensorDesc* __restrict__ descs, const u32* __restrict__ block_starts,
            int ntensors, u32 chunks_per_warp, u64 out_override) {
    extern __shared__ __align__(16) u16 luts[];
    int lo = 0, hi = ntensors - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (block_starts[mid] <= blockIdx.x) lo = mid; else hi = mid - 1;
    }
    const TensorDesc d = descs[lo];
    const uint4* src = (const uint4*)d.luts;
    for (u32 i = threadIdx.x; i < d.ntables * (ECF8_LUT_SIZE / 8); i += blockDim.x)
        ((uint4*)luts)[i] = src[i];
    __syncthreads();
    u8* out = (u8*)(out_override ? out_override : d.out);
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u64 base = (u64)(blockIdx.x - block_starts[lo]) * ECF8_WARPS * chunks_per_warp;
    const u8* table_ids = (const u8*)d.chunk_tables;
    for (u32 k = 0; k < chunks_per_warp; ++k) {
        const u64 chunk = base + (u64)k * ECF8_WARPS + warp;
        if (chunk >= d.nchunks) break;
        decode_chunk<ELEM_BYTES, EXP_BITS, MAN_BITS>(d, luts + table_ids[chunk] * ECF8_LUT_SIZE,
                                                     chunk, out, lane);
    }
}

// Instantiations, named by ecf8.decoder_cuda: E4M3FN, E5M2, BF16, FP16.
template __global__ void ecf8_decode<1, 4, 3>(const TensorDesc*, const u32*, int, u32, u64);
template __global__ void ecf8_decode<1, 5, 2>(const TensorDesc*, const u32*, int, u32, u64);
template __global__ void ecf8_decode<2, 8, 7>(const TensorDesc*, const u32*, int, u32, u64);
template __global__ void ecf8_decode<2, 5, 10>(const TensorDesc*, const u32*, int, u32, u64);
