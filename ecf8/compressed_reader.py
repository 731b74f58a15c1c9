"""Reading compressed checkpoints (format ``ecf8.safetensors``, FORMAT.md section 9): a file opened
and checked to account for every byte (``PackedFile``), its tensors read one at a time
(``CompressedFile``, ``safe_open``) or all in data order through a bounded read-ahead (``load_file``,
``iter_decoded``: ``ecf8.compressed_stream``), and every checksum checked (``verify_file``).

Reading goes through one open file, never a memory map (``stable_file``: a file truncated, written
to or replaced meanwhile is a CorruptDataError; arrays loaded are copies that nothing changes).
Writing is ``ecf8.compressed``.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any, Iterator

import ml_dtypes
import numpy as np
import zstandard

from . import api, compressed_stream
from . import format as fmt
from .errors import CorruptDataError, ECF8Error, UnsupportedError
from .names import device_name
from .progress import _Progress
from .read_ahead import WINDOW, Span
from .safetensors_io import DTYPE_NAMES, MAX_HEADER, Tensor, load_json, parse_header, read_layout
from .stable_file import StableFile
from .tensor_codecs import CODED, checksum, checksum_seed, stored_checksum

__all__ = ["PackedFile", "CompressedFile", "safe_open", "load_file", "iter_decoded", "TensorInfo",
           "inspect_file", "file_version", "check_file", "verify_file", "CODECS", "META_KEY", "FORMAT",
           "VERSION"]

CODECS = ("ecf8", "zstd", "none")
META_KEY = "ecf8"
FORMAT = "ecf8.safetensors"
VERSION = 2
# A record holds at most RECORD_PER_HEADER_BYTE bytes per byte of the compressed header, plus
# RECORD_SLACK (the writer pads the header to keep to it): its cost is in proportion to the file.
RECORD_PER_HEADER_BYTE = 4
RECORD_SLACK = 1 << 20
# A zstandard block yields at most 128 KiB and takes at least 4 bytes (an RLE block): no frame holds
# more than 32768 bytes per byte of its own.
ZSTD_MAX_RATIO = 1 << 15
# Extra NumPy types for dtypes ecf8 stores as bytes (when ml_dtypes has them).
_MORE_DTYPES = {"C64": np.complex64, "F8_E8M0": getattr(ml_dtypes, "float8_e8m0fnu", None)}


class PackedFile:
    """An open compressed file, checked to account for every byte: the safetensors library accepts
    it, the record's crc holds, its original header parses and tiles the original data section,
    and the compressed header names exactly the original tensors plus the record."""

    def __init__(self, path: Path):
        self.path = path = Path(path)
        if not path.is_file():
            raise UnsupportedError(f"{path}: no such file")
        self.file = StableFile(path)     # every read: a copy from this open file (no memory map)
        try:
            self._open(path)
        except BaseException:
            self.file.close()
            raise

    def _open(self, path: Path) -> None:
        packed = read_layout(path)
        self.file.check_path()              # (the layout read is the open file's)
        self.header_bytes = len(packed.text)
        meta = packed.metadata.get(META_KEY)
        if meta is None:
            raise UnsupportedError(f"{path}: a plain safetensors file, not an ecf8-compressed one (no "
                                   f"__metadata__['{META_KEY}']; `ecf8 compress` compresses it)")
        info = load_json(meta, f"{path}: __metadata__['{META_KEY}']")
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise CorruptDataError(f"{path}: malformed __metadata__['{META_KEY}']")
        if type(info.get("version")) is not int or info["version"] not in (1, VERSION):
            raise UnsupportedError(f"{path}: {FORMAT} version {info.get('version')!r} (this ecf8 reads 1 and 2)")
        self.spans = {t.name: (packed.data_start + t.begin, t.nbytes) for t in packed.tensors}
        self.version = info["version"]
        text, table = self._v2(info) if self.version == VERSION else self._v1(info)
        self.original = parse_header(text, f"{path}: the original header")
        self.tensors = {t.name: t for t in self.original.tensors}
        if self.version == VERSION and info["record"] in self.tensors:
            raise CorruptDataError(f"{path}: the record {info['record']!r} is also an original tensor")
        extra = set(self.spans) - set(self.tensors) - {info.get("record")}
        missing = set(self.tensors) - set(self.spans)
        if extra or missing or set(table) != set(self.tensors):
            which = sorted(extra | missing | (set(table) ^ set(self.tensors)))[0]
            raise CorruptDataError(f"{path}: tensor {which!r} is not both in the compressed and the "
                                   f"original header")
        for name, row in table.items():
            t = self.tensors[name]
            if not (isinstance(row, list) and len(row) == 3 and row[0] in CODECS and all(
                    v is None if self.version == 1 else type(v) is int for v in row[1:])):
                raise CorruptDataError(f"{path}: tensor {name!r} has a malformed codec entry")
            if (row[0] == "none" and self.spans[name][1] != t.nbytes) or (
                    row[0] == "ecf8" and t.dtype not in CODED):
                raise CorruptDataError(f"{path}: tensor {name!r}: {self.spans[name][1]} stored bytes "
                                       f"do not fit codec {row[0]} for {t.dtype} {list(t.shape)}")
        if self.version == VERSION:
            odd = [t.name for t in packed.tensors if t.dtype != "U8" or t.shape != (t.nbytes,)]
            if odd:
                raise CorruptDataError(f"{path}: tensor {odd[0]!r} is not stored as U8 bytes")
        self.codecs = table
        keep = {k: v for k, v in packed.metadata.items() if k != META_KEY}
        if keep != {k: v for k, v in self.original.metadata.items() if k != META_KEY}:
            raise CorruptDataError(f"{path}: __metadata__ differs from the original's")

    def _v2(self, info: dict) -> tuple[bytes, dict]:
        path, record = self.path, info.get("record")
        n, size, crc = info.get("header"), info.get("size"), info.get("crc")
        if not (set(info) == {"format", "version", "record", "header", "size", "crc"}
                and isinstance(record, str) and record in self.spans
                and all(type(v) is int for v in (n, size, crc))
                and 0 <= n <= min(size, MAX_HEADER) and size <= 4 * MAX_HEADER):
            raise CorruptDataError(f"{path}: malformed __metadata__['{META_KEY}']")
        if size > RECORD_PER_HEADER_BYTE * self.header_bytes + RECORD_SLACK:
            raise CorruptDataError(f"{path}: record {record!r} claims {size:,} bytes, more than a "
                                   f"header of {self.header_bytes:,} bytes allows")
        raw = _unzstd(self.stored(record), size, f"{path}: record {record!r}")
        if _record_crc(raw, n) != crc or raw[n:n + 1] != b"{":
            raise CorruptDataError(f"{path}: record {record!r} fails its checksum")
        table = load_json(raw[n:], f"{path}: record {record!r}")
        if not isinstance(table, dict):
            raise CorruptDataError(f"{path}: record {record!r} holds no table")
        return raw[:n], table

    def _v1(self, info: dict) -> tuple[bytes, dict]:
        rows, text = info.get("tensors"), info.get("header")
        if not (set(info) == {"format", "version", "tensors", "header"} and isinstance(rows, dict)
                and isinstance(text, str) and all(isinstance(r, list) and len(r) == 3 for r in rows.values())):
            raise CorruptDataError(f"{self.path}: malformed __metadata__['{META_KEY}']")
        try:
            return text.encode(), {name: [r[0], None, None] for name, r in rows.items()}
        except UnicodeEncodeError:
            raise CorruptDataError(f"{self.path}: malformed __metadata__['{META_KEY}']") from None

    def names(self) -> list[str]:
        return [t.name for t in self.original.tensors]

    def restore(self, name: str) -> np.ndarray:
        """The original bytes (uint8) of a tensor, checked against its crc."""
        if self.codecs[name][0] == "ecf8":
            return self.original_bytes(name, self.decode(name, "cpu").reshape(-1).view(np.uint8))
        return self.restored(name, self.payload(name))

    def restored(self, name: str, stored: np.ndarray, stored_crc: int | None = None) -> np.ndarray:
        """The original bytes (uint8) of a tensor stored with zstd or raw, from its stored bytes
        (checked already), checked against its crc.  stored_crc: the CRC-32 of all but the last 4
        stored bytes from the tensor's checksum seed, where the caller has it (then a raw tensor's
        checksum costs 4 bytes)."""
        t, (codec, crc, _) = self.tensors[name], self.codecs[name]
        if codec == "zstd":
            return self.original_bytes(name, np.frombuffer(bytearray(_unzstd(
                stored, t.nbytes, f"{self.path}: tensor {name!r}")), np.uint8))
        if crc is not None and stored_crc is not None:
            if zlib.crc32(stored[max(0, stored.size - 4):], stored_crc) != crc:
                raise CorruptDataError(f"{self.path}: tensor {name!r} fails its checksum")
            return stored
        return self.original_bytes(name, stored)

    def original_bytes(self, name: str, data: np.ndarray) -> np.ndarray:
        """data (a tensor's original bytes, uint8), checked against the tensor's crc."""
        crc = self.codecs[name][1]
        if crc is not None and checksum(self.tensors[name], data) != crc:
            raise CorruptDataError(f"{self.path}: tensor {name!r} fails its checksum")
        return data

    def as_array(self, name: str, data: np.ndarray) -> np.ndarray:
        """A tensor's original bytes (uint8) viewed with its dtype and shape (UnsupportedError for
        a dtype NumPy cannot hold)."""
        t = self.tensors[name]
        return data.view(_numpy_dtype(self.path, t)).reshape(t.shape)

    def span(self, name: str) -> Span:
        """Where a tensor's stored bytes lie, for ``ReadAhead``: checksummed but their last 4, from
        the tensor's checksum seed (the stored crc's coverage)."""
        offset, size = self.spans[name]
        return Span(offset, size, max(0, size - 4), checksum_seed(self.tensors[name]))

    def check_stored(self, name: str, stored_crc: int) -> None:
        """CorruptDataError unless stored_crc (CRC-32 of a tensor's stored bytes but their last 4,
        from its checksum seed) is the one recorded (a version-1 file records none)."""
        expected = self.codecs[name][2]
        if expected is not None and stored_crc != expected:
            raise CorruptDataError(f"{self.path}: tensor {name!r}: its stored bytes fail their checksum")

    def check_frame(self, name: str, frame: fmt.Frame) -> None:
        """CorruptDataError unless a tensor's parsed frame has the dtype and shape of its header."""
        t = self.tensors[name]
        if frame.spec.dtype != DTYPE_NAMES[t.dtype] or tuple(frame.shape) != t.shape:
            raise CorruptDataError(f"{self.path}: tensor {name!r} holds a {frame.spec.dtype} "
                                   f"{tuple(frame.shape)} frame, the header says {t.dtype} {t.shape}")

    def stored(self, name: str) -> np.ndarray:
        """The bytes stored for an entry of the compressed header (uint8, a copy read from the file;
        CorruptDataError if the file changed since it was opened)."""
        return self.file.read(*self.spans[name])

    def payload(self, name: str) -> np.ndarray:
        """The bytes stored for a tensor (uint8, a copy), checked against its stored crc."""
        data, stored_crc = self.stored(name), self.codecs[name][2]
        if stored_crc is not None and stored_checksum(self.tensors[name], data) != stored_crc:
            raise CorruptDataError(f"{self.path}: tensor {name!r}: its stored bytes fail their checksum")
        return data

    def decode(self, name: str, device: str) -> Any:
        """An ecf8-coded tensor decoded on a device, checked to have the original dtype and shape."""
        t = self.tensors[name]
        payload = self.payload(name)                                # (its errors name the tensor)
        try:
            x = api.decode(payload, device=device)
        except ECF8Error as e:
            raise type(e)(f"{self.path}: tensor {name!r}: {e}") from None
        if x.dtype != DTYPE_NAMES[t.dtype] or tuple(x.shape) != t.shape:
            raise CorruptDataError(f"{self.path}: tensor {name!r} decodes to {x.dtype} {tuple(x.shape)}, "
                                   f"the header says {t.dtype} {t.shape}")
        return x

    def frame(self, name: str) -> bytes:
        """An ecf8-coded tensor's frame, checked (stored crc, frame checksums, the header's dtype
        and shape) but not decoded."""
        data = bytes(self.payload(name))
        try:
            f = fmt.parse(memoryview(data), verify=True)
        except ECF8Error as e:
            raise type(e)(f"{self.path}: tensor {name!r}: {e}") from None
        self.check_frame(name, f)
        return data

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> PackedFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _record_crc(raw: bytes, n: int) -> int:
    """crc32 of the record, seeded with its split point (the original header's length, 8 bytes LE)."""
    return zlib.crc32(raw, zlib.crc32(n.to_bytes(8, "little")))


