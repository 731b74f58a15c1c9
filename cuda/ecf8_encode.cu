// ECF8 GPU encoder: the kernels behind ecf8.encoder_cuda (FORMAT.md is normative; section numbers
// below refer to it). Frames are byte-identical to ecf8/encoder.py's for the same input/options.
//
// Layout assumptions
// - Input: n element bits, 1 or 2 bytes each, little-endian, C order, 16-byte aligned (the host
//   copies unaligned or strided input first). A lane run (16 elements, §3) is read with one or two
//   16-byte loads when it is whole, element by element at the tensor's end.
// - Chunks of 2^chunk_log2 elements (9..20); groups of 512; lane l of group g owns elements
//   g*512 + 16*l .. +15 of its chunk. The last group of the last chunk is completed with the host's
//   `pad` element (encoder.py: the last chunk's most common exponent, zero raw bits).
// - Symbols (§4): two exponent fields (first in the low nibble) for E4M3, one otherwise; a lane
//   has 16 / fields-per-symbol symbols per group, coded in steps of 2.
// - Code tables: ntables * alphabet u32 entries `code << 8 | length` (length 1..12, 0 = absent),
//   copied to shared memory (at most 8 * 256 * 4 = 8 KB); chunk c uses table chunk_tables[c].
// - Word schedule (§6): one warp per chunk replays the decoder's loads: before each step every lane
//   holding fewer than 24 bits loads, the loading lanes taking consecutive slots in lane order
//   (ballot + popc). ecf8_count records, per chunk, 1 + the slot of the last load that carries a
//   real word (trailing empty loads are trimmed); the host prefix-sums these into chunk word
//   offsets. ecf8_code replays the same schedule and writes each lane's word j to the slot of its
//   j-th load. Empty loads are not written: the host zeroes the exponent stream first.
// - Raw plane (§2.8): run r (elements 16r..16r+15) is 2R bytes at byte 2R*r, LSB-first; elements
//   past n are zero; ecf8_code writes every run that holds an element (run offsets 2R-aligned:
//   8-byte stores for R = 4, 16-byte for R = 8, 2-byte halves otherwise).
// - CRC-32 (zlib polynomial, reflected): the payload [begin, end) of the frame is viewed with zero
//   bytes prepended to a multiple of 8 KB (leading zeros leave a zero-initialised CRC register
//   unchanged). Each thread computes the raw register G (init 0, no final xor) of one 256-byte
//   piece; a warp tree combines its 32 pieces (G(AB) = x^(8|B|) G(A) + G(B) mod P, constants from
//   the host), lane 0 shifts the warp's 8 KB by the bytes after it and XORs it into *acc; then
//   ecf8_crc_final writes ~(x^(8L) * ~seed + acc) little-endian at `end`. The frame buffer must be
//   readable up to align4(end).
// Every kernel runs on the caller's stream; none synchronises with the host.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define ECF8_TILE_LOG2 14          // elements per histogram block
#define ECF8_CRC_POLY 0xedb88320u

template <int ELEM_BYTES, int EXP_BITS, int MAN_BITS> struct EKind {
    static constexpr int R = MAN_BITS + 1;                        // raw bits per element
    static constexpr int PER = 8 / EXP_BITS;                      // exponent fields per symbol
    static constexpr int A = 1 << (EXP_BITS * PER);               // alphabet
    static constexpr int SYMS = 16 / PER;                         // symbols per lane run
    static constexpr u32 EMASK = (1u << EXP_BITS) - 1u;
    __device__ static __forceinline__ u32 exp_of(u32 b) { return (b >> MAN_BITS) & EMASK; }
    __device__ static __forceinline__ u32 raw_of(u32 b) {
        return ((b >> (EXP_BITS + MAN_BITS)) << MAN_BITS) | (b & ((1u << MAN_BITS) - 1u));
    }
};

