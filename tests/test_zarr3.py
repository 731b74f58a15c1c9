"""The zarr 3 array-to-bytes codec: real zarr 3 arrays of every dtype and order, bit-exact."""

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ecf8
from ecf8.errors import CorruptDataError, ECF8Error
from helpers import DTYPES, bits, weights_like

zarr = pytest.importorskip("zarr", minversion="3.1")
from ecf8.zarr3_codec import ECF8Codec  # noqa: E402

SHORT = {np.dtype(ml_dtypes.float8_e4m3fn): "e4m3", np.dtype(ml_dtypes.float8_e5m2): "e5m2",
         np.dtype(ml_dtypes.bfloat16): "bf16", np.dtype(np.float16): "fp16"}
ROOT = Path(__file__).resolve().parents[1]


def new_array(store, x_shape, dtype, codec, chunks=(32, 16), order="C", **kw):
    return zarr.create_array(store=store, shape=x_shape, chunks=chunks, dtype=dtype,
                             serializer=codec, compressors=None, config={"order": order}, **kw)


def stored_forms(dtype):
    """(array dtype, codec, to-stored-values) for each way an element type can be stored."""
    short = SHORT[np.dtype(dtype)]
    u = "uint8" if np.dtype(dtype).itemsize == 1 else "uint16"
    i = "int8" if np.dtype(dtype).itemsize == 1 else "int16"
    forms = [(u, ECF8Codec(dtype=short)), (i, ECF8Codec(dtype=short, max_tables=1))]
    if short == "fp16":
        forms += [("float16", ECF8Codec()), (">f2", ECF8Codec(dtype="fp16", chunk_size=512))]
    return forms


@pytest.mark.parametrize("order", "CF")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_every_dtype_and_order(dtype, order):
    x = weights_like(70 * 45, dtype, seed=1).reshape(70, 45)  # edge chunks are partial
    for array_dtype, codec in stored_forms(dtype):
        v = bits(x).reshape(x.shape).view(np.dtype(array_dtype).newbyteorder("="))
        store = {}
        a = new_array(store, x.shape, array_dtype, codec, order=order)
        a[:] = v
        b = zarr.open_array(store)  # metadata -> codec, through the registry
        assert b.metadata.codecs == (codec,)
        native = np.dtype(array_dtype).newbyteorder("=")  # zarr 3 keeps byte order in codecs
        got = b[:]
        assert got.dtype.newbyteorder("=") == native
        np.testing.assert_array_equal(bits(got.astype(native).view(dtype)), bits(x))
        np.testing.assert_array_equal(b[5:67, 3:40], v[5:67, 3:40])
        frame = store["c/0/0"].to_bytes()  # whatever the memory order, a chunk is stored C-ordered
        np.testing.assert_array_equal(bits(ecf8.decode(frame)), bits(x[:32, :16]))


@given(st.sampled_from(DTYPES), st.sampled_from("CF"), st.data())
def test_any_bit_pattern(dtype, order, data):
    u_dtype = np.uint8 if np.dtype(dtype).itemsize == 1 else np.uint16
    u = data.draw(hnp.arrays(u_dtype, hnp.array_shapes(min_dims=1, max_dims=3, max_side=20)))
    chunks = data.draw(st.tuples(*[st.integers(1, max(n, 1)) for n in u.shape]))
    a = new_array({}, u.shape, u_dtype, ECF8Codec(dtype=SHORT[np.dtype(dtype)], chunk_size=512),
                  chunks=chunks, order=order)
    a[:] = u
    np.testing.assert_array_equal(a[:], u)


def test_sharded_and_empty_arrays():
    u = bits(weights_like(100 * 90, ml_dtypes.float8_e5m2, seed=2)).reshape(100, 90)
    a = zarr.create_array(store={}, shape=u.shape, chunks=(16, 16), shards=(64, 32), dtype="uint8",
                          serializer=ECF8Codec(dtype="e5m2"), compressors=None)
    a[:] = u
    np.testing.assert_array_equal(a[:], u)
    np.testing.assert_array_equal(a[3:90:7, 50:], u[3:90:7, 50:])
    for shape in [(0,), (0, 5), (5, 0)]:
        e = new_array({}, shape, "uint16", ECF8Codec(dtype="bf16"), chunks=(4,) * len(shape))
        e[:] = np.zeros(shape, np.uint16)
        assert e[:].shape == shape


