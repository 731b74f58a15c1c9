"""Reference encoder: NumPy only, vectorized over chunks and lanes, bounded extra memory."""

from __future__ import annotations

import struct
import sys
import zlib

import numpy as np

from . import format as fmt
from .errors import UnsupportedError
from .table_choice import assign_tables
from .tables import canonical_codes

__all__ = ["encode", "check_args", "reject_framework_tensor", "decode_chunk_size", "on_cuda",
           "native_order"]

BATCH_ELEMENTS = 1 << 19   # elements coded per pass; bounds the encoder's working memory


_ADAPTERS = {"torch": ("torch tensor", "ecf8.torch.encode / ecf8.torch.save_file"),
             "jax": ("JAX array", "ecf8.jax.encode"), "jaxlib": ("JAX array", "ecf8.jax.encode"),
             "cupy": ("CuPy array", "ecf8.cupy.encode")}


def reject_framework_tensor(x: object, name: str | None = None) -> None:
    """UnsupportedError naming the adapter to use when x is a torch/JAX/CuPy array, not NumPy."""
    known = _ADAPTERS.get(type(x).__module__.partition(".")[0])
    if known is not None:
        where = f"tensor {name!r}: " if name else ""
        raise UnsupportedError(f"{where}ecf8 takes NumPy arrays here, not a {known[0]}: use {known[1]}")


def decode_chunk_size(n: int) -> int:
    """The chunk size that decodes a tensor of n elements fastest on a GPU at little cost in size:
    the largest power of two <= n / 4096, clamped to 4096..32768.

    One warp decodes one chunk and an H200 holds ~5,300 decoding warps, so a tensor needs about
    4096 chunks to fill the GPU.  Measured on the H200 with decoder v7 (bench/NOTES.md, two
    bench_tax runs): a 14336x4096 E4M3 weight decoded in 52.0 / 54.6 us at chunk 8192 (6.81
    bits/w) and 53.6 / 55.2 us at 4096 (6.89), against 63.1 / 66.0 us at 32768 (6.75); 256 M
    elements took 184.7-185.8 us at 32768 against 188.7-190.2 at 16384.
    """
    per_chunk = n >> 12
    size = 1 << (per_chunk.bit_length() - 1) if per_chunk else 1
    return min(max(size, 4096), 32768)


def check_args(shape: tuple[int, ...], chunk_size: int, max_tables: int) -> None:
    """UnsupportedError unless a frame can hold this shape with these options (both encoders and
    the codecs check with this)."""
    if chunk_size & (chunk_size - 1) or not (1 << fmt.MIN_CHUNK_LOG2) <= chunk_size <= (1 << fmt.MAX_CHUNK_LOG2):
        raise UnsupportedError(f"chunk_size must be a power of two from 512 to 2**20, not {chunk_size}")
    if not 1 <= max_tables <= fmt.MAX_TABLES:
        raise UnsupportedError(f"max_tables must be 1..{fmt.MAX_TABLES}, not {max_tables}")
    if np.prod([max(d, 1) for d in shape], dtype=object) > fmt.MAX_ELEMENTS:
        raise UnsupportedError("ecf8 codes at most 2**40 elements per frame (and shapes whose "
                               "non-zero extents multiply to at most 2**40)")
    if len(shape) > fmt.MAX_NDIM:
        raise UnsupportedError(f"ecf8 codes at most {fmt.MAX_NDIM} dimensions, not {len(shape)}")


def native_order(x: np.ndarray) -> np.ndarray:
    """x with its elements in this machine's byte order: the same values, converted (a copy) when
    stored the other way round (a big-endian '>f2' or '>u2' array, say); x itself otherwise.
    Every path into a frame or a file goes through this, so that no element is read byte-swapped."""
    return x if x.dtype.isnative else x.astype(x.dtype.newbyteorder("="))


def encode(x: np.ndarray, *, chunk_size: int | None = 32768, max_tables: int = 4,
           allow_stored: bool = True, dtype=None, stream=None) -> bytes:
    """Compress a host array losslessly into one ECF8 frame (``ecf8.encode`` also takes CUDA
    arrays, encoded on their GPU by ``ecf8.encoder_cuda``).

    x: any shape (0-d and empty too), contiguous or not, of dtype float8_e4m3fn, float8_e5m2,
    bfloat16 or float16 (either byte order: frames are little-endian, values are kept).  chunk_size: elements per independently decodable chunk, a power of two
    from 512 to 2**20, or None for ``decode_chunk_size(x.size)`` (GPU decoding speed over size).
    max_tables: code tables the chunks may choose among, 1 to 8.
    allow_stored: store the elements raw (mode 1) when coding would not make them smaller; with
    False every non-empty tensor is entropy coded.  dtype, stream: CUDA arrays only.
    Raises UnsupportedError for another dtype, a torch/JAX/CuPy array or a bad option.
    """
    reject_framework_tensor(x)
    if dtype is not None or stream is not None:
        raise UnsupportedError("dtype= and stream= apply to CUDA arrays only")
    x = native_order(np.asarray(x))            # (big-endian float16: the same values)
    spec = fmt.spec_for_dtype(x.dtype)
    if chunk_size is None:
        chunk_size = decode_chunk_size(x.size)
    check_args(x.shape, chunk_size, max_tables)
    u = np.ascontiguousarray(x).reshape(-1).view(spec.uint)
    if u.size:
        frame = _encode_coded(u, spec, tuple(x.shape), chunk_size.bit_length() - 1, max_tables)
        if not allow_stored or len(frame) < u.nbytes:
            return frame
    return _encode_stored(u, spec, tuple(x.shape))


