// ECF8 frame GPU decoder for format versions 1 and 2, which share one layout (FORMAT.md is
// normative; section numbers below refer to it).
//
// Layout assumptions
// - One warp decodes one chunk (§3): 32 lanes, lane l owning the 16 consecutive elements
//   g*512 + 16*l .. +15 of every 512-element group g of the chunk.
// - A lane's symbols (2 exponent fields each for E4M3, 1 otherwise, §4) are decoded in steps of 2;
//   before each step every lane holding fewer than 24 bits loads the next word of the chunk's
//   stream, the loading lanes taking consecutive words in lane order (ballot + popc, §6). Words at or
//   past the chunk's end read as zero: a chunk never reads outside its own words.
// - Global loads are issued well before their use (a shared-memory word ring two windows ahead, raw
//   runs one group ahead): the decoder is bound by per-symbol work, not by memory latency.
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

#ifndef ECF8_WARPS
#define ECF8_WARPS 8          // warps per block; the host reads it from decoder_cuda.WARPS
#endif
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

// A lane's bit buffer, fed from a per-warp ring of ECF8_RING words in shared memory. Windows of 32
// words are loaded (coalesced) into two staging registers two window-crossings ahead of use and
// stored to the ring only when the cursor enters the window before them, so no instruction waits on
// a recent global load: the ring always holds the cursor's window and the next one.
#define ECF8_RING 128

// Shared memory through 32-bit shared-window addresses (one LEA per lookup, no generic pointers).
__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ u32 lds_u16(u32 a) {
    u32 v; asm volatile("ld.shared.u16 %0, [%1];" : "=r"(v) : "r"(a)); return v;
}
__device__ __forceinline__ u32 lds_u32(u32 a) {
    u32 v; asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(a)); return v;
}
__device__ __forceinline__ void sts_u32(u32 a, u32 v) {
    asm volatile("st.shared.u32 [%0], %1;" :: "r"(a), "r"(v) : "memory");
}
// PTX shl.b64 clamps shift amounts above 64 (a negative int reads as one) to a zero result.
__device__ __forceinline__ u64 shl64(u64 x, int n) {
    u64 r; asm("shl.b64 %0, %1, %2;" : "=l"(r) : "l"(x), "r"(n)); return r;
}
__device__ __forceinline__ void prefetch_l2(const void* p) {
    asm volatile("prefetch.global.L2 [%0];" :: "l"(p));
}

struct LaneStream {
    u64 buf;          // next stream bits, most significant first
    int nbits;        // valid bits in buf
    u32 cursor;       // next word slot of the chunk, relative to its first word (warp-uniform)
    u32 next_cross;   // cursor value that enters the next window
    u32 limit;        // the chunk's word count: slots at or past it read as zero
    u32 lane;
    const u32* words; // the chunk's first word
    u32 ring;         // shared address of this warp's ring (512-byte aligned)
    u32 stage0, stage1;   // windows in flight: window w lives in stage[w & 1]

    __device__ __forceinline__ u32 fetch(u32 slot) const {
        return slot < limit ? __ldg(words + slot) : 0u;
    }
    __device__ __forceinline__ u32 ring_at(u32 slot) const {
        return ring | ((slot << 2) & (4 * ECF8_RING - 1));
    }

    __device__ __forceinline__ void start(const u32* all_words, u32 first, u32 last, u32 l, u32 r) {
        words = all_words + first; limit = last - first; lane = l; ring = r;
        buf = 0; nbits = 0; cursor = 0; next_cross = 32;
        sts_u32(ring_at(l), fetch(l));
        sts_u32(ring_at(32 + l), fetch(32 + l));
        stage0 = fetch(64 + l);
        stage1 = fetch(96 + l);
        __syncwarp();
    }

    __device__ __forceinline__ void refill(u32 lanemask_lt) {
        // Branch-free: every lane reads the ring (non-loading lanes read a neighbour's word and
        // discard it), so the warp never diverges here.
        const bool need = nbits < 24;
        const u32 mask = __ballot_sync(0xffffffffu, need);
        const u32 w = lds_u32(ring_at(cursor + __popc(mask & lanemask_lt)));
        buf |= shl64(need ? w : 0u, 32 - nbits);
        nbits += need ? 32 : 0;
        cursor += __popc(mask);
        if (cursor >= next_cross) {                     // warp-uniform: entered window j + 1
            // Window j + 2 goes to the ring slots of window j - 2, read (and used) steps ago.
            const u32 j2 = next_cross + 32;
            if ((j2 >> 5) & 1) {
                sts_u32(ring_at(j2 + lane), stage1);
                stage1 = fetch(j2 + 64 + lane);         // window j + 4
            } else {
                sts_u32(ring_at(j2 + lane), stage0);
                stage0 = fetch(j2 + 64 + lane);
            }
            if (j2 + 192 + lane < limit) prefetch_l2(words + j2 + 192 + lane);   // window j + 8
            next_cross += 32;
            __syncwarp();
        }
    }

