"""The ECF8 frame: element dtypes, header layout, parsing and validation (FORMAT.md is normative).

All integers are little-endian.  A frame is::

    Header(24) | Shape(8*ndim) | CodeTables | ChunkTableIds | ChunkWordOffsets | HeaderCRC(4)
    | pad to 16 | ExponentStream(4*exp_words) | pad to 16 | RawPlane | PayloadCRC(4)

Stored frames (mode 1) have no tables, chunk index or exponent stream; their raw plane holds the
elements' bytes unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import zlib
from typing import Any

import ml_dtypes
import numpy as np

from .errors import CorruptDataError, UnsupportedError

__all__ = ["DtypeSpec", "Frame", "DTYPES", "spec_for_dtype", "parse", "header_size", "header_crc", "as_buffer", "is_frame_file", "MAX_CODE_LEN"]

MAGIC = b"ECF8"
VERSION = 2                # written by the encoder; version 1 frames are still read
VERSIONS = (1, 2)          # v2: the payload CRC is seeded with the header CRC (binds the two)
MAX_CODE_LEN = 12          # every code is at most 12 bits: decoders use one 4096-entry table
REFILL_THRESHOLD = 24      # a lane loads a word when it holds fewer bits than this ...
SYMBOLS_PER_CHECK = 2      # ... checked before every 2 symbols (2 * 12 <= 24)
LANES = 32                 # lanes per chunk; a group is 32 lanes x 16 elements
GROUP = 512
LANE_RUN = 16
MIN_CHUNK_LOG2, MAX_CHUNK_LOG2 = 9, 20
MAX_TABLES = 8
MAX_NDIM = 8
MAX_ELEMENTS = 1 << 40     # per frame; also bounds the product of the non-zero shape extents
HEADER = struct.Struct("<4sBBBBBBHIQ")  # magic ver dtype mode ndim chunk_log2 ntables rsv words n
HEADER_PROBE = HEADER.size + 8 * MAX_NDIM + 4  # bytes that tell a header's length (header_size)
MODE_CODED, MODE_STORED = 0, 1


@dataclasses.dataclass(frozen=True)
class DtypeSpec:
    """One coded element dtype: how it splits into an exponent field and raw (sign + mantissa)
    bits, and its names elsewhere.  ``DTYPES`` is the only list of them: every other table of
    ecf8 (safetensors names, short names, torch dtypes, DLPack codes, CUDA kernel instantiations)
    is derived from it."""

    code: int            # dtype byte of the header
    name: str            # safetensors-style name
    dtype: np.dtype      # NumPy dtype of decoded arrays (its name is also the torch dtype's)
    bits: int            # element width: 8 or 16
    exp_bits: int        # E
    man_bits: int        # M; the raw value is sign << M | mantissa, R = M + 1 bits
    short: str           # the command line's, the CuPy adapter's and the codecs' name
    dlpack: int          # DLPack DLDataTypeCode of the element type
    aliases: tuple[str, ...] = ()    # more spellings ecf8.names accepts (lower case)

    @property
    def raw_bits(self) -> int:
        return self.man_bits + 1

    @property
    def per_symbol(self) -> int:
        """Exponent fields per code symbol: 8 // E (2 for E4M3, else 1)."""
        return 8 // self.exp_bits

    @property
    def alphabet(self) -> int:
        return 1 << (self.exp_bits * self.per_symbol)

    @property
    def uint(self) -> type:
        return np.uint8 if self.bits == 8 else np.uint16

    @property
    def kernel_args(self) -> str:
        """The CUDA kernels' template arguments for this dtype: "bytes, E, M" (cuda/*.cu
        instantiate each kernel once per entry of DTYPES)."""
        return f"{self.bits // 8}, {self.exp_bits}, {self.man_bits}"


