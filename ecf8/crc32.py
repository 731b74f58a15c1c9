"""CRC-32 (zlib's) of a concatenation from the CRC-32s of its parts, as zlib's crc32_combine (which
Python's zlib module does not expose): a checksum over many pieces read in parallel is their
CRC-32s combined, and two checksums of the same bytes from different starting values differ by
a term computed from the starting values and the length alone, so one pass over the bytes serves
both.  GF(2) polynomial arithmetic modulo the CRC-32 polynomial (zlib 1.2.12's method)."""

from __future__ import annotations

import functools

__all__ = ["combine", "shift", "multiply", "zeros", "POLY", "X2N"]

POLY = 0xEDB88320             # the CRC-32 polynomial, bit-reversed


def multiply(a: int, b: int) -> int:
    """a(x) * b(x) modulo the polynomial (bit-reversed: bit 31 is x**0)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ POLY if b & 1 else b >> 1


X2N = [1 << 30]               # x**(2**k) modulo the polynomial, k = 0..31
for _ in range(31):
    X2N.append(multiply(X2N[-1], X2N[-1]))


@functools.lru_cache(maxsize=256)
def zeros(n: int) -> int:
    """x**(8 * n) modulo the polynomial: the operator of n zero bytes (cached: pieces share sizes)."""
    p, k = 1 << 31, 3
    while n:
        if n & 1:
            p = multiply(X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def shift(crc: int, n: int) -> int:
    """crc carried through n bytes of the linear part of CRC-32: ``zlib.crc32(b, a) ^ zlib.crc32(b, c)
    == shift(a ^ c, len(b))`` for any bytes b and starting values a, c."""
    return multiply(zeros(n), crc) if n and crc else crc


def combine(crc1: int, crc2: int, n2: int) -> int:
    """``zlib.crc32(a + b)`` from ``crc1 = zlib.crc32(a)``, ``crc2 = zlib.crc32(b)`` and
    ``n2 = len(b)``; also ``zlib.crc32(b, crc1)`` for any starting value crc1."""
    return shift(crc1, n2) ^ crc2
