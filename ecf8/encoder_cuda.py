"""CUDA encoder: frames byte-identical to ``ecf8.encoder.encode``, built where the weights are.

    t = ecf8.encoder_cuda.encode(cupy_array)              # float16, or bits with dtype="e4m3"/...
    y = ecf8.decode(t, device="cuda")                     # t is a DeviceTensor: decode directly
    blob = t.tobytes()                                    # the frame on the host

Pipeline (kernels in ``cuda/ecf8_encode.cu``, all on the caller's stream):

1. per-chunk symbol histograms on the GPU; the tables are chosen by the CPU encoder's own
   ``encoder.assign_tables``, so both encoders choose identically by construction.  When that is
   ``table_choice.assign_tables`` (exact arithmetic), its large products run on the GPU
   (``DeviceProducts``) and only small arrays cross to the host; for any other rule the
   histograms (``nchunks x alphabet`` counts) are copied to the host and it runs there;
2. one warp per chunk replays the decoder's load schedule and counts each chunk's words; the host
   reads the counts back (the frame size, the coded/stored decision and the header need them) and
   builds the header with ``format.build_header``;
3. the same replay writes the exponent words and the raw plane into the device frame, and a
   parallel CRC-32 writes the payload checksum.

So an encode synchronises with the host during 1 (once, or about twice per k-means iteration with
the exact rule) and after 2; the frame is complete once ``stream`` reaches it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator

import numpy as np

from . import crc32
from . import decoder_cuda as dc
from . import encoder as cpu_encoder
from . import format as fmt
from . import gpu, names, table_choice
from .errors import UnsupportedError
from .tables import canonical_codes

__all__ = ["EncodedTensor", "encode", "encode_to_bytes"]

TILE_LOG2 = 14                  # elements per histogram block (ECF8_TILE_LOG2 in the kernel)
CODE_WARPS = 8                  # chunks (warps) per coding block at most
CRC_PIECE, CRC_WARP = 256, 256 * 32
_KINDS = {code: spec.kernel_args for code, spec in fmt.DTYPES.items()}
KERNEL_NAMES = ([f"ecf8_hist<{k}>" for k in _KINDS.values()]
                + [f"ecf8_code<{k}, {w}>" for k in _KINDS.values() for w in ("false", "true")]
                + ["ecf8_crc", "ecf8_crc_final"])

_consts: dict[int, Any] = {}


def _compile(device_id: int):
    """The encoder's kernels for a device (NVRTC)."""
    cupy = gpu.cupy()
    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(code=gpu.kernel_source("ecf8_encode.cu"), options=("-std=c++17",),
                                name_expressions=KERNEL_NAMES)
        module.compile()
    return module


KERNELS = gpu.KernelCache(_compile)       # the encoder's, per device


# --- host-side pieces (pure NumPy; tests/test_encoder_cuda.py checks them without a GPU) ---------

