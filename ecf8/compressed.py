"""Compressed checkpoints (format ``ecf8.safetensors``, specified in FORMAT.md section 9 and only
there): safetensors files whose float tensors are ECF8 frames, written, read, restored and checked.

Reading goes through one open file, never a memory map (``stable_file``: a file truncated, written
to or replaced meanwhile is a CorruptDataError; arrays loaded are copies that nothing changes).
Writing streams tensor by tensor from that file (``tensor_codecs.compress_tensors``) into a
temporary file renamed only on success; the header is reserved at its largest possible size
(refused beforehand if that exceeds the 100 MB safetensors reads), and at least a quarter of the
record less 1 MiB (readers refuse a larger record before decompressing it), filled in last and
padded with spaces as the safetensors format allows.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import zlib
from json.encoder import encode_basestring        # JSON string, non-ASCII kept as is
from pathlib import Path
from typing import Any, Callable, Iterator

import ml_dtypes
import numpy as np
import zstandard

from . import api, encoder, model_config
from . import format as fmt
from .errors import CorruptDataError, ECF8Error, UnsupportedError
from .names import device_name
from .output_files import named
from .progress import _Progress
from .safetensors_io import (DTYPE_NAMES, MAX_HEADER, Layout, Tensor, atomic_dir, atomic_file,
                             file_mode, load_json, model_files,
                             parse_header, plain_header, read_layout, tensor_files)
from .stable_file import StableFile
from .tensor_codecs import CODED, checksum, compress_tensors, daemonic, stored_checksum

__all__ = ["save_file", "load_file", "safe_open", "CompressedFile", "compress_file",
           "decompress_file", "inspect_file", "verify_file", "check_file", "file_version",
           "compress_path", "decompress_path", "iter_decoded", "TensorInfo"]

CODECS = ("ecf8", "zstd", "none")
META_KEY = "ecf8"
FORMAT = "ecf8.safetensors"
VERSION = 2
RECORD_LEVEL = 9
RECORD_NAME = "__ecf8__"
# A record holds at most RECORD_PER_HEADER_BYTE bytes per byte of the compressed header, plus
# RECORD_SLACK (the writer pads the header to keep to it): its cost is in proportion to the file.
RECORD_PER_HEADER_BYTE = 4
RECORD_SLACK = 1 << 20
# A zstandard block yields at most 128 KiB and takes at least 4 bytes (an RLE block): no frame holds
# more than 32768 bytes per byte of its own.
ZSTD_MAX_RATIO = 1 << 15
# Extra NumPy types for dtypes ecf8 stores as bytes (when ml_dtypes has them).
_MORE_DTYPES = {"C64": np.complex64, "F8_E8M0": getattr(ml_dtypes, "float8_e8m0fnu", None)}


def _dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _is_packed(meta: dict[str, str]) -> bool:
    try:
        info = json.loads(meta.get(META_KEY, ""))
        return isinstance(info, dict) and info.get("format") == FORMAT
    except (ValueError, RecursionError):
        return False


def _packed_header(layout: Layout, sizes: list[int], record: str, info: dict) -> bytes:
    """The compressed file's header JSON for stored sizes (tensors in data order, then the record)."""
    meta = {k: v for k, v in layout.metadata.items() if k != META_KEY}
    meta[META_KEY] = _dumps(info).decode()
    parts = ['{"__metadata__":', _dumps(meta).decode()]
    offset = 0
    for name, n in zip([t.name for t in layout.tensors] + [record], sizes):
        parts.append(f',{encode_basestring(name)}:{{"dtype":"U8","shape":[{n}],"data_offsets":[{offset},{offset + n}]}}')
        offset += n
    parts.append("}")
    return "".join(parts).encode()


