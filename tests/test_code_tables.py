"""Code tables: length limits, the Kraft inequality, canonical codes and decode tables."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from ecf8.tables import canonical_codes, code_lengths, decode_lut, is_valid_lengths


@given(st.lists(st.integers(0, 10**9), min_size=2, max_size=256), st.integers(8, 12))
def test_lengths_are_a_limited_prefix_code(counts, max_len):
    counts = np.array(counts, dtype=np.int64)
    lengths = code_lengths(counts, max_len)
    assert is_valid_lengths(lengths, max_len)
    present = counts > 0
    if present.sum() > 1:
        assert np.array_equal(lengths > 0, present)
    elif present.sum() == 1:
        assert lengths[present][0] == 1


def test_lengths_follow_frequencies():
    counts = np.array([1000, 500, 250, 125, 60, 30, 15, 8, 4, 2, 1, 1])
    lengths = code_lengths(counts, 12)
    assert list(lengths) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 11]
    limited = code_lengths(counts, 6)
    assert limited.max() == 6 and is_valid_lengths(limited, 6)


def test_canonical_codes_and_lut_agree():
    lengths = np.array([2, 0, 3, 3, 2, 2, 0, 0], dtype=np.uint8)
    codes = canonical_codes(lengths)
    assert list(codes[[0, 4, 5, 2, 3]]) == [0b00, 0b01, 0b10, 0b110, 0b111]
    lut = decode_lut(lengths, 12)
    for s in np.flatnonzero(lengths):
        window = int(codes[s]) << (12 - int(lengths[s]))
        assert lut[window] == (int(lengths[s]) << 8) | s


def test_invalid_lengths_rejected():
    assert not is_valid_lengths(np.array([1, 1, 1]), 12)        # Kraft sum 1.5
    assert not is_valid_lengths(np.array([13, 1]), 12)
    assert is_valid_lengths(np.array([1, 0, 0]), 12)
