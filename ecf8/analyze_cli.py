"""``ecf8 analyze``: should this be compressed?  Per-tensor table, totals, JSON, one tensor's detail,
and plots (matplotlib only when --plot is given).  See docs/analyze.md."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from . import api
from . import format as fmt
from .analysis import TensorReport, analyze_tensor, fit_alpha, model_probabilities
from .errors import ECF8Error
from .safetensors_io import DTYPE_NAMES, iter_tensors, read_layout, tensor_files

__all__ = ["sources", "tensors_of", "totals", "run_analyze", "figure", "short_label", "ordinal"]


def sources(path: Path) -> list[tuple[Path, str]]:
    """(file, kind) of each input file; kind: 'safetensors', 'compressed' (an ecf8-compressed
    checkpoint), 'npy' or 'frame' (an ECF8 frame)."""
    from .compressed import META_KEY

    path = Path(path)
    if path.suffix == ".npy" and path.is_file():
        return [(path, "npy")]
    if path.is_file() and fmt.is_frame_file(path):
        return [(path, "frame")]
    out = []
    for file in tensor_files(path):
        out.append((file, "compressed" if META_KEY in read_layout(file).metadata else "safetensors"))
    return out


def tensors_of(path: Path, dtype: str | None = None) -> Iterator[tuple[str, str, np.ndarray]]:
    """(name, dtype name, array) of every tensor of a path; compressed inputs are decoded (their
    restored content), .npy bit views are read as `dtype` ('e4m3', 'e5m2', 'bf16', 'fp16')."""
    yield from _tensors(sources(path), dtype)


def _tensors(srcs: list[tuple[Path, str]], dtype: str | None) -> Iterator[tuple[str, str, np.ndarray]]:
    """tensors_of over sources() already listed."""
    from .numpy import load_npy
    from .compressed import CompressedFile

    for file, kind in srcs:
        if kind == "npy":
            x = load_npy(file, dtype)
            yield file.stem, _dtype_name(x.dtype), x
        elif kind == "frame":
            x = api.decode(file.read_bytes())
            yield file.stem, _dtype_name(x.dtype), x
        elif kind == "compressed":
            with CompressedFile(file) as f:
                for name in f.keys():
                    dtype = f.dtype_of(name)
                    yield name, dtype, f.get_tensor(name) if dtype in DTYPE_NAMES else f.get_bytes(name)
        else:
            for entry in iter_tensors(file, raw=True):     # unknown dtypes: their bytes (uint8)
                yield entry.name, entry.dtype, entry.array


def _dtype_name(dtype: np.dtype) -> str:
    try:
        return fmt.spec_for_dtype(dtype).name
    except ECF8Error:
        return next((k for k, v in DTYPE_NAMES.items() if v == dtype), dtype.name)


def totals(reports: list[TensorReport]) -> dict:
    """Whole-input sums: bytes before and after compress, saving, tensors per codec, and the
    element-weighted mean exponent entropy of the entropy-coded tensors."""
    orig = sum(r.original_bytes for r in reports)
    stored = sum(r.stored_bytes for r in reports)
    coded = [r for r in reports if r.exponent_entropy_bits is not None]
    n = sum(r.numel for r in coded)
    return {
        "tensors": len(reports),
        "numel": sum(r.numel for r in reports),
        "original_bytes": orig,
        "stored_bytes": stored,
        "saving": 1 - stored / orig if orig else 0.0,
        "codecs": {c: sum(r.codec == c for r in reports) for c in ("ecf8", "zstd", "none")},
        "exponent_entropy_bits": sum(r.exponent_entropy_bits * r.numel for r in coded) / n if n else None,
    }


def _answer(t: dict, threshold: float) -> str:
    c = t["codecs"]
    how = f"{c['ecf8']} entropy-coded (ecf8), {c['zstd']} zstd, {c['none']} kept unchanged"
    if t["original_bytes"] == 0:
        return "nothing to compress (no tensor data)"
    verdict = "yes" if t["saving"] >= threshold else "no"
    note = "" if c["ecf8"] else "; nothing is entropy-coded (no FP8/BF16/FP16 tensor gains): only zstd acts"
    return (f"compress: {t['original_bytes']:,} -> {t['stored_bytes']:,} bytes, saving {t['saving']:.1%} "
            f"({how}){note}. Worth it at --threshold {threshold:.0%}: {verdict}")


def run_analyze(args) -> None:
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ECF8Error("--plot needs matplotlib: pip install 'ecf8[plot]'") from None
    options = {"chunk_size": args.chunk_size, "max_tables": args.max_tables, "zstd_level": args.zstd_level}
    srcs = sources(args.path)
    notes = [f"note: {f} is an ecf8-compressed checkpoint: analysing its restored content "
             "(what `ecf8 decompress` gives back)" for f, kind in srcs if kind == "compressed"]
    notes += [f"note: {f} is an ECF8 frame: analysing its decoded array" for f, kind in srcs if kind == "frame"]
    detail_only = args.tensor is not None and args.plot is None
    from .progress import Bar

    items = [(n, d, x) for n, d, x in _tensors(srcs, args.dtype)
             if not detail_only or n == args.tensor]
    if args.tensor is not None and not any(n == args.tensor for n, _, _ in items):
        raise ECF8Error(f"{args.path}: no tensor named {args.tensor!r}")
    reports: list[TensorReport] = []
    with Bar(sum(x.nbytes for _, _, x in items), "analyze", False if args.quiet else None) as bar:
        for name, dtype_name, x in items:
            try:
                reports.append(analyze_tensor(name, x, dtype_name, options))
            except ECF8Error as e:
                raise type(e)(f"{args.path}: tensor {name!r}: {e}") from None
            bar.advance(x.nbytes, name)
    t = totals(reports)
    if args.json:
        print(json.dumps({"path": str(args.path), "compressed_input": any(k == "compressed" for _, k in srcs),
                          "notes": notes, "tensors": [r.as_json() for r in reports], "total": t,
                          "answer": _answer(t, args.threshold / 100)}, indent=1))
    elif detail_only:
        print("\n".join(notes * (not args.quiet) + [_detail(reports[0])]))
    else:
        print("\n".join(notes * (not args.quiet) + [_table(reports, t), _answer(t, args.threshold / 100)]))
    if args.plot is not None:
        _plot(reports, args.plot, args.tensor)
        if not args.json and not args.quiet:
            print(f"plot written to {args.plot}")


def _fmt(v, spec=".3f"):
    """A number as the table prints it: '-' for none, never '-0.000'."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    text = format(v, spec)
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def ordinal(n: int) -> str:
    """'1st', '2nd', '3rd', '4th', '11th', '22nd', ..."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


BOUNDS_NOTE = ("order-0 and ecf8 bound are the least one code for the whole tensor can spend, and ecf8 "
               "with --max-tables 1 never goes below them; with several code tables (default 4) chunks "
               "whose exponents differ are coded apart, and zstd uses context: achieved can then be lower")


def _table(reports: list[TensorReport], t: dict) -> str:
    width = max([len(r.name) for r in reports] + [len("total")])
    lines = [f"{'tensor':{width}} {'dtype':7} {'numel':>11} {'H(exp)':>7} {'H(raw)':>7} "
             f"{'order-0':>8} {'ecf8 bound':>10} {'achieved':>8} {'alpha':>6} {'H model':>7} "
             f"{'codec':5} {'saving':>7}"]
    for r in reports:
        lines.append(f"{r.name:{width}} {r.dtype:7} {r.numel:11,} {_fmt(r.exponent_entropy_bits):>7} "
                     f"{_fmt(r.raw_entropy_bits):>7} {_fmt(r.order0_bound_bits_per_weight):>8} "
                     f"{_fmt(r.ecf8_bound_bits_per_weight):>10} {_fmt(r.achieved_bits_per_weight):>8} "
                     f"{_fmt(r.alpha, '.2f'):>6} {_fmt(r.model_exponent_entropy_bits):>7} "
                     f"{r.codec:5} {r.saving:7.1%}")
    lines.append(f"{'total':{width}} {t['tensors']:>4} ten. {t['numel']:11,} "
                 f"{_fmt(t['exponent_entropy_bits']):>7} {'':7} {'':8} {'':10} "
                 f"{_fmt(t['stored_bytes'] * 8 / t['numel'] if t['numel'] else None):>8} {'':6} {'':7} "
                 f"{'':5} {t['saving']:7.1%}")
    lines.append("bits per element. order-0: entropy of whole bit patterns; ecf8 bound: H(exp) + raw bits; "
                 "achieved: what compress stores; alpha: tail index of the exponent histogram; H model: "
                 "its geometric-model entropy; codec: what `ecf8 compress` stores the tensor as "
                 f"(ecf8 = entropy-coded, zstd, none = unchanged). {BOUNDS_NOTE[0].upper()}{BOUNDS_NOTE[1:]}.")
    return "\n".join(lines)


def _detail(r: TensorReport) -> str:
    lines = [f"{r.name}: {r.dtype} {r.shape}, {r.numel:,} elements, {r.original_bytes:,} bytes",
             f"  compress stores it as {r.codec}: {r.stored_bytes:,} bytes "
             f"({_fmt(r.achieved_bits_per_weight)} bits/element), saving {r.saving:.1%}"]
    if r.exponent_entropy_bits is None:
        lines.append("  (no exponent statistics: ecf8 entropy-codes FP8, BF16 and FP16 only)"
                     if r.numel else "  (empty)")
        return "\n".join(lines)
    spec = fmt.spec_for_name(r.dtype)
    lines.append(f"  exponent entropy {r.exponent_entropy_bits:.3f} bits, sign+mantissa {r.raw_entropy_bits:.3f} "
                 f"bits ({spec.raw_bits} kept), order-0 bound {r.order0_bound_bits_per_weight:.3f}, "
                 f"ecf8 bound {r.ecf8_bound_bits_per_weight:.3f}")
    lines.append(f"  ({BOUNDS_NOTE})")
    lines.append(f"  tail index alpha {_fmt(r.alpha, '.2f')}, geometric-model exponent entropy "
                 f"{_fmt(r.model_exponent_entropy_bits)} bits")
    counts = np.array(r.exponent_counts, dtype=np.int64)
    bias = (1 << (spec.exp_bits - 1)) - 1
    lines.append(f"  {'exponent':>8}  {'|value| in':14} {'count':>13} {'share':>7}")
    seen = np.flatnonzero(counts)
    top = counts.max()
    for e in range(seen[0], seen[-1] + 1):
        span = "0 or subnormal" if e == 0 else f"[2^{e - bias}, 2^{e - bias + 1})"
        bar = "#" * int(round(40 * counts[e] / top))
        lines.append(f"  {e:8}  {span:14} {counts[e]:13,} {counts[e] / r.numel:7.2%} {bar}")
    return "\n".join(lines)


def short_label(name: str, width: int = 30) -> str:
    """An axis label for a tensor: 'L3 attention.self.query' for '...layer.3.attention.self.query.weight'
    (layers/blocks/h numbering shortened, a trailing '.weight' dropped), at most `width` characters."""
    s = re.sub(r"\.weight$", "", name)
    m = re.search(r"(?:^|\.)(?:layers?|blocks?|h)\.(\d+)\.", s)
    if m:
        s = f"L{m.group(1)} {s[m.end():]}"
    return s if len(s) <= width else "..." + s[-(width - 3):]


def _plot(reports: list[TensorReport], path: Path, tensor: str | None) -> None:
    """Draw the figure (see figure) and write it as a PNG, atomically."""
    import io

    from .safetensors_io import atomic_file

    fig = figure(reports, tensor)
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    with atomic_file(path) as f:
        f.write(buf.getvalue())


def figure(reports: list[TensorReport], tensor: str | None = None):
    """A matplotlib Figure: exponent entropy, achieved exponent bits and the model per tensor
    (left), and one tensor's exponent histogram (right; default: the largest FP8 tensor)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    coded = [r for r in reports if r.exponent_entropy_bits is not None]
    if not coded:
        raise ECF8Error("nothing to plot: no FP8/BF16/FP16 tensors")
    # Default: the largest FP8 tensor (the case ecf8 is for), else the largest one.
    pick = (next((r for r in coded if r.name == tensor), None) if tensor else
            max(coded, key=lambda r: (r.dtype.startswith("F8"), r.numel)))
    if pick is None:
        raise ECF8Error(f"--tensor {tensor!r} is not an analysed FP8/BF16/FP16 tensor")
    fig = plt.figure(figsize=(14, 7.4))
    grid = fig.add_gridspec(1, 2, width_ratios=[1.7, 1], left=0.055, right=0.985, top=0.83, bottom=0.36,
                            wspace=0.2)
    ax1, ax2 = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    x = np.arange(len(coded))
    palette = ("tab:blue", "tab:purple", "tab:orange", "tab:green", "tab:red", "tab:brown")
    colors = {spec.name: palette[(code - 1) % len(palette)] for code, spec in fmt.DTYPES.items()}
    for dtype in [d for d in colors if any(r.dtype == d for r in coded)]:
        idx = np.array([i for i, r in enumerate(coded) if r.dtype == dtype])
        rs = [coded[i] for i in idx]
        raw = fmt.spec_for_name(dtype).raw_bits
        c = colors[dtype]
        ax1.plot(idx, [r.exponent_entropy_bits for r in rs], "o", color=c, ms=5,
                 label=f"{dtype}: exponent entropy H(exp)")
        ax1.plot(idx, [r.achieved_bits_per_weight - raw if r.codec == "ecf8" else np.nan for r in rs], "_",
                 color=c, ms=11, mew=2, label=f"{dtype}: achieved bits/weight - {raw} raw bits")
        ax1.plot(idx, [r.model_exponent_entropy_bits if r.model_exponent_entropy_bits is not None else np.nan
                       for r in rs], "x", color=c, ms=5, alpha=0.6, label=f"{dtype}: geometric model (alpha fit)")
    step = max(1, -(-len(coded) // 60))
    ax1.set_xticks(x[::step])
    ax1.set_xticklabels([short_label(r.name) for r in coded][::step], rotation=90, fontsize=7)
    ax1.set_xlim(-0.7, len(coded) - 0.3)
    others = len(reports) - len(coded)
    ax1.set_xlabel("FP8/BF16/FP16 tensors in file order" + (f", every {ordinal(step)} named" if step > 1 else "")
                   + (f" ({others} tensors of other dtypes not shown)" if others else ""), fontsize=8)
    ax1.set_ylabel("exponent bits per weight")
    ax1.grid(axis="y", alpha=0.3)
    ax1.legend(fontsize=7.5, ncol=len({r.dtype for r in coded}), loc="lower left", bbox_to_anchor=(0, 1.01),
               borderaxespad=0, frameon=False)
    ax1.text(0, 1.16, "Exponent entropy per tensor, and what ecf8 spends on exponents", transform=ax1.transAxes,
             fontsize=11, va="bottom")
    spec = fmt.spec_for_name(pick.dtype)
    counts = np.array(pick.exponent_counts, dtype=np.float64)
    share = counts / counts.sum()
    seen = np.flatnonzero(counts)
    e = np.arange(seen[0], seen[-1] + 1)
    ax2.bar(e, share[e], color=colors.get(pick.dtype, "tab:blue"), alpha=0.8, label="measured")
    alpha, mode = fit_alpha(counts, spec)
    if not math.isnan(alpha):
        model = model_probabilities(alpha, mode, spec)
        ax2.plot(e, model[e], "k.--", label=f"geometric model, alpha = {alpha:.2f}")
    ax2.set_yscale("log")
    ax2.set_ylim(share[share > 0].min() / 3, min(1.0, share.max() * 3))
    ax2.set_xlim(e[0] - 0.6, e[-1] + 0.6)
    ax2.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    bias = (1 << (spec.exp_bits - 1)) - 1
    ax2.set_xlabel(f"exponent field e (|w| in [2^(e-{bias}), 2^(e-{bias}+1)); 0: zero/subnormal)", fontsize=8)
    ax2.set_ylabel("share of elements")
    title = pick.name if len(pick.name) <= 60 else "..." + pick.name[-57:]
    ax2.set_title(f"{title} ({pick.dtype}, {pick.numel:,} elements)\n"
                  f"H(exp) {pick.exponent_entropy_bits:.2f} bits, stored {pick.achieved_bits_per_weight:.2f} "
                  f"bits/weight ({pick.codec})", fontsize=9)
    ax2.grid(axis="y", alpha=0.3)
    ax2.legend(fontsize=7)
    fig.text(0.055, 0.012,
             "Left: order-0 entropy of each tensor's exponent field (dots), what ecf8 actually stores per weight "
             "minus the sign+mantissa bits it keeps verbatim\n(dashes: the exponent code plus all frame overhead), "
             "and the entropy of the two-sided geometric model (x). Right: the exponent histogram of one tensor.\n"
             "alpha is the tail index fitted above the histogram's mode: if |w| has a heavy tail P(|w| > x) ~ x^-alpha, "
             "each binade above the mode holds 2^-alpha times\nthe one below it; smaller alpha = heavier tail = "
             "more exponent entropy. Below the mode each binade holds about half the one above it.",
             fontsize=8, va="bottom")
    return fig
