"""The ``ecf8`` command (also ``python -m ecf8``).

    ecf8 bench [PATH]        # bits/weight and CPU/GPU speed next to zstd; no PATH: a bundled real sample
    ecf8 compress model.safetensors|shard-dir -o OUT [-j N] [--zstd-level L] [--device cuda]
    ecf8 decompress OUT -o restored.safetensors                   # the original, byte for byte
    ecf8 info FILE... [--json]   # per-tensor table of a compressed checkpoint (a folder: its total too), or a frame header
    ecf8 verify FILE...      # every checksum, every tensor decoded; exit status 1 on any problem
    ecf8 analyze PATH [--json] [--tensor NAME] [--plot FILE.png]   # should I compress? docs/analyze.md
    ecf8 encode weights.npy -o weights.ecf8 [--dtype bf16]       # one array, one frame
    ecf8 decode weights.ecf8 -o weights.npy

Every command takes -q (no progress bar or messages besides results); every command that writes
refuses an existing output unless given -f/--force, never writes over its input, and writes into a
folder that exists (never created).  .npy files cannot name ml_dtypes types (NumPy
saves them as raw 'V1'/'V2'): ``encode`` takes ``--dtype`` (any spelling of ``ecf8.names``) for such
files or for uint8/uint16 bit views, and ``decode`` writes the bit view.  Errors print one line
naming the file (and tensor) and exit with status 1; output files appear only when complete.  A
reader of the output that leaves (``ecf8 info ... | head``) ends the command quietly with status 141,
as SIGPIPE would.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import re
import signal
import sys
from pathlib import Path

import numpy as np

from . import api, compressed, encoder
from . import format as fmt
from .errors import ECF8Error, UnsupportedError
from .info_cli import file_info, frame_line, refuse_plain, run_info
from .names import device_name, short_name
from .output_files import check_parent
from .numpy import load_npy
from .progress import job as progress_job
from .safetensors_io import atomic_file, iter_tensors, model_files, read_layout, tensor_files  # noqa: F401
from .tensor_codecs import ZSTD_LEVEL


def write_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def _jobs(text: str) -> int:
    """--jobs: worker processes; 0 means all cores."""
    n = _whole(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (all cores) or more, not {n}")
    return n or (os.cpu_count() or 1)


def _chunk_size(text: str) -> int | None:
    if text == "auto":
        return None
    n = _positive(text)
    if n & (n - 1) or not (1 << fmt.MIN_CHUNK_LOG2) <= n <= (1 << fmt.MAX_CHUNK_LOG2):
        raise argparse.ArgumentTypeError(f"must be a power of 2 from {1 << fmt.MIN_CHUNK_LOG2} to "
                                         f"2^{fmt.MAX_CHUNK_LOG2}, not {n}")
    return n


def _max_tables(text: str) -> int:
    n = _positive(text)
    if n > fmt.MAX_TABLES:
        raise argparse.ArgumentTypeError(f"must be 1 to {fmt.MAX_TABLES}, not {n}")
    return n


def _positive(text: str) -> int:
    n = _whole(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {n}")
    return n


def _dtype_arg(text: str) -> str:
    """--dtype: any spelling of ecf8.names (e4m3, F8_E4M3, float8_e4m3fn, ...), as its short name."""
    try:
        return short_name(text)
    except ECF8Error as e:
        raise argparse.ArgumentTypeError(str(e)) from None


DTYPE_HELP = "element type of a bit-view .npy: e4m3, e5m2, bf16 or fp16 (F8_E4M3, bfloat16, ... also work)"


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="ecf8", description="Lossless compression of FP8/BF16/FP16 "
                                     "weights by entropy-coding their exponents.",
                                     epilog="Try it: `ecf8 bench` measures a bundled sample of real weights.")
    parser.add_argument("-V", "--version", action="version", version=f"ecf8 {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("-q", "--quiet", action="store_true",
                       help="no progress bar, no messages besides results (info, verify, analyze, bench) and errors")
    force = argparse.ArgumentParser(add_help=False)
    force.add_argument("-f", "--force", action="store_true",
                       help="overwrite an existing output file (never the input; a folder output is never "
                       "replaced: it must be new or empty)")

    def chunking(p):
        p.add_argument("--chunk-size", type=_chunk_size, default=32768, metavar="N|auto",
                       help="elements per chunk, a power of 2 from 512 to 2^20, or auto: per tensor, "
                       "for GPU decoding speed (up to +0.15 bits/weight; default 32768)")
        p.add_argument("--max-tables", type=_max_tables, default=4, metavar="N",
                       help="code tables per tensor, 1-8 (default 4)")

    def coding(p, zstd_default=ZSTD_LEVEL, zstd_help="zstandard level for tensors ecf8 does not code"):
        chunking(p)
        p.add_argument("--zstd-level", type=int, default=zstd_default, choices=range(1, 23), metavar="1-22",
                       help=f"{zstd_help} (default {zstd_default})")

    def output(p, what):
        p.add_argument("-o", "--output", required=True, help=what + " (its folder must exist)")

    def cmd(name, help, *parents):
        return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                              parents=[quiet, *parents])

    p = cmd("compress", "compress a safetensors file or a directory of shards", force)
    p.add_argument("input", type=Path, help="a .safetensors file or a directory of shards")
    output(p, "the compressed file (a directory for a directory input)")
    p.add_argument("-j", "--jobs", type=_jobs, default="0", metavar="N",
                   help="worker processes on the CPU; 0 (default) = all cores; not used with --device cuda[:N]")
    p.add_argument("--device", default="cpu", metavar="DEV",
                   help="where FP8/BF16/FP16 tensors are encoded: cpu (default); cuda = every visible GPU "
                        "(CUDA_VISIBLE_DEVICES), a folder's shards spread over one worker process per GPU "
                        "(a single file uses one); cuda:N = GPU N only. Needs CuPy; the output is the same bytes")
    coding(p)
    p = cmd("decompress", "restore the original safetensors file(s), byte for byte", force)
    p.add_argument("input", type=Path, help="a compressed file or directory")
    output(p, "the restored file (a directory for a directory input)")
    p = cmd("info", "per-tensor sizes of compressed checkpoints or frames, and each folder's total")
    p.add_argument("inputs", type=Path, nargs="+", metavar="FILE",
                   help="compressed .safetensors files, folders of them, or .ecf8 frames")
    p.add_argument("--json", action="store_true",
                   help="print one JSON document ({inputs: [...], errors: [...]}) instead of tables")
    p = cmd("verify", "check every checksum and decode every tensor (exit status 1 on any problem)")
    p.add_argument("inputs", type=Path, nargs="+", metavar="FILE",
                   help="compressed .safetensors files or .ecf8 frames")
    p = cmd("analyze", "should I compress this? per-tensor entropy, tail index and what compress does", force)
    p.add_argument("path", type=Path,
                   help="a .safetensors file (plain or compressed), a directory of shards, a .npy or a frame")
    p.add_argument("--dtype", type=_dtype_arg, metavar="TYPE", help=DTYPE_HELP)
    p.add_argument("--json", action="store_true", help="print JSON (tensors, total, answer) instead of a table")
    p.add_argument("--threshold", type=float, default=5.0, metavar="PCT",
                   help="least total saving, in percent, worth compressing for (default 5)")
    p.add_argument("--plot", metavar="FILE.png",
                   help="draw exponent entropy per tensor and one tensor's histogram (needs matplotlib)")
    p.add_argument("--tensor", metavar="NAME",
                   help="print this tensor's detail; with --plot, the tensor whose histogram is drawn "
                   "(default: the largest FP8)")
    coding(p)
    p = cmd("bench", "size and CPU/GPU speed of ecf8 next to zstd on a bundled real sample or your file")
    p.add_argument("path", type=Path, nargs="?",
                   help="a .safetensors file or directory, a .npy or a frame (default: the bundled "
                   "all-MiniLM-L6-v2 sample)")
    p.add_argument("--tensor", metavar="NAME", help="measure only this tensor")
    p.add_argument("--dtype", type=_dtype_arg, metavar="TYPE", help=DTYPE_HELP)
    p.add_argument("--runs", type=_positive, default=5, metavar="N",
                   help="timed runs per measurement after the warm-up; the median is shown (default 5)")
    p.add_argument("--cpu-only", action="store_true", help="skip the GPU measurement")
    coding(p, zstd_default=3, zstd_help="zstandard level measured next to ecf8")
    p = cmd("encode", "compress one .npy array into an ECF8 frame", force)
    p.add_argument("input", type=Path, help="a .npy file (FP8/BF16 ones need --dtype: NumPy saves them as bits)")
    output(p, "the frame to write (.ecf8)")
    p.add_argument("--dtype", type=_dtype_arg, metavar="TYPE", help=DTYPE_HELP)
    chunking(p)
    p = cmd("decode", "decompress an ECF8 frame to a .npy file (a uint8/uint16 bit view)", force)
    p.add_argument("input", type=Path, help="an ECF8 frame")
    output(p, "the .npy file to write")
    return parser


def _check_device(args) -> None:
    """--device as 'cpu', 'cuda' or 'cuda:N'; one error line naming them otherwise."""
    if getattr(args, "device", None) is not None:
        try:
            args.device = device_name(args.device)
        except ECF8Error:
            raise UnsupportedError(f"--device must be cpu, cuda or cuda:N, not {args.device!r}") from None


def _check_output(args) -> None:
    """Refuse, before any work, an output that is the input, exists (a file without --force, a
    folder that is not empty), or whose folder does not exist (one rule for files and folders)."""
    key = "output" if getattr(args, "output", None) is not None else "plot"
    text = getattr(args, key, None)
    if text is None:
        return
    out = Path(text)
    setattr(args, key, out)
    src = getattr(args, "input", None) or getattr(args, "path", None)
    if src is not None and src.exists() and out.exists() and os.path.samefile(src, out):
        raise ECF8Error(f"{out} is the input: ecf8 never writes over its input, even with -f "
                        "(write elsewhere, then move the result)")
    makes_dir = args.command in ("compress", "decompress") and args.input.is_dir()
    if makes_dir:
        if out.resolve().is_relative_to(args.input.resolve()):
            raise ECF8Error(f"{out} lies inside the input folder {args.input}")
        if out.exists() and not (out.is_dir() and not any(out.iterdir())):
            raise ECF8Error(f"{out}: already exists and is not an empty folder (a folder output is never "
                            "replaced, even with -f: remove it first)")
        if out.suffix == ".safetensors" and not out.is_dir():
            raise ECF8Error(f"{args.input} is a folder, and the output of a folder is a folder of its "
                            f"files; {text} names one file: give a folder name, as in "
                            f"{out.with_suffix('')}")
    else:
        if out.is_dir() or text.endswith(("/", os.sep)):
            like = f", as in {out / src.name}" if args.command in ("compress", "decompress") else ""
            raise ECF8Error(f"{text} {'is' if out.is_dir() else 'names'} a folder, and the output of a "
                            f"file is a file: give its name{like}" + ("" if out.is_dir() else
                                                                      f" (folder {out} must exist)"))
        if out.exists() and not args.force:
            raise ECF8Error(f"{out} exists; use -f/--force to overwrite it")
    check_parent(out)


def _message(e: BaseException, args=None) -> str:
    """The first line of an error, naming its file: the real one where a temporary one would leak,
    and for an I/O error that names none (a full disk), the command's input and output."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    name, other = getattr(e, "filename", None), getattr(e, "filename2", None)
    if isinstance(e, FileNotFoundError) and isinstance(name, (str, bytes, os.PathLike)) and not other:
        text = f"{os.fsdecode(name)}: no such file"        # as every command says it
    elif isinstance(e, OSError) and e.strerror:
        if isinstance(name, (str, bytes, os.PathLike)):
            text = f"{e.strerror}: {os.fsdecode(name)}" + (f" -> {os.fsdecode(other)}" if other else "")
        elif getattr(args, "output", None) is not None:
            src = getattr(args, "input", None) or getattr(args, "path", None)
            text = f"{e.strerror} ({'' if src is None else f'{src} -> '}{args.output})"
    return _TEMP.sub(lambda m: m.group(1), text)


