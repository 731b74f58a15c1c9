"""Reference decoder: NumPy, vectorized over all lanes of all chunks, one step per symbol pair."""

from __future__ import annotations

import numpy as np

from . import format as fmt
from .tables import decode_luts

__all__ = ["decode_frame"]

BATCH_CHUNK_ELEMENTS = 1 << 24   # elements decoded per vectorized pass
ASSEMBLE_ELEMENTS = 1 << 22      # elements assembled per pass (a multiple of 8: whole raw bytes)


def decode_frame(blob: memoryview, frame: fmt.Frame) -> np.ndarray:
    """Decode a parsed frame to a NumPy array of its dtype and shape.

    Working memory beside the result: the exponent stream widened to 8 bytes a word, and passes
    of BATCH_CHUNK_ELEMENTS (lanes decoded) and ASSEMBLE_ELEMENTS (elements assembled).
    """
    spec = frame.spec
    if frame.mode == fmt.MODE_STORED:
        u = np.frombuffer(blob, spec.uint(0).dtype.newbyteorder("<"), frame.n, frame.raw_offset)
        return u.astype(spec.uint).view(spec.dtype).reshape(frame.shape)
    words = np.empty(frame.exp_words + 1, np.uint64)
    words[:-1] = np.frombuffer(blob, "<u4", frame.exp_words, frame.exp_offset)
    words[-1] = 0                           # slot exp_words: the zero word read past a chunk's end
    luts = decode_luts(frame.lengths, fmt.MAX_CODE_LEN).astype(np.int64)
    plane = np.frombuffer(blob, np.uint8, frame.raw_bytes, frame.raw_offset)
    u = np.empty(frame.n, spec.uint)
    chunk = 1 << frame.chunk_log2
    per_batch = max(1, BATCH_CHUNK_ELEMENTS // chunk)
    first = 0
    for count, groups in fmt.chunk_groups(frame.n, frame.chunk_log2):
        for c0 in range(first, first + count, per_batch):
            c1 = min(c0 + per_batch, first + count)
            sym = _decode_lanes(words, luts, frame, c0, c1, groups * fmt.LANE_RUN // spec.per_symbol)
            fields = _unpair(sym, spec)                                # (B, 32, groups*16)
            fields = fields.reshape(c1 - c0, fmt.LANES, groups, fmt.LANE_RUN).transpose(0, 2, 1, 3)
            lo = c0 * chunk
            _assemble(u, lo, fields.reshape(-1)[: frame.n - lo], plane, spec)
        first += count
    return u.view(spec.dtype).reshape(frame.shape)


def _assemble(u: np.ndarray, first: int, exp: np.ndarray, plane: np.ndarray, spec: fmt.DtypeSpec) -> None:
    """Elements first.. of u from their exponent fields exp (uint8) and the packed raw plane."""
    m, r = spec.man_bits, spec.raw_bits
    for k in range(0, exp.size, ASSEMBLE_ELEMENTS):     # first and k: multiples of 8 (whole raw bytes)
        lo, hi = first + k, first + min(k + ASSEMBLE_ELEMENTS, exp.size)
        raw = unpack_raw(plane[lo * r // 8 : -(-hi * r // 8)], spec, hi - lo)
        e = exp[k : k + hi - lo].astype(spec.uint)
        np.bitwise_or(((raw >> m) << (spec.exp_bits + m)) | (e << m), raw & ((1 << m) - 1), out=u[lo:hi])


def _decode_lanes(words, luts, frame, c0, c1, nsym):
    """Symbols (c1-c0, 32, nsym) of chunks c0..c1-1, simulating each warp's loads exactly."""
    b = c1 - c0
    lanes = b * fmt.LANES
    buf = np.zeros(lanes, np.uint64)          # next stream bits, most significant first
    nbits = np.zeros(lanes, np.int64)
    nxt = frame.chunk_words[c0:c1].copy()     # next word slot of each chunk
    end = np.repeat(frame.chunk_words[c0 + 1 : c1 + 1], fmt.LANES)
    tid = np.repeat(frame.chunk_tables[c0:c1].astype(np.int64) << fmt.MAX_CODE_LEN, fmt.LANES)
    out = np.empty((nsym, lanes), np.uint8)
    sh = np.uint64(64 - fmt.MAX_CODE_LEN)
    for i in range(nsym):
        if i % fmt.SYMBOLS_PER_CHECK == 0:
            need = (nbits < fmt.REFILL_THRESHOLD).reshape(b, fmt.LANES)
            rank = np.cumsum(need, axis=1) - need
            slot = (nxt[:, None] + rank).reshape(-1)
            nxt += need.sum(axis=1)
            need = need.reshape(-1)
            slot = np.where(need & (slot < end), slot, words.size - 1)
            buf |= np.where(need, words[slot] << (32 - np.clip(nbits, 0, 32)).astype(np.uint64), 0
                            ).astype(np.uint64)
            nbits += need * 32
        entry = luts.reshape(-1)[tid + (buf >> sh).astype(np.int64)]
        ln = entry >> 8
        out[i] = entry & 0xFF
        buf <<= ln.astype(np.uint64)
        nbits -= ln
    return out.T.reshape(b, fmt.LANES, nsym)


def _unpair(sym, spec):
    if spec.per_symbol == 1:
        return sym
    mask = (1 << spec.exp_bits) - 1
    out = np.empty(sym.shape[:-1] + (sym.shape[-1] * 2,), np.uint8)
    out[..., 0::2] = sym & mask
    out[..., 1::2] = sym >> spec.exp_bits
    return out


def unpack_raw(plane: np.ndarray, spec: fmt.DtypeSpec, n: int) -> np.ndarray:
    """Raw values (n,) in the element's unsigned type from a packed raw plane."""
    r = spec.raw_bits
    if r == 4:
        out = np.empty(plane.size * 2, np.uint8)
        out[0::2], out[1::2] = plane & 15, plane >> 4
        return out[:n].astype(spec.uint)
    if r == 8:
        return plane[:n].astype(spec.uint)
    bits = np.unpackbits(plane, bitorder="little")[: n * r].reshape(n, r)
    return (bits.astype(np.uint16) << np.arange(r, dtype=np.uint16)).sum(1, dtype=np.uint16).astype(spec.uint)
