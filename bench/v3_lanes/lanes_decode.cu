// Prototype GPU decoder for the lane-stream layout of bench/v3_lanes/lanes.py (E4M3 only): an
// experiment for a frame format v3, not part of ecf8.
//
// Layout assumptions (lanes.py has the encoder and a NumPy emulation of this kernel)
// - One warp decodes one chunk of 2**chunk_log2 elements (the last may be shorter, whole
//   512-element groups); lane l owns elements 16l..16l+15 of every group, as in format v2.
// - The chunk's stream (words[chunk_words[c] .. chunk_words[c+1]), most significant bit first,
//   a multiple of 4 words, 16-byte aligned) holds each lane's codes bit-contiguously; lane l's
//   first bit is lane_bits[32c + l].
// - Decode tables: per table 4096 u32 entries for the next 12 bits, sym1 | sym2 << 8 | count << 16
//   | bits << 27 (count 1 or 2 symbols, bits their total code length).
// - Raw plane: two sign+mantissa nibbles a byte, element 2i in the low nibble (format v2's).
// - The grid is persistent (at most as many blocks as fit on the GPU at once): each block copies
//   its tables into shared memory once, 16 bytes a thread per load, and its warps then loop over
//   chunks c = blockIdx.x * WARPS + warp + k * gridDim.x * WARPS.
// - Shared memory: the tables, then per warp two stream buffers of wbuf words (max words a chunk
//   plus 4; with MAXQ > 0 one buffer, the next chunk's words held in registers meanwhile) and a symbol buffer of 32 rows of srow = S + 4 bytes (S symbols a lane: an odd
//   number of words a row, so lanes at the same symbol index use different banks).  A warp copies its next chunk's words
//   with 16-byte cp.async into the other stream buffer before it decodes the current one.
// - Phases per chunk: each lane decodes its symbols into its row (one table access yields one or
//   two symbols; lanes run ahead freely; the lane keeps three stream words in registers and loads
//   the next one from shared memory when its window passes a word), then
//   assembles its 16-element runs from 8 symbols and 8 raw bytes, 16-byte stores.
// - Valid streams only: a corrupt one can move a lane's window past its chunk's words (a format
//   would bound it, e.g. by clamping the window index to the chunk's last word).

#ifndef WARPS
#define WARPS 16
#endif
#ifndef MAXQ
#define MAXQ 0                // > 0: stage words through registers, MAXQ x 16 bytes a lane
#endif

typedef unsigned char u8;
typedef unsigned int u32;

__device__ __forceinline__ u32 bitsel(u32 a, u32 b, u32 mask) {      // b where mask, else a
    u32 r; asm("lop3.b32 %0, %1, %2, %3, 0xd8;" : "=r"(r) : "r"(a), "r"(b), "r"(mask)); return r;
}
__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ u32 lds(u32 a) {
    u32 v; asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(a)); return v;
}
__device__ __forceinline__ void sts8(u32 a, u32 v) { asm volatile("st.shared.u8 [%0], %1;" :: "r"(a), "r"(v)); }
__device__ __forceinline__ void cp_async16(u32 dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
}

