"""Code tables: length-limited canonical Huffman codes over an alphabet of at most 256 symbols.

A table is stored as code *lengths* only (one per symbol, 0 = symbol absent); the codes follow from
the canonical rule of FORMAT.md §4: symbols sorted by (length, symbol value) get consecutive codes.
"""

from __future__ import annotations

import heapq

import numpy as np

__all__ = ["code_lengths", "canonical_codes", "decode_lut", "decode_luts", "is_valid_lengths"]


def code_lengths(counts: np.ndarray, max_len: int) -> np.ndarray:
    """Huffman code lengths limited to max_len bits.

    counts: (A,) non-negative symbol counts.  Returns (A,) uint8 lengths, 0 for absent symbols; a
    lone present symbol gets length 1.  Lengths over max_len are cut to it and the Kraft sum is
    repaired by lengthening the deepest shorter codes (the rule of zlib/miniz), which costs little
    because only rare symbols are affected.  Requires 2**max_len >= number of present symbols.
    """
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(counts.shape[0], dtype=np.uint8)
    present = np.flatnonzero(counts)
    if present.size <= 1:
        lengths[present] = 1
        return lengths
    if present.size > (1 << max_len):
        raise ValueError(f"{present.size} symbols do not fit codes of at most {max_len} bits")
    depth = _huffman_depths(counts[present])
    # Codes per length, clipped to max_len, then Kraft repair.
    per_len = np.bincount(np.minimum(depth, max_len), minlength=max_len + 1)
    kraft = int(np.sum(per_len[1:] << (max_len - np.arange(1, max_len + 1))))
    while kraft > (1 << max_len):
        per_len[max_len] -= 1
        for i in range(max_len - 1, 0, -1):
            if per_len[i]:
                per_len[i] -= 1
                per_len[i + 1] += 2
                break
        kraft -= 1
    # Most frequent symbols take the shortest lengths.
    order = present[np.argsort(-counts[present], kind="stable")]
    lengths[order] = np.repeat(np.arange(max_len + 1), per_len).astype(np.uint8)
    return lengths


def _huffman_depths(weights: np.ndarray) -> np.ndarray:
    """Depth of each leaf in a Huffman tree over weights (n >= 2), (n,) int64."""
    n = weights.size
    heap = [(int(w), i) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    parent = np.zeros(2 * n - 1, dtype=np.int64)
    nxt = n
    while len(heap) > 1:
        w1, a = heapq.heappop(heap)
        w2, b = heapq.heappop(heap)
        parent[a] = parent[b] = nxt
        heapq.heappush(heap, (w1 + w2, nxt))
        nxt += 1
    depth = np.zeros(2 * n - 1, dtype=np.int64)
    for node in range(2 * n - 3, -1, -1):   # parents are numbered after their children
        depth[node] = depth[parent[node]] + 1
    return depth[:n]


def is_valid_lengths(lengths: np.ndarray, max_len: int) -> bool:
    """True when the lengths describe a prefix code (Kraft sum <= 1) within max_len bits.

    An empty table (all zero) is valid; it can only be used by chunks that hold no symbol.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0 or lengths.min() < 0 or lengths.max() > max_len:
        return False
    used = lengths[lengths > 0]
    return int(np.sum(1 << (max_len - used))) <= (1 << max_len)


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code values, (A,) uint32, for code lengths (A,); 0 where the length is 0."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lengths.shape[0], dtype=np.uint32)
    order = np.lexsort((np.arange(lengths.size), lengths))
    order = order[lengths[order] > 0]
    code, prev_len = 0, 0
    for s in order:
        l = int(lengths[s])
        code <<= l - prev_len
        codes[s] = code
        code += 1
        prev_len = l
    return codes


def decode_lut(lengths: np.ndarray, max_len: int) -> np.ndarray:
    """One-level decode table, (2**max_len,) uint16: entry = length << 8 | symbol.

    Entry i decodes the max_len-bit window i (next stream bits, most significant first).  Windows
    that match no code (an incomplete code) decode as symbol 0 with length max_len; a valid stream
    never produces them, and a corrupt one only yields wrong symbols, never an unbounded read.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    lut = np.full(1 << max_len, (max_len << 8), dtype=np.uint16)
    codes = canonical_codes(lengths)
    for s in np.flatnonzero(lengths):
        l = int(lengths[s])
        lo = int(codes[s]) << (max_len - l)
        lut[lo : lo + (1 << (max_len - l))] = (l << 8) | int(s)
    return lut


def decode_luts(lengths: np.ndarray, max_len: int) -> np.ndarray:
    """(K, 2**max_len) uint16: ``decode_lut`` of each row of lengths (K, A), vectorized.

    Canonical codes give the symbols, sorted by (length, symbol), consecutive code ranges, so each
    table is their entries repeated 2**(max_len - length) times, then the default entry.
    """
    out = np.full((lengths.shape[0], 1 << max_len), max_len << 8, np.uint16)
    symbols = np.arange(lengths.shape[1])
    for t, row in enumerate(np.asarray(lengths, np.int64)):
        order = np.lexsort((symbols, row))
        order = order[row[order] > 0]
        entries = np.repeat((row[order] << 8) | order, 1 << (max_len - row[order]))
        out[t, : entries.size] = entries
    return out