// The 16 element bits of the lane run starting at element e0; elements past n read as `pad`.
template <int ELEM_BYTES>
__device__ __forceinline__ void load_run(const u8* __restrict__ x, u64 e0, u64 n, u32 pad, u32 (&el)[16]) {
    if (e0 + 16 <= n) {
        if (ELEM_BYTES == 1) {
            const uint4 q = __ldg((const uint4*)(x + e0));
            const u32 w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
            for (int i = 0; i < 16; ++i) el[i] = (w[i >> 2] >> ((i & 3) * 8)) & 0xffu;
        } else {
            const uint4 q0 = __ldg((const uint4*)(x + 2 * e0)), q1 = __ldg((const uint4*)(x + 2 * e0) + 1);
            const u32 w[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
#pragma unroll
            for (int i = 0; i < 16; ++i) el[i] = (w[i >> 1] >> ((i & 1) * 16)) & 0xffffu;
        }
    } else {
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const u64 e = e0 + i;
            el[i] = e < n ? (ELEM_BYTES == 1 ? (u32)x[e] : (u32)((const u16*)x)[e]) : pad;
        }
    }
}

// Per-chunk symbol histograms of the real elements (no padding; for E4M3 a symbol counts only
// when both its elements are real). hist: nchunks * A u32, zeroed by the host; hist[nchunks * A]
// receives the last element's bits (the host needs its exponent to add the padding).
template <int ELEM_BYTES, int EXP_BITS, int MAN_BITS>
__global__ void __launch_bounds__(256)
ecf8_hist(const u8* __restrict__ x, u64 n, u32 chunk_log2, u64 nchunks, u32* __restrict__ hist) {
    typedef EKind<ELEM_BYTES, EXP_BITS, MAN_BITS> K;
    extern __shared__ u32 sh[];                     // subs * A counters
    const u32 subs = chunk_log2 >= ECF8_TILE_LOG2 ? 1u : 1u << (ECF8_TILE_LOG2 - chunk_log2);
    const u64 tile = (u64)blockIdx.x << ECF8_TILE_LOG2;
    for (u32 i = threadIdx.x; i < subs * K::A; i += blockDim.x) sh[i] = 0;
    if (blockIdx.x == 0 && threadIdx.x == 0)
        hist[nchunks * K::A] = ELEM_BYTES == 1 ? (u32)x[n - 1] : (u32)((const u16*)x)[n - 1];
    __syncthreads();
    for (u32 r = threadIdx.x; r < (1u << ECF8_TILE_LOG2) / 16; r += blockDim.x) {
        const u64 e0 = tile + 16 * r;
        if (e0 >= n) break;
        u32 el[16];
        load_run<ELEM_BYTES>(x, e0, n, 0, el);
        u32* h = sh + (chunk_log2 >= ECF8_TILE_LOG2 ? 0u : ((16 * r) >> chunk_log2) * K::A);
        if (K::PER == 2) {
#pragma unroll
            for (int k = 0; k < 8; ++k)
                if (e0 + 2 * k + 1 < n) atomicAdd(h + (K::exp_of(el[2 * k]) | (K::exp_of(el[2 * k + 1]) << EXP_BITS)), 1u);
        } else {
#pragma unroll
            for (int k = 0; k < 16; ++k)
                if (e0 + k < n) atomicAdd(h + K::exp_of(el[k]), 1u);
        }
    }
    __syncthreads();
    const u64 chunk0 = tile >> chunk_log2;
    for (u32 i = threadIdx.x; i < subs * K::A; i += blockDim.x) {
        const u32 v = sh[i];
        if (v) atomicAdd(hist + (chunk0 + i / K::A) * K::A + (i % K::A), v);
    }
}