// Copy chunk c's stream words into the buffer at shared address buf (16 bytes a lane per copy).
__device__ __forceinline__ void stage(const u32* words, const u32* chunk_words, u32 c, u32 buf, u32 lane) {
    const u32 first = __ldg(chunk_words + c), nw = __ldg(chunk_words + c + 1) - first;
    for (u32 i = 4 * lane; i < nw; i += 128) cp_async16(buf + 4 * i, words + first + i);
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
lanes_decode(const u32* __restrict__ words, const u32* __restrict__ chunk_words,
             const u32* __restrict__ lane_bits, const u8* __restrict__ chunk_tables,
             const u32* __restrict__ luts, u32 ntables, const u8* __restrict__ raw,
             u8* __restrict__ out, u32 nchunks, u32 chunk_log2, u32 n, u32 wbuf) {
    extern __shared__ __align__(16) u32 smem[];
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u32 srow = (1u << (chunk_log2 - 6)) + 4;                 // symbols a lane, plus slack
#if MAXQ                                                             // one buffer, next words in registers
    const u32 per_warp = wbuf + 8 * srow;                           // words
#else                                                                // two buffers, cp.async
    const u32 per_warp = 2 * wbuf + 8 * srow;
#endif
    const u32 bufs = smem_addr(smem + ntables * 4096 + warp * per_warp);
    const u32 row = bufs + 4 * (per_warp - 8 * srow) + lane * srow;
    for (u32 i = threadIdx.x; i < ntables * 1024; i += blockDim.x)
        ((uint4*)smem)[i] = __ldg((const uint4*)luts + i);
    __syncthreads();
    const u32 stride = gridDim.x * WARPS;
    u32 c = blockIdx.x * WARPS + warp, side = 0;       // side: the buffer of chunk c
#if MAXQ
    uint4 ahead[MAXQ];                                               // the next chunk's words
    u32 ahead_n = 0;
    auto fetch = [&](u32 k) {
        const u32 first = __ldg(chunk_words + k);
        ahead_n = __ldg(chunk_words + k + 1) - first;
#pragma unroll
        for (int j = 0; j < MAXQ; ++j)
            if (4 * lane + 128 * j < ahead_n) ahead[j] = __ldg((const uint4*)(words + first) + lane + 32 * j);
    };
    auto put = [&]() {
#pragma unroll
        for (int j = 0; j < MAXQ; ++j)
            if (4 * lane + 128 * j < ahead_n) ((uint4*)(smem + ((bufs - smem_addr(smem)) >> 2)))[lane + 32 * j] = ahead[j];
    };
    if (c < nchunks) { fetch(c); put(); }
    for (; c < nchunks; c += stride) {
        if (c + stride < nchunks) fetch(c + stride);
        __syncwarp();
#else
    if (c < nchunks) stage(words, chunk_words, c, bufs, lane);
    cp_async_commit();
    for (; c < nchunks; c += stride, side ^= 1) {
        if (c + stride < nchunks) stage(words, chunk_words, c + stride, bufs + 4 * wbuf * (side ^ 1), lane);
        cp_async_commit();
        cp_async_wait<1>();                                          // this chunk's words landed
        __syncwarp();
#endif
        const u32 e0 = c << chunk_log2;
        const u32 span = min(1u << chunk_log2, n - e0);
        const u32 lut = smem_addr(smem) + 16384 * __ldg(chunk_tables + c);
        u32 p = __ldg(lane_bits + 32 * c + lane);
        const u32 buf = bufs + 4 * wbuf * side;
        // The lane's window: words cur, nxt (bits from `off` of cur on) and nn, loaded ahead.
        const u32* bw = smem + ((buf - smem_addr(smem)) >> 2) + (p >> 5);
        const u32* tb = smem + ((lut - smem_addr(smem)) >> 2);
        u32 off = p & 31, cur = bw[0], nxt = bw[1], nn = bw[2];
        bw += 3;
        u8* q = (u8*)smem + (row - smem_addr(smem));
        u8* const last = q + (span >> 6) - 1;                       // the lane's last symbol
        while (q < last) {                                           // room for two symbols
            const u32 e = tb[__funnelshift_l(nxt, cur, off) >> 20];
            q[0] = (u8)e;
            q[1] = (u8)(e >> 8);                                     // overwritten unless two
            off += e >> 27;
            q += (e >> 16) & 3;
            if (off >= 32) {                                         // at most 24 bits an access
                off -= 32;
                cur = nxt;
                nxt = nn;
                nn = *bw++;
            }
        }
        if (q == last)                                               // the last symbol alone
            *q = (u8)tb[__funnelshift_l(nxt, cur, off) >> 20];
        __syncwarp();
#if MAXQ
        if (c + stride < nchunks) put();                             // the next chunk's words
#endif
        const u8* rows = (const u8*)smem + (row - smem_addr(smem));
#pragma unroll 4
        for (u32 g = 0; g < (span >> 9); ++g) {
            const u32 el = e0 + 512 * g + 16 * lane;
            const uint2 sy = make_uint2(*(const u32*)(rows + 8 * g), *(const u32*)(rows + 8 * g + 4));
            const uint2 nb = __ldg((const uint2*)(raw + (el >> 1)));
            u32 o[4];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const u32 nib = h ? nb.y : nb.x, exps = h ? sy.y : sy.x;
                const u32 va = bitsel(bitsel(nib << 4, nib, 0x07070707u), exps << 3, 0x78787878u);
                const u32 vb = bitsel(bitsel(nib, nib >> 4, 0x07070707u), exps >> 1, 0x78787878u);
                o[2 * h] = __byte_perm(va, vb, 0x5140);
                o[2 * h + 1] = __byte_perm(va, vb, 0x7362);
            }
            *(uint4*)(out + el) = make_uint4(o[0], o[1], o[2], o[3]);
        }
        __syncwarp();                                                // rows and buffer free again
    }
    cp_async_wait<0>();
}