def compress_file(src: Path, dst: Path, *, jobs: int | None = None, progress: bool | None = None,
                  layout: Layout | None = None, **options) -> dict[str, str]:
    """Compress one safetensors file into a compressed (still safetensors) file, which the safetensors
    library is asked to open before it replaces dst (its mode is src's).

    options go to ``ecf8.encode`` (chunk_size, max_tables), plus zstd_level and device: "cpu"
    (default) or "cuda[:N]" (one GPU: "cuda" is the current one), where FP8/BF16/FP16 tensors are
    encoded by the CUDA encoder (the same bytes) in two threads that overlap reading, encoding and
    writing.  jobs: worker processes on the CPU (default: the machine's cores; 1 compresses in
    this process, as does a daemonic process), at most 2 * jobs tensors in flight; not used on a GPU.
    layout: src's ``read_layout``, when the caller has read it (read again unless the open file
    still begins with that header).  Returns each tensor's codec ({name: "ecf8" | "zstd" | "none"}).
    Raises ECF8Error, before writing anything, for a file safetensors refuses, an already compressed
    one, or one whose compressed header would exceed safetensors' 100 MB limit; CorruptDataError,
    leaving nothing, if src is replaced, written to or truncated while it is read.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise UnsupportedError(f"{src}: no such file")
    with StableFile(src) as source:     # every read of src, workers' too: this file, no memory map
        if layout is None or not _begins_with(source, layout):
            layout = read_layout(src)
            source.check_path()         # (the layout read is the open file's)
        return _pack(layout, dst, file_mode(src), src, None, jobs, progress, options, source)


def _begins_with(source: StableFile, layout: Layout) -> bool:
    """Whether the open file is the one a layout read earlier describes: its size, and its header's
    exact bytes."""
    n = len(layout.text)
    return (source.size == layout.data_start + layout.data_size and
            source.read(0, 8 + n).tobytes() == n.to_bytes(8, "little") + layout.text)


def _pack(layout: Layout, dst: Path, mode: int, src: Path, raws: list[np.ndarray] | None,
          jobs: int | None, progress: bool | None, options: dict, source: StableFile | None = None
          ) -> dict[str, str]:
    """compress_file of the plain file `layout` describes: the file src, read through `source`, or
    (raws given: each tensor's bytes, uint8, in data order) the file src would be, never written."""
    if _is_packed(layout.metadata):
        raise UnsupportedError(f"{src} is already an ecf8-compressed checkpoint")
    names = {t.name for t in layout.tensors}
    record = next(RECORD_NAME + "." * k for k in range(len(names) + 1) if RECORD_NAME + "." * k not in names)
    table_bound = len(_dumps({t.name: ["none", 0xFFFFFFFF, 0xFFFFFFFF] for t in layout.tensors}))
    raw_bound = len(layout.text) + table_bound
    record_bound = raw_bound + (raw_bound >> 7) + 1024          # > zstd's worst case
    info = {"format": FORMAT, "version": VERSION, "record": record, "header": len(layout.text),
            "size": raw_bound, "crc": 0xFFFFFFFF}
    reserved = len(_packed_header(layout, [t.nbytes for t in layout.tensors] + [record_bound],
                                  record, info))
    reserved = max(reserved, -(-(raw_bound - RECORD_SLACK) // RECORD_PER_HEADER_BYTE))  # (readers)
    reserved += -reserved % 8
    if reserved > MAX_HEADER:
        raise UnsupportedError(f"{src}: the compressed header would take {reserved:,} bytes, over the "
                               f"{MAX_HEADER:,} safetensors reads")
    jobs = max(1, jobs if jobs is not None else (os.cpu_count() or 1))
    if "device" in options:
        options["device"] = device_name(options["device"])     # (UnsupportedError naming cpu, cuda:N)
    if options.get("device", "cpu") != "cpu":
        from . import gpu

        if gpu.device_id(options["device"]) >= gpu.cupy().cuda.runtime.getDeviceCount():
            raise UnsupportedError(f"{options['device']}: no such GPU")
    bar = _Progress(layout.data_size, f"compress {src.name}", progress)
    results = compress_tensors(src, layout, jobs, options, raws, source)
    try:
        with atomic_file(dst, mode, _check_packed) as f:
            f.write(bytes(8 + reserved))
            sizes, table = [], {}
            for i, ((codec, payload, crc, stored_crc), t) in enumerate(zip(results, layout.tensors)):
                if payload is None and raws is not None:
                    f.write(raws[i].data)
                elif payload is None:
                    _copy_range(source, f, layout.data_start + t.begin, t.nbytes)
                else:
                    f.write(payload)
                sizes.append(t.nbytes if payload is None else len(payload))
                table[t.name] = [codec, crc, stored_crc]
                bar.advance(t.nbytes, t.name)
            raw = layout.text + _dumps(table)
            blob = zstandard.ZstdCompressor(level=RECORD_LEVEL, write_checksum=True).compress(raw)
            f.write(blob)
            info.update(size=len(raw), crc=_record_crc(raw, len(layout.text)))
            text = _packed_header(layout, sizes + [len(blob)], record, info)
            if len(text) > reserved:
                raise ECF8Error("internal error: safetensors header outgrew its reservation")
            f.seek(0)
            f.write(reserved.to_bytes(8, "little") + text + b" " * (reserved - len(text)))
            if source is not None:
                source.check_path()     # (every byte read came from the file still at src)
    except ECF8Error as e:
        if str(src) in str(e):
            raise
        raise type(e)(f"{src}: {e}") from None
    except OSError as e:        # (a write error names dst already: this one is reading src)
        raise named(e, src) from None
    finally:
        results.close()
        bar.close()
    return {name: row[0] for name, row in table.items()}


def _copy_range(source: StableFile, fout, start: int, n: int) -> None:
    for at in range(start, start + n, 1 << 24):
        fout.write(source.read(at, min(start + n - at, 1 << 24)).data)


def _check_packed(path: Path) -> None:
    """A compressed file (one just written, or an input) must account for every byte."""
    _Packed(path).close()


def save_file(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str] | None = None,
              **options) -> None:
    """Write NumPy arrays as a compressed checkpoint (FP8/BF16/FP16 as ECF8, others zstd or raw).
    UnsupportedError for names or metadata safetensors cannot store ('__metadata__', non-str)."""
    path = Path(path)
    for name, x in tensors.items():
        encoder.reject_framework_tensor(x, name)
    text, arrays = plain_header(tensors, metadata)          # (no plain file is written)
    layout = parse_header(text, str(path))
    by_name = dict(zip(tensors, arrays))
    raws = [by_name[t.name].reshape(-1).view(np.uint8) for t in layout.tensors]
    _pack(layout, path, file_mode(), path, raws, 1, False, options)


# ------------------------------------------------------------------------------------- reading

class _Packed:
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
        t, (codec, crc, _) = self.tensors[name], self.codecs[name]
        where = f"{self.path}: tensor {name!r}"
        if codec == "ecf8":
            data = self.decode(name, "cpu").reshape(-1).view(np.uint8)
        elif codec == "zstd":
            data = np.frombuffer(bytearray(_unzstd(self.payload(name), t.nbytes, where)), np.uint8)
        else:
            data = self.payload(name)
        if crc is not None and checksum(t, data) != crc:
            raise CorruptDataError(f"{where} fails its checksum")
        return data

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
        t = self.tensors[name]
        data = bytes(self.payload(name))
        try:
            f = fmt.parse(memoryview(data), verify=True)
        except ECF8Error as e:
            raise type(e)(f"{self.path}: tensor {name!r}: {e}") from None
        if f.spec.dtype != DTYPE_NAMES[t.dtype] or tuple(f.shape) != t.shape:
            raise CorruptDataError(f"{self.path}: tensor {name!r} holds a {f.spec.dtype} {tuple(f.shape)} "
                                   f"frame, the header says {t.dtype} {t.shape}")
        return data

    def close(self) -> None:
        self.file.close()


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
        self._packed = _Packed(path)

    def _open(self) -> _Packed:
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
        t, codec = p.tensors[name], p.codecs[name][0]
        if codec == "ecf8" and self.device != "cpu":
            if self.compressed:
                from .decoder_cuda import to_device

                return to_device(p.payload(name), self.device)
            return p.decode(name, self.device)
        x = p.restore(name).view(_numpy_dtype(p.path, t)).reshape(t.shape)
        return x if self.device == "cpu" else _to_device(x, self.device)

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
    For the metadata or one tensor at a time, use safe_open."""
    with CompressedFile(path, device, compressed=compressed) as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def iter_decoded(path: Path, device: str = "cpu", compressed: bool = False
                 ) -> Iterator[tuple[str, str, Any]]:
    """(name, dtype name, tensor) of a compressed file, in data order, decoded one at a time."""
    with CompressedFile(path, device, compressed=compressed) as f:
        for name in f.keys():
            yield name, f.dtype_of(name), f.get_tensor(name)


def _to_device(x: np.ndarray, device: str):
    from . import gpu
    from .decoder_cuda import CudaArray

    cupy = gpu.cupy()
    with cupy.cuda.Device(gpu.device_id(device)):
        bits = cupy.asarray(x.reshape(-1).view(np.uint8)).view(f"u{x.dtype.itemsize}") if x.size else \
            cupy.empty(0, np.uint8)
    return CudaArray(bits, x.dtype, x.shape)


def decompress_file(src: Path, dst: Path, *, progress: bool | None = None) -> None:
    """Restore the original safetensors file byte for byte (dst gets src's mode).  Every tensor is
    checked (crc, frame checksums) before dst appears; CorruptDataError otherwise."""
    src = Path(src)
    p = _Packed(src)
    layout = p.original
    bar = _Progress(layout.data_size, f"decompress {src.name}", progress)
    try:
        with atomic_file(Path(dst), file_mode(src)) as f:
            f.write(len(layout.text).to_bytes(8, "little") + layout.text)
            written = 0
            for t in layout.tensors:
                data = p.restore(t.name)
                if data.size != t.nbytes:
                    raise CorruptDataError(f"{src}: tensor {t.name!r} restores to {data.size} bytes, not {t.nbytes}")
                f.write(data.data)
                written += data.size
                bar.advance(data.size, t.name)
            if written != layout.data_size:
                raise CorruptDataError(f"{src}: restored {written} data bytes, the header needs {layout.data_size}")
    except OSError as e:        # (a write error names dst already: this one is reading src)
        raise named(e, src) from None
    finally:
        bar.close()
        p.close()


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
    p = _Packed(path)
    try:
        return [TensorInfo((t.name, t.dtype, t.shape, p.codecs[t.name][0], t.nbytes, p.spans[t.name][1]))
                for t in p.original.tensors]
    finally:
        p.close()


def file_version(path: Path) -> int:
    """The ecf8.safetensors format version of a compressed file, after the checks of opening it:
    2 (a checksum per tensor and over the record) or 1 (no checksums: verify can only decode)."""
    p = _Packed(path)
    p.close()
    return p.version


def check_file(path: Path, progress: bool | None = None) -> tuple[int, list[str]]:
    """(tensors checked, problems): every tensor decoded and checked; each problem is one line
    naming the file and, where it applies, the tensor and what failed."""
    try:
        p = _Packed(path)
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


# -------------------------------------------------------------------------------- model folders

def _map_path(src: Path, dst: Path, one_file: Callable[..., Any], check: Callable[[Path], Any],
              many: Callable[..., Any] | None = None, known: dict | None = None,
              config: Callable[[bytes], bytes | None] | None = None, **kwargs) -> dict[Path, Any]:
    """{output file: what one_file returned} of one_file(src_file, dst_file, **kwargs) for a file,
    or for each safetensors file of a model folder (subfolders kept; every other file copied;
    check(file) on each input first, so a bad input writes nothing; the output folder appears
    complete or not at all).  many: instead of one_file on each file of a folder,
    many([(src_file, dst_file), ...], known=known, **kwargs) on them all, returning
    {dst_file: result}.
    known: {input file: what the caller already read of it}, given to one_file as layout= (and
    to check when it takes it) and filled with what check returns.
    config: the new bytes of a config.json beside safetensors files (None: copied unchanged)."""
    src, dst = Path(src), Path(dst)
    known = {} if known is None else known
    if not src.is_dir():
        if not src.is_file():
            raise UnsupportedError(f"{src}: no such file")
        extra = {"layout": known[src]} if known.get(src) is not None else {}
        return {dst: one_file(src, dst, **extra, **kwargs)}
    tensors, others = model_files(src)
    for rel in tensors:
        known[src / rel] = check(src / rel) if known.get(src / rel) is None else check(src / rel, known[src / rel])
    with atomic_dir(dst, file_mode(src)) as tmp:
        for root, dirs, _ in os.walk(src):                    # empty folders too
            for d in dirs:
                (tmp / Path(root, d).relative_to(src)).mkdir(mode=file_mode(Path(root, d)), exist_ok=True)
        for rel in tensors + others:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        beside = {Path(rel).parent for rel in tensors}
        for rel in others:
            try:
                text = None
                if config is not None and Path(rel).name == model_config.CONFIG_NAME and Path(rel).parent in beside:
                    text = config((src / rel).read_bytes())
                if text is None:
                    shutil.copyfile(src / rel, tmp / rel)
                else:
                    (tmp / rel).write_bytes(text)
            except OSError as e:
                raise named(e, dst / rel) from None
            os.chmod(tmp / rel, file_mode(src / rel))
        pairs = [(src / rel, tmp / rel) for rel in tensors]
        if many is not None:
            done = many(pairs, known=known, **kwargs) or {}
            results = {dst / rel: done.get(tmp / rel) for rel in tensors}
        else:
            results = {}
            for rel in tensors:
                extra = {"layout": known[src / rel]} if known.get(src / rel) is not None else {}
                results[dst / rel] = one_file(src / rel, tmp / rel, **extra, **kwargs)
    return results


def _check_plain(path: Path, layout: Layout | None = None) -> Layout:
    """path's Layout (layout: already read), unless it is not plain safetensors (ECF8Error)."""
    layout = read_layout(path) if layout is None else layout
    if _is_packed(layout.metadata):
        raise UnsupportedError(f"{path} is already an ecf8-compressed checkpoint")
    return layout


def compress_path(src: Path, dst: Path, *, layouts: dict[Path, Layout] | None = None,
                  codecs: dict[Path, dict[str, str]] | None = None, **kwargs) -> list[Path]:
    """A safetensors file, or a model folder, compressed to dst (see compress_file); returns the
    compressed files.  device="cuda" on a folder of several shards with several GPUs visible spreads
    the shards over all of them, one worker process per GPU (``ecf8.gpu_pool``; jobs not used);
    the files are the same bytes.  A single file is compressed on one GPU.  In a daemonic process
    (a worker of another pool, which may start no processes) all the work is done in this process,
    to the same bytes.  layouts: {input file
    (as ``tensor_files(src)`` names it): its ``read_layout``} where the caller has read them (not
    read again); codecs: a dict to fill with {output file: {tensor: codec}}.  A config.json beside
    safetensors files gains an ecf8 quantization_config (``ecf8.model_config``; Transformers and
    Diffusers then load the folder through ecf8), which decompress_path takes back."""
    many = None
    if kwargs.get("device") == "cuda" and Path(src).is_dir() and not daemonic():
        from . import gpu_pool

        gpus = gpu_pool.gpus()          # (UnsupportedError without CuPy or a GPU: nothing written)
        if len(gpus) > 1 and len(tensor_files(src)) > 1:
            many = functools.partial(gpu_pool.compress_shards, devices=gpus, one_file=compress_file)
    results = _map_path(src, dst, compress_file, _check_plain, many, dict(layouts or {}),
                        model_config.marked, **kwargs)
    if codecs is not None:
        codecs.update(results)
    return list(results)


def decompress_path(src: Path, dst: Path, **kwargs) -> list[Path]:
    """The original file or model folder restored from a compressed one; returns the restored files."""
    return list(_map_path(src, dst, decompress_file, _check_packed, config=model_config.restored, **kwargs))