def test_refusals():
    for bad, match in [(dict(dtype="fp32"), "dtype must be one of"),
                       (dict(chunk_size=1000), "chunk_size"), (dict(max_tables=9), "max_tables"),
                       (dict(chunk_size="4096"), "integers")]:
        with pytest.raises(ECF8Error, match=match):
            ECF8Codec(**bad)
    with pytest.raises(ECF8Error, match="unknown configuration keys"):
        ECF8Codec.from_dict({"name": "ecf8", "configuration": {"level": 3}})
    for array_dtype, codec, match in [("uint8", ECF8Codec(), "cannot code zarr dtype uint8"),
                                      ("float32", ECF8Codec(), "cannot code zarr dtype float32"),
                                      ("uint8", ECF8Codec(dtype="bf16"), "2-byte integers"),
                                      ("float16", ECF8Codec(dtype="bf16"), "not float16")]:
        with pytest.raises(ECF8Error, match=match):
            new_array({}, (8,), array_dtype, codec, chunks=(8,))


def test_corrupt_or_misplaced_chunks():
    store = {}
    a = new_array(store, (64, 32), "uint16", ECF8Codec(dtype="bf16"))
    a[:] = bits(weights_like(64 * 32, ml_dtypes.bfloat16)).reshape(64, 32)
    other = {}
    new_array(other, (8,), "uint16", ECF8Codec(dtype="bf16"), chunks=(8,))[:] = 1
    store["c/0/0"] = other["c/0"]  # a valid frame of the wrong shape
    with pytest.raises(CorruptDataError, match=r"holds BF16 \(8,\), the chunk is BF16 \(32, 16\)"):
        a[:]
    f16 = {}
    new_array(f16, (32, 16), "float16", ECF8Codec())[:] = 1
    store["c/0/0"] = f16["c/0/0"]  # a valid frame of another element type
    with pytest.raises(CorruptDataError, match="holds F16"):
        a[:]
    frame = bytearray(store["c/1/0"].to_bytes())
    frame[len(frame) // 2] ^= 1
    store["c/1/0"] = store["c/1/0"].from_bytes(bytes(frame))
    with pytest.raises(CorruptDataError):
        a[32:, :16]


def test_metadata_json():
    store = {}
    new_array(store, (8,), "uint8", ECF8Codec(dtype="e4m3", chunk_size=1024), chunks=(8,))
    meta = json.loads(store["zarr.json"].to_bytes())
    assert meta["codecs"] == [{"name": "ecf8", "configuration": {"chunk_size": 1024, "max_tables": 4,
                                                                 "dtype": "e4m3"}}]
    assert ECF8Codec.from_dict(ECF8Codec().to_dict()) == ECF8Codec()


def test_pyproject_declares_both_entry_points():
    import tomllib

    from ecf8.numcodecs_codec import ECF8

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    for group, cls in [("zarr.codecs", ECF8Codec), ("numcodecs.codecs", ECF8)]:
        module, name = declared[group]["ecf8"].split(":")
        assert getattr(__import__(module, fromlist=[name]), name) is cls


def test_store_opens_in_a_fresh_process(tmp_path):
    if "ecf8" not in entry_points(group="zarr.codecs").names:
        pytest.skip("the installed ecf8 predates its zarr.codecs entry point (pip install -e .)")
    u = np.arange(300, dtype=np.uint16).reshape(20, 15)
    new_array(str(tmp_path / "w.zarr"), u.shape, "uint16", ECF8Codec(dtype="bf16"), chunks=(8, 8))[:] = u
    code = ("import sys, zarr, numpy as np; a = zarr.open_array(sys.argv[1]); "
            "assert 'ecf8.zarr3_codec' in sys.modules; print(int(a[:].astype(np.int64).sum()))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "w.zarr")], capture_output=True,
                         text=True, check=True)
    assert int(out.stdout) == int(u.sum())


def test_real_weights(real_weights):
    w8 = next(iter(real_weights["e4m3"].values())).view(np.uint8)        # 384 x 384
    w16 = next(iter(real_weights["bf16"].values())).view(np.uint16)
    for w, short in [(w8, "e4m3"), (w16, "bf16")]:
        for order in "CF":
            store = {}
            a = new_array(store, w.shape, w.dtype, ECF8Codec(dtype=short), chunks=(100, 256),
                          order=order)
            a[:] = w
            np.testing.assert_array_equal(zarr.open_array(store)[:], w)
            frames = [v.to_bytes() for k, v in store.items() if k.startswith("c/")]
            assert len(frames) == 8  # 4 x 2 chunks, the last row and column partial
            # exponents of trained weights do compress (edge chunks are padded with zeros)
            assert sum(map(len, frames)) < 0.9 * 8 * 100 * 256 * w.itemsize
