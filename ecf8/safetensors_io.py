"""safetensors files: validation, a strict header parser, a reader, atomic writers.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor
name to {dtype, shape, data_offsets} (plus an optional "__metadata__" of strings), then the data.
Whether a file is valid safetensors is judged by the ``safetensors`` library itself
(:func:`check_safetensors`); :func:`parse_header` then reads the header into a :class:`Layout`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np

from .encoder import native_order
from .errors import CorruptDataError, UnsupportedError
from .format import DTYPES
from .output_files import TEMP_SUFFIX, NamedWriter, check_parent, remove_stale, temp_prefix
from .signals import held
from .stable_file import StableFile

__all__ = ["DTYPE_NAMES", "MAX_HEADER", "Entry", "Tensor", "Layout", "nbytes_of", "load_json",
           "check_safetensors", "parse_header", "read_layout", "atomic_file", "atomic_dir",
           "file_mode", "model_files", "check_names", "read_header", "read_header_text",
           "iter_tensors", "tensor_files", "write_safetensors", "plain_header"]

DTYPE_NAMES = {                # safetensors dtype name -> NumPy dtype: the coded ones, then the rest
    **{spec.name: spec.dtype for spec in DTYPES.values()},
    "F32": np.dtype(np.float32), "F64": np.dtype(np.float64), "BOOL": np.dtype(np.bool_),
    "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "I16": np.dtype(np.int16),
    "U16": np.dtype(np.uint16), "I32": np.dtype(np.int32), "U32": np.dtype(np.uint32),
    "I64": np.dtype(np.int64), "U64": np.dtype(np.uint64),
}
MAX_HEADER = 100_000_000       # the safetensors library refuses longer headers (bytes)


def nbytes_of(dtype_name: str, shape) -> int:
    """Bytes of a tensor of a DTYPE_NAMES dtype and shape (exact, any size)."""
    return math.prod(int(d) for d in shape) * DTYPE_NAMES[dtype_name].itemsize


class Tensor(NamedTuple):
    """One header entry: name, dtype string (any), shape, and its byte range in the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class Layout(NamedTuple):
    """A safetensors header: its exact bytes, __metadata__, the tensors in data order."""

    text: bytes
    metadata: dict[str, str]
    tensors: list[Tensor]
    data_size: int              # bytes of the data section, all covered by the tensors

    @property
    def data_start(self) -> int:
        return 8 + len(self.text)


def load_json(text: bytes | str, where: str):
    """Parse UTF-8 JSON (a repeated key keeps its last value, as in safetensors' parser);
    CorruptDataError naming `where` otherwise."""
    try:
        return json.loads(text.decode() if isinstance(text, bytes) else text)
    except (ValueError, RecursionError) as e:       # UnicodeDecodeError, JSONDecodeError, huge ints
        raise CorruptDataError(f"{where}: invalid JSON ({str(e).splitlines()[0][:80]})") from None


def check_safetensors(path: Path, name: Path | None = None) -> None:
    """Let the safetensors library judge a file (header length, JSON, dtypes, shapes, offsets,
    coverage of the data section); CorruptDataError naming the file (or `name`) if it refuses."""
    import safetensors

    try:
        with safetensors.safe_open(str(path), framework="numpy"):
            pass
    except Exception as e:      # SafetensorError, OSError: the library's own words
        why = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise CorruptDataError(f"{name or path}: not a valid safetensors file (safetensors "
                               f"{safetensors.__version__}: {why})") from None


def _check_twin(path: Path, layout: Layout) -> None:
    """check_safetensors on a sparse twin of the file whose dtypes outside DTYPE_NAMES (which this
    safetensors may not know: any string passes through ecf8 as bytes) are U8 of the same bytes."""
    head: dict = {"__metadata__": layout.metadata} if layout.metadata else {}
    for t in layout.tensors:
        known = t.dtype in DTYPE_NAMES
        head[t.name] = {"dtype": t.dtype if known else "U8", "shape": list(t.shape) if known else [t.nbytes],
                        "data_offsets": [t.begin, t.end]}
    text = json.dumps(head).encode()
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        f.truncate(8 + len(text) + layout.data_size)          # sparse: no data is written
        f.flush()
        check_safetensors(Path(f.name), path)