    // The next symbol's table entry (length << 8 | symbol; callers use the low byte).
    __device__ __forceinline__ u32 decode(u32 lut) {
        const u32 e = lds_u16(lut + ((u32)(buf >> (64 - ECF8_LUT_BITS)) << 1));
        const u32 len = e >> 8;
        buf <<= len;
        nbits -= (int)len;
        return e;
    }
};

// Nibbles 0..3 of v (16 bits) into bytes 0..3.
__device__ __forceinline__ u32 spread_nibbles(u32 v) {
    v = (v | (v << 8)) & 0x00ff00ffu;
    return (v | (v << 4)) & 0x0f0f0f0fu;
}

// The raw bits of one lane run: 2R bytes, as 16-byte-or-less vector loads kept unsplit until used.
template <int R> struct RawRun { u32 v[(2 * R + 3) / 4]; };

template <int R>
__device__ __forceinline__ RawRun<R> load_raw(const u8* raw, u64 e0, bool active) {
    RawRun<R> r;
    const u8* p = raw + (e0 >> 4) * (2 * R);
    if (!active) {
#pragma unroll
        for (int k = 0; k < (2 * R + 3) / 4; ++k) r.v[k] = 0;
    } else if (R == 4) {
        const uint2 q = __ldg((const uint2*)p);
        r.v[0] = q.x; r.v[1] = q.y;
    } else if (R == 8) {
        const uint4 q = __ldg((const uint4*)p);
        r.v[0] = q.x; r.v[1] = q.y; r.v[2] = q.z; r.v[3] = q.w;
    } else {
#pragma unroll
        for (int k = 0; k < R; ++k) {     // 2-byte aligned: R halves
            const u32 h = __ldg((const u16*)p + k);
            if (k & 1) r.v[k >> 1] |= h << 16; else r.v[k >> 1] = h;
        }
    }
    return r;
}

template <int ELEM_BYTES, int EXP_BITS, int MAN_BITS>
__device__ __forceinline__ void decode_group(LaneStream& s, u32 lut, const RawRun<MAN_BITS + 1>& rr,
                                             u64 e0, u64 n, u8* out, u32 lanemask_lt) {
    typedef Kind<ELEM_BYTES, EXP_BITS, MAN_BITS> K;
    u32 sym[K::SYMBOLS];
#pragma unroll
    for (int i = 0; i < K::SYMBOLS; i += 2) {
        s.refill(lanemask_lt);
        sym[i] = s.decode(lut);
        sym[i + 1] = s.decode(lut);
    }
    if (e0 >= n) return;
    u32 o[4 * ELEM_BYTES];   // the run's 16 * ELEM_BYTES output bytes as words
    if (EXP_BITS == 4) {
        // E4M3: byte = sign << 7 | exp << 3 | mantissa. Raw nibbles and the symbols' exponent
        // nibbles are spread to bytes with byte permutes, 8 elements per 32-bit nibble word.
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const u32 nib = rr.v[h];
            const u32 exps = __byte_perm(__byte_perm(sym[4 * h], sym[4 * h + 1], 0x0040),
                                         __byte_perm(sym[4 * h + 2], sym[4 * h + 3], 0x0040), 0x5410);
            const u32 xa = nib & 0x0f0f0f0fu, xb = (nib >> 4) & 0x0f0f0f0fu;
            const u32 ya = exps & 0x0f0f0f0fu, yb = (exps >> 4) & 0x0f0f0f0fu;
#pragma unroll
            for (int k = 0; k < 2; ++k) {
                const u32 sel = k ? 0x7362u : 0x5140u;
                const u32 x = __byte_perm(xa, xb, sel), y = __byte_perm(ya, yb, sel);
                o[2 * h + k] = ((x << 4) & 0x80808080u) | (y << 3) | (x & 0x07070707u);
            }
        }
    } else {
        u32 h[K::R + 1];     // 16-bit halves of the raw run
#pragma unroll
        for (int k = 0; k < K::R; ++k) h[k] = (rr.v[k >> 1] >> ((k & 1) * 16)) & 0xffffu;
        h[K::R] = 0;
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const int pos = i * K::R;
            const u32 r = ((h[pos >> 4] | (h[(pos >> 4) + 1] << 16)) >> (pos & 15)) & ((1u << K::R) - 1u);
            const u32 v = ((r >> MAN_BITS) << (EXP_BITS + MAN_BITS)) | ((sym[i] & 0xffu) << MAN_BITS) |
                          (r & ((1u << MAN_BITS) - 1u));
            const int per_word = 4 / ELEM_BYTES;
            const int sh = (i % per_word) * 8 * ELEM_BYTES;
            if (sh == 0) o[i / per_word] = v; else o[i / per_word] |= v << sh;
        }
    }
    u8* dst = out + e0 * ELEM_BYTES;
    if (e0 + 16 <= n) {
#pragma unroll
        for (int k = 0; k < ELEM_BYTES; ++k)
            ((uint4*)dst)[k] = make_uint4(o[4 * k], o[4 * k + 1], o[4 * k + 2], o[4 * k + 3]);
    } else {
        const u32 tail = (u32)(n - e0) * ELEM_BYTES;
#pragma unroll
        for (u32 b = 0; b < 16 * ELEM_BYTES; ++b)
            if (b < tail) dst[b] = (u8)(o[b >> 2] >> ((b & 3) * 8));
    }
}

