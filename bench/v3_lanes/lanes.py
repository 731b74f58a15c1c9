"""Prototype of a lane-stream layout for E4M3 exponents with two-symbol decode tables: an
experiment for a frame format v3 (bench/NOTES.md, "Format v3 study"), not a format ecf8 writes.

    frame = encode(x, chunk)            # x: float8_e4m3fn, size a multiple of 512
    assert (emulate(frame) == bits(x)).all()

The code tables and their choice per chunk are today's (a v2 frame of x with the same chunk size
is encoded first and its tables reused), so only the layout differs:

- a chunk's 32 lanes each own the 16 consecutive elements 16l..16l+15 of every 512-element group
  (as in v2); a lane's symbols (exponent pairs, the first in the low nibble) are its codes in
  order, most significant bit first, and the lanes' codes follow each other bit-contiguously
  (lane 0, lane 1, ...); the chunk's stream is padded with zero bits to 16 bytes;
- `chunk_words`: each chunk's first 32-bit word (nchunks + 1 entries); `lane_bits`: each lane's
  first bit relative to its chunk's first word (nchunks x 32, u32 here; u16 would do up to
  chunk 8192 and is what the size study counts);
- `luts`: per table 4096 u32 entries indexed by the next 12 stream bits: sym1 | sym2 << 8 |
  count << 16 | bits << 27, where count is 2 when a second whole code (sym2) follows the first
  inside the 12 bits, else 1, and bits is the length of the count codes.  A lane whose last
  symbol is next takes only sym1.
- `raw`: v2's raw plane (two sign+mantissa nibbles a byte), copied from the v2 frame.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import ecf8  # noqa: E402
from ecf8 import format as fmt  # noqa: E402
from ecf8.encoder import symbols  # noqa: E402
from ecf8.tables import canonical_codes, decode_lut  # noqa: E402

W = 12


@dataclass
class LaneFrame:
    n: int
    chunk: int
    words: np.ndarray         # u32 stream
    chunk_words: np.ndarray   # u32 (nchunks + 1)
    lane_bits: np.ndarray     # u32 (nchunks, 32)
    chunk_tables: np.ndarray  # u8 (nchunks,)
    luts: np.ndarray          # u32 (ntables, 4096)
    raw: np.ndarray           # u8 raw plane (n / 2 bytes)
    v2_bytes: int             # size of the v2 frame of the same tensor

    @property
    def nbytes(self) -> int:
        """Bytes a frame of this layout would take: the v2 frame with its stream replaced by this
        one and 64 bytes of lane offsets a chunk (u16)."""
        return int(self.v2_bytes - 4 * self._v2_words + 4 * self.words.size + 64 * self.chunk_tables.size)


def two_symbol_lut(lengths: np.ndarray) -> np.ndarray:
    """(4096,) u32 two-symbol entries for one table of code lengths (256,)."""
    one = decode_lut(lengths, W).astype(np.int64)           # length << 8 | symbol
    v = np.arange(1 << W)
    sym1, len1 = one[v] & 0xFF, one[v] >> 8
    rest = (v << len1) & ((1 << W) - 1)                     # the bits after the first code
    sym2, len2 = one[rest] & 0xFF, one[rest] >> 8
    two = (len1 + len2 <= W) & (lengths[sym2] == len2)      # a whole real code within the window
    length = np.where(two, len1 + len2, len1)
    return (sym1 | (np.where(two, sym2, 0) << 8) | ((1 + two.astype(np.int64)) << 16) | (length << 27)
            ).astype(np.uint32)


def encode(x: np.ndarray, chunk: int) -> LaneFrame:
    u = x.reshape(-1).view(np.uint8)
    n = u.size
    if n % fmt.GROUP or n == 0:
        raise ValueError("the prototype takes whole 512-element groups")
    blob = ecf8.encode(x.reshape(-1), chunk_size=chunk)
    f = fmt.parse(memoryview(blob))
    if f.mode != fmt.MODE_CODED:
        raise ValueError("the tensor was stored raw")
    lengths = f.lengths.astype(np.int64)
    codes = np.stack([canonical_codes(l) for l in lengths]).astype(np.int64)
    sym = symbols(u, f.spec).astype(np.int64)
    words, chunk_words, lane_bits = [], [0], []
    for c in range(f.nchunks):
        lo, hi = c * chunk, min((c + 1) * chunk, n)
        groups = (hi - lo) // fmt.GROUP
        s = sym[lo // 2 : hi // 2].reshape(groups, fmt.LANES, 8).transpose(1, 0, 2).reshape(fmt.LANES, -1)
        t = int(f.chunk_tables[c])
        ln, cd = lengths[t][s], codes[t][s]                 # (32, S)
        starts = np.concatenate([[0], np.cumsum(ln.reshape(-1))])[:-1].reshape(ln.shape)
        total = int(ln.sum())
        nwords = -(-total // 128) * 4                       # padded to 16 bytes
        bits = np.zeros(nwords * 32, np.uint8)
        for b in range(W):                                  # bit b of each code (MSB first)
            m = b < ln
            bits[(starts + b)[m]] = (cd[m] >> (ln[m] - 1 - b)) & 1
        words.append(np.packbits(bits).view(">u4").astype(np.uint32))
        lane_bits.append(starts[:, 0].astype(np.uint32))
        chunk_words.append(chunk_words[-1] + nwords)
    lf = LaneFrame(n, chunk, np.concatenate(words), np.array(chunk_words, np.uint32),
                   np.stack(lane_bits), f.chunk_tables.copy(),
                   np.stack([two_symbol_lut(l) for l in lengths]),
                   np.frombuffer(blob, np.uint8, f.raw_bytes, f.raw_offset).copy(), len(blob))
    lf._v2_words = f.exp_words
    return lf


def emulate(lf: LaneFrame) -> np.ndarray:
    """The element bytes (n,) u8, decoded exactly as the kernel does (per lane: a 32-bit window at
    the lane's bit position, one table access, one or two symbols)."""
    out = np.empty(lf.n, np.uint8)
    words = np.concatenate([lf.words, np.zeros(2, np.uint32)]).astype(np.uint64)
    nib = np.empty(lf.raw.size * 2, np.uint8)
    nib[0::2], nib[1::2] = lf.raw & 15, lf.raw >> 4
    for c in range(lf.chunk_tables.size):
        lo, hi = c * lf.chunk, min((c + 1) * lf.chunk, lf.n)
        S = (hi - lo) // 64                                  # symbols per lane
        lut = lf.luts[lf.chunk_tables[c]].astype(np.int64)
        base = int(lf.chunk_words[c])
        p = lf.lane_bits[c].astype(np.int64).copy()
        k = np.zeros(32, np.int64)
        sym = np.zeros((32, S + 1), np.int64)
        ar = np.arange(32)
        while (k < S).any():
            live = k < S
            wi = base + (p >> 5)
            win = ((words[wi] << 32 | words[wi + 1]) >> (32 - (p & 31)).astype(np.uint64)) & 0xFFFFFFFF
            e = lut[(win.astype(np.int64) >> (32 - W))]
            two = (((e >> 16) & 3) == 2) & (k + 1 < S)
            ln = np.where(k + 1 < S, e >> 27, 0)           # the last symbol alone: no advance
            r = ar[live]
            sym[r, k[r]] = e[live] & 0xFF
            sym[r, k[r] + 1] = np.where(two[live], (e[live] >> 8) & 0xFF, sym[r, k[r] + 1])
            p = np.where(live, p + ln, p)
            k = np.where(live, k + 1 + two, k)
        s = sym[:, :S].reshape(32, -1, 8).transpose(1, 0, 2).reshape(-1)      # element-pair order
        e = np.empty(2 * s.size, np.uint8)
        e[0::2], e[1::2] = s & 15, s >> 4
        r = nib[lo:hi]
        out[lo:hi] = ((r >> 3) << 7) | (e << 3) | (r & 7)
    return out