def _uint(x) -> bool:
    return type(x) is int and 0 <= x < 1 << 64


def parse_header(text: bytes, where: str) -> Layout:
    """A header's Layout; CorruptDataError unless every entry is well formed and the tensors tile
    the data section exactly (no gap, no overlap), as safetensors requires."""
    header = load_json(text, f"{where}: header")
    if not isinstance(header, dict):
        raise CorruptDataError(f"{where}: the header is not a JSON object")
    meta = header.pop("__metadata__", None)
    meta = {} if meta is None else meta
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptDataError(f"{where}: __metadata__ must map strings to strings")
    tensors = []
    for name, e in header.items():
        try:
            dtype, shape, (a, b) = e["dtype"], e["shape"], e["data_offsets"]
            ok = (type(dtype) is str and type(shape) is list and _uint(a) and _uint(b) and a <= b
                  and all(_uint(d) for d in shape))
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise CorruptDataError(f"{where}: tensor {name!r} has a malformed header entry")
        t = Tensor(name, dtype, tuple(shape), a, b)
        if dtype in DTYPE_NAMES and nbytes_of(dtype, shape) != b - a:
            raise CorruptDataError(f"{where}: tensor {name!r}: {b - a} bytes for {dtype} {shape}")
        tensors.append(t)
    tensors.sort(key=lambda t: (t.begin, t.end))
    end = 0
    for t in tensors:
        if t.begin != end:
            raise CorruptDataError(f"{where}: tensor {t.name!r} starts at data byte {t.begin}, not {end} "
                                   f"(a gap or an overlap in the data section)")
        end = t.end
    return Layout(bytes(text), meta, tensors, end)


def read_layout(path: Path, check: bool = True) -> Layout:
    """The Layout of a safetensors file, judged by the safetensors library first (check=True);
    CorruptDataError unless the tensors cover the data section to the file's last byte."""
    path = Path(path)
    if not path.is_file():
        raise UnsupportedError(f"{path}: no such file")
    try:
        if check:
            check_safetensors(path)
    except CorruptDataError:   # refused for a dtype string this safetensors does not know?
        layout = _read(path)    # (its message is the more precise when it refuses too)
        if all(t.dtype in DTYPE_NAMES for t in layout.tensors):
            raise
        _check_twin(path, layout)
        return layout
    return _read(path)


# What a file that is not safetensors most likely is, by its first bytes (for the error message).
_KNOWN_STARTS = ((b"PK\x03\x04", "a zip archive, as PyTorch's torch.save writes: load it with torch and save "
                  "it with safetensors first"),
                 (b"\x80", "a Python pickle, as older torch.save writes: load it with torch and save it with "
                  "safetensors first"),
                 (b"\x93NUMPY", "a NumPy .npy array: `ecf8 encode` compresses one array"),
                 (b"ECF8", "an ECF8 frame: `ecf8 decode` and `ecf8 info` read it"),
                 (b"{", "it starts like JSON"))


def _what_it_is(head: bytes, n: int, size: int) -> str:
    for start, what in _KNOWN_STARTS:
        if head.startswith(start):
            return what
    if len(head) < 8:
        return f"{size} bytes, shorter than a safetensors header"
    return f"its first 8 bytes give a header of {n:,} bytes, the file has {size:,}"


def _read(path: Path) -> Layout:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little")
        if len(head) < 8 or n > MAX_HEADER or 8 + n > size:
            raise CorruptDataError(f"{path}: not a safetensors file ({_what_it_is(head, n, size)})")
        text = f.read(n)
    layout = parse_header(text, str(path))
    if layout.data_start + layout.data_size != size:
        raise CorruptDataError(f"{path}: the tensors cover {layout.data_size} data bytes, the file has "
                               f"{size - layout.data_start}")
    return layout


def file_mode(like: Path | None = None) -> int:
    """Permission bits for a new file: those of `like`, else 0o666 less the umask (as cp or zstd)."""
    return Path(like).stat().st_mode & 0o777 if like is not None else 0o666 & ~_umask()


