"""The ``ecf8`` command.

    ecf8 compress model.safetensors|shard-dir -o OUT [--jobs N]   # a compressed safetensors file
    ecf8 decompress OUT -o restored.safetensors                   # the original, byte for byte
    ecf8 info FILE...        # per-tensor table of a compressed checkpoint, or an ECF8 frame header
    ecf8 verify FILE...      # every checksum, every tensor decoded; exit status 1 on any problem
    ecf8 analyze PATH [--json] [--threshold PCT] [--plot FILE.png]   # see docs/analyze.md
    ecf8 encode weights.npy -o weights.ecf8 [--dtype bf16]       # one array, one frame
    ecf8 decode weights.ecf8 -o weights.npy

.npy files cannot name ml_dtypes types (NumPy saves them as raw 'V1'/'V2'): ``encode`` takes
``--dtype`` for such files or for uint8/uint16 bit views, and ``decode`` writes the bit view.
Errors print one line and exit with status 1; output files appear only when complete.
"""

from __future__ import annotations

import argparse
import io
import math
import signal
import sys
from pathlib import Path

import numpy as np

from . import api, encoder, store
from . import format as fmt
from .checkpoint import atomic_file, model_files
from .errors import ECF8Error



def write_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def load_npy(path: Path, dtype: str | None) -> np.ndarray:
    """An array from a .npy file, viewed as `dtype` (e4m3, e5m2, bf16, fp16) when given."""
    x = np.load(path, allow_pickle=False)
    if dtype:
        spec = fmt.SHORT_NAMES[dtype]
        if x.dtype.itemsize != spec.dtype.itemsize or x.dtype.kind not in "uiVf":
            raise ECF8Error(f"{path}: elements of {x.dtype} cannot be viewed as {dtype}")
        return x.view(spec.dtype)
    if x.dtype.kind in "Vu":
        raise ECF8Error(f"{path}: dtype {x.dtype} is a bit view; say which type it holds with --dtype")
    return x