// Raw bits of one lane run packed LSB-first into 2R bytes at dst (2R-aligned).
template <int R>
__device__ __forceinline__ void store_raw(u8* dst, const u32 (&raw)[16]) {
    u32 w[(16 * R + 31) / 32 + 1];
#pragma unroll
    for (int k = 0; k < (16 * R + 31) / 32 + 1; ++k) w[k] = 0;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
        const int p = i * R;
        w[p >> 5] |= raw[i] << (p & 31);
        if ((p & 31) + R > 32) w[(p >> 5) + 1] |= raw[i] >> (32 - (p & 31));
    }
    if (R == 4) {
        *(uint2*)dst = make_uint2(w[0], w[1]);
    } else if (R == 8) {
        *(uint4*)dst = make_uint4(w[0], w[1], w[2], w[3]);
    } else {
#pragma unroll
        for (int k = 0; k < R; ++k) ((u16*)dst)[k] = (u16)(w[k >> 1] >> ((k & 1) * 16));
    }
}

// One warp per chunk replays the decoder's load schedule (§6).
// WRITE = false: counts[chunk] = words the chunk owns (1 + last real word's slot).
// WRITE = true: writes the chunk's words at words + chunk_offsets[chunk] and its raw runs.
template <int ELEM_BYTES, int EXP_BITS, int MAN_BITS, bool WRITE>
__device__ __forceinline__ void code_chunk(const u8* __restrict__ x, u64 n, u32 chunk_log2, u64 chunk,
                                           const u32* tbl, u32 pad, u32 lane, u32* __restrict__ counts,
                                           const u32* __restrict__ chunk_offsets, u32* __restrict__ words,
                                           u8* __restrict__ raw) {
    typedef EKind<ELEM_BYTES, EXP_BITS, MAN_BITS> K;
    const u32 lt = (1u << lane) - 1u;
    const u64 first = chunk << chunk_log2;
    const u64 left = n - first;
    const u64 span = left < (1ull << chunk_log2) ? left : (1ull << chunk_log2);
    const u32 groups = (u32)((span + 511) >> 9);
    int nbits = 0;            // the decoder's buffered bits for this lane
    u32 cursor = 0;           // next slot of the chunk (warp-uniform)
    // COUNT: slots of the last two loads, loads made, bits coded.
    u32 slot_last = 0, slot_prev = 0, loads = 0;
    u64 total = 0;
    // WRITE: pending load slots (oldest first), bits not yet written.
    u32 p0 = 0, p1 = 0, p2 = 0;
    u32 q = 0;
    u64 acc = 0;
    int accbits = 0;
    u32* out = WRITE ? words + chunk_offsets[chunk] : nullptr;
    for (u32 g = 0; g < groups; ++g) {
        const u64 e0 = first + ((u64)g << 9) + (lane << 4);
        u32 el[16];
        load_run<ELEM_BYTES>(x, e0, n, pad, el);
        u32 sym[K::SYMS];
#pragma unroll
        for (int k = 0; k < K::SYMS; ++k)
            sym[k] = K::PER == 2 ? (K::exp_of(el[2 * k]) | (K::exp_of(el[2 * k + 1]) << EXP_BITS))
                                 : K::exp_of(el[k]);
        if (WRITE && e0 < n) {
            u32 r[16];
#pragma unroll
            for (int i = 0; i < 16; ++i) r[i] = (e0 + i < n) ? K::raw_of(el[i]) : 0u;
            store_raw<K::R>(raw + (e0 >> 4) * (2 * K::R), r);
        }
#pragma unroll
        for (int s = 0; s < K::SYMS; s += 2) {
            const u32 ea = tbl[sym[s]], eb = tbl[sym[s + 1]];
            const bool need = nbits < 24;
            const u32 mask = __ballot_sync(0xffffffffu, need);
            const u32 slot = cursor + __popc(mask & lt);
            cursor += __popc(mask);
            if (need) {
                nbits += 32;
                if (WRITE) {
                    if (q == 0) p0 = slot; else if (q == 1) p1 = slot; else p2 = slot;
                    ++q;
                } else {
                    slot_prev = slot_last; slot_last = slot; ++loads;
                }
            }
            const u32 lb = eb & 0xffu;
            const int ln = (int)((ea & 0xffu) + lb);
            nbits -= ln;
            if (WRITE) {
                const u64 cd = ((u64)(ea >> 8) << lb) | (eb >> 8);
                acc = (acc << ln) | cd;
                accbits += ln;
                if (accbits >= 32) {
                    out[p0] = (u32)(acc >> (accbits - 32));
                    accbits -= 32;
                    p0 = p1; p1 = p2; --q;
                }
            } else {
                total += (u64)ln;
            }
        }
    }
    if (WRITE) {
        if (accbits > 0) out[p0] = (u32)(acc << (32 - accbits));
    } else {
        // The lane's real words are its first ceil(total / 32) loads; it loads at most one more.
        const u32 lane_words = (u32)((total + 31) >> 5);
        const u32 last = lane_words == loads ? slot_last : slot_prev;
        const u32 count = __reduce_max_sync(0xffffffffu, last + 1);
        if (lane == 0) counts[chunk] = count;
    }
}