def _umask() -> int:
    try:                    # Linux: read it without changing it (os.umask is process-wide)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


@contextlib.contextmanager
def atomic_file(path: Path, mode: int | None = None, check: Callable[[Path], None] | None = None):
    """A binary file object that replaces `path` only if the block completes (and check(temp path)
    passes); nothing otherwise.  mode: permission bits (default: file_mode()).  `path`'s folder must
    exist (UnsupportedError); temporaries of killed runs for `path` are removed first
    (ecf8.output_files); the file's I/O errors name `path`."""
    path = Path(path)
    check_parent(path)
    remove_stale(path)
    tmp = None
    try:
        with held():            # (Ctrl-C waits until the clean-up below knows the temporary)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=TEMP_SUFFIX)
            f = NamedWriter(os.fdopen(fd, "wb"), path)      # (a full disk names `path`)
        with f:
            yield f
        if check is not None:
            check(Path(tmp))
        os.chmod(tmp, file_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            with held(), contextlib.suppress(OSError):     # (a second Ctrl-C waits for it)
                os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: Path, mode: int | None = None):
    """A temporary sibling folder renamed to `path` only if the block completes; removed otherwise.
    `path` must not exist or be an empty folder, and its parent must exist (UnsupportedError, before
    anything is written); temporaries of killed runs for `path` are removed first."""
    path = Path(path)
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        raise UnsupportedError(f"{path}: already exists and is not an empty folder (ecf8 never "
                               "replaces a folder, even with -f: remove it first)")
    check_parent(path)
    remove_stale(path)
    tmp = None
    try:
        with held():            # (Ctrl-C waits until the clean-up below knows the temporary)
            tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=temp_prefix(path), suffix=TEMP_SUFFIX))
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            with held():                # (a second Ctrl-C waits until it is gone)
                shutil.rmtree(tmp, ignore_errors=True)
        raise


