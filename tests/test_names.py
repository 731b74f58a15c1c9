"""One spelling map for element types and devices (ecf8.names), used the same way by the command
line, the adapters and the top-level API; Info's repr stays one short line."""

import ml_dtypes
import numpy as np
import pytest
import torch

import ecf8
import ecf8.cupy
import ecf8.jax
import ecf8.numpy
import ecf8.torch
from ecf8 import format as fmt
from ecf8.cli import main
from ecf8.names import device_name, dtype_spec, short_name
from helpers import DTYPES, assert_bit_exact, bits, weights_like

SPELLINGS = {
    "e4m3": ["e4m3", "F8_E4M3", "f8_e4m3fn", "float8_e4m3fn", "float8_e4m3", ml_dtypes.float8_e4m3fn,
             np.dtype(ml_dtypes.float8_e4m3fn), torch.float8_e4m3fn, "torch.float8_e4m3fn"],
    "e5m2": ["e5m2", "F8_E5M2", "float8_e5m2", ml_dtypes.float8_e5m2, torch.float8_e5m2],
    "bf16": ["bf16", "BF16", "bfloat16", ml_dtypes.bfloat16, torch.bfloat16, " BFloat16 "],
    "fp16": ["fp16", "F16", "float16", np.float16, torch.float16, torch.half],
}


@pytest.mark.parametrize("short", SPELLINGS)
def test_every_dtype_spelling_maps_to_one_spec(short):
    for spelling in SPELLINGS[short]:
        assert dtype_spec(spelling) is fmt.SHORT_NAMES[short], spelling
        assert short_name(spelling) == short
    spec = fmt.SHORT_NAMES[short]
    assert dtype_spec(spec) is spec and short_name(spec.name) == short     # Info.dtype / checkpoint names


def test_unknown_dtypes_are_refused():
    for bad in ("e4m3fnuz", "float32", "", np.float32, torch.float32, "int8"):
        with pytest.raises(ecf8.UnsupportedError):
            dtype_spec(bad)


def test_info_dtype_round_trips_through_every_entry_point(tmp_path, capsys):
    x = weights_like(4096, ml_dtypes.bfloat16)
    blob = ecf8.encode(x)
    name = ecf8.info(blob).dtype
    assert name == "BF16" and dtype_spec(name).dtype == x.dtype
    np.save(tmp_path / "w.npy", bits(x))
    for spelling in ("bf16", name, "bfloat16"):              # the CLI takes Info's spelling too
        assert main(["encode", str(tmp_path / "w.npy"), "--dtype", spelling, "-o", str(tmp_path / "w.ecf8"),
                     "-f", "-q"]) == 0
        assert (tmp_path / "w.ecf8").read_bytes() == blob
    with pytest.raises(SystemExit):
        main(["encode", str(tmp_path / "w.npy"), "--dtype", "float32", "-o", str(tmp_path / "x.ecf8")])
    assert "unknown element type 'float32'" in capsys.readouterr().err


def test_device_spellings():
    assert device_name("cpu") == "cpu" and device_name(" CUDA ") == "cuda" and device_name("cuda:1") == "cuda:1"
    assert device_name(torch.device("cpu")) == "cpu" and device_name(torch.device("cuda")) == "cuda"
    assert device_name(torch.device("cuda", 2)) == "cuda:2" and device_name(3) == "cuda:3"
    import jax

    assert device_name(jax.devices("cpu")[0]) == "cpu"
    for bad in ("gpu", "cuda:x", "mps", torch.device("meta"), -1, True, None, 1.0):
        with pytest.raises(ecf8.UnsupportedError):
            device_name(bad)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_adapters_take_device_objects_and_out_the_same_way(dtype):
    x = weights_like(6000, dtype).reshape(60, 100)
    blob = ecf8.encode(x)
    assert_bit_exact(ecf8.numpy.decode(blob, device=torch.device("cpu")), x)
    assert np.array_equal(np.asarray(ecf8.jax.decode(blob, device=torch.device("cpu"))).view(bits(x).dtype),
                          bits(x))
    # out: same bytes, any dtype; the result is a view of it with the frame's dtype and shape
    out = np.empty(x.nbytes, np.uint8)
    y = ecf8.numpy.decode(blob, out=out)
    assert y.dtype == x.dtype and y.shape == x.shape and np.shares_memory(y, out)
    assert np.array_equal(out, bits(x).reshape(-1).view(np.uint8))
    t = torch.empty(x.nbytes, dtype=torch.uint8)
    yt = ecf8.torch.decode(blob, device=torch.device("cpu"), out=t)
    assert tuple(yt.shape) == x.shape and yt.data_ptr() == t.data_ptr()
    for bad in (np.empty(x.nbytes - 1, np.uint8), np.empty((x.nbytes, 2), np.uint8)[:, 0],
                np.frombuffer(bytes(x.nbytes), np.uint8)):
        with pytest.raises(ecf8.UnsupportedError):
            ecf8.numpy.decode(blob, out=bad)
    with pytest.raises(ecf8.UnsupportedError):
        ecf8.cupy.decode(blob, device=torch.device("cpu"))



def test_top_level_decode_takes_device_objects_and_out():
    x = weights_like(6000, ml_dtypes.float8_e4m3fn).reshape(60, 100)
    blob = ecf8.encode(x)
    assert_bit_exact(ecf8.decode(blob, device=torch.device("cpu")), x)
    out = np.empty(x.nbytes, np.uint8)
    y = ecf8.decode(blob, out=out)
    assert y.dtype == x.dtype and y.shape == x.shape and np.shares_memory(y, out)
    with pytest.raises(ecf8.UnsupportedError):
        ecf8.decode(blob, out=np.empty(3, np.uint8))


def test_info_repr_is_one_short_line():
    x = weights_like(65536, ml_dtypes.float8_e4m3fn).reshape(256, 256)
    r = repr(ecf8.info(ecf8.encode(x)))
    assert "\n" not in r and len(r) < 120 and "F8_E4M3 (256, 256)" in r and "bits/weight" in r