def on_cuda(x) -> bool:
    """Whether x is an array in CUDA device memory (DLPack device kDLCUDA / kDLCUDAManaged, or
    __cuda_array_interface__), without importing any GPU library."""
    if isinstance(x, np.ndarray):
        return False
    device = getattr(x, "__dlpack_device__", None)
    if device is not None:
        try:
            return device()[0] in (2, 13)
        except Exception:  # noqa: BLE001 - a device we cannot ask is not a CUDA device
            return False
    try:
        return hasattr(x, "__cuda_array_interface__")
    except Exception:  # noqa: BLE001 - torch raises TypeError for dtypes CAI cannot express
        return False


def _encode_stored(u: np.ndarray, spec: fmt.DtypeSpec, shape: tuple[int, ...]) -> bytes:
    head = fmt.build_header(spec, fmt.MODE_STORED, shape, 0, None, None, None, 0)
    body = bytes(fmt.align16(len(head)) - len(head)) + u.astype(u.dtype.newbyteorder("<")).tobytes()
    return head + body + struct.pack("<I", zlib.crc32(body, fmt.header_crc(head)))


def split_fields(u: np.ndarray, spec: fmt.DtypeSpec) -> tuple[np.ndarray, np.ndarray]:
    """(exponent fields as uint8, raw values sign << M | mantissa) of an element-bits array."""
    m = spec.man_bits
    exp = ((u >> m) & ((1 << spec.exp_bits) - 1)).astype(np.uint8)
    raw = ((u >> (spec.exp_bits + m)) << m) | (u & ((1 << m) - 1))
    return exp, raw


