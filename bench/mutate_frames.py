"""Frame mutations for bench/mutate.py: single ECF8 frames of all four dtypes, coded and stored.

Kinds whose checksums stay as they were must give ECF8Error (or, rarely, identical output).
``field_hdrcrc`` recomputes only the header checksum: a version-2 frame (payload checksum seeded
with the header checksum) must reject every such edit.  The ``*_allcrc`` and ``crafted_*`` kinds
recompute every checksum, so a frame that is valid after the edit may legitimately decode to
other data ("accepted", when its dtype and shape are what the header says); for them the campaign
checks only that nothing else happens (no other exception, hang, crash or memory blow-up).
The same holds for header-only edits of the version-1 golden frames (tests/golden/*.v1.ecf8), whose
payload checksum does not cover the header.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np

import ecf8
from ecf8.errors import ECF8Error
from ecf8.format import spec_for_name

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "golden"
HEADER = struct.Struct("<4sBBBBBBHIQ")
ALPHABET = {1: 256, 2: 32, 3: 256, 4: 32}
KINDS = ["bitflip", "bitflip_header", "byte_boundary", "truncate", "extend", "splice",
         "swap_payload_authentic", "header_payload_cross", "field_hdrcrc", "field_allcrc",
         "tables_allcrc", "chunks_allcrc", "payload_allcrc", "crafted_empty", "buffer_view"]
FORGED = {"field_allcrc", "tables_allcrc", "chunks_allcrc", "payload_allcrc", "crafted_empty"}
# A version-1 frame's payload checksum does not depend on its header: these edits of a v1 header
# cannot be detected by design (v2 detects them), so a consistent decode counts as "accepted".
V1_BLIND = {"header_payload_cross", "field_hdrcrc"}
BOUNDARY_BYTES = [0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF]
U64 = [0, 1, 2, 2**32, 2**40, 2**40 + 1, 2**63, 2**64 - 1]


def pick(rng, seq):
    """One element of a list (rng.choice would turn big ints into floats)."""
    return seq[int(rng.integers(len(seq)))]


def prepare(tmp, args):
    return None


def _weights(rng, n, dtype, spread=1.0):
    w = rng.standard_normal(n).astype(np.float32) * spread
    w *= 16 if np.dtype(dtype).itemsize == 1 else 0.02
    return w.astype(dtype)


def setup(_arg, workdir):
    """Base frames: (blob, original array), and pairs (i, j) of frames of equal payload size."""
    frames, pairs = [], []
    for d, dtype in enumerate([ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, ml_dtypes.bfloat16,
                               np.float16]):
        rng = np.random.default_rng(1000 + d)

        def add(x, **kw):
            frames.append((ecf8.encode(x, **kw), x))
            return len(frames) - 1

        # pairs: equal-length headers that differ (shape), payloads of equal size that differ
        a = _weights(rng, 2000, dtype)
        add(a, chunk_size=512, max_tables=4)
        i = add(a.reshape(40, 50), chunk_size=512, max_tables=4)
        j = add((-a).reshape(50, 40), chunk_size=512, max_tables=4)   # same exponents, other signs
        pairs.append((i, j))
        mixed = np.concatenate([_weights(rng, 700, dtype, s) for s in (1.0, 1e-2, 30.0)]).reshape(3, 700)
        add(mixed, chunk_size=512, max_tables=8)
        add(_weights(rng, 513, dtype), chunk_size=512, allow_stored=False)
        add(_weights(rng, 1, dtype), allow_stored=False)
        add(_weights(rng, 1, dtype).reshape(()), allow_stored=False)
        add(_weights(rng, 64, dtype).reshape(2, 1, 2, 1, 2, 1, 2, 4), chunk_size=512, allow_stored=False)
        bits = np.uint8 if np.dtype(dtype).itemsize == 1 else np.uint16
        r1 = rng.integers(0, 2**16, 300).astype(bits).view(dtype)
        r2 = rng.integers(0, 2**16, 300).astype(bits).view(dtype)
        add(r1)
        pairs.append((add(r1.reshape(10, 30)), add(r2.reshape(30, 10))))   # stored, equal sizes
        add(np.zeros(0, dtype))
        add(np.zeros((2, 0, 3), dtype))
        add(r1[:1].reshape(()))
        add(r1[:35].reshape(5, 7))
    for path in sorted(GOLDEN.glob("*.v1.ecf8")):      # version-1 frames stay decodable
        blob = path.read_bytes()
        frames.append((blob, ecf8.decode(blob)))
    return {"frames": frames, "pairs": pairs}


# ---------------------------------------------------------------------------------------------
# Frame layout arithmetic (FORMAT.md), tolerant of nonsense values


def crc_at(b: bytes | bytearray) -> int | None:
    """Where the header checksum of this (possibly edited) header lies, or None."""
    if len(b) < HEADER.size:
        return None
    _, _, dcode, mode, ndim, log2, ntables, _, _, n = HEADER.unpack_from(b)
    pos = HEADER.size + 8 * ndim
    if mode == 0:
        if log2 > 62:
            return None
        nchunks = -(-n // (1 << log2))
        pos += ntables * ALPHABET.get(dcode, 256) // 2 + 5 * nchunks
    return pos if pos + 4 <= len(b) else None


def payload_crc(b: bytes | bytearray, at: int) -> int:
    """The payload checksum this frame's version calls for (v2: seeded with the header's)."""
    head = struct.unpack_from("<I", b, at)[0]
    return zlib.crc32(bytes(b[at + 4 : len(b) - 4]), head if b[4] >= 2 else 0)


def fix_header_crc(b: bytearray, at: int | None) -> None:
    if at is not None:
        struct.pack_into("<I", b, at, zlib.crc32(bytes(b[:at])))


def fix_payload_crc(b: bytearray, at: int | None) -> None:
    if at is not None and len(b) >= at + 8:
        struct.pack_into("<I", b, len(b) - 4, payload_crc(b, at))


# ---------------------------------------------------------------------------------------------
# Mutations: each returns (mutated bytes, index of the base frame whose data counts as original)


def _pick(rng, state):
    i = int(rng.integers(len(state["frames"])))
    return i, bytearray(state["frames"][i][0])


def _header_end(b) -> int:
    at = crc_at(b)
    return at + 4 if at is not None else min(len(b), 64)


def m_bitflip(rng, state, header_only=False):
    i, b = _pick(rng, state)
    hi = _header_end(b) if header_only else len(b)
    for _ in range(int(rng.integers(1, 4))):
        pos = int(rng.integers(hi))
        b[pos] ^= 1 << int(rng.integers(8))
    return b, i


def m_byte_boundary(rng, state):
    i, b = _pick(rng, state)
    pos = int(rng.integers(len(b)))
    choices = [v for v in BOUNDARY_BYTES if v != b[pos]]
    b[pos] = int(pick(rng, choices))
    return b, i


def m_truncate(rng, state):
    i, b = _pick(rng, state)
    cut = int(pick(rng, [rng.integers(len(b)), rng.integers(min(len(b), 40)), len(b) - 1]))
    return b[:cut], i


def m_extend(rng, state):
    i, b = _pick(rng, state)
    k = int(pick(rng, [1, 4, 16, 100]))
    extra = bytes(k) if rng.random() < 0.5 else rng.integers(0, 256, k, dtype=np.uint8).tobytes()
    return b + extra, i


def m_splice(rng, state):
    i, a = _pick(rng, state)
    _, b = _pick(rng, state)
    return a[: int(rng.integers(len(a) + 1))] + b[int(rng.integers(len(b) + 1)):], i


def _split(b):
    at = crc_at(b)
    return b[: at + 4], b[at + 4 :]


def m_swap_payload_authentic(rng, state):
    """Header of one frame (with its own checksum) + payload of its partner (with its own)."""
    i, j = state["pairs"][int(rng.integers(len(state["pairs"])))]
    if rng.random() < 0.5:
        i, j = j, i
    ha, _ = _split(bytearray(state["frames"][i][0]))
    _, pb = _split(bytearray(state["frames"][j][0]))
    # the headers may differ in length (shape): keep the partner's padding to the 16-byte boundary
    pad = (-len(ha)) % 16
    hb_len = len(_split(bytearray(state["frames"][j][0]))[0])
    body = pb[(-hb_len) % 16 :]
    return ha + bytes(pad) + body, i


def m_header_payload_cross(rng, state):
    i, a = _pick(rng, state)
    _, b = _pick(rng, state)
    return _split(a)[0] + _split(b)[1], i


FIELDS = {  # name: (offset, struct format, boundary values or None for computed)
    "version": (4, "B", [0, 2, 3, 255]), "dtype": (5, "B", [0, 1, 2, 3, 4, 5, 255]),
    "mode": (6, "B", [0, 1, 2, 255]), "ndim": (7, "B", [0, 1, 7, 8, 9, 255]),
    "chunk_log2": (8, "B", [0, 8, 9, 10, 19, 20, 21, 63, 64, 255]),
    "ntables": (9, "B", [0, 1, 2, 7, 8, 9, 255]), "reserved": (10, "<H", [1, 0x8000, 0xFFFF]),
    "exp_words": (12, "<I", None), "numel": (16, "<Q", None), "extent": (24, "<Q", None),
}


def _edit_field(rng, b: bytearray) -> None:
    name = list(FIELDS)[int(rng.integers(len(FIELDS)))]
    off, f, values = FIELDS[name]
    cur = struct.unpack_from(f, b, off)[0] if len(b) >= off + struct.calcsize(f) else 0
    if name == "exp_words":
        values = [0, 1, max(cur - 1, 0), cur + 1, 2**31, 2**32 - 1]
    elif name == "numel":
        values = U64 + [max(cur - 1, 0), cur + 1]
    elif name == "extent":
        ndim = b[7]
        if ndim == 0:
            return _edit_field(rng, b)
        off = 24 + 8 * int(rng.integers(ndim))
        values = U64
    v = int(pick(rng, values)) % (1 << (8 * struct.calcsize(f)))
    if off + struct.calcsize(f) > len(b):
        return
    struct.pack_into(f, b, off, v)
    if name == "extent" and rng.random() < 0.5 and len(b) >= 24 + 8 * b[7]:
        dims = struct.unpack_from(f"<{b[7]}Q", b, 24)   # keep NumElements = product (mod 2**64)
        struct.pack_into("<Q", b, 16, math.prod(dims) % 2**64)


def m_field(rng, state, fix_payload):
    i, b = _pick(rng, state)
    for _ in range(int(pick(rng, [1, 1, 2]))):
        _edit_field(rng, b)
    at = crc_at(b)
    fix_header_crc(b, at)
    if fix_payload:
        fix_payload_crc(b, at)
    return b, i


def _coded(rng, state):
    coded = [k for k, (blob, _) in enumerate(state["frames"]) if blob[6] == 0]
    i = int(pick(rng, coded))
    return i, bytearray(state["frames"][i][0])


def m_tables(rng, state):
    """Code-length nibbles: random, all zero, all 1 (Kraft violation), 13..15."""
    i, b = _coded(rng, state)
    pos = 24 + 8 * b[7]
    size = b[9] * ALPHABET[b[5]] // 2
    t = int(rng.integers(b[9]))
    row = slice(pos + t * ALPHABET[b[5]] // 2, pos + (t + 1) * ALPHABET[b[5]] // 2)
    how = int(rng.integers(4))
    if how == 0:
        k = pos + int(rng.integers(size))
        b[k] = int(rng.integers(256))
    elif how == 1:
        b[row] = bytes(row.stop - row.start)
    elif how == 2:
        b[row] = b"\x11" * (row.stop - row.start)
    else:
        k = pos + int(rng.integers(size))
        b[k] = (b[k] & 0xF0) | int(rng.integers(13, 16))
    fix_all_crcs(b)
    return b, i


def fix_all_crcs(b: bytearray) -> None:
    """Recompute both checksums of an edited frame (as a hostile encoder would)."""
    at = crc_at(b)
    fix_header_crc(b, at)
    fix_payload_crc(b, at)


def m_chunks(rng, state):
    """Chunk table ids and chunk word offsets at boundary values."""
    i, b = _coded(rng, state)
    _, _, dcode, _, ndim, log2, ntables, _, words, n = HEADER.unpack_from(b)
    nchunks = -(-n // (1 << log2))
    ids = 24 + 8 * ndim + ntables * ALPHABET[dcode] // 2
    offs = ids + nchunks
    c = int(rng.integers(nchunks))
    if rng.random() < 0.4:
        b[ids + c] = int(pick(rng, [ntables, ntables - 1, 8, 255]))
    else:
        v = int(pick(rng, [0, 1, words, words + 1, 2**31, 2**32 - 1]))
        struct.pack_into("<I", b, offs + 4 * c, v)
    fix_all_crcs(b)
    return b, i


def m_payload(rng, state):
    """Random payload bytes (exponent words, raw plane, padding), payload checksum recomputed."""
    i, b = _pick(rng, state)
    at = crc_at(b)
    lo, hi = at + 4, len(b) - 4
    if hi <= lo:
        return m_field(rng, state, True)
    for _ in range(int(pick(rng, [1, 4, 64]))):
        b[int(rng.integers(lo, hi))] = int(rng.integers(256))
    fix_payload_crc(b, at)
    return b, i


def m_crafted_empty(rng, state):
    """A well-formed stored frame with 0 elements whose other extents are huge (all checksums valid)."""
    i, base = _pick(rng, state)
    version, dcode = base[4], base[5]
    ndim = int(rng.integers(1, 9))
    dims = [int(pick(rng, U64 + [3])) for _ in range(ndim)]
    dims[int(rng.integers(ndim))] = 0
    head = bytearray(HEADER.pack(b"ECF8", version, dcode, 1, ndim, 0, 0, 0, 0, 0))
    head += struct.pack(f"<{ndim}Q", *dims)
    head += struct.pack("<I", zlib.crc32(bytes(head)))
    b = head + bytes(-len(head) % 16) + bytes(4)
    fix_payload_crc(b, len(head) - 4)
    return b, i


def m_buffer_view(rng, state):
    """A base frame unchanged (run_case may flip a bit and passes it as another buffer type)."""
    i, b = _pick(rng, state)
    return b, i


MUTATORS = {
    "bitflip": m_bitflip, "bitflip_header": lambda r, s: m_bitflip(r, s, True),
    "byte_boundary": m_byte_boundary, "truncate": m_truncate, "extend": m_extend,
    "splice": m_splice, "swap_payload_authentic": m_swap_payload_authentic,
    "header_payload_cross": m_header_payload_cross,
    "field_hdrcrc": lambda r, s: m_field(r, s, False), "field_allcrc": lambda r, s: m_field(r, s, True),
    "tables_allcrc": m_tables, "chunks_allcrc": m_chunks, "payload_allcrc": m_payload,
    "crafted_empty": m_crafted_empty, "buffer_view": m_buffer_view,
}

VIEWS = ["bytes", "bytearray", "uint8", "uint8 strided", "uint8 2-d", "memoryview",
         "memoryview strided", "memoryview 2-d"]


def as_view(blob: bytes, how: str):
    """The same bytes as another buffer type (what callers may pass to ecf8.decode)."""
    u = np.frombuffer(blob, np.uint8)
    return {"bytes": lambda: blob, "bytearray": lambda: bytearray(blob), "uint8": lambda: u,
            "uint8 strided": lambda: np.repeat(u, 2)[::2], "uint8 2-d": lambda: u.reshape(1, -1),
            "memoryview": lambda: memoryview(blob),
            "memoryview strided": lambda: memoryview(np.repeat(u, 2))[::2],
            "memoryview 2-d": lambda: memoryview(blob).cast("B", (1, len(blob)))}[how]()
assert list(MUTATORS) == KINDS


def _mutate(state, seed, case):
    kind = KINDS[case % len(KINDS)]
    rng = np.random.default_rng([seed, 1, case])
    blob, base = MUTATORS[kind](rng, state)
    return kind, bytes(blob), base


def mutated_input(state, seed, case) -> bytes:
    return _mutate(state, seed, case)[1]


def run_case(state, seed, case):
    kind, blob, base = _mutate(state, seed, case)
    view = blob
    if kind == "buffer_view":           # a valid frame (or one bit flipped) in another container
        rng = np.random.default_rng([seed, 5, case])
        if rng.random() < 0.3:
            b = bytearray(blob)
            b[int(rng.integers(len(b)))] ^= 1 << int(rng.integers(8))
            blob = bytes(b)
        view = as_view(blob, pick(rng, VIEWS))
    for i, (other, _) in enumerate(state["frames"]):    # (a splice can rebuild another base frame)
        if blob == other:
            base = i
    original = state["frames"][base][1]
    try:
        meta = ecf8.info(view)
    except ECF8Error:
        meta = None
    except MemoryError:
        raise
    except Exception as e:
        return f"other:{type(e).__name__}", f"ecf8.info: {type(e).__name__}: {e}"[:300]
    try:
        y = ecf8.decode(view)
    except ECF8Error as e:
        return "ECF8Error", str(e)[:300]
    except MemoryError:
        raise
    except Exception as e:
        return f"other:{type(e).__name__}", f"ecf8.decode: {type(e).__name__}: {e}"[:300]
    if meta is None:
        return "DIFFERENT", "ecf8.info refused a frame that ecf8.decode accepted"
    if (y.dtype == original.dtype and y.shape == original.shape
            and np.ascontiguousarray(y).tobytes() == np.ascontiguousarray(original).tobytes()):
        return "identical", ""
    consistent = y.shape == tuple(meta.shape) and y.dtype == spec_for_name(meta.dtype).dtype
    if consistent and (kind in FORGED or (kind in V1_BLIND and state["frames"][base][0][4] == 1)):
        return "accepted", f"{meta.dtype} {meta.shape}"
    if y.dtype == original.dtype and y.shape == original.shape:
        diff = int(np.sum(np.ascontiguousarray(y).view(np.uint8) != np.ascontiguousarray(original).view(np.uint8)))
        what = f"decoded {y.dtype} {y.shape} like the original, {diff} bytes differ"
    else:
        what = f"decoded {y.dtype} {y.shape} instead of {original.dtype} {original.shape}"
    return "DIFFERENT", what + ("" if consistent else " (not what its header says)")
