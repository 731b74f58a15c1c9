"""Real weights: MiniLM layer 0 (../shared/data) round-trips and compresses as measured."""

import ml_dtypes
import numpy as np
import pytest

import ecf8
from helpers import assert_bit_exact


def _load(shared_data, fname, dtype):
    with np.load(shared_data / fname) as z:
        return {k: z[k].view(dtype) for k in z.files}


def _roundtrip_bits_per_weight(tensors) -> float:
    total_bytes = total_n = 0
    for x in tensors.values():
        blob = ecf8.encode(x)
        assert_bit_exact(ecf8.decode(blob), x)
        total_bytes += len(blob)
        total_n += x.size
    return total_bytes * 8 / total_n


def test_fp8_e4m3_block128(shared_data):
    tensors = _load(shared_data, "minilm-layer0-fp8-e4m3fn-block128.npz", ml_dtypes.float8_e4m3fn)
    # Measured 6.748 bits/weight for these six tensors (147k-590k weights each); the paper's
    # format needs 6.99 and nvCOMP ANS 6.92 on the same recipe.
    assert _roundtrip_bits_per_weight(tensors) < 6.78


def test_bf16(shared_data):
    tensors = _load(shared_data, "minilm-layer0-bf16.npz", ml_dtypes.bfloat16)
    assert _roundtrip_bits_per_weight(tensors) < 10.8     # measured 10.67 (8 raw bits + ~2.7)


@pytest.mark.parametrize("target", ["e5m2", "fp16"])
def test_derived_dtypes(shared_data, target):
    bf16 = _load(shared_data, "minilm-layer0-bf16.npz", ml_dtypes.bfloat16)
    for x in bf16.values():
        w = x.astype(np.float32)
        y = (w / np.abs(w).max() * 57344).astype(ml_dtypes.float8_e5m2) if target == "e5m2" \
            else w.astype(np.float16)
        blob = ecf8.encode(y, max_tables=8)
        assert_bit_exact(ecf8.decode(blob), y)
        assert len(blob) < y.nbytes