_TEMP = re.compile(r"(?<![^/\\\s'\"])\.([^/\\\s'\"]+?)(?:\.plain)?(?:\.\d+)?\.(?:[A-Za-z0-9_]+\.)?tmp\b")


def _job(args):
    """One progress bar over all the files of compress/decompress/verify (ETA for the whole job)."""
    enabled = False if args.quiet else None
    total = 0
    try:
        if args.command == "compress":     # (each input's header read here, once: see _run)
            for f in tensor_files(args.input):
                args.layouts[f] = read_layout(f)
            total = sum(layout.data_size for layout in args.layouts.values())
        else:
            paths = [p for p, e in _inputs(args.inputs) if not e] if args.command == "verify" \
                else tensor_files(args.input)
            total = sum(r.original_bytes for p in paths if not fmt.is_frame_file(p) for r in compressed.inspect_file(p))
    except (ECF8Error, OSError, ValueError, KeyError):
        pass            # the command itself reports the problem
    return progress_job(total, args.command, enabled)


def _input_bytes(src: Path) -> int:
    return sum(f.stat().st_size for f in tensor_files(src))


def _compress_summary(src: Path, before: int, outs: list[Path], zstd_level: int,
                      chosen: dict[Path, dict[str, str] | None]) -> str:
    """'src: original -> compressed bytes (saving)', and a note when nothing was entropy-coded
    (chosen: each output's {tensor: codec}, as compress_path reports it)."""
    after = sum(f.stat().st_size for f in outs)
    line = f"{src}: {before:,} -> {after:,} file bytes ({1 - after / max(before, 1):.1%} saved) in {len(outs)} file" \
        + "s" * (len(outs) != 1)
    codecs = {codec for f in outs for codec in (chosen.get(f) or {
        r.name: r.codec for r in compressed.inspect_file(f)}).values()}
    if "ecf8" not in codecs:
        line += (f"\nnothing was entropy-coded (no FP8/BF16/FP16 tensor gained): only zstandard "
                 f"(level {zstd_level}) acted{'' if 'zstd' in codecs else ', and it saved nothing'}")
    return line


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up runs."""


def _terminate(signum, frame):
    raise _Terminated()


def _notes(quiet: bool) -> logging.Handler:
    """Print what the library logs on the ``ecf8`` logger (a removed temporary of a killed run, say)
    as 'ecf8: ...' lines on stderr; -q: only errors."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("ecf8: %(message)s"))
    handler.setLevel(logging.ERROR if quiet else logging.INFO)
    logging.getLogger("ecf8").addHandler(handler)
    return handler


