"""Code-table choice in exact arithmetic, so that any machine (and a GPU) chooses identically.

The rule is encoder.py's (k-means over the chunks' symbol histograms, seeded by mean exponent,
distance = ideal code lengths, Huffman tables per cluster, each chunk then taking the table that
codes it in the fewest bits, K among 1, 2, 4, 8 by total size), with one change: the ideal code
lengths -log2(p) are rounded to 1/65536 bit.  Every large product is then a sum of integers below
2**53, which float64 arithmetic computes exactly in any order (BLAS, threads, cuBLAS); the few
floating-point steps left (log2 of k x A cluster sums, the mean exponents) run on the host in
NumPy for the CPU and the CUDA encoder alike.

The large arrays live behind a *backend* (``HostProducts`` here, a CuPy one in encoder_cuda), which
computes the exact products where the histograms are and returns small host arrays.
"""

from __future__ import annotations

import numpy as np

from . import format as fmt
from .tables import code_lengths

__all__ = ["IDEAL_FRAC_BITS", "HostProducts", "assign_tables", "ideal_lengths"]

IDEAL_FRAC_BITS = 16


def ideal_lengths(sums: np.ndarray) -> np.ndarray:
    """(k, A) ideal code lengths of cluster symbol counts (k, A), in 1/65536 bits: integers held
    as float64 (exact: at most ~2**22)."""
    s = sums.astype(np.float64) + 1e-3
    return np.rint((np.log2(s.sum(1, keepdims=True)) - np.log2(s)) * (1 << IDEAL_FRAC_BITS))


class HostProducts:
    """The exact products of assign_tables over a host histogram (nchunks, A) of counts < 2**20.

    Every method returns host arrays; every float64 result is an exact integer (< 2**53).
    """

    def __init__(self, hist: np.ndarray):
        self.hist = np.asarray(hist, np.float64)
        self.nchunks, self.alphabet = self.hist.shape

    def mean_parts(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sum of count x weight, sum of counts) per chunk, int64."""
        return ((self.hist @ weights.astype(np.float64)).astype(np.int64),
                self.hist.sum(1).astype(np.int64))

    def sums(self, assign: np.ndarray, k: int) -> np.ndarray:
        """(k, A) int64 symbol counts of each cluster."""
        onehot = np.zeros((k, self.nchunks))
        onehot[assign, np.arange(self.nchunks)] = 1.0
        return (onehot @ self.hist).astype(np.int64)

    def costs(self, per_symbol: np.ndarray) -> np.ndarray:
        """(nchunks, k) float64: each chunk's counts times each row of per_symbol (k, A)."""
        return self.hist @ per_symbol.T

    def missing(self, absent: np.ndarray) -> np.ndarray:
        """(nchunks, k) bool: the chunk has a symbol that row t of absent (k, A; 1 = absent) marks
        (counts are non-negative, so their product with the 0/1 rows is positive exactly then)."""
        return (self.hist @ absent.T) > 0


def assign_tables(hist: np.ndarray, max_tables: int, field_mask: int, iters: int = 8,
                  backend=None) -> tuple[np.ndarray, np.ndarray]:
    """Cluster chunk histograms (nchunks, A) into at most max_tables code tables.

    Returns (lengths (K, A) uint8, chunk table ids (nchunks,) uint8), K chosen among 1, 2, 4, 8 to
    minimise the coded size including each table's A/2 header bytes.  backend: where the
    histograms are (default: HostProducts(hist)); hist is unused when a backend is given.
    """
    be = backend if backend is not None else HostProducts(hist)
    nchunks, alphabet = be.nchunks, be.alphabet
    weighted, total = be.mean_parts(np.arange(alphabet) & field_mask)
    mean = weighted / np.maximum(total, 1)
    rank = np.argsort(np.argsort(mean, kind="stable"), kind="stable")
    best = None
    k = 1
    while k <= min(max_tables, nchunks):
        assign = rank * k // nchunks             # seed: chunks split by mean exponent
        sums = None
        for _ in range(iters if k > 1 else 0):
            sums = be.sums(assign, k)
            new = be.costs(ideal_lengths(sums)).argmin(1)
            if np.array_equal(new, assign):
                break
            assign, sums = new, None
        if sums is None:                         # k == 1, or assign moved after the last sums
            sums = be.sums(assign, k)
        used = np.bincount(assign, minlength=k) > 0
        tables = np.stack([code_lengths(sums[t], fmt.MAX_CODE_LEN) for t in range(k) if used[t]])
        cost = be.costs(tables.astype(np.float64)).astype(np.int64)
        cost[be.missing((tables == 0).astype(np.float64))] = 1 << 62
        assign = cost.argmin(1)                 # a chunk may move to a table that codes it better
        bits = int(cost.min(1).sum()) + tables.shape[0] * alphabet * 4
        if best is None or bits < best[0]:
            best = (bits, tables, assign.astype(np.uint8))
        k *= 2
    return best[1], best[2]
