"""Checkpoint layouts as real files have them: the round trip is byte for byte, or compress refuses
before writing anything."""


import ml_dtypes
import numpy as np
import pytest
import safetensors

import ecf8
from ecf8 import compressed
from ecf8.safetensors_io import MAX_HEADER, write_safetensors
from checkpoint_helpers import entry, header_of, raw_file, round_trip, weights

BF16 = weights(64, ml_dtypes.bfloat16).tobytes()       # 128 bytes of codable weights


def _refused(tmp_path, src, match):
    out = tmp_path / "out.safetensors"
    with pytest.raises(ecf8.ECF8Error, match=match):
        compressed.compress_file(src, out, jobs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]      # no output, no temp file


@pytest.mark.parametrize("header, data", [
    ({"w": entry("BF16", [64], 0, 128)}, BF16 + bytes(4096)),                       # trailing bytes
    ({}, bytes(7)),                                                                  # ... no tensor
    ({"w": entry("BF16", [64], 4, 132)}, bytes(4) + BF16),                           # gap before
    ({"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}, bytes(12)),     # gap between
    ({"a": entry("BF16", [64], 0, 128), "b": entry("BF16", [64], 0, 128)}, BF16),   # shared storage
    ({"a": entry("U8", [4], 0, 4), "b": entry("U8", [2], 2, 4)}, b"abcd"),         # overlap
])
def test_bytes_outside_the_tensors_are_refused_before_writing(tmp_path, header, data):
    # safetensors itself refuses these files; ecf8 used to drop the bytes or fail at restore time
    _refused(tmp_path, raw_file(tmp_path / "in.safetensors", header, data),
             "not a valid safetensors file|gap or an overlap|cover")


def test_duplicate_names_are_refused(tmp_path):
    text = (b'{"w":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]},'
            b'"w":{"dtype":"BF16","shape":[1],"data_offsets":[2,4]}}')
    _refused(tmp_path, raw_file(tmp_path / "in.safetensors", text, bytes(4)), "not a valid|duplicate")


@pytest.mark.parametrize("text, data", [
    # header order differs from data order, a zero-size tensor at a shared offset listed last
    (b'{"b":{"dtype":"BF16","shape":[64],"data_offsets":[2,130]},"z":{"dtype":"BF16","shape":[0],'
     b'"data_offsets":[2,2]},"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}', b"xy" + BF16),
    # whitespace around the JSON, escaped and non-ASCII names, an extra field, metadata
    (b'  {"__metadata__":{"format":"pt","\\u00e9":"\\u2603"},'
     b'"\\u0061\\/b":{"dtype":"U8","shape":[2],"data_offsets":[0,2],"extra":[1,{"x":null}]},'
     b'"\xe6\x9d\x83 \xf0\x9f\x98\x80":{"dtype":"BF16","shape":[64],"data_offsets":[2,130]}}\n   ',
     b"xy" + BF16),
    (b"{}", b""),
    (b'{"__metadata__":null,"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]},'
     b'"e":{"dtype":"F16","shape":[0,3],"data_offsets":[4,4]},"b":{"dtype":"BOOL","shape":[2],'
     b'"data_offsets":[4,6]},"w":{"dtype":"BF16","shape":[64],"data_offsets":[6,134]}}', bytes(6) + BF16),
])
def test_valid_layouts_round_trip_byte_for_byte(tmp_path, text, data):
    src = raw_file(tmp_path / "in.safetensors", text, data)
    with safetensors.safe_open(str(src), "numpy"):      # the reference reader accepts each input
        pass
    assert round_trip(src, tmp_path) == src.read_bytes()


@pytest.mark.parametrize("dtype, shape, nbytes", [("F8_E8M0", [16, 8], 128), ("F4", [4, 64], 128),
                                                  ("F6_E2M3", [4, 32], 96), ("C64", [16], 128),
                                                  ("X_FUTURE", [3, 5], 128)])
def test_dtypes_ecf8_does_not_code_pass_through(tmp_path, dtype, shape, nbytes):
    scales = np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    header = {"__metadata__": {"quant": "mx"}, "w": entry("F8_E4M3", [4096], 0, 4096),
              "w_scale": entry(dtype, shape, 4096, 4096 + nbytes),
              "zeros": entry(dtype, shape, 4096 + nbytes, 4096 + 2 * nbytes)}
    src = raw_file(tmp_path / "in.safetensors", header,
                   weights(4096, ml_dtypes.float8_e4m3fn).tobytes() + scales + bytes(nbytes))
    assert round_trip(src, tmp_path) == src.read_bytes()
    codecs = {r.name: r.codec for r in compressed.inspect_file(tmp_path / "packed.safetensors")}
    assert codecs == {"w": "ecf8", "w_scale": "none", "zeros": "zstd"}
    with ecf8.safe_open(tmp_path / "packed.safetensors") as f:
        assert f.metadata() == {"quant": "mx"}
        if dtype == "F8_E8M0" and hasattr(ml_dtypes, "float8_e8m0fnu"):
            x = f.get_tensor("w_scale")
            assert x.dtype == ml_dtypes.float8_e8m0fnu and x.shape == (16, 8) and x.tobytes() == scales


def test_coded_dtypes_with_more_dimensions_than_a_frame_holds(tmp_path):
    x = weights(4096, ml_dtypes.bfloat16).reshape((1,) * 9 + (4096,))
    ecf8.save_file({"w": x}, tmp_path / "m.safetensors")
    assert compressed.inspect_file(tmp_path / "m.safetensors")[0].codec == "zstd"
    assert ecf8.load_file(tmp_path / "m.safetensors")["w"].tobytes() == x.tobytes()


def test_70000_tensors_keep_the_header_under_the_limit(tmp_path):
    # A header of this many entries once came out about 3x as long (the original header was
    # embedded as an escaped string), past the 100 MB safetensors reads.
    names = [f"model.layers.{i // 700}.mlp.experts.{i % 700}.down_proj.weight_scale" for i in range(70_000)]
    header = {"__metadata__": {"format": "pt"}}
    header.update({name: entry("F32", [], 4 * i, 4 * i + 4) for i, name in enumerate(names)})
    src = raw_file(tmp_path / "in.safetensors", header, np.arange(70_000, dtype=np.float32).tobytes())
    compressed.compress_file(src, tmp_path / "packed.safetensors", jobs=1)
    compressed.decompress_file(tmp_path / "packed.safetensors", tmp_path / "restored.safetensors")
    assert (tmp_path / "restored.safetensors").read_bytes() == src.read_bytes()
    _, start = header_of(src)
    _, packed_start = header_of(tmp_path / "packed.safetensors")
    assert packed_start <= 1.1 * start + 4096
    with safetensors.safe_open(str(tmp_path / "packed.safetensors"), "numpy") as f:
        assert len(f.keys()) == 70_001


def test_a_header_past_the_limit_is_refused_before_writing(tmp_path, monkeypatch):
    src = tmp_path / "in.safetensors"
    write_safetensors({f"t{i}": np.zeros(1, np.float32) for i in range(50)}, src)
    monkeypatch.setattr(compressed, "MAX_HEADER", 2000)
    _refused(tmp_path, src, "compressed header would take")
    assert MAX_HEADER == 100_000_000         # what safetensors reads (its own limit)