def pack_raw(raw: np.ndarray, spec: fmt.DtypeSpec) -> np.ndarray:
    """Dense little-endian bit packing of R-bit raw values, padded to 16-element runs (uint8)."""
    r = spec.raw_bits
    n = raw.size
    padded = np.zeros(-(-n // fmt.LANE_RUN) * fmt.LANE_RUN, dtype=raw.dtype)
    padded[:n] = raw
    if r == 4:
        return (padded[0::2] | (padded[1::2] << 4)).astype(np.uint8)
    if r == 8:
        return padded.astype(np.uint8)
    bits = np.unpackbits(padded.astype("<u2").view(np.uint8).reshape(-1, 2), axis=1, bitorder="little")
    return np.packbits(bits[:, :r].reshape(-1), bitorder="little")


def symbols(x: np.ndarray, spec: fmt.DtypeSpec) -> np.ndarray:
    """Code symbols (uint8) of element bits x: per_symbol consecutive exponent fields, the first
    in the low bits.  x.size must be a multiple of per_symbol."""
    if spec.per_symbol == 2 and sys.byteorder == "little":   # E4M3: straight from element pairs
        v = x.view(np.uint16)
        return (((v >> 3) & 0x0F) | ((v >> 7) & 0xF0)).astype(np.uint8)
    exp, _ = split_fields(x, spec)
    if spec.per_symbol == 1:
        return exp
    return exp[0::2] | (exp[1::2] << spec.exp_bits)


def _encode_coded(u, spec, shape, chunk_log2, max_tables):
    n, chunk, per = u.size, 1 << chunk_log2, spec.per_symbol
    nchunks = -(-n // chunk)
    # Padding of the last 512-element group repeats the last chunk's most common exponent.
    tail_exp, _ = split_fields(u[(nchunks - 1) * chunk :], spec)
    pad = spec.uint(int(np.argmax(np.bincount(tail_exp))) << spec.man_bits)
    step = max(chunk, BATCH_ELEMENTS // chunk * chunk)

    def batches():
        """(first chunk, element bits padded to whole groups, real element count) per batch."""
        for lo in range(0, n, step):
            x = u[lo : lo + step]
            m = x.size
            padded = -(-m // fmt.GROUP) * fmt.GROUP
            if padded != m:
                x = np.concatenate([x, np.full(padded - m, pad, spec.uint)])
            yield lo // chunk, x, m

    hist = np.zeros((nchunks, spec.alphabet), np.int64)
    for first, x, _ in batches():
        local = -(-x.size // chunk)
        rows = symbols(x, spec)
        for c in range(local):
            hist[first + c] = np.bincount(rows[c * (chunk // per) : (c + 1) * (chunk // per)],
                                          minlength=spec.alphabet)
    lengths, chunk_tables = assign_tables(hist, max_tables, (1 << spec.exp_bits) - 1)
    codes = np.stack([canonical_codes(l) for l in lengths])

    words, starts, raw_parts = [], [], []
    base = 0
    for first, x, m in batches():
        raw_parts.append(pack_raw(split_fields(x[:m], spec)[1], spec))
        sym = symbols(x, spec)
        for count, groups in fmt.chunk_groups(x.size, chunk_log2):
            k = count * groups * fmt.GROUP // per
            lanes = sym[:k].reshape(count, groups, fmt.LANES, fmt.LANE_RUN // per)
            sym = sym[k:]
            lanes = lanes.transpose(0, 2, 1, 3).reshape(count, fmt.LANES, -1)
            w, s = _pack_lanes(lanes, chunk_tables[first : first + count], codes, lengths)
            words.append(w.astype("<u4", copy=False))
            starts.append(s + base)
            base += w.size
            first += count
    if base >= 1 << 32:
        raise UnsupportedError("exponent stream exceeds 2**32 words; use a smaller tensor")
    head = fmt.build_header(spec, fmt.MODE_CODED, shape, chunk_log2, lengths, chunk_tables,
                            np.concatenate(starts), base)
    # One join writes the frame: each section is copied once, straight into the result.
    payload = [bytes(fmt.align16(len(head)) - len(head)), *words,
               bytes(fmt.align16(4 * base) - 4 * base), *raw_parts]
    crc = fmt.header_crc(head)
    for part in payload:
        crc = zlib.crc32(part, crc)
    return b"".join([head, *payload, struct.pack("<I", crc)])


def _pack_lanes(sym, tid, codes, lens):
    """Code one run of equal-size chunks.

    sym: (B, 32, S) lane symbol streams, S even; tid: (B,) table ids; codes, lens: (K, A) code
    values and lengths.  Returns (words uint32, start word of each chunk relative to the run).
    Bits are written most-significant first, each lane's stream starting on a word boundary; words
    are ordered as the decoder's warp loads them (FORMAT.md §6).
    """
    b, lanes, s = sym.shape
    packed = (codes.astype(np.uint32) << 8) | lens.astype(np.uint32)     # code << 8 | length
    entry = packed.reshape(-1)[(tid.astype(np.int32) * codes.shape[1])[:, None, None] + sym]
    # Merge each check step's two codes into one (<= 24 bits); the schedule works per step.
    e0, e1 = entry[:, :, 0::2], entry[:, :, 1::2]
    l1 = e1 & 0xFF
    ln = ((e0 & 0xFF) + l1).astype(np.int32)                              # (B, 32, steps)
    cd = (((e0 >> 8) << l1) | (e1 >> 8)).astype(np.uint64)
    end = np.cumsum(ln, axis=2, dtype=np.int32)
    start = end - ln                                                      # bits before each step
    lane_words = (end[:, :, -1] + 31) >> 5                                # data words per lane
    lane_base = np.cumsum(lane_words.reshape(-1)) - lane_words.reshape(-1)
    off = start & 31
    word = (start >> 5) + lane_base.reshape(b, lanes, 1).astype(np.int32)
    val = (cd << (64 - off - ln).astype(np.uint64)).reshape(-1)           # 64-bit window at `word`
    prev = np.empty_like(ln)
    prev[:, :, 0] = 32
    prev[:, :, 1:] = ln[:, :, :-1]
    seg = np.flatnonzero(off < prev)       # first step starting in its word (or in its lane)
    acc = np.zeros(int(lane_words.sum()), np.uint64)
    acc[word.reshape(-1)[seg]] = np.add.reduceat(val, seg)
    data = (acc >> np.uint64(32)).astype(np.uint32)
    data[1:] |= acc[:-1].astype(np.uint32)
    # Refill schedule: before each step a lane holding fewer than 24 bits loads one word, so the
    # words loaded after step t's check number (start + 23) // 32 + 1.
    loaded = ((start + (fmt.REFILL_THRESHOLD - 1)) >> 5) + 1
    loads = np.empty_like(loaded)
    loads[:, :, 0] = 1
    np.subtract(loaded[:, :, 1:], loaded[:, :, :-1], out=loads[:, :, 1:])
    order = loads.transpose(0, 2, 1).reshape(b, -1)                       # warp order: (step, lane)
    slot = (np.cumsum(order, axis=1, dtype=np.int32) - 1).reshape(b, -1, lanes).transpose(0, 2, 1)
    real = (loads == 1) & (loaded <= lane_words[:, :, None])
    count = (np.where(real, slot, -1).reshape(b, -1).max(axis=1) + 1).astype(np.int64)
    chunk_base = np.cumsum(count) - count
    pos = (slot + chunk_base[:, None, None].astype(np.int32))[real]       # (chunk, lane, word) order
    out = np.zeros(int(count.sum()), np.uint32)
    out[pos] = data
    return out, chunk_base
