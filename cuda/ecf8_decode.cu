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
// - The chunk's words reach a per-warp shared-memory ring of 4 windows of 32 words by asynchronous
//   copies (cp.async) issued three windows ahead of the cursor, so no step waits on global memory.
// - Codes are at most 12 bits; the decode tables (host-built, one 4096-entry uint16 table per code
//   table, entry = length << 8 | symbol) are copied to shared memory by each block with their bytes
//   swapped (symbol << 8 | length), so that a funnel shift by a raw entry (which uses its low 5
//   bits) or by the sum of two entries shifts by the code length(s).
// - A lane's bit buffer is two 32-bit words hi:lo, most significant bit first; bits past nbits are
//   zero.
// - The raw plane packs R = M + 1 bits per element densely (§2.8); a lane's 16 elements are 2R
//   aligned bytes. The exponent stream and raw plane are 16-byte aligned, and `out` must be too.
// - Corrupt payloads (checksums off) can only yield wrong elements: every step consumes at most 24
//   bits, so a lane's bit count stays in [0, 56) whatever the words hold, and every read is bounded.
//
// One launch decodes a batch of tensors of one element kind: block b finds its tensor by binary
// search over block_starts, loads that tensor's tables, and its warps decode WARPS * chunks_per_warp
// consecutive chunks. A tensor's output starts at its descriptor's `out` plus the launch's
// `out_base`: absolute addresses with out_base 0, or offsets into one buffer at out_base.

#ifndef ECF8_WARPS
#define ECF8_WARPS 8          // warps per block; the host reads it from decoder_cuda.WARPS
#endif
#define ECF8_LUT_BITS 12
#define ECF8_LUT_SIZE (1 << ECF8_LUT_BITS)
#define ECF8_RING 128         // words per warp ring: 4 windows of 32

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

