"""``ecf8 analyze``: the per-tensor table, JSON and plots (matplotlib only when --plot is given)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from . import format as fmt
from .analysis import TensorReport, analyze_tensor, model_probabilities, fit_alpha
from .checkpoint import iter_tensors, tensor_files
from .errors import ECF8Error


def _tensors(path: Path, dtype: str | None):
    from .cli import load_npy

    if path.suffix == ".npy":
        x = load_npy(path, dtype)
        try:
            name = fmt.spec_for_dtype(x.dtype).name
        except ECF8Error:
            name = x.dtype.name
        yield path.stem, name, x
        return
    for file in tensor_files(path):
        for entry in iter_tensors(file):
            yield entry.name, entry.dtype, entry.array


def run_analyze(args) -> None:
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ECF8Error("--plot needs matplotlib: pip install 'ecf8[plot]'") from None
    items = list(_tensors(args.path, args.dtype))
    reports: list[TensorReport] = []
    show = sys.stderr.isatty()
    for i, (name, dtype_name, x) in enumerate(items, 1):
        if show:
            print(f"\ranalyze [{i}/{len(items)}] {name[:60]:60}", end="", file=sys.stderr, flush=True)
        reports.append(analyze_tensor(name, x, dtype_name, args.threshold / 100))
    if show:
        print("\r" + " " * 80 + "\r", end="", file=sys.stderr)
    if args.json:
        print(json.dumps([r.as_json() for r in reports], indent=1))
    else:
        print(_table(reports))
    if args.plot is not None:
        _plot(reports, args.plot, args.tensor)
        if not args.json:
            print(f"plot written to {args.plot}")


def _fmt(v, spec=".3f"):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _table(reports: list[TensorReport]) -> str:
    width = max([len(r.name) for r in reports] + [6])
    lines = [f"{'tensor':{width}} {'dtype':7} {'numel':>11} {'H(exp)':>7} {'H(raw)':>7} "
             f"{'order-0':>8} {'ecf8 bound':>10} {'achieved':>8} {'alpha':>6} {'H model':>7}  verdict"]
    for r in reports:
        lines.append(f"{r.name:{width}} {r.dtype:7} {r.numel:11,} {_fmt(r.exponent_entropy_bits):>7} "
                     f"{_fmt(r.raw_entropy_bits):>7} {_fmt(r.order0_bound_bits_per_weight):>8} "
                     f"{_fmt(r.ecf8_bound_bits_per_weight):>10} {_fmt(r.achieved_bits_per_weight):>8} "
                     f"{_fmt(r.alpha, '.2f'):>6} {_fmt(r.model_exponent_entropy_bits):>7}  {r.verdict}")
    coded = [r for r in reports if r.achieved_bits_per_weight is not None]
    if coded:
        n = sum(r.numel for r in coded)
        mean = lambda key: sum(getattr(r, key) * r.numel for r in coded) / n  # noqa: E731
        bits = sum(r.numel * fmt.spec_for_name(r.dtype).bits for r in coded)
        got = sum(r.numel * r.achieved_bits_per_weight for r in coded)
        lines.append(f"{'total (coded tensors)':{width}} {'':7} {n:11,} {mean('exponent_entropy_bits'):7.3f} "
                     f"{mean('raw_entropy_bits'):7.3f} {mean('order0_bound_bits_per_weight'):8.3f} "
                     f"{mean('ecf8_bound_bits_per_weight'):10.3f} {mean('achieved_bits_per_weight'):8.3f} "
                     f"{'':6} {'':7}  saving {1 - got / bits:.1%}")
    lines.append("bits per element; order-0 = entropy of whole bit patterns; ecf8 bound = H(exp) + raw "
                 "bits; alpha = tail index of the exponent histogram; H model = geometric-model entropy")
    return "\n".join(lines)


def _plot(reports: list[TensorReport], path: Path, tensor: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    coded = [r for r in reports if r.exponent_entropy_bits is not None]
    if not coded:
        raise ECF8Error("nothing to plot: no FP8/BF16/FP16 tensors")
    # Default: the largest FP8 tensor (the case ecf8 is for), else the largest one.
    pick = (next((r for r in coded if r.name == tensor), None) if tensor else
            max(coded, key=lambda r: (r.dtype.startswith("F8"), r.numel)))
    if pick is None:
        raise ECF8Error(f"--tensor {tensor!r} is not an analysed FP8/BF16/FP16 tensor")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    ax1.plot(range(len(coded)), [r.exponent_entropy_bits for r in coded], "o-", ms=3, label="measured")
    ax1.plot(range(len(coded)), [r.model_exponent_entropy_bits if r.model_exponent_entropy_bits
                                 is not None else np.nan for r in coded], "x--", ms=3,
             label="geometric model")
    ax1.set_xlabel("tensor (file order)")
    ax1.set_ylabel("exponent entropy (bits)")
    ax1.set_title("Exponent entropy per tensor")
    ax1.legend()
    spec = fmt.spec_for_name(pick.dtype)
    counts = np.array(pick.exponent_counts, dtype=np.float64)
    e = np.arange(counts.size)
    ax2.bar(e, counts / counts.sum(), color="tab:blue", label="measured")
    alpha, mode = fit_alpha(counts, spec)
    if not math.isnan(alpha):
        ax2.plot(e, model_probabilities(alpha, mode, spec), "r.-", label=f"geometric model, alpha={alpha:.2f}")
    seen = np.flatnonzero(counts)
    ax2.set_xlim(max(seen[0] - 2, -0.5), min(seen[-1] + 2, counts.size - 0.5))
    ax2.set_ylim(0.3 / counts.sum(), 1.5)
    ax2.set_yscale("log")
    ax2.set_xlabel("exponent field")
    ax2.set_ylabel("probability")
    ax2.set_title(pick.name[-60:])
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
