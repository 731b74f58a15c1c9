"""Exponent concentration: entropies, the alpha-stable tail fit, and what ecf8 achieves (docs/analyze.md).

Everything is computed from histograms filled batch by batch, so a tensor is never copied whole.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from . import format as fmt
from .encoder import split_fields

__all__ = ["TensorReport", "analyze_tensor", "entropy_bits", "fit_alpha", "model_probabilities"]

BATCH = 1 << 22


@dataclasses.dataclass
class TensorReport:
    """One tensor's statistics; entropies and bit rates in bits per element.

    codec is what ``ecf8 compress`` stores the tensor as (the same decision function):
    ``ecf8`` (exponents entropy-coded), ``zstd``, or ``none`` (kept unchanged).
    """

    name: str
    dtype: str
    numel: int
    shape: list[int] = dataclasses.field(default_factory=list)
    codec: str = "none"
    original_bytes: int = 0
    stored_bytes: int = 0                            # bytes compress stores for this tensor
    exponent_entropy_bits: float | None = None
    raw_entropy_bits: float | None = None           # sign + mantissa bits, order 0
    order0_bound_bits_per_weight: float | None = None   # entropy of whole bit patterns
    ecf8_bound_bits_per_weight: float | None = None     # exponent entropy + raw bits kept verbatim
    achieved_bits_per_weight: float | None = None    # stored_bytes * 8 / numel
    alpha: float | None = None                       # tail index of the exponent histogram
    model_exponent_entropy_bits: float | None = None    # entropy the fitted geometric model predicts
    exponent_counts: list[int] | None = None

    @property
    def saving(self) -> float:
        return 1 - self.stored_bytes / self.original_bytes if self.original_bytes else 0.0

    def as_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("exponent_counts")
        d["saving"] = self.saving
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def entropy_bits(counts: np.ndarray) -> float:
    """Shannon entropy (bits) of the distribution given by counts."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum()) + 0.0      # (+ 0.0: one symbol gives 0.0, not -0.0)


def normal_exponents(spec: fmt.DtypeSpec) -> range:
    """Exponent field values of normal numbers (E4M3FN uses the all-ones exponent for numbers)."""
    top = (1 << spec.exp_bits) - 1
    return range(1, top + 1 if spec.code == 1 else top)


def fit_alpha(counts: np.ndarray, spec: fmt.DtypeSpec, min_count: int = 8) -> tuple[float, int]:
    """(alpha, mode): the tail index of an exponent histogram, and its most common normal exponent.

    A stable law with tail index alpha has P(|X| > x) ~ x^-alpha, so the mass of binade e (values in
    [2^e, 2^(e+1))) falls as 2^(-alpha e) above the bulk.  alpha is minus the slope of log2(count)
    against e over the exponents above the mode, fitted by least squares weighted by the counts
    (a count's log has variance ~1/count).  NaN when fewer than two such exponents hold min_count.
    """
    normal = normal_exponents(spec)
    c = np.asarray(counts, dtype=np.float64)
    mode = normal.start + int(np.argmax(c[normal.start : normal.stop]))
    e = np.arange(mode + 1, normal.stop)
    w = c[mode + 1 : normal.stop]
    keep = w >= min_count
    if keep.sum() < 2:
        return float("nan"), mode
    e, w = e[keep], w[keep]
    y = np.log2(w)
    em, ym = np.average(e, weights=w), np.average(y, weights=w)
    slope = np.sum(w * (e - em) * (y - ym)) / np.sum(w * (e - em) ** 2)
    return float(-slope), mode


def model_probabilities(alpha: float, mode: int, spec: fmt.DtypeSpec) -> np.ndarray:
    """Exponent probabilities of the two-sided geometric model, (2^E,) float64.

    Below the mode a density that is smooth and non-zero near 0 puts mass proportional to a
    binade's width in it: ratio 2 per exponent step.  Above the mode the tail falls by 2^-alpha
    per step.  Exponent 0 (zero and subnormals) spans as much as exponent 1, so it gets the same
    mass.  Exponents outside the normal range (infinities, NaN) get none.
    """
    normal = normal_exponents(spec)
    e = np.arange(1 << spec.exp_bits, dtype=np.float64)
    logp = np.where(e <= mode, e - mode, -alpha * (e - mode))
    p = np.exp2(logp)
    p[0] = p[1]
    p[normal.stop :] = 0.0
    return p / p.sum()


def analyze_tensor(name: str, x: np.ndarray, dtype_name: str, options: dict | None = None
                   ) -> TensorReport:
    """Statistics of one tensor, and what ``ecf8 compress`` would store it as.

    options: as for ``ecf8 compress`` (chunk_size, max_tables, zstd_level).
    """
    from .tensor_codecs import choose_codec

    report = TensorReport(name, dtype_name, int(x.size), list(x.shape), original_bytes=int(x.nbytes))
    raw = np.ascontiguousarray(x).reshape(-1).view(np.uint8)
    codec, payload = choose_codec(dtype_name, x.shape, raw, options or {})
    report.codec = codec
    report.stored_bytes = report.original_bytes if payload is None else len(payload)
    if x.size:
        report.achieved_bits_per_weight = report.stored_bytes * 8 / x.size
    try:
        spec = fmt.spec_for_dtype(x.dtype)
    except Exception:
        return report
    flat = x.reshape(-1)
    u = flat.view(spec.uint)
    exp_counts = np.zeros(1 << spec.exp_bits, np.int64)
    raw_counts = np.zeros(1 << spec.raw_bits, np.int64)
    bit_counts = np.zeros(1 << spec.bits, np.int64)
    for lo in range(0, u.size, BATCH):
        part = u[lo : lo + BATCH]
        exp, raw = split_fields(part, spec)
        exp_counts += np.bincount(exp, minlength=exp_counts.size)
        raw_counts += np.bincount(raw, minlength=raw_counts.size)
        bit_counts += np.bincount(part, minlength=bit_counts.size)
    report.exponent_counts = exp_counts.tolist()
    if not u.size:
        return report
    report.exponent_entropy_bits = entropy_bits(exp_counts)
    report.raw_entropy_bits = entropy_bits(raw_counts)
    report.order0_bound_bits_per_weight = entropy_bits(bit_counts)
    report.ecf8_bound_bits_per_weight = report.exponent_entropy_bits + spec.raw_bits
    alpha, mode = fit_alpha(exp_counts, spec)
    report.alpha = alpha
    if not math.isnan(alpha):
        report.model_exponent_entropy_bits = entropy_bits(model_probabilities(alpha, mode, spec))
    return report