def _unzstd(data, size: int, where: str) -> bytes:
    """A zstandard frame that must hold exactly `size` bytes (checked before allocating: no frame
    can hold more than ZSTD_MAX_RATIO bytes per byte of its own)."""
    if size > ZSTD_MAX_RATIO * len(data):
        raise CorruptDataError(f"{where}: a zstandard frame of {len(data):,} bytes cannot hold {size:,}")
    try:
        if zstandard.frame_content_size(data) != size:
            raise CorruptDataError(f"{where}: the zstandard frame does not hold {size} bytes")
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise CorruptDataError(f"{where}: {e}") from None
    if len(out) != size:
        raise CorruptDataError(f"{where}: the zstandard frame does not hold {size} bytes")
    return out


def _numpy_dtype(path: Path, t: Tensor) -> np.dtype:
    dtype = DTYPE_NAMES.get(t.dtype) or _MORE_DTYPES.get(t.dtype)
    if dtype is None or math.prod(t.shape) * np.dtype(dtype).itemsize != t.nbytes:
        raise UnsupportedError(f"{path}: tensor {t.name!r} has dtype {t.dtype} {list(t.shape)}, "
                               f"which NumPy cannot hold as {t.nbytes} bytes")
    return np.dtype(dtype)


class CompressedFile:
    """An open compressed checkpoint read one tensor at a time, like ``safetensors.safe_open``:

        with ecf8.safe_open("model.safetensors", device="cpu") as f:
            f.keys(); f.metadata(); w = f.get_tensor("layers.0.weight")

    Opening checks the file's structure (CorruptDataError otherwise); get_tensor decodes one tensor
    and, on the CPU, checks its crc.  device "cpu" gives NumPy arrays of the original dtype and
    shape, "cuda[:N]" CudaArrays; compressed=True keeps ecf8 tensors compressed on the GPU
    (DeviceTensors for ``decode_batch``).  Every array is in memory of its own (the file is read,
    never mapped: changing the file later changes no array; a file changed while open is a
    CorruptDataError).  Once closed, every method raises ECF8Error.
    """

    def __init__(self, path: Path, device: str = "cpu", *, compressed: bool = False):
        device = device_name(device)
        if compressed and device == "cpu":
            raise UnsupportedError("compressed=True keeps tensors compressed on a GPU: give device='cuda'")
        self.device, self.compressed = device, compressed
        self._packed = PackedFile(path)

    def _open(self) -> PackedFile:
        """The open file; ECF8Error once closed (after its with block), whatever is asked."""
        if self._packed.file.closed:
            raise ECF8Error(f"{self._packed.path}: the file is closed (use it inside its with block)")
        return self._packed

    def keys(self) -> list[str]:
        """Tensor names, in the original file's data order."""
        return self._open().names()

    def metadata(self) -> dict[str, str] | None:
        """The original file's __metadata__ (None when it had none), as safetensors gives it."""
        return dict(self._open().original.metadata) or None

    def get_tensor(self, name: str) -> Any:
        """One tensor, decoded, in memory of its own (KeyError for an unknown name)."""
        p = self._open()
        if name not in p.tensors:
            raise KeyError(name)
        if p.codecs[name][0] == "ecf8" and self.device != "cpu":
            if self.compressed:
                from .decoder_cuda import to_device

                return to_device(p.payload(name), self.device)
            return p.decode(name, self.device)
        x = p.as_array(name, p.restore(name))
        return x if self.device == "cpu" else compressed_stream.upload_array(x, self.device)

    def get_frame(self, name: str) -> bytes | None:
        """One tensor's ECF8 frame as stored (bytes: decode it with ``ecf8.decode``), checked like
        a decoded tensor but not decoded; None for a tensor stored otherwise (zstd or raw).
        KeyError for an unknown name, CorruptDataError for a damaged one."""
        p = self._packed
        if name not in p.tensors:
            raise KeyError(name)
        return p.frame(name) if p.codecs[name][0] == "ecf8" else None

    def dtype_of(self, name: str) -> str:
        """A tensor's safetensors dtype string (any string: ecf8 passes unknown ones through)."""
        p = self._open()
        if name not in p.tensors:
            raise KeyError(name)
        return p.tensors[name].dtype

    def get_bytes(self, name: str) -> np.ndarray:
        """One tensor's original bytes (uint8, checked against its crc), whatever its dtype."""
        p = self._open()
        if name not in p.tensors:
            raise KeyError(name)
        return p.restore(name)

    def close(self) -> None:
        self._packed.close()

    def __enter__(self) -> CompressedFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def safe_open(path: Path, framework: str = "numpy", device: str = "cpu", *,
              compressed: bool = False) -> CompressedFile:
    """Open a compressed checkpoint lazily (see CompressedFile); framework must be "numpy"/"np"
    (the torch, jax and cupy adapters convert the arrays)."""
    if framework not in ("numpy", "np"):
        raise UnsupportedError(f"framework {framework!r}: ecf8.safe_open gives NumPy arrays (or CudaArrays)")
    return CompressedFile(path, device, compressed=compressed)


