"""Compatibility: frozen frames of format version 1 decode, and the encoder still writes them."""

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import ecf8
from helpers import assert_bit_exact

GOLDEN = Path(__file__).parent / "golden"
DTYPE = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2,
         "bf16": ml_dtypes.bfloat16, "fp16": np.float16}


@pytest.mark.parametrize("name", sorted(DTYPE))
def test_golden_frame_decodes(name):
    x = np.load(GOLDEN / f"{name}.npy").view(DTYPE[name])
    blob = (GOLDEN / f"{name}.ecf8").read_bytes()
    assert not ecf8.info(blob).stored
    assert_bit_exact(ecf8.decode(blob), x)


@pytest.mark.parametrize("name", sorted(DTYPE))
def test_encoder_output_is_frozen(name):
    """An accidental change to the format or the encoder's choices fails here."""
    x = np.load(GOLDEN / f"{name}.npy").view(DTYPE[name])
    assert ecf8.encode(x, chunk_size=4096, max_tables=4) == (GOLDEN / f"{name}.ecf8").read_bytes()
