"""Compressed checkpoints (format ``ecf8.safetensors``, specified in FORMAT.md section 9 and only
there): safetensors files whose float tensors are ECF8 frames, written and restored, one file or a
model folder at a time.  Reading them is ``ecf8.compressed_reader`` (its public names are
re-exported here).

Writing streams tensor by tensor from one open input file (``stable_file``: a file truncated,
written to or replaced meanwhile is a CorruptDataError; ``tensor_codecs.compress_tensors``) into a
temporary file renamed only on success; the header is reserved at its largest possible size
(refused beforehand if that exceeds the 100 MB safetensors reads), and at least a quarter of the
record less 1 MiB (readers refuse a larger record before decompressing it), filled in last and
padded with spaces as the safetensors format allows.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from json.encoder import encode_basestring        # JSON string, non-ASCII kept as is
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zstandard

from . import encoder, model_config
from .compressed_reader import (FORMAT, META_KEY, RECORD_PER_HEADER_BYTE, RECORD_SLACK,  # noqa: F401
                                VERSION, CompressedFile, PackedFile, TensorInfo,
                                _record_crc, check_file, file_version, inspect_file,
                                iter_decoded, load_file, safe_open, verify_file)
from .errors import CorruptDataError, ECF8Error, UnsupportedError
from .names import device_name
from .output_files import named
from .progress import _Progress
from .safetensors_io import (MAX_HEADER, Layout, atomic_dir, atomic_file, file_mode, model_files,
                             parse_header, plain_header, read_layout, tensor_files)
from .stable_file import StableFile
from .tensor_codecs import compress_tensors, daemonic

__all__ = ["save_file", "load_file", "safe_open", "CompressedFile", "compress_file",
           "decompress_file", "inspect_file", "verify_file", "check_file", "file_version",
           "compress_path", "decompress_path", "iter_decoded", "TensorInfo"]

RECORD_LEVEL = 9
RECORD_NAME = "__ecf8__"


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
    PackedFile(path).close()


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


def decompress_file(src: Path, dst: Path, *, progress: bool | None = None) -> None:
    """Restore the original safetensors file byte for byte (dst gets src's mode).  Every tensor is
    checked (crc, frame checksums) before dst appears; CorruptDataError otherwise."""
    src = Path(src)
    p = PackedFile(src)
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