# DLPack codes: kDLFloat 2, kDLBfloat 4, kDLFloat8_e4m3fn 10, kDLFloat8_e5m2 12.
DTYPES = {spec.code: spec for spec in (
    DtypeSpec(1, "F8_E4M3", np.dtype(ml_dtypes.float8_e4m3fn), 8, 4, 3, "e4m3", 10, ("float8_e4m3", "f8_e4m3fn")),
    DtypeSpec(2, "F8_E5M2", np.dtype(ml_dtypes.float8_e5m2), 8, 5, 2, "e5m2", 12),
    DtypeSpec(3, "BF16", np.dtype(ml_dtypes.bfloat16), 16, 8, 7, "bf16", 4),
    DtypeSpec(4, "F16", np.dtype(np.float16), 16, 5, 10, "fp16", 2),
)}
CODED_NAMES = frozenset(spec.name for spec in DTYPES.values())      # F8_E4M3, F8_E5M2, BF16, F16


# Short names used by the command line, the CuPy adapter and the numcodecs codec.
SHORT_NAMES = {spec.short: spec for spec in DTYPES.values()}


def spec_for_name(name: str) -> DtypeSpec:
    """The DtypeSpec of a safetensors dtype name (F8_E4M3, F8_E5M2, BF16, F16)."""
    for spec in DTYPES.values():
        if spec.name == name:
            return spec
    raise UnsupportedError(f"ecf8 does not code {name}")


def spec_for_dtype(dtype) -> DtypeSpec:
    """The DtypeSpec of a NumPy dtype; UnsupportedError names the supported ones otherwise."""
    dtype = np.dtype(dtype)
    for spec in DTYPES.values():
        if spec.dtype == dtype:
            return spec
    names = ", ".join(f"{s.dtype.name} ({s.name})" for s in DTYPES.values())
    raise UnsupportedError(f"ecf8 cannot code dtype {dtype}; supported: {names}")


def as_buffer(blob: Any) -> memoryview:
    """A flat byte memoryview of bytes, bytearray, memoryview or a uint8 NumPy array."""
    if isinstance(blob, np.ndarray):
        if blob.dtype != np.uint8:
            raise UnsupportedError(f"a blob array must have dtype uint8, not {blob.dtype}")
        blob = np.ascontiguousarray(blob).reshape(-1)
    try:
        view = memoryview(blob)
    except TypeError:
        raise UnsupportedError(f"a blob must be bytes-like or a uint8 array, not {type(blob).__name__}") from None
    if not view.c_contiguous:                 # e.g. a strided slice: its bytes, in order
        view = memoryview(view.tobytes())
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def is_frame_file(path) -> bool:
    """Whether a file starts with the frame magic (an ECF8 frame rather than a checkpoint)."""
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def align16(n: int) -> int:
    return (n + 15) & ~15