template <int ELEM_BYTES, int EXP_BITS, int MAN_BITS, bool WRITE>
__global__ void __launch_bounds__(256)
ecf8_code(const u8* __restrict__ x, u64 n, u32 chunk_log2, u64 nchunks, const u8* __restrict__ chunk_tables,
          const u32* __restrict__ entries, u32 ntables, u32 pad, u32* __restrict__ counts,
          const u32* __restrict__ chunk_offsets, u32* __restrict__ words, u8* __restrict__ raw) {
    typedef EKind<ELEM_BYTES, EXP_BITS, MAN_BITS> K;
    __shared__ u32 ent[8 * 256];
    for (u32 i = threadIdx.x; i < ntables * K::A; i += blockDim.x) ent[i] = entries[i];
    __syncthreads();
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u64 chunk = (u64)blockIdx.x * (blockDim.x >> 5) + warp;
    if (chunk >= nchunks) return;
    code_chunk<ELEM_BYTES, EXP_BITS, MAN_BITS, WRITE>(x, n, chunk_log2, chunk, ent + chunk_tables[chunk] * K::A,
                                                      pad, lane, counts, chunk_offsets, words, raw);
}

// ---- CRC-32 -------------------------------------------------------------------------------------

// a * b mod P, reflected (bit 31 is x^0); as zlib's multmodp.
__device__ __forceinline__ u32 multmodp(u32 a, u32 b) {
    u32 p = 0;
#pragma unroll 4
    for (int i = 0; i < 32; ++i) {
        if (a & (0x80000000u >> i)) p ^= b;
        b = (b >> 1) ^ ((b & 1u) ? ECF8_CRC_POLY : 0u);
    }
    return p;
}

// x^(8 * nbytes) mod P, from x2n[k] = x^(2^k) mod P.
__device__ __forceinline__ u32 shift_bytes(u64 nbytes, const u32* x2n) {
    u32 p = 0x80000000u;
    int k = 3;
    while (nbytes) {
        if (nbytes & 1) p = multmodp(x2n[k & 31], p);
        nbytes >>= 1;
        ++k;
    }
    return p;
}

// consts: T[4][256] slicing tables | x2n[32] | level[5] (x^(8 * 256 * 2^k) mod P)
#define ECF8_CRC_PIECE 256
#define ECF8_CRC_CONSTS (4 * 256 + 32 + 5)

