// Prototype GPU decoder for the lane-stream layout of bench/v3_lanes/lanes.py (E4M3 only): an
// experiment for a frame format v3, not part of ecf8.
//
// Layout assumptions (lanes.py has the encoder and a NumPy emulation of this kernel)
// - One warp decodes one chunk of 2**chunk_log2 elements (the last may be shorter, whole
//   512-element groups); lane l owns elements 16l..16l+15 of every group, as in format v2.
// - The chunk's stream (words[chunk_words[c] .. chunk_words[c+1]), most significant bit first)
//   holds each lane's codes bit-contiguously; lane l's first bit is lane_bits[32c + l].
// - Decode tables: per table 4096 u32 entries for the next 12 bits, sym1 | sym2 << 8 | len1 << 16
//   | len12 << 21 | two << 26 (two: a second whole code follows inside the 12 bits).
// - Raw plane: two sign+mantissa nibbles a byte, element 2i in the low nibble (format v2's).
// - Shared memory: the block's tables, then per warp the chunk's words plus two zero words
//   (max_words + 4 slots) and a symbol buffer of 32 rows of srow bytes.
// - Phases per chunk: stage the words (coalesced), each lane decodes its symbols into its row
//   (one 32-bit window and one table access yield one or two symbols; lanes run ahead freely),
//   then each lane assembles its 16-element runs from 8 symbols and 8 raw bytes, 16-byte stores.
// - Valid streams only: a corrupt one can move a lane's window past its chunk's words (a format
//   would bound it, e.g. by clamping the window index to the chunk's last word).

#ifndef WARPS
#define WARPS 8
#endif

typedef unsigned char u8;
typedef unsigned int u32;

__device__ __forceinline__ u32 bitsel(u32 a, u32 b, u32 mask) {      // b where mask, else a
    u32 r; asm("lop3.b32 %0, %1, %2, %3, 0xd8;" : "=r"(r) : "r"(a), "r"(b), "r"(mask)); return r;
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
lanes_decode(const u32* __restrict__ words, const u32* __restrict__ chunk_words,
             const u32* __restrict__ lane_bits, const u8* __restrict__ chunk_tables,
             const u32* __restrict__ luts, u32 ntables, const u8* __restrict__ raw,
             u8* __restrict__ out, u32 nchunks, u32 chunk_log2, u32 n, u32 max_words) {
    extern __shared__ __align__(16) u32 smem[];
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u32 srow = (1u << (chunk_log2 - 6)) + 8;                 // symbols a lane, plus slack
    const u32 per_warp = max_words + 4 + 8 * srow;                  // words: stream, symbols
    u32* wbuf = smem + ntables * 4096 + warp * per_warp;
    u8* row = (u8*)(wbuf + max_words + 4) + lane * srow;
    for (u32 i = threadIdx.x; i < ntables * 4096; i += blockDim.x) smem[i] = __ldg(luts + i);
    __syncthreads();
    for (u32 c = blockIdx.x * WARPS + warp; c < nchunks; c += gridDim.x * WARPS) {
        const u32 first = __ldg(chunk_words + c), nw = __ldg(chunk_words + c + 1) - first;
        __syncwarp();                                                // the previous chunk is done
        for (u32 i = lane; i < nw + 2; i += 32) wbuf[i] = i < nw ? __ldg(words + first + i) : 0u;
        __syncwarp();
        const u32 e0 = c << chunk_log2;
        const u32 span = min(1u << chunk_log2, n - e0);
        const u32 S = span >> 6;                                     // symbols a lane
        const u32* lut = smem + __ldg(chunk_tables + c) * 4096;
        u32 p = __ldg(lane_bits + 32 * c + lane);
        u32 k = 0;
        while (k + 1 < S) {                                          // room for two symbols
            const u32 win = __funnelshift_l(wbuf[(p >> 5) + 1], wbuf[p >> 5], p);  // 32 bits from bit p
            const u32 e = lut[win >> 20];
            row[k] = (u8)e;
            row[k + 1] = (u8)(e >> 8);                               // overwritten unless two
            p += (e >> 21) & 31;
            k += 1 + (e >> 26);
        }
        if (k < S) {                                                 // the last symbol alone
            const u32 win = __funnelshift_l(wbuf[(p >> 5) + 1], wbuf[p >> 5], p);
            row[k] = (u8)lut[win >> 20];
        }
        __syncwarp();
        for (u32 g = 0; g < (span >> 9); ++g) {
            const u32 el = e0 + 512 * g + 16 * lane;
            const uint2 sy = *(const uint2*)(row + 8 * g);
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
    }
}