def load_file(path: Path, device: str = "cpu", *, compressed: bool = False) -> dict[str, Any]:
    """All tensors of a compressed checkpoint: NumPy arrays (cpu), CudaArrays (cuda), or with
    compressed=True device-resident compressed tensors for ecf8 entries (decode them later).
    Read ahead by worker threads, each tensor checked before it is used (see iter_decoded).
    For the metadata or one tensor at a time, use safe_open."""
    return {name: x for name, _, x in iter_decoded(path, device, compressed)}


def iter_decoded(path: Path, device: str = "cpu", compressed: bool = False, *, frames: bool = False,
                 window: int = WINDOW) -> Iterator[tuple[str, str, Any]]:
    """(name, dtype name, tensor) of a compressed file, in data order, decoded one at a time (or,
    with compressed=True on a GPU, ECF8 frames kept compressed there; with frames=True on the
    CPU, ECF8 frames as their checked bytes).  Worker threads read and checksum up to `window`
    bytes ahead (``ecf8.compressed_stream``): host memory beyond the tensors handed out stays
    about `window`, whatever the file's size.  CorruptDataError for a damaged tensor or a file
    changed meanwhile, raised before that tensor is handed out."""
    if frames and device_name(device) != "cpu":
        raise UnsupportedError("frames=True gives frames on the host: on a GPU use compressed=True")
    with CompressedFile(path, device, compressed=compressed) as f:
        yield from compressed_stream.tensors(f._open(), f.device, compressed=compressed, frames=frames,
                                             window=window)