def raw_plane_bytes(spec: DtypeSpec, n: int) -> int:
    """Bytes of a coded frame's raw plane: 2R bytes per 16-element run, the last one padded."""
    return -(-n // LANE_RUN) * 2 * spec.raw_bits


def chunk_groups(n: int, chunk_log2: int) -> list[tuple[int, int]]:
    """(number of chunks, groups per chunk) runs: the full chunks, then the last partial one."""
    chunk = 1 << chunk_log2
    full, rest = divmod(n, chunk)
    runs = [(full, chunk // GROUP)] if full else []
    if rest:
        runs.append((1, -(-rest // GROUP)))
    return runs


@dataclasses.dataclass(frozen=True)
class Frame:
    """A parsed, validated frame header: every offset is a byte offset into the blob."""

    spec: DtypeSpec
    mode: int
    shape: tuple[int, ...]
    n: int
    chunk_log2: int
    lengths: np.ndarray        # (ntables, alphabet) uint8 code lengths
    chunk_tables: np.ndarray   # (nchunks,) uint8
    chunk_words: np.ndarray    # (nchunks + 1,) int64 word offsets, last = exp_words
    exp_offset: int
    exp_words: int
    raw_offset: int
    raw_bytes: int
    payload_offset: int        # first byte covered by the payload CRC
    size: int                  # total frame bytes
    payload_seed: int          # initial CRC value of the payload CRC: the header CRC (v2) or 0 (v1)

    @property
    def nchunks(self) -> int:
        return int(self.chunk_tables.size)

    @property
    def ntables(self) -> int:
        return int(self.lengths.shape[0])


def build_header(spec: DtypeSpec, mode: int, shape: tuple[int, ...], chunk_log2: int,
                 lengths: np.ndarray, chunk_tables: np.ndarray, chunk_starts: np.ndarray,
                 exp_words: int) -> bytes:
    """Header through HeaderCRC (the caller adds the zero padding to a 16-byte boundary)."""
    n = math.prod(shape)
    ntables = lengths.shape[0] if mode == MODE_CODED else 0
    parts = [HEADER.pack(MAGIC, VERSION, spec.code, mode, len(shape), chunk_log2, ntables, 0,
                         exp_words, n),
             np.asarray(shape, dtype="<u8").tobytes()]
    if mode == MODE_CODED:
        lo, hi = lengths[:, 0::2], lengths[:, 1::2]
        parts += [(lo | (hi << 4)).astype(np.uint8).tobytes(),
                  chunk_tables.astype(np.uint8).tobytes(),
                  chunk_starts.astype("<u4").tobytes()]
    head = b"".join(parts)
    return head + struct.pack("<I", zlib.crc32(head))


def header_crc(head: bytes) -> int:
    """The HeaderChecksum at the end of a build_header result: the seed of the v2 payload CRC."""
    return struct.unpack_from("<I", head, len(head) - 4)[0]


def _fixed_header(blob: memoryview) -> tuple:
    """(spec, mode, shape, n, chunk_log2, ntables, nchunks, exp_words, version, offset of the
    HeaderCRC) from a frame's fixed header and shape, validated; CorruptDataError otherwise."""
    have = len(blob)
    if have < HEADER.size:
        raise CorruptDataError(f"blob of {have} bytes is shorter than the {HEADER.size}-byte header")
    magic, version, dcode, mode, ndim, chunk_log2, ntables, rsv, exp_words, n = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise CorruptDataError("not an ECF8 frame (bad magic)")
    if version not in VERSIONS:
        raise UnsupportedError(f"ECF8 format version {version} is not supported (this reads "
                               f"{', '.join(map(str, VERSIONS))})")
    if dcode not in DTYPES:
        raise CorruptDataError(f"unknown dtype code {dcode}")
    spec = DTYPES[dcode]
    if mode not in (MODE_CODED, MODE_STORED) or rsv != 0 or ndim > MAX_NDIM:
        raise CorruptDataError("invalid mode, reserved field or ndim in header")
    pos = HEADER.size
    if have < pos + 8 * ndim + 4:
        raise CorruptDataError("blob truncated inside the header")
    shape = tuple(int(d) for d in np.frombuffer(blob, "<u8", ndim, pos))
    pos += 8 * ndim
    prod, nonzero = 1, 1
    for d in shape:
        prod *= d
        nonzero *= max(d, 1)
    if prod != n or nonzero > MAX_ELEMENTS:
        raise CorruptDataError(f"element count {n} does not match shape {shape}, or the product of "
                               "its non-zero extents exceeds 2**40")
    if mode == MODE_CODED:
        if not (MIN_CHUNK_LOG2 <= chunk_log2 <= MAX_CHUNK_LOG2) or not (1 <= ntables <= MAX_TABLES) or n == 0:
            raise CorruptDataError("invalid chunk size, table count or element count in coded frame")
        nchunks = -(-n // (1 << chunk_log2))
        meta = ntables * spec.alphabet // 2 + nchunks + 4 * nchunks
    else:
        if chunk_log2 or ntables or exp_words:
            raise CorruptDataError("stored frame with coded-frame fields set")
        nchunks, meta = 0, 0
    return spec, mode, shape, n, chunk_log2, ntables, nchunks, exp_words, version, pos + meta


def header_size(blob: memoryview) -> int:
    """Bytes from a frame's start through its HeaderCRC (where the payload CRC's coverage begins),
    from its first HEADER_PROBE bytes or all of a shorter frame; CorruptDataError (UnsupportedError
    for an unknown version) where parse would refuse that much of the header."""
    return _fixed_header(blob[:HEADER_PROBE])[-1] + 4


def parse(blob: memoryview, verify: bool = True, size: int | None = None) -> Frame:
    """Parse and validate a frame; CorruptDataError on any inconsistency.

    Every size is checked against the frame's length before anything is allocated.  With verify,
    the payload CRC is checked too (the header CRC always is).  size: the frame's length when blob
    holds its header only (the payload lies elsewhere, e.g. on a GPU); verify must then be False.
    """
    have = len(blob)
    if size is None:
        size = have
    elif verify:
        raise UnsupportedError("a frame given by its header alone cannot have its payload verified")
    spec, mode, shape, n, chunk_log2, ntables, nchunks, exp_words, version, crc_at = _fixed_header(blob)
    pos = HEADER.size + 8 * len(shape)
    alphabet = spec.alphabet
    if have < crc_at + 4:
        raise CorruptDataError("blob truncated inside the header")
    (head_crc,) = struct.unpack_from("<I", blob, crc_at)
    if zlib.crc32(blob[:crc_at]) != head_crc:
        raise CorruptDataError("header checksum mismatch")
    exp_offset = align16(crc_at + 4)
    lengths = np.zeros((0, alphabet), np.uint8)
    chunk_tables = np.zeros(0, np.uint8)
    chunk_words = np.zeros(1, np.int64)
    if mode == MODE_CODED:
        packed = np.frombuffer(blob, np.uint8, ntables * alphabet // 2, pos).reshape(ntables, -1)
        lengths = np.empty((ntables, alphabet), np.uint8)
        lengths[:, 0::2], lengths[:, 1::2] = packed & 15, packed >> 4
        pos += packed.size
        chunk_tables = np.frombuffer(blob, np.uint8, nchunks, pos).copy()
        pos += nchunks
        starts = np.frombuffer(blob, "<u4", nchunks, pos).astype(np.int64)
        chunk_words = np.append(starts, exp_words)
        _check_tables(lengths, chunk_tables, chunk_words)
        raw_offset = align16(exp_offset + 4 * exp_words)
        raw_bytes = raw_plane_bytes(spec, n)
    else:
        raw_offset = exp_offset
        raw_bytes = n * spec.dtype.itemsize
    expected = raw_offset + raw_bytes + 4
    if size != expected:
        raise CorruptDataError(f"blob is {size} bytes; its header describes {expected}")
    frame = Frame(spec, mode, shape, n, chunk_log2, lengths, chunk_tables, chunk_words,
                  exp_offset, exp_words, raw_offset, raw_bytes, crc_at + 4, size,
                  head_crc if version >= 2 else 0)
    if verify:
        verify_payload(blob, frame)
    return frame


def _check_tables(lengths: np.ndarray, chunk_tables: np.ndarray, chunk_words: np.ndarray) -> None:
    from .tables import is_valid_lengths

    if chunk_words[0] != 0 or np.any(np.diff(chunk_words) < 0):
        raise CorruptDataError("chunk word offsets are not non-decreasing from 0")
    if chunk_tables.size and int(chunk_tables.max()) >= lengths.shape[0]:
        raise CorruptDataError("a chunk names a code table that does not exist")
    for t in range(lengths.shape[0]):
        if not is_valid_lengths(lengths[t], MAX_CODE_LEN) or not lengths[t].any():
            raise CorruptDataError(f"code table {t} is not a valid prefix code")


def verify_payload(blob: memoryview, frame: Frame) -> None:
    """Check the payload CRC (it covers the alignment padding too, and in v2 is seeded with the
    header CRC, so a payload only checks out under the header it was written with)."""
    end = frame.size - 4
    (crc,) = struct.unpack_from("<I", blob, end)
    if zlib.crc32(blob[frame.payload_offset : end], frame.payload_seed) != crc:
        raise CorruptDataError("payload checksum mismatch")
