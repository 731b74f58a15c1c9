"""Compatibility: frozen frames of every format version decode, and the encoder still writes the
current version's frames byte for byte."""

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import ecf8
import ecf8.format
from ecf8.format import VERSION, VERSIONS
from helpers import assert_bit_exact

GOLDEN = Path(__file__).parent / "golden"
DTYPE = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2,
         "bf16": ml_dtypes.bfloat16, "fp16": np.float16}


def source(name: str) -> np.ndarray:
    return np.load(GOLDEN / f"{name}.npy").view(DTYPE[name])


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", sorted(DTYPE))
def test_golden_frame_decodes(name, version):
    blob = (GOLDEN / f"{name}.v{version}.ecf8").read_bytes()
    assert blob[4] == version
    assert not ecf8.info(blob).stored
    assert_bit_exact(ecf8.decode(blob), source(name))


@pytest.mark.parametrize("name", sorted(DTYPE))
def test_encoder_output_is_frozen(name):
    """An accidental change to the format or the encoder's choices fails here."""
    blob = ecf8.encode(source(name), chunk_size=4096, max_tables=4)
    assert blob == (GOLDEN / f"{name}.v{VERSION}.ecf8").read_bytes()


@pytest.mark.parametrize("name", sorted(DTYPE))
def test_versions_differ_only_in_version_byte_and_payload_checksum(name):
    """v2 kept v1's layout: same header fields (but the version), same payload bytes."""
    v1 = (GOLDEN / f"{name}.v1.ecf8").read_bytes()
    v2 = (GOLDEN / f"{name}.v2.ecf8").read_bytes()
    assert len(v1) == len(v2)
    head_crc = ecf8.format.parse(memoryview(v2)).payload_offset - 4
    allowed = {4, *range(head_crc, head_crc + 4), *range(len(v1) - 4, len(v1))}
    assert {i for i in range(len(v1)) if v1[i] != v2[i]} <= allowed
