"""The ``ecf8`` command: encode / decode .npy files and inspect frames.

    ecf8 encode weights.npy -o weights.ecf8 [--dtype bf16] [--chunk-size N] [--max-tables K]
    ecf8 decode weights.ecf8 -o weights.npy
    ecf8 info weights.ecf8 [...]
    ecf8 analyze model.safetensors|shard-dir|weights.npy [--json] [--threshold PCT] [--plot FILE.png]

.npy files cannot name ml_dtypes types (NumPy saves them as raw 'V1'/'V2'): ``encode`` takes
``--dtype`` for such files or for uint8/uint16 bit views, and ``decode`` writes the bit view
(uint8/uint16) and says which dtype to view it as.  Errors print one line and exit with status 1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from . import api, encoder
from .checkpoint import atomic_file
from . import format as fmt
from .errors import ECF8Error

DTYPE_NAMES = {"e4m3": 1, "e5m2": 2, "bf16": 3, "fp16": 4}


def write_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def load_npy(path: Path, dtype: str | None) -> np.ndarray:
    x = np.load(path, allow_pickle=False)
    if dtype:
        spec = fmt.DTYPES[DTYPE_NAMES[dtype]]
        if x.dtype.itemsize != spec.dtype.itemsize or x.dtype.kind not in "uiVf":
            raise ECF8Error(f"{path}: elements of {x.dtype} cannot be viewed as {dtype}")
        return x.view(spec.dtype)
    if x.dtype.kind in "Vu":
        raise ECF8Error(f"{path}: dtype {x.dtype} is a bit view; say which type it holds with --dtype")
    return x


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ecf8", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="compress a .npy file")
    enc.add_argument("input", type=Path)
    enc.add_argument("-o", "--output", type=Path, required=True)
    enc.add_argument("--dtype", choices=sorted(DTYPE_NAMES))
    enc.add_argument("--chunk-size", type=int, default=32768)
    enc.add_argument("--max-tables", type=int, default=4)
    dec = sub.add_parser("decode", help="decompress a frame to a .npy file")
    dec.add_argument("input", type=Path)
    dec.add_argument("-o", "--output", type=Path, required=True)
    inf = sub.add_parser("info", help="print frame headers")
    inf.add_argument("inputs", type=Path, nargs="+")
    ana = sub.add_parser("analyze", help="exponent entropy, tail index and achievable savings per tensor")
    ana.add_argument("path", type=Path, help="a .safetensors file, a directory of shards, or a .npy")
    ana.add_argument("--dtype", choices=sorted(DTYPE_NAMES), help="element type of a bit-view .npy")
    ana.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    ana.add_argument("--threshold", type=float, default=5.0,
                     help="least saving, in percent, worth compressing (default 5)")
    ana.add_argument("--plot", type=Path, help="draw entropy per tensor and one histogram (PNG)")
    ana.add_argument("--tensor", help="the tensor whose histogram --plot draws (default: largest)")
    args = parser.parse_args(argv)
    try:
        if args.command == "encode":
            x = load_npy(args.input, args.dtype)
            write_atomic(args.output, encoder.encode(x, chunk_size=args.chunk_size,
                                                     max_tables=args.max_tables))
            print(_describe(args.output))
        elif args.command == "decode":
            y = api.decode(args.input.read_bytes())
            with tempfile.TemporaryFile() as f:
                np.save(f, y.view(np.uint8 if y.itemsize == 1 else np.uint16))
                f.seek(0)
                write_atomic(args.output, f.read())
            print(f"{args.output}: {y.shape} bits of {y.dtype.name} (uint{8 * y.itemsize} view)")
        elif args.command == "analyze":
            from .analyze_cli import run_analyze

            run_analyze(args)
        else:
            for path in args.inputs:
                print(_describe(path))
    except (ECF8Error, OSError, ValueError) as e:
        print(f"ecf8: error: {e}", file=sys.stderr)
        return 1
    return 0


def _describe(path: Path) -> str:
    m = api.info(Path(path).read_bytes())
    how = "stored" if m.stored else f"{m.chunks} chunks of {m.chunk_size}, {m.tables} tables"
    return (f"{path}: {m.dtype} {m.shape}, {m.original_bytes} -> {m.compressed_bytes} bytes, "
            f"{m.bits_per_weight:.3f} bits/weight ({how})")


if __name__ == "__main__":
    sys.exit(main())