def _is_frame(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == fmt.MAGIC


def _frame_line(path: Path) -> str:
    m = api.info(Path(path).read_bytes())
    how = "stored" if m.stored else f"{m.chunks} chunks of {m.chunk_size}, {m.tables} tables"
    return (f"{path}: {m.dtype} {m.shape}, {m.original_bytes} -> {m.compressed_bytes} bytes, "
            f"{m.bits_per_weight:.3f} bits/weight ({how})")


def _checkpoint_table(path: Path) -> str:
    rows = store.inspect_file(path)
    width = max([len(r.name) for r in rows] + [6])
    lines = [f"{path}", f"{'tensor':{width}} {'dtype':7} {'shape':>18} {'codec':5} {'original':>12} "
             f"{'stored':>12} {'bits/w':>7} {'saving':>7}"]
    for r in rows:
        n = math.prod(r.shape)
        bpw = f"{r.stored_bytes * 8 / n:7.3f}" if n else f"{'-':>7}"
        saving = f"{1 - r.stored_bytes / r.original_bytes:7.1%}" if r.original_bytes else f"{'-':>7}"
        lines.append(f"{r.name:{width}} {r.dtype:7} {str(list(r.shape)):>18} {r.codec:5} "
                     f"{r.original_bytes:12,} {r.stored_bytes:12,} {bpw} {saving}")
    orig = sum(r.original_bytes for r in rows)
    stored = sum(r.stored_bytes for r in rows)
    lines.append(f"{'total':{width}} {len(rows):>7} tensors {'':18} {orig:12,} {stored:12,} "
                 f"{'':7} {1 - stored / max(orig, 1):7.1%}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecf8", description="Lossless compression of FP8/BF16/FP16 "
                                     "weights by entropy-coding their exponents.")
    sub = parser.add_subparsers(dest="command", required=True)

    def coding(p):
        p.add_argument("--chunk-size", type=int, default=32768, help="elements per chunk (power of 2)")
        p.add_argument("--max-tables", type=int, default=4, help="code tables per tensor (1-8)")

    p = sub.add_parser("compress", help="compress a safetensors file or a directory of shards")
    p.add_argument("input", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    coding(p)
    p = sub.add_parser("decompress", help="restore the original safetensors file(s)")
    p.add_argument("input", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--quiet", action="store_true")
    p = sub.add_parser("info", help="per-tensor sizes of compressed checkpoints or frames")
    p.add_argument("inputs", type=Path, nargs="+")
    p = sub.add_parser("verify", help="check every checksum and decode every tensor")
    p.add_argument("inputs", type=Path, nargs="+")
    p.add_argument("--quiet", action="store_true")
    p = sub.add_parser("analyze", help="exponent entropy, tail index and achievable savings per tensor")
    p.add_argument("path", type=Path, help="a .safetensors file, a directory of shards, or a .npy")
    p.add_argument("--dtype", choices=sorted(fmt.SHORT_NAMES), help="element type of a bit-view .npy")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--threshold", type=float, default=5.0,
                   help="least saving, in percent, worth compressing (default 5)")
    p.add_argument("--plot", type=Path, help="draw entropy per tensor and one histogram (PNG)")
    p.add_argument("--tensor", help="the tensor whose histogram --plot draws (default: largest FP8)")
    p = sub.add_parser("encode", help="compress one .npy array into an ECF8 frame")
    p.add_argument("input", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--dtype", choices=sorted(fmt.SHORT_NAMES))
    coding(p)
    p = sub.add_parser("decode", help="decompress an ECF8 frame to a .npy file (bit view)")
    p.add_argument("input", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up runs."""


def _terminate(signum, frame):
    raise _Terminated()


def _error(e: BaseException) -> str:
    return f"ecf8: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:        # SIGTERM and Ctrl-C: no partial output, workers stopped, one line, 143 / 130
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:                        # not the main thread: leave signals alone
        previous = None
    try:
        return _run(args)
    except KeyboardInterrupt as e:
        print("ecf8: interrupted", file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130
    except (ECF8Error, OSError, ValueError, KeyError) as e:
        print(_error(e), file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _inputs(paths: list[Path]):
    """(file, None) for each path and each safetensors file of a folder; (path, error) for a
    folder that cannot be listed."""
    for path in paths:
        try:
            files = [path / rel for rel in model_files(path)[0]] if path.is_dir() else [path]
        except ECF8Error as e:
            yield path, e
            continue
        yield from ((f, None) for f in files)


def _run(args) -> int:
    cmd = args.command
    if cmd in ("compress", "decompress"):
        progress = False if args.quiet else None
        if cmd == "compress":
            outs = store.compress_path(args.input, args.output, jobs=args.jobs, progress=progress,
                                       chunk_size=args.chunk_size, max_tables=args.max_tables)
        else:
            outs = store.decompress_path(args.input, args.output, progress=progress)
        for out in outs:
            print(f"{out}: {out.stat().st_size:,} bytes")
    elif cmd == "info":         # every input, each fully accounted for; 1 if any is not
        failed = False
        for path, error in _inputs(args.inputs):
            try:
                if error:
                    raise error
                print(_frame_line(path) if _is_frame(path) else _checkpoint_table(path))
            except (ECF8Error, OSError) as e:
                print(_error(e), file=sys.stderr)
                failed = True
        return int(failed)
    elif cmd == "verify":       # every input checked; every problem on its own line
        failed = False
        for path, error in _inputs(args.inputs):
            try:
                if error:
                    raise error
                if _is_frame(path):
                    api.decode(path.read_bytes())
                    n, problems = 1, []
                else:
                    n, problems = store.check_file(path, progress=False if args.quiet else None)
            except (ECF8Error, OSError) as e:
                n, problems = 0, [f"{path}: {e}" if str(path) not in str(e) else str(e)]
            for problem in problems:
                print(_error(problem), file=sys.stderr)
            if problems:
                failed = True
            else:
                print(f"{path}: ok ({n} {'frame' if _is_frame(path) else 'tensors'})")
        return int(failed)
    elif cmd == "analyze":
        from .analyze_cli import run_analyze

        run_analyze(args)
    elif cmd == "encode":
        x = load_npy(args.input, args.dtype)
        write_atomic(args.output, encoder.encode(x, chunk_size=args.chunk_size,
                                                 max_tables=args.max_tables))
        print(_frame_line(args.output))
    else:
        y = api.decode(args.input.read_bytes())
        buf = io.BytesIO()
        np.save(buf, y.view(np.uint8 if y.itemsize == 1 else np.uint16))
        write_atomic(args.output, buf.getvalue())
        print(f"{args.output}: {y.shape} bits of {y.dtype.name} (uint{8 * y.itemsize} view)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