template <int ELEM_BYTES, int EXP_BITS, int MAN_BITS>
__device__ __forceinline__ void decode_chunk(const TensorDesc& d, u32 lut, u64 chunk,
                                             u8* out, u32 lane, u32 ring) {
    constexpr int R = MAN_BITS + 1;
    const u32 lanemask_lt = (1u << lane) - 1u;
    const u64 first = chunk << d.chunk_log2;
    const u64 left = d.n - first;
    const u64 span = left < (1ull << d.chunk_log2) ? left : (1ull << d.chunk_log2);
    const u32 groups = (u32)((span + 511) >> 9);
    const u32* chunk_words = (const u32*)d.chunk_words;
    const u8* raw = (const u8*)d.raw;
    LaneStream s;
    s.start((const u32*)d.words, chunk_words[chunk], chunk_words[chunk + 1], lane, ring);
    // Groups in pairs, raw runs loaded one group ahead into alternating registers.
    u64 e0 = first + (lane << 4);
    RawRun<R> a = load_raw<R>(raw, e0, e0 < d.n), b;
    for (u32 g = 0; g < groups; g += 2) {
        const u64 e1 = e0 + 512, e2 = e0 + 1024;
        const bool has1 = g + 1 < groups;
        b = load_raw<R>(raw, e1, has1 && e1 < d.n);
        if (e0 + 4 * 512 < d.n) prefetch_l2(raw + ((e0 + 4 * 512) >> 4) * (2 * R));
        decode_group<ELEM_BYTES, EXP_BITS, MAN_BITS>(s, lut, a, e0, d.n, out, lanemask_lt);
        if (!has1) break;
        a = load_raw<R>(raw, e2, g + 2 < groups && e2 < d.n);
        decode_group<ELEM_BYTES, EXP_BITS, MAN_BITS>(s, lut, b, e1, d.n, out, lanemask_lt);
        e0 = e2;
    }
}

// Blocks per SM the register allocation must allow: the most that compile without spills for
// 8-warp blocks (E4M3: 48 registers, E5M2: 64, 16-bit kinds: 80). The decoder is bound by the
// latency of each lane's serial decode chain, so resident warps are what buys throughput.
template <int ELEM_BYTES, int EXP_BITS> struct MinBlocks {
    static constexpr int value = ELEM_BYTES == 2 ? 3 : (EXP_BITS == 4 ? 5 : 4);
};

template <int ELEM_BYTES, int EXP_BITS, int MAN_BITS>
__global__ void __launch_bounds__(ECF8_WARPS * 32, (MinBlocks<ELEM_BYTES, EXP_BITS>::value * 8) / ECF8_WARPS)
ecf8_decode(const TensorDesc* __restrict__ descs, const u32* __restrict__ block_starts,
            int ntensors, u32 chunks_per_warp, u64 out_override) {
    extern __shared__ __align__(16) u16 luts[];      // ntables * 4096 entries, then the rings
    __shared__ __align__(512) u32 rings[ECF8_WARPS][ECF8_RING];
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
        decode_chunk<ELEM_BYTES, EXP_BITS, MAN_BITS>(
            d, smem_addr(luts) + table_ids[chunk] * (2 * ECF8_LUT_SIZE), chunk, out, lane,
            smem_addr(rings[warp]));
    }
}

// Instantiations, named by ecf8.decoder_cuda: E4M3FN, E5M2, BF16, FP16.
template __global__ void ecf8_decode<1, 4, 3>(const TensorDesc*, const u32*, int, u32, u64);
template __global__ void ecf8_decode<1, 5, 2>(const TensorDesc*, const u32*, int, u32, u64);
template __global__ void ecf8_decode<2, 8, 7>(const TensorDesc*, const u32*, int, u32, u64);
template __global__ void ecf8_decode<2, 5, 10>(const TensorDesc*, const u32*, int, u32, u64);