def crc_constants() -> np.ndarray:
    """The CRC kernel's constants (u32): 4 slicing tables of 256, x^(2^k) mod P for k < 32, and
    x^(8 * 256 * 2^k) mod P for the 5 levels of the warp tree."""
    t0 = np.zeros(256, np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (crc32.POLY if c & 1 else 0)
        t0[i] = c
    tables = [t0]
    for _ in range(3):
        prev = tables[-1]
        tables.append((prev >> 8) ^ t0[prev & 0xFF])
    levels = [crc32.zeros(CRC_PIECE << k) for k in range(5)]
    return np.concatenate([*tables, np.array(crc32.X2N + levels, np.uint32)]).astype(np.uint32)


def padding(last_row: np.ndarray, last_bits: int, spec: fmt.DtypeSpec, n: int, chunk_log2: int
            ) -> tuple[np.ndarray, int]:
    """What the last group's padding adds to the last chunk's histogram, exactly as encoder.py
    pads: elements whose exponent is the last chunk's most common one, raw bits zero.

    last_row: (A,) the last chunk's counts of symbols made of real elements only; last_bits: the
    last element's bits.  Returns ((A,) int64 counts to add, padding element bits).
    """
    a, per, e = spec.alphabet, spec.per_symbol, spec.exp_bits
    last_exp = (last_bits >> spec.man_bits) & ((1 << e) - 1)
    tail = np.asarray(last_row, np.int64)
    if per == 2:
        grid = tail.reshape(1 << e, 1 << e)         # [high field, low field]
        fields = grid.sum(0) + grid.sum(1)
        if n % 2:
            fields[last_exp] += 1
    else:
        fields = tail
    pad = int(np.argmax(fields))
    real = n - (((n - 1) >> chunk_log2) << chunk_log2)
    missing = -(-real // fmt.GROUP) * fmt.GROUP - real
    delta = np.zeros(a, np.int64)
    if per == 2:
        if n % 2:
            delta[last_exp | pad << e] += 1
            missing -= 1
        delta[pad | pad << e] += missing // 2
    else:
        delta[pad] += missing
    return delta, pad << spec.man_bits


def finish_histogram(raw: np.ndarray, spec: fmt.DtypeSpec, n: int, chunk_log2: int
                     ) -> tuple[np.ndarray, int]:
    """The CPU encoder's per-chunk histograms from the kernel's.

    raw: (nchunks * A + 1) u32: counts of the symbols made of real elements only, then the last
    element's bits.  Returns (hist (nchunks, A) int64 with the padding added, padding element bits).
    """
    a = spec.alphabet
    nchunks = -(-n // (1 << chunk_log2))
    hist = raw[: nchunks * a].astype(np.int64).reshape(nchunks, a)
    delta, pad = padding(hist[-1], int(raw[nchunks * a]), spec, n, chunk_log2)
    hist[-1] += delta
    return hist, pad


class DeviceProducts:
    """table_choice's exact products over device histograms ((nchunks, A) CuPy float64 counts):
    cuBLAS float64 products of integers below 2**53 are exact, so they equal the host's."""

    def __init__(self, hist):
        self.hist = hist
        self.nchunks, self.alphabet = hist.shape
        self._present = None

    def mean_parts(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cupy = gpu.cupy()
        parts = cupy.stack([self.hist @ cupy.asarray(weights.astype(np.float64)), self.hist.sum(1)]).get()
        return parts[0].astype(np.int64), parts[1].astype(np.int64)

    def sums(self, assign: np.ndarray, k: int) -> np.ndarray:
        cupy = gpu.cupy()
        a = cupy.asarray(assign.astype(np.int32))
        onehot = (a[None, :] == cupy.arange(k, dtype=np.int32)[:, None]).astype(np.float64)
        return (onehot @ self.hist).get().astype(np.int64)

    def costs(self, per_symbol: np.ndarray) -> np.ndarray:
        return (self.hist @ gpu.cupy().asarray(per_symbol).T).get()

    def missing(self, absent: np.ndarray) -> np.ndarray:
        cupy = gpu.cupy()
        if self._present is None:
            self._present = (self.hist > 0).astype(np.float64)
        return ((self._present @ cupy.asarray(absent).T) > 0).get()


def code_entries(lengths: np.ndarray) -> np.ndarray:
    """(K * A,) u32 kernel table entries ``code << 8 | length`` of code-length tables (K, A)."""
    codes = np.stack([canonical_codes(l) for l in lengths]).astype(np.uint32)
    return ((codes << 8) | lengths.astype(np.uint32)).reshape(-1)


def parse_header(head: bytes, size: int) -> fmt.Frame:
    """fmt.parse of a frame of `size` bytes whose payload is not on the host, from its header."""
    return fmt.parse(memoryview(head), verify=False, size=size)


# --- the result ----------------------------------------------------------------------------------

@dataclasses.dataclass
class EncodedTensor(dc.DeviceTensor):
    """A frame encoded on a GPU: a ``DeviceTensor`` (decode it directly) whose ``payload`` holds
    the frame bytes; complete once ``stream`` reaches the end of the encode."""

    stream: Any = None

    @property
    def frame_bytes(self) -> int:
        """Length of the frame in bytes."""
        return self.frame.size

    def tobytes(self) -> bytes:
        """The frame on the host (waits for the encode to finish)."""
        return self.payload.get(stream=self.stream).tobytes()

    to_bytes = tobytes

    def __bytes__(self) -> bytes:
        return self.tobytes()


# --- encoding ------------------------------------------------------------------------------------

def _spec_of(arr: Any, dtype: Any) -> fmt.DtypeSpec:
    if dtype is not None:
        return names.dtype_spec(dtype)
    if np.dtype(arr.dtype) == np.float16:
        return fmt.spec_for_dtype(np.float16)
    raise UnsupportedError(f"say which type the {arr.dtype} bits hold: dtype='e4m3', 'e5m2', 'bf16' "
                           "or 'fp16' (any spelling of ecf8.names)")


def _as_cupy(x: Any, dtype: Any):
    """(CuPy array of x's elements, spec, logical shape) for a CUDA array of any kind."""
    cupy = gpu.cupy()
    if isinstance(x, dc.CudaArray):
        return x.bits.reshape(x.shape), _spec_of(x, dtype if dtype is not None else x.dtype), x.shape
    if not isinstance(x, cupy.ndarray):
        try:
            if hasattr(x, "__cuda_array_interface__"):
                x = cupy.asarray(x)
            elif hasattr(x, "__dlpack__"):
                x = cupy.from_dlpack(x)
            else:
                raise TypeError(type(x).__name__)
        except Exception as e:  # noqa: BLE001 - any import failure means: not a usable CUDA array
            raise UnsupportedError(f"encode on the GPU needs a CUDA array (CuPy, __cuda_array_interface__ "
                                   f"or DLPack; float8/bfloat16 as uint8/uint16 bit views): {e}") from None
    spec = _spec_of(x, dtype)
    if x.dtype.itemsize != spec.bits // 8 or x.dtype.kind not in "uif":
        raise UnsupportedError(f"a {x.dtype} array cannot hold {spec.name} elements")
    return x, spec, tuple(x.shape)


def encode(x: Any, *, dtype: Any = None, chunk_size: int | None = 32768, max_tables: int = 4,
           allow_stored: bool = True, stream: Any = None) -> EncodedTensor:
    """Compress a CUDA array on its GPU into the frame ``ecf8.encode`` makes of the same elements.

    x: a CuPy array, ``CudaArray``, or any CUDA array with ``__cuda_array_interface__`` or DLPack
    (any shape, strided too).  dtype: what its elements are when its dtype does not say (uint8 /
    uint16 / int16 bit views of float8 or bfloat16), any spelling of ``ecf8.names`` ('e4m3',
    'F8_E4M3', 'bfloat16', a NumPy/ml_dtypes or torch dtype, ...); float16 arrays need none.
    chunk_size, max_tables, allow_stored: as ``ecf8.encode``.  stream: the CUDA stream (None:
    CuPy's current one; a CuPy stream, an int handle or an object with ``__cuda_stream__``).
    Returns an ``EncodedTensor``: decodable in place (``ecf8.decode(t, device="cuda")``),
    ``tobytes()`` for the host bytes.  Device memory: the frame, plus during the table choice the
    histograms (nchunks x alphabet u32; with the exact rule two float64 copies besides).
    Raises UnsupportedError for other inputs or options.
    """
    with _encoding(x, dtype, chunk_size, max_tables, allow_stored, stream) as (frame_d, head, dev, st):
        return dc.resident(parse_header(head, frame_d.size), dev, frame_d, EncodedTensor, stream=st)


def encode_to_bytes(x: Any, *, dtype: Any = None, chunk_size: int | None = 32768, max_tables: int = 4,
                    allow_stored: bool = True, stream: Any = None) -> bytes:
    """``encode(x, ...).tobytes()`` (the same arguments and errors), without building the decoder's
    index and tables on the GPU: for callers that only store the frame.  Waits for the encode."""
    with _encoding(x, dtype, chunk_size, max_tables, allow_stored, stream) as (frame_d, _, _, st):
        return frame_d.get(stream=st).tobytes()


@contextlib.contextmanager
def _encoding(x: Any, dtype: Any, chunk_size: int | None, max_tables: int, allow_stored: bool,
              stream: Any) -> Iterator[tuple]:
    """(frame bytes on the GPU (CuPy uint8, complete once the stream reaches them), header bytes,
    device id, CuPy stream) of x's frame, inside that device's and stream's context."""
    cupy = gpu.cupy()
    arr, spec, shape = _as_cupy(x, dtype)
    n = math.prod(shape)
    if chunk_size is None:
        chunk_size = cpu_encoder.decode_chunk_size(n)
    cpu_encoder.check_args(shape, chunk_size, max_tables)
    dev = arr.device.id
    with cupy.cuda.Device(dev):
        st = gpu.stream(stream)
        with st:
            u = arr.reshape(-1).view(spec.uint)
            if not u.flags.c_contiguous or u.data.ptr % 16:
                u = cupy.ascontiguousarray(u)
                if u.data.ptr % 16:
                    u = u.copy()
            u = u.reshape(-1)
            made = None
            if n:
                made = _encode_coded(u, spec, shape, n, chunk_size.bit_length() - 1, max_tables,
                                     allow_stored, dev, st)
            if made is None:
                made = _encode_stored(u, spec, shape, n, dev, st)
            yield made + (dev, st)


def _alloc_frame(size: int):
    """Device bytes for a frame (readable a little past its end, as the CRC kernel needs)."""
    cupy = gpu.cupy()
    return cupy.empty(fmt.align16(size) + 16, np.uint8)


def _finish(buf, head: bytes, size: int, dev: int, st) -> tuple:
    """Write the header and the payload CRC; (the frame's bytes on the GPU, head)."""
    cupy = gpu.cupy()
    buf[: len(head)].set(np.frombuffer(head, np.uint8), stream=st)
    consts = _consts.get(dev)
    if consts is None:
        consts = _consts[dev] = cupy.asarray(crc_constants())
    acc = cupy.zeros(1, np.uint32)
    begin, end = len(head), size - 4
    vlen = -(-(end - begin) // CRC_WARP) * CRC_WARP
    if vlen:
        KERNELS.function(dev, "ecf8_crc")((-(-(vlen // CRC_PIECE) // 256),), (256,),
                                          (buf, np.uint64(begin), np.uint64(end), consts, acc))
    KERNELS.function(dev, "ecf8_crc_final")((1,), (32,), (buf, np.uint64(begin), np.uint64(end), consts,
                                                           acc, np.uint32(fmt.header_crc(head))))
    return buf[:size], head


def _encode_stored(u, spec: fmt.DtypeSpec, shape: tuple, n: int, dev: int, st) -> tuple:
    head = fmt.build_header(spec, fmt.MODE_STORED, shape, 0, None, None, None, 0)
    raw_at = fmt.align16(len(head))
    size = raw_at + n * spec.bits // 8 + 4
    buf = _alloc_frame(size)
    buf[len(head) : raw_at] = 0
    if n:
        buf[raw_at : size - 4] = u.view(np.uint8)
    return _finish(buf, head, size, dev, st)


def _encode_coded(u, spec: fmt.DtypeSpec, shape: tuple, n: int, chunk_log2: int, max_tables: int,
                  allow_stored: bool, dev: int, st) -> tuple | None:
    """The coded frame (as _finish), or None when allow_stored and it would not be smaller than
    the input."""
    cupy = gpu.cupy()
    kind = _KINDS[spec.code]
    a = spec.alphabet
    nchunks = -(-n // (1 << chunk_log2))
    # 1. histograms -> host -> tables (the CPU encoder's own choice)
    hist_d = cupy.zeros(nchunks * a + 1, np.uint32)
    subs = 1 if chunk_log2 >= TILE_LOG2 else 1 << (TILE_LOG2 - chunk_log2)
    KERNELS.function(dev, f"ecf8_hist<{kind}>")(
        (-(-n // (1 << TILE_LOG2)),), (256,),
        (u, np.uint64(n), np.uint32(chunk_log2), np.uint64(nchunks), hist_d), shared_mem=subs * a * 4)
    field_mask = (1 << spec.exp_bits) - 1
    if cpu_encoder.assign_tables is table_choice.assign_tables:
        # The exact rule: histograms stay on the GPU, only small products come back.
        tail = hist_d[(nchunks - 1) * a :].get(stream=st)
        delta, pad = padding(tail[:a], int(tail[a]), spec, n, chunk_log2)
        hist_f = hist_d[: nchunks * a].reshape(nchunks, a).astype(np.float64)
        del hist_d
        hist_f[-1] += cupy.asarray(delta.astype(np.float64))
        lengths, chunk_tables = table_choice.assign_tables(None, max_tables, field_mask,
                                                           backend=DeviceProducts(hist_f))
        del hist_f
    else:
        # Any other rule runs on the host, over the whole histogram array.
        hist, pad = finish_histogram(hist_d.get(stream=st), spec, n, chunk_log2)
        lengths, chunk_tables = cpu_encoder.assign_tables(hist, max_tables, field_mask)
    entries = cupy.asarray(code_entries(lengths))
    tables_d = cupy.asarray(chunk_tables)
    # 2. word counts -> host -> header, size, coded or stored
    warps = max(1, min(CODE_WARPS, nchunks // 264))
    grid = (-(-nchunks // warps),)
    counts = cupy.zeros(nchunks + 1, np.uint32)
    common = (u, np.uint64(n), np.uint32(chunk_log2), np.uint64(nchunks), tables_d, entries,
              np.uint32(lengths.shape[0]), np.uint32(pad))
    KERNELS.function(dev, f"ecf8_code<{kind}, false>")(grid, (32 * warps,), common + (counts, counts, counts, counts))
    words = counts[:nchunks].get(stream=st).astype(np.int64)
    starts = np.cumsum(words) - words
    exp_words = int(words.sum())
    if exp_words >= 1 << 32:
        raise UnsupportedError("exponent stream exceeds 2**32 words; use a smaller tensor")
    raw_bytes = fmt.raw_plane_bytes(spec, n)
    head = fmt.build_header(spec, fmt.MODE_CODED, shape, chunk_log2, lengths, chunk_tables, starts,
                            exp_words)
    exp_at = fmt.align16(len(head))
    raw_at = fmt.align16(exp_at + 4 * exp_words)
    size = raw_at + raw_bytes + 4
    if allow_stored and size >= n * spec.bits // 8:
        return None
    # 3. words, raw plane, checksum: launches only
    buf = _alloc_frame(size)
    buf[len(head) : raw_at] = 0                  # padding, and the empty loads inside the stream
    offsets = cupy.asarray(starts.astype(np.uint32))
    KERNELS.function(dev, f"ecf8_code<{kind}, true>")(
        grid, (32 * warps,), common + (counts, offsets, buf[exp_at:], buf[raw_at:]))
    return _finish(buf, head, size, dev, st)