def main(argv: list[str] | None = None) -> int:
    try:        # SIGTERM and Ctrl-C: no partial output, workers stopped, one line, 143 / 130
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:                        # not the main thread: leave signals alone
        previous = None
    args = notes = None
    try:
        args = _parser().parse_args(argv)
        notes = _notes(args.quiet)
        _check_device(args)
        _check_output(args)
        code = _run(args)
        sys.stdout.flush()              # (a reader gone shows here: see BrokenPipeError below)
        return code
    except KeyboardInterrupt as e:
        print("ecf8: interrupted", file=sys.stderr)
        code = 143 if isinstance(e, _Terminated) else 130
        if argv is None:        # the command line itself (outputs are cleaned up by now): leave
            # at once, not waiting at exit for the threads of a worker pool that was just killed
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    except BrokenPipeError:     # `ecf8 info ... | head`: the reader left; nothing to say, and the
        # status of a command killed by SIGPIPE, as `cat` gives.  (Python's recipe: stdout goes
        # to devnull, so that the interpreter's flush at exit does not fail again.)
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (ECF8Error, OSError, ValueError, KeyError) as e:
        print(f"ecf8: error: {_message(e, args)}", file=sys.stderr)
        return 1
    finally:
        if notes is not None:
            logging.getLogger("ecf8").removeHandler(notes)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _inputs(paths: list[Path]):
    """(file, None) for each path and each safetensors file of a folder; (path, error) for a
    folder that cannot be listed."""
    for path in paths:
        if not path.exists():
            yield path, UnsupportedError(f"{path}: no such file")
            continue
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
        args.layouts, chosen = {}, {}
        with _job(args):
            if cmd == "compress":
                before = _input_bytes(args.input)
                outs = compressed.compress_path(args.input, args.output, jobs=args.jobs, progress=progress,
                                                chunk_size=args.chunk_size, max_tables=args.max_tables,
                                                zstd_level=args.zstd_level, device=args.device,
                                                layouts=args.layouts, codecs=chosen)
            else:
                outs = compressed.decompress_path(args.input, args.output, progress=progress)
        if args.quiet:
            pass
        elif cmd == "compress":
            print(_compress_summary(args.input, before, outs, args.zstd_level, chosen))
        else:
            for out in outs:
                print(f"{out}: {out.stat().st_size:,} bytes")
    elif cmd == "info":         # every input, each fully accounted for; 1 if any is not
        return run_info(args.inputs, args.json, _message)
    elif cmd == "verify":       # every input checked; every problem on its own line
        failed = False
        with _job(args):
            for path, error in _inputs(args.inputs):
                try:
                    if error:
                        raise error
                    if fmt.is_frame_file(path):
                        api.decode(path.read_bytes())
                        n, problems, what = 1, [], "frame"
                    else:
                        refuse_plain(path)
                        n, problems = compressed.check_file(path, progress=False if args.quiet else None)
                        what = "tensors" if problems or compressed.file_version(path) > 1 else \
                            "tensors; format 1: no checksums; decoded only"
                except BrokenPipeError:
                    raise
                except (ECF8Error, OSError) as e:
                    text = _message(e)
                    n, problems = 0, [text if str(path) in text else f"{path}: {text}"]
                for problem in problems:
                    print(f"ecf8: error: {_message(problem)}", file=sys.stderr)
                failed |= bool(problems)
                if not problems:
                    print(f"{path}: ok ({n} {what})")
        return int(failed)
    elif cmd == "analyze":
        from .analyze_cli import run_analyze

        run_analyze(args)
    elif cmd == "bench":
        from .bench_cli import run_bench

        for line in run_bench(args.path, dtype=args.dtype, tensor=args.tensor, runs=args.runs,
                              zstd_level=args.zstd_level, gpu=not args.cpu_only,
                              options={"chunk_size": args.chunk_size, "max_tables": args.max_tables}):
            print(line, flush=True)
    elif cmd == "encode":
        x = load_npy(args.input, args.dtype)
        try:
            blob = encoder.encode(x, chunk_size=args.chunk_size, max_tables=args.max_tables)
        except ECF8Error as e:
            raise type(e)(f"{args.input}: {e}") from None
        write_atomic(args.output, blob)
        if not args.quiet:
            print(frame_line(file_info(args.output)))
    else:
        if args.input.is_file() and not fmt.is_frame_file(args.input):
            try:
                read_layout(args.input, check=False)
            except (ECF8Error, OSError):
                pass            # not safetensors either: decode's own error says what it is
            else:
                raise UnsupportedError(f"{args.input}: a safetensors file, not an ECF8 frame (`ecf8 decompress` "
                                       "restores a compressed checkpoint; decode reads frames of `ecf8 encode`)")
        try:
            y = api.decode(args.input.read_bytes())
        except ECF8Error as e:
            raise type(e)(e if str(args.input) in str(e) else f"{args.input}: {e}") from None
        buf = io.BytesIO()
        np.save(buf, y.view(np.uint8 if y.itemsize == 1 else np.uint16))
        write_atomic(args.output, buf.getvalue())
        if not args.quiet:
            print(f"{args.output}: {y.shape} bits of {y.dtype.name} (uint{8 * y.itemsize} view)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