__global__ void __launch_bounds__(256)
ecf8_crc(const u8* __restrict__ frame, u64 begin, u64 end, const u32* __restrict__ consts, u32* acc) {
    __shared__ u32 T[4 * 256];
    __shared__ u32 cs[37];
    for (u32 i = threadIdx.x; i < 4 * 256; i += blockDim.x) T[i] = consts[i];
    if (threadIdx.x < 37) cs[threadIdx.x] = consts[4 * 256 + threadIdx.x];
    __syncthreads();
    const u64 len = end - begin;
    const u64 vlen = (len + 32 * ECF8_CRC_PIECE - 1) / (32 * ECF8_CRC_PIECE) * (32 * ECF8_CRC_PIECE);
    const i64 vstart = (i64)end - (i64)vlen;
    const u64 piece = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u32 lane = threadIdx.x & 31;
    u32 c = 0;
    if (piece * ECF8_CRC_PIECE < vlen) {
        const i64 pstart = vstart + (i64)(piece * ECF8_CRC_PIECE);
        if (pstart + ECF8_CRC_PIECE > (i64)begin) {
            const u32 sh = (u32)(pstart & 3) * 8;       // the same for every piece
            const i64 a0 = pstart & ~(i64)3;
            u32 prev = 0;
#pragma unroll 8
            for (int j = 0; j <= ECF8_CRC_PIECE / 4; ++j) {
                const i64 a = a0 + 4 * j;
                u32 w = 0;
                if (a + 4 > (i64)begin && a < (i64)end) {
                    w = __ldg((const u32*)(frame + a));
                    // zero the bytes outside [begin, end)
                    if (a < (i64)begin) w &= 0xffffffffu << (8 * (u32)((i64)begin - a));
                    if (a + 4 > (i64)end) w &= 0xffffffffu >> (8 * (u32)(a + 4 - (i64)end));
                }
                if (j > 0) {
                    const u32 v = sh ? __funnelshift_r(prev, w, sh) : prev;
                    c ^= v;
                    c = T[768 + (c & 0xffu)] ^ T[512 + ((c >> 8) & 0xffu)] ^ T[256 + ((c >> 16) & 0xffu)] ^ T[c >> 24];
                }
                prev = w;
            }
        }
    }
    // Warp tree: blocks of 2^k pieces, the left one shifted by the right one's length.
#pragma unroll
    for (int k = 0; k < 5; ++k) {
        const u32 other = __shfl_down_sync(0xffffffffu, c, 1 << k);
        if ((lane & ((2u << k) - 1u)) == 0) c = multmodp(cs[32 + k], c) ^ other;
    }
    if (lane == 0 && piece * ECF8_CRC_PIECE < vlen) {
        const u64 seg_end = (piece / 32 + 1) * (32 * ECF8_CRC_PIECE);
        c = multmodp(shift_bytes(vlen - seg_end, cs), c);
        if (c) atomicXor(acc, c);
    }
}

__global__ void ecf8_crc_final(u8* frame, u64 begin, u64 end, const u32* __restrict__ consts,
                               const u32* acc, u32 seed) {
    if (threadIdx.x || blockIdx.x) return;
    const u32 crc = ~(multmodp(shift_bytes(end - begin, consts + 4 * 256), ~seed) ^ *acc);
#pragma unroll
    for (int b = 0; b < 4; ++b) frame[end + b] = (u8)(crc >> (8 * b));
}

// Instantiations: one per entry of ecf8.format.DTYPES (E4M3FN, E5M2, BF16, FP16), in its order;
// tests/test_dtype_registry.py checks that they agree.
template __global__ void ecf8_hist<1, 4, 3>(const u8*, u64, u32, u64, u32*);
template __global__ void ecf8_hist<1, 5, 2>(const u8*, u64, u32, u64, u32*);
template __global__ void ecf8_hist<2, 8, 7>(const u8*, u64, u32, u64, u32*);
template __global__ void ecf8_hist<2, 5, 10>(const u8*, u64, u32, u64, u32*);
#define ECF8_CODE_INST(B, E, M, W) \
    template __global__ void ecf8_code<B, E, M, W>(const u8*, u64, u32, u64, const u8*, const u32*, u32, u32, \
                                                   u32*, const u32*, u32*, u8*);
ECF8_CODE_INST(1, 4, 3, false) ECF8_CODE_INST(1, 4, 3, true)
ECF8_CODE_INST(1, 5, 2, false) ECF8_CODE_INST(1, 5, 2, true)
ECF8_CODE_INST(2, 8, 7, false) ECF8_CODE_INST(2, 8, 7, true)
ECF8_CODE_INST(2, 5, 10, false) ECF8_CODE_INST(2, 5, 10, true)
