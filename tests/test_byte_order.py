"""Big-endian arrays ('>f2', '>u2' bit views) keep their values on every way in: ecf8.encode, the
NumPy adapter, save_file, and `ecf8 encode` of a big-endian .npy (which read their bytes as
little-endian, and decode gave every element byte-swapped); a big-endian ``out=`` is refused."""

import ml_dtypes
import numpy as np
import pytest

import ecf8
from ecf8 import cli, compressed
from ecf8.errors import UnsupportedError

from helpers import assert_bit_exact, weights_like


def test_encode_keeps_the_values_of_a_big_endian_array():
    x = weights_like(5000, np.float16, seed=3)
    big = x.astype(">f2")
    assert_bit_exact(ecf8.decode(ecf8.encode(big)), x)
    assert_bit_exact(ecf8.numpy.decode(ecf8.numpy.encode(big)), x)
    assert ecf8.encode(big) == ecf8.encode(x)


def test_save_file_keeps_the_values_of_big_endian_arrays(tmp_path):
    arrays = {"h": weights_like(3000, np.float16, seed=1), "f": np.arange(7, dtype=np.float32),
              "i": np.arange(-3, 3, dtype=np.int64)}
    compressed.save_file({k: v.astype(v.dtype.newbyteorder(">")) for k, v in arrays.items()},
                    tmp_path / "c.safetensors")
    loaded = ecf8.load_file(tmp_path / "c.safetensors")
    for k, v in arrays.items():
        assert loaded[k].dtype == v.dtype
        np.testing.assert_array_equal(loaded[k], v)


def test_a_big_endian_out_is_refused():
    x = weights_like(100, np.float16)
    out = np.zeros(100, ">f2")
    with pytest.raises(UnsupportedError, match="byte order"):
        ecf8.numpy.decode(ecf8.encode(x), out=out)
    with pytest.raises(UnsupportedError, match="byte order"):
        ecf8.decode(ecf8.encode(x), out=out)
    assert not out.any()


@pytest.mark.parametrize("dtype, flag, stored", [
    (ml_dtypes.bfloat16, "bf16", ">u2"),          # bits of bfloat16 in a big-endian uint16 file
    (np.float16, "fp16", ">u2"),
    (np.float16, "fp16", ">f2"),
    (np.float16, None, ">f2"),
])
def test_cli_encode_decode_of_a_big_endian_npy(tmp_path, capsys, dtype, flag, stored):
    x = weights_like(4096, dtype, seed=7)
    src = tmp_path / "w.npy"
    bits = x.view(np.uint16)
    np.save(src, bits.astype(">u2") if stored == ">u2" else x.astype(">f2"))
    assert np.load(src).dtype.str == stored
    args = ["encode", "-q", str(src), "-o", str(tmp_path / "w.ecf8")] + (["--dtype", flag] if flag else [])
    assert cli.main(args) == 0
    assert_bit_exact(ecf8.decode((tmp_path / "w.ecf8").read_bytes()), x)
    assert cli.main(["decode", "-q", str(tmp_path / "w.ecf8"), "-o", str(tmp_path / "back.npy")]) == 0
    back = np.load(tmp_path / "back.npy")
    np.testing.assert_array_equal(back.astype("=u2"), bits)
