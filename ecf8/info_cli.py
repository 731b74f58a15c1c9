"""``ecf8 info``: per-tensor sizes of compressed checkpoints and ECF8 frames, with a total for each
folder, as tables or as one JSON document (--json)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Callable

from . import api, compressed
from . import format as fmt
from .safetensors_io import model_files, read_layout
from .errors import ECF8Error, UnsupportedError

__all__ = ["file_info", "folder_total", "frame_line", "run_info", "refuse_plain"]


def refuse_plain(path: Path) -> None:
    """UnsupportedError pointing to ``ecf8 compress``/``analyze`` when `path` is a safetensors file
    that ecf8 did not compress (one whose header carries no ``__metadata__['ecf8']``)."""
    try:
        layout = read_layout(path, check=False)
    except (ECF8Error, OSError):
        return              # not safetensors at all: the command's own error says what it is
    if compressed.META_KEY not in layout.metadata:
        raise UnsupportedError(f"{path}: a plain safetensors file, not an ecf8-compressed one "
                               "(`ecf8 compress` compresses it; `ecf8 analyze` tells what that would save)")


def file_info(path: Path) -> dict:
    """What ``ecf8 info --json`` says of one file: an ECF8 frame's header, or a compressed
    checkpoint's tensors and total (sizes in bytes).  ECF8Error/OSError for anything else."""
    path = Path(path)
    if fmt.is_frame_file(path):
        m = api.info(path.read_bytes())
        return {"path": str(path), "kind": "frame", "dtype": m.dtype, "shape": list(m.shape),
                "codec": "none" if m.stored else "ecf8", "chunk_size": m.chunk_size, "chunks": m.chunks,
                "tables": m.tables, "original_bytes": m.original_bytes, "stored_bytes": m.compressed_bytes,
                "saving": _saving(m.original_bytes, m.compressed_bytes)}
    refuse_plain(path)
    rows = compressed.inspect_file(path)
    tensors = [{"name": r.name, "dtype": r.dtype, "shape": list(r.shape), "codec": r.codec,
                "original_bytes": r.original_bytes, "stored_bytes": r.stored_bytes} for r in rows]
    orig, stored = sum(r.original_bytes for r in rows), sum(r.stored_bytes for r in rows)
    return {"path": str(path), "kind": "checkpoint", "tensors": tensors,
            "total": {"tensors": len(rows), "original_bytes": orig, "stored_bytes": stored,
                      "saving": _saving(orig, stored)}}


def folder_total(files: list[dict]) -> dict:
    """Sums over the file_info of a folder's files."""
    orig = sum(f["total"]["original_bytes"] if "total" in f else f["original_bytes"] for f in files)
    stored = sum(f["total"]["stored_bytes"] if "total" in f else f["stored_bytes"] for f in files)
    return {"files": len(files), "tensors": sum(f["total"]["tensors"] if "total" in f else 1 for f in files),
            "original_bytes": orig, "stored_bytes": stored, "saving": _saving(orig, stored)}


def _saving(orig: int, stored: int) -> float | None:
    return 1 - stored / orig if orig else None


def _pct(saving: float | None) -> str:
    return "-" if saving is None else f"{saving:.1%}"


def frame_line(f: dict) -> str:
    """One line on a frame, from its ``file_info``: dtype, shape, sizes, bits/weight, layout."""
    n = math.prod(f["shape"])
    tables = f"{f['tables']} table{'s' * (f['tables'] != 1)}"
    chunks = f"{f['chunks']} chunk{'s' * (f['chunks'] != 1)}"
    how = "stored" if f["codec"] == "none" else f"{chunks} of {f['chunk_size']}, {tables}"
    bpw = f"{f['stored_bytes'] * 8 / n:.3f}" if n else "-"
    return (f"{f['path']}: {f['dtype']} {tuple(f['shape'])}, {f['original_bytes']} -> {f['stored_bytes']} bytes, "
            f"{bpw} bits/weight ({how})")


def _checkpoint_table(f: dict) -> str:
    rows = f["tensors"]
    width = max([len(r["name"]) for r in rows] + [6])
    lines = [f["path"], f"{'tensor':{width}} {'dtype':7} {'shape':>18} {'codec':5} {'original':>12} "
             f"{'stored':>12} {'bits/w':>7} {'saving':>7}"]
    for r in rows:
        n = math.prod(r["shape"])
        bpw = f"{r['stored_bytes'] * 8 / n:7.3f}" if n else f"{'-':>7}"
        lines.append(f"{r['name']:{width}} {r['dtype']:7} {str(r['shape']):>18} {r['codec']:5} "
                     f"{r['original_bytes']:12,} {r['stored_bytes']:12,} {bpw} "
                     f"{_pct(_saving(r['original_bytes'], r['stored_bytes'])):>7}")
    t = f["total"]
    lines.append(f"{'total':{width}} {t['tensors']:>7} tensors {'':18} {t['original_bytes']:12,} "
                 f"{t['stored_bytes']:12,} {'':7} {_pct(t['saving']):>7}")
    return "\n".join(lines)


def _text(f: dict) -> str:
    return frame_line(f) if f["kind"] == "frame" else _checkpoint_table(f)


def _total_line(path: Path, t: dict, failed: int) -> str:
    line = (f"{path}: {t['files']} file{'s' * (t['files'] != 1)}, {t['tensors']} tensors, "
            f"{t['original_bytes']:,} -> {t['stored_bytes']:,} tensor bytes ({_pct(t['saving'])} saved)")
    return line + (f"; {failed} more file{'s' * (failed != 1)} could not be read" if failed else "")


def run_info(paths: list[Path], as_json: bool = False, message: Callable[[BaseException], str] = str) -> int:
    """``ecf8 info``: every input accounted for (one error line each on stderr, `message` its text);
    1 if any failed.  A folder's files are listed, then the folder's total."""
    out: list[dict] = []
    errors: list[str] = []

    def one(file: Path) -> dict | None:
        try:
            return file_info(file)
        except BrokenPipeError:
            raise
        except (ECF8Error, OSError) as e:
            errors.append(message(e))
            print(f"ecf8: error: {errors[-1]}", file=sys.stderr)
            return None

    for path in paths:
        if not path.exists():
            errors.append(f"{path}: no such file")
            print(f"ecf8: error: {errors[-1]}", file=sys.stderr)
            continue
        if not path.is_dir():
            f = one(path)
            if f is not None:
                out.append(f)
                if not as_json:
                    print(_text(f))
            continue
        try:
            files = [path / rel for rel in model_files(path)[0]]
        except ECF8Error as e:
            errors.append(message(e))
            print(f"ecf8: error: {errors[-1]}", file=sys.stderr)
            continue
        done = []
        for file in files:
            f = one(file)
            if f is not None:
                done.append(f)
                if not as_json:
                    print(_text(f))
        total = folder_total(done)
        if as_json:
            out.append({"path": str(path), "kind": "folder", "files": done, "total": total})
        else:
            print(_total_line(path, total, len(files) - len(done)))
    if as_json:
        print(json.dumps({"inputs": out, "errors": errors}, indent=1))
    return int(bool(errors))