class TensorInfo(tuple):
    """(name, dtype, shape, codec, original bytes, stored bytes) of one tensor."""

    __slots__ = ()
    name = property(lambda s: s[0])
    dtype = property(lambda s: s[1])
    shape = property(lambda s: s[2])
    codec = property(lambda s: s[3])
    original_bytes = property(lambda s: s[4])
    stored_bytes = property(lambda s: s[5])


def inspect_file(path: Path) -> list[TensorInfo]:
    """Per-tensor sizes of a compressed file, in data order, after checking that its header and
    record account for every byte (CorruptDataError otherwise; no tensor is decoded)."""
    p = PackedFile(path)
    try:
        return [TensorInfo((t.name, t.dtype, t.shape, p.codecs[t.name][0], t.nbytes, p.spans[t.name][1]))
                for t in p.original.tensors]
    finally:
        p.close()


def file_version(path: Path) -> int:
    """The ecf8.safetensors format version of a compressed file, after the checks of opening it:
    2 (a checksum per tensor and over the record) or 1 (no checksums: verify can only decode)."""
    p = PackedFile(path)
    p.close()
    return p.version


def check_file(path: Path, progress: bool | None = None) -> tuple[int, list[str]]:
    """(tensors checked, problems): every tensor decoded and checked; each problem is one line
    naming the file and, where it applies, the tensor and what failed."""
    try:
        p = PackedFile(path)
    except ECF8Error as e:
        return 0, [str(e)]
    problems = []
    bar = _Progress(p.original.data_size, f"verify {Path(path).name}", progress)
    try:
        for t in p.original.tensors:
            try:
                p.restore(t.name)
            except ECF8Error as e:
                problems.append(str(e))
            bar.advance(t.nbytes, t.name)
    finally:
        bar.close()
        p.close()
    return len(p.original.tensors), problems


def verify_file(path: Path, progress: bool | None = None) -> int:
    """Check every checksum and decode every tensor; the number of tensors checked, or
    CorruptDataError with the first problem (check_file lists them all).  A version-1 file has no
    checksums: its tensors are only decoded (file_version tells)."""
    count, problems = check_file(path, progress)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise CorruptDataError(problems[0] + more)
    return count