class Entry(tuple):
    """(name, dtype name, shape, array, file offset) of one tensor; the array holds a copy of the
    bytes at that offset of the file."""

    __slots__ = ()

    def __new__(cls, name: str, dtype: str, shape: tuple[int, ...], array: np.ndarray, offset: int):
        return super().__new__(cls, (name, dtype, shape, array, offset))

    name = property(lambda self: self[0])
    dtype = property(lambda self: self[1])
    shape = property(lambda self: self[2])
    array = property(lambda self: self[3])
    offset = property(lambda self: self[4])


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, byte offset of the data section) of a valid safetensors file."""
    header, raw = read_header_text(path)
    return header, 8 + len(raw)


def read_header_text(path: Path) -> tuple[dict, bytes]:
    """(header dict, the header's exact bytes, padding included) of a valid safetensors file."""
    layout = read_layout(path)
    return load_json(layout.text, str(path)), layout.text


def iter_tensors(path: Path, raw: bool = False) -> Iterator[Entry]:
    """Each tensor of a safetensors file in data order, each array a copy in memory of its own (the
    file is read, never mapped: CorruptDataError if it changes meanwhile; nothing loaded changes).

    Dtypes outside DTYPE_NAMES raise UnsupportedError, or with raw=True come as uint8 byte arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise UnsupportedError(f"{path}: no such file")
    with StableFile(path) as f:
        layout = read_layout(path)
        f.check_path()                  # (the layout read is the open file's)
        for t in layout.tensors:
            if t.dtype in DTYPE_NAMES:
                dtype, shape = DTYPE_NAMES[t.dtype], t.shape
            elif raw:
                dtype, shape = np.dtype(np.uint8), (t.nbytes,)
            else:
                raise UnsupportedError(f"{path}: tensor {t.name!r} has unsupported dtype {t.dtype}")
            array = f.read(layout.data_start + t.begin, t.nbytes).view(dtype)
            yield Entry(t.name, t.dtype, shape, array.reshape(shape), layout.data_start + t.begin)


def model_files(folder: Path) -> tuple[list[str], list[str]]:
    """(safetensors files, other files) of a model folder and its subfolders, as sorted relative
    POSIX paths.  Every ``*.safetensors.index.json`` must name only existing safetensors files
    inside the folder (UnsupportedError otherwise: a missing shard, an absolute or '..' path)."""
    folder = Path(folder)
    files = []
    for root, dirs, names in os.walk(folder):
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
        if links:       # os.walk would skip it: the output would silently lack its files
            raise UnsupportedError(f"{Path(root, links[0])}: a link to a folder (give the folder itself)")
        for n in names:
            if not os.path.isfile(os.path.join(root, n)):     # a dangling link, a pipe, ...
                raise UnsupportedError(f"{Path(root, n)}: not a regular file (or a link to a missing one)")
            files.append(Path(root, n).relative_to(folder).as_posix())
    files.sort()
    tensors = [f for f in files if f.endswith(".safetensors")]
    for index in (f for f in files if f.endswith(".safetensors.index.json")):
        weight_map = load_json((folder / index).read_bytes(), str(folder / index))
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UnsupportedError(f"{folder / index}: no weight_map of tensor names to files")
        base = Path(index).parent
        for shard in dict.fromkeys(weight_map.values()):
            rel = Path(shard)
            if rel.is_absolute() or ".." in rel.parts or not rel.parts:
                raise UnsupportedError(f"{folder / index}: shard {shard!r} is outside the model folder")
            if (base / rel).as_posix() not in tensors:
                raise UnsupportedError(f"{folder / index}: shard {shard!r} is missing")
    if not tensors:
        raise UnsupportedError(f"{folder}: no .safetensors files")
    kept = set(tensors)
    return tensors, [f for f in files if f not in kept]


def tensor_files(path: Path) -> list[Path]:
    """The safetensors files of a path: the file itself, or those of a model folder (model_files)."""
    path = Path(path)
    if path.is_dir():
        return [path / f for f in model_files(path)[0]]
    if not path.exists():
        raise UnsupportedError(f"{path}: no such file")
    return [path]


def check_names(tensors: dict, metadata) -> None:
    """UnsupportedError unless names and metadata are what safetensors stores: str names other
    than '__metadata__', and a dict of str to str."""
    for name in tensors:
        if not isinstance(name, str) or name == "__metadata__":
            raise UnsupportedError(f"tensor name {name!r}: safetensors names are strings other than "
                                   f"'__metadata__'")
        try:
            name.encode()
        except UnicodeEncodeError:
            raise UnsupportedError(f"tensor name {name!r} is not valid Unicode") from None
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise UnsupportedError("metadata must be a dict of str to str (as safetensors stores it)")


def plain_header(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
                 ) -> tuple[bytes, list[np.ndarray]]:
    """(header bytes, arrays) of the safetensors file write_safetensors writes: the header JSON
    padded with spaces to 8 bytes, and the arrays C-contiguous in data order (those given, or
    copies; big-endian ones converted, values kept).  UnsupportedError for names, metadata or dtypes
    safetensors cannot store."""
    check_names(tensors, metadata)
    names = {v: k for k, v in DTYPE_NAMES.items()}
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    arrays = []
    for name, x in tensors.items():
        x = native_order(np.asarray(x))                  # (safetensors data is little-endian)
        x = x if x.flags.c_contiguous else x.copy()       # (ascontiguousarray makes 0-d 1-d)
        if x.dtype not in names:
            raise UnsupportedError(f"tensor {name!r}: dtype {x.dtype} has no safetensors name")
        header[name] = {"dtype": names[x.dtype], "shape": list(x.shape),
                        "data_offsets": [offset, offset + x.nbytes]}
        offset += x.nbytes
        arrays.append(x)
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return blob + b" " * (-len(blob) % 8), arrays


def write_safetensors(tensors: dict[str, np.ndarray], path: Path,
                      metadata: dict[str, str] | None = None) -> None:
    """Write arrays (any DTYPE_NAMES dtype, either byte order) as a safetensors file, atomically
    (temp file + rename).
    UnsupportedError for names, metadata or dtypes safetensors cannot store."""
    blob, arrays = plain_header(tensors, metadata)
    with atomic_file(path) as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for x in arrays:
            f.write(x.reshape(-1).view(np.uint8).data)