// Shared memory through 32-bit shared-window addresses (one LEA per lookup, no generic pointers).
__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ u32 lds_u16(u32 a) {
    u32 v; asm volatile("ld.shared.u16 %0, [%1];" : "=r"(v) : "r"(a)); return v;
}
__device__ __forceinline__ u32 lds_u32(u32 a) {     // ring reads: ordered after the copies' waits
    u32 v; asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(a) : "memory"); return v;
}
// 4-byte asynchronous copy global -> shared; src_bytes 0 writes a zero word.
__device__ __forceinline__ void cp_async4(u32 dst, const void* src, u32 src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" :: "r"(dst), "l"(src), "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
}
// Funnel shifts that use the low 5 bits of n (PTX shf.*.wrap).
__device__ __forceinline__ u32 shl_wrap(u32 lo, u32 hi, u32 n) {   // high word of (hi:lo) << n
    u32 r; asm("shf.l.wrap.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(lo), "r"(hi), "r"(n)); return r;
}

// The top ECF8_LUT_BITS bits of x, as a funnel shift so that the compiler keeps the shift and
// folds the table offset in with one IMAD (x >> 19 & 0x1ffe plus an add otherwise).
__device__ __forceinline__ u32 top_bits(u32 x) {
    u32 r; asm("shf.r.clamp.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(x), "r"(0u), "n"(32 - ECF8_LUT_BITS)); return r;
}

// The bits of b where mask is set and of a elsewhere: one LOP3 (inline, as the compiler splits
// the C form in two when the mask is a constant).
__device__ __forceinline__ u32 bitsel(u32 a, u32 b, u32 mask) {
    u32 r; asm("lop3.b32 %0, %1, %2, %3, 0xd8;" : "=r"(r) : "r"(a), "r"(b), "r"(mask)); return r;
}

struct LaneStream {
    u32 hi, lo;       // next stream bits, most significant first
    u32 nbits;        // valid bits in hi:lo
    u32 cursor;       // next word slot of the chunk, relative to its first word (warp-uniform)
    u32 next_cross;   // cursor value that enters the next window
    u32 limit;        // the chunk's word count: slots at or past it read as zero
    u32 lane;
    const u32* words; // the chunk's first word
    u32 ring;         // shared address of this warp's ring (512-byte aligned)

    __device__ __forceinline__ u32 ring_at(u32 slot) const {
        return ring | ((slot << 2) & (4 * ECF8_RING - 1));
    }
    // Every lane copies its word of the window starting at slot w (zero past the chunk's end).
    __device__ __forceinline__ void copy_window(u32 w) const {
        const u32 slot = w + lane;
        cp_async4(ring_at(slot), words + (slot < limit ? slot : 0), slot < limit ? 4u : 0u);
        cp_async_commit();
    }

    __device__ __forceinline__ void start(const u32* all_words, u32 first, u32 last, u32 l, u32 r) {
        words = all_words + first; limit = last - first; lane = l; ring = r;
        hi = lo = 0; nbits = 0; cursor = 0; next_cross = 32;
        cp_async_wait<0>();           // the previous chunk's copies have landed
        __syncwarp();                 // and its ring reads are done
        copy_window(0);
        copy_window(32);
        copy_window(64);
        copy_window(96);
        cp_async_wait<2>();           // windows 0 and 1 are in the ring
        __syncwarp();
    }

    __device__ __forceinline__ void refill(u32 lanemask_lt) {
        // Branch-free: every lane reads the ring (non-loading lanes read a neighbour's word and
        // discard it), so the warp never diverges here.
        const bool need = nbits < 24;
        const u32 mask = __ballot_sync(0xffffffffu, need);
        const u32 w = lds_u32(ring_at(cursor + __popc(mask & lanemask_lt)));
        if (need) {
            hi |= w >> nbits;
            lo |= __funnelshift_rc(0u, w, nbits);     // low word of (w:0) >> nbits
            nbits += 32;
        }
        cursor += __popc(mask);
        if (cursor >= next_cross) {                     // warp-uniform: entered window j + 1
            // Window j + 2 must be complete (reads reach one window past the cursor's); window
            // j + 4 goes to the ring slots of window j.
            __syncwarp();
            copy_window(next_cross + 96);
            cp_async_wait<2>();
            __syncwarp();
            next_cross += 32;
        }
    }

    // The step's two symbols' (swapped) table entries: symbol << 8 | length.
    __device__ __forceinline__ void decode2(u32 lut, u32& e1, u32& e2) {
        e1 = lds_u16(lut + (top_bits(hi) << 1));
        const u32 peek = shl_wrap(lo, hi, e1);
        e2 = lds_u16(lut + (top_bits(peek) << 1));
        const u32 both = e1 + e2;                       // low 5 bits: the two lengths, <= 24
        hi = shl_wrap(lo, hi, both);
        lo = shl_wrap(0u, lo, both);
        nbits -= both & 31u;
    }
};

// The raw bits of one lane run: 2R bytes, as 16-byte-or-less vector loads kept unsplit until used.
template <int R> struct RawRun { u32 v[(2 * R + 3) / 4]; };

template <int R>
__device__ __forceinline__ RawRun<R> load_raw(const u8* p, bool active) {
    RawRun<R> r;
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

// The symbols of one 16-element lane run (every lane of the warp takes part: refills are
// warp-collective), as swapped table entries: the symbol is byte 1.
template <int ELEM_BYTES, int EXP_BITS, int MAN_BITS>
__device__ __forceinline__ void decode_symbols(LaneStream& s, u32 lut, u32 lanemask_lt,
                                               u32 (&sym)[Kind<ELEM_BYTES, EXP_BITS, MAN_BITS>::SYMBOLS]) {
    typedef Kind<ELEM_BYTES, EXP_BITS, MAN_BITS> K;
#pragma unroll
    for (int i = 0; i < K::SYMBOLS; i += 2) {
        s.refill(lanemask_lt);
        s.decode2(lut, sym[i], sym[i + 1]);
    }
}

// A run's 16 * ELEM_BYTES element bytes, as little-endian words o, from its symbols and raw bits.
template <int ELEM_BYTES, int EXP_BITS, int MAN_BITS>
__device__ __forceinline__ void assemble(const u32 (&sym)[Kind<ELEM_BYTES, EXP_BITS, MAN_BITS>::SYMBOLS],
                                         const RawRun<MAN_BITS + 1>& rr, u32 (&o)[4 * ELEM_BYTES]) {
    typedef Kind<ELEM_BYTES, EXP_BITS, MAN_BITS> K;
    if (EXP_BITS == 4) {
        // E4M3: byte = sign << 7 | exp << 3 | mantissa from the raw nibble sign << 3 | mantissa:
        // bits 0-2 and 7 from the nibble, bits 3-6 from the exponent, as two bit-selects a word.
        // Even elements sit in the low nibbles of the nibble words, odd ones in the high nibbles;
        // byte permutes interleave them.
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const u32 nib = rr.v[h];
            const u32 exps = __byte_perm(__byte_perm(sym[4 * h], sym[4 * h + 1], 0x0051),
                                         __byte_perm(sym[4 * h + 2], sym[4 * h + 3], 0x0051), 0x5410);
            const u32 va = bitsel(bitsel(nib << 4, nib, 0x07070707u), exps << 3, 0x78787878u);
            const u32 vb = bitsel(bitsel(nib, nib >> 4, 0x07070707u), exps >> 1, 0x78787878u);
            o[2 * h] = __byte_perm(va, vb, 0x5140);
            o[2 * h + 1] = __byte_perm(va, vb, 0x7362);
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
            const u32 v = ((r >> MAN_BITS) << (EXP_BITS + MAN_BITS)) | (((sym[i] >> 8) & 0xffu) << MAN_BITS) |
                          (r & ((1u << MAN_BITS) - 1u));
            const int per_word = 4 / ELEM_BYTES;
            const int sh = (i % per_word) * 8 * ELEM_BYTES;
            if (sh == 0) o[i / per_word] = v; else o[i / per_word] |= v << sh;
        }
    }
}

// Decode one 16-element lane run whose first element is the chunk's element e (e < span: the
// chunk's element count) and store it at dst (the run's first output byte).
template <int ELEM_BYTES, int EXP_BITS, int MAN_BITS>
__device__ __forceinline__ void decode_group(LaneStream& s, u32 lut, const RawRun<MAN_BITS + 1>& rr,
                                             u32 e, u32 span, u8* dst, u32 lanemask_lt) {
    u32 sym[Kind<ELEM_BYTES, EXP_BITS, MAN_BITS>::SYMBOLS];
    decode_symbols<ELEM_BYTES, EXP_BITS, MAN_BITS>(s, lut, lanemask_lt, sym);
    if (e >= span) return;
    u32 o[4 * ELEM_BYTES];   // the run's 16 * ELEM_BYTES output bytes as words
    assemble<ELEM_BYTES, EXP_BITS, MAN_BITS>(sym, rr, o);
    if (e + 16 <= span) {
#pragma unroll
        for (int k = 0; k < ELEM_BYTES; ++k)
            ((uint4*)dst)[k] = make_uint4(o[4 * k], o[4 * k + 1], o[4 * k + 2], o[4 * k + 3]);
    } else {
        const u32 tail = (span - e) * ELEM_BYTES;
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
    const u32 span = (u32)(left < (1ull << d.chunk_log2) ? left : (1ull << d.chunk_log2));
    const u32* chunk_words = (const u32*)d.chunk_words;
    // This lane's first raw run and output bytes; each group advances them by 32 runs.
    const u8* raw = (const u8*)d.raw + ((first + (lane << 4)) >> 4) * (2 * R);
    u8* dst = out + (first + (lane << 4)) * ELEM_BYTES;
    LaneStream s;
    s.start((const u32*)d.words, __ldg(chunk_words + chunk), __ldg(chunk_words + chunk + 1), lane, ring);
    // Groups in pairs, raw runs loaded one group ahead into alternating registers. `base` (the
    // group's first element, warp-uniform) bounds the loop; e = base + 16 * lane.
    u32 e = lane << 4;
    RawRun<R> a = load_raw<R>(raw, e < span), b;
    for (u32 base = 0; base < span; base += 1024) {
        b = load_raw<R>(raw + 64 * R, e + 512 < span);
        decode_group<ELEM_BYTES, EXP_BITS, MAN_BITS>(s, lut, a, e, span, dst, lanemask_lt);
        if (base + 512 >= span) break;
        a = load_raw<R>(raw + 128 * R, e + 1024 < span);
        decode_group<ELEM_BYTES, EXP_BITS, MAN_BITS>(s, lut, b, e + 512, span, dst + 512 * ELEM_BYTES,
                                                     lanemask_lt);
        e += 1024;
        raw += 128 * R;
        dst += 1024 * ELEM_BYTES;
    }
}

// The block's copy of a tensor's decode tables in shared memory, entries swapped to
// symbol << 8 | length (the block synchronizes).
__device__ __forceinline__ void load_tables(const TensorDesc& d, u16* luts) {
    const uint4* src = (const uint4*)d.luts;
    for (u32 i = threadIdx.x; i < d.ntables * (ECF8_LUT_SIZE / 8); i += blockDim.x) {
        const uint4 q = src[i];
        ((uint4*)luts)[i] = make_uint4(__byte_perm(q.x, 0, 0x2301), __byte_perm(q.y, 0, 0x2301),
                                       __byte_perm(q.z, 0, 0x2301), __byte_perm(q.w, 0, 0x2301));
    }
    __syncthreads();
}

// Blocks per SM the register allocation must allow for 8-warp blocks (E4M3: 48 registers, E5M2:
// 64, 16-bit kinds: 80). The decoder is bound by its integer instruction issue (ALU and IMAD
// together, bench/NOTES.md), yet E4M3 at 40 registers (6 blocks) ran 4-6% slower than at 48.
template <int ELEM_BYTES, int EXP_BITS> struct MinBlocks {
    static constexpr int value = ELEM_BYTES == 2 ? 3 : (EXP_BITS == 4 ? 5 : 4);
};

template <int ELEM_BYTES, int EXP_BITS, int MAN_BITS>
__global__ void __launch_bounds__(ECF8_WARPS * 32, (MinBlocks<ELEM_BYTES, EXP_BITS>::value * 8) / ECF8_WARPS)
ecf8_decode(const TensorDesc* __restrict__ descs, const u32* __restrict__ block_starts,
            int ntensors, u32 chunks_per_warp, u64 out_base) {
    extern __shared__ __align__(16) u16 luts[];      // ntables * 4096 entries
    __shared__ __align__(512) u32 rings[ECF8_WARPS][ECF8_RING];
    int lo = 0, hi = ntensors - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (block_starts[mid] <= blockIdx.x) lo = mid; else hi = mid - 1;
    }
    const TensorDesc d = descs[lo];
    load_tables(d, luts);
    u8* out = (u8*)(d.out + out_base);
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
    cp_async_wait<0>();       // no copy into this block's shared memory outlives the block
}

#ifndef ECF8_DEVICE_CODE_ONLY    // set by sources that include this one for its device code
// Instantiations: one per entry of ecf8.format.DTYPES (E4M3FN, E5M2, BF16, FP16), in its order;
// tests/test_dtype_registry.py checks that they agree.
template __global__ void ecf8_decode<1, 4, 3>(const TensorDesc*, const u32*, int, u32, u64);
template __global__ void ecf8_decode<1, 5, 2>(const TensorDesc*, const u32*, int, u32, u64);
template __global__ void ecf8_decode<2, 8, 7>(const TensorDesc*, const u32*, int, u32, u64);
template __global__ void ecf8_decode<2, 5, 10>(const TensorDesc*, const u32*, int, u32, u64);
#endif
