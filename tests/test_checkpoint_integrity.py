"""Every byte of a compressed checkpoint is checked: edits are an ECF8Error naming the file (and the
tensor), never a silently different restore, a traceback or a memory blow-up;
version-1 files stay readable."""

import json
import struct
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import ecf8
from ecf8 import compressed
from ecf8.safetensors_io import write_safetensors
from checkpoint_helpers import header_of, patch, weights

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture
def packed(tmp_path):
    rng = np.random.default_rng(5)
    tensors = {"a": weights(4096, ml_dtypes.float8_e4m3fn, 1).reshape(64, 64),
               "b": weights(4096, ml_dtypes.float8_e4m3fn, 2).reshape(64, 64),
               "s1": rng.standard_normal(32).astype(np.float32),
               "s2": rng.standard_normal(32).astype(np.float32),
               "ids": np.arange(512, dtype=np.int64),
               "w": weights(2048, ml_dtypes.bfloat16, 3)}
    src = tmp_path / "plain.safetensors"
    write_safetensors(tensors, src, {"format": "pt"})
    out = tmp_path / "packed.safetensors"
    compressed.compress_file(src, out, jobs=1)
    assert {r.name: r.codec for r in compressed.inspect_file(out)} == {
        "a": "ecf8", "b": "ecf8", "s1": "none", "s2": "none", "ids": "zstd", "w": "ecf8"}
    return src, out


def _rewrite(path: Path, edit) -> None:
    """Apply edit(header dict, data bytearray) -> (header, data) and write the file back."""
    header, start = header_of(path)
    blob = path.read_bytes()
    header, data = edit(header, bytearray(blob[start:]))
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(data))


def _all_refuse(path: Path, tmp_path: Path, match: str = "") -> None:
    """verify, info, decompress, load_file and safe_open all raise ECF8Error; nothing is written."""
    for call in (lambda: compressed.verify_file(path), lambda: compressed.inspect_file(path),
                 lambda: compressed.decompress_file(path, tmp_path / "restored.safetensors"),
                 lambda: ecf8.load_file(path)):
        try:
            call()
        except ecf8.ECF8Error as e:
            assert str(path) in str(e) and "\n" not in str(e) and match in str(e), str(e)
            continue
        except Exception as e:          # the failure this test exists for
            pytest.fail(f"{type(e).__name__} instead of ECF8Error: {e}")
        pytest.fail(f"no error for {path}")
    assert not (tmp_path / "restored.safetensors").exists()


def _stored_range(path: Path, name: str) -> tuple[int, int]:
    header, start = header_of(path)
    a, b = header[name]["data_offsets"]
    return start + a, start + b


def test_a_flipped_bit_in_a_raw_tensor_is_caught(packed, tmp_path):
    _, out = packed
    a, _ = _stored_range(out, "s1")
    patch(out, a + 5, bytes([out.read_bytes()[a + 5] ^ 0x01]))
    count, problems = compressed.check_file(out)
    assert count == 6 and len(problems) == 1 and "'s1'" in problems[0] and "checksum" in problems[0]
    with pytest.raises(ecf8.CorruptDataError, match="'s1'.*checksum"):
        compressed.decompress_file(out, tmp_path / "restored.safetensors")
    assert not (tmp_path / "restored.safetensors").exists()


@pytest.mark.parametrize("x, y", [("s1", "s2"), ("a", "b")])
def test_swapped_payloads_are_caught(packed, tmp_path, x, y):
    # raw tensors of one size swapped in place; ecf8 frames swapped by their header entries
    _, out = packed

    def swap(header, data):
        header[x], header[y] = header[y], header[x]
        return header, data
    _rewrite(out, swap)
    count, problems = compressed.check_file(out)
    assert len(problems) == 2 and f"{x!r}" in problems[0] and f"{y!r}" in problems[1]


def test_swapped_frames_are_caught_on_the_gpu_path_too(packed, monkeypatch):
    # the GPU decoder is stood in for by the CPU one: what matters is that the stored bytes are
    # checked before they are handed to it (a GPU load cannot check the decoded bytes' crc)
    _, out = packed

    def swap(header, data):
        header["a"], header["b"] = header["b"], header["a"]
        return header, data
    _rewrite(out, swap)
    _expect_caught_on_gpu_path(out, "a", monkeypatch)


def _expect_caught_on_gpu_path(out, name, monkeypatch):
    """safe_open(device="cuda") with the CPU decoder standing in for the GPU's refuses `name`."""
    from ecf8 import api, decoder_cuda
    cpu_decode = api.decode
    monkeypatch.setattr(api, "decode", lambda blob, device="cpu", **kw: cpu_decode(blob, "cpu"))
    monkeypatch.setattr(decoder_cuda, "to_device", lambda blob, device="cuda", **kw: blob)
    for compressed in (False, True):
        with ecf8.safe_open(out, device="cuda", compressed=compressed) as f:
            with pytest.raises(ecf8.CorruptDataError, match=f"'{name}'.*checksum"):
                f.get_tensor(name)


def test_equal_length_frames_swapped_are_caught_on_the_gpu_path(tmp_path, monkeypatch):
    # x and -x code to frames of one length; a CRC-32 over a whole frame (which ends with its own
    # CRC-32) would be the same for both
    x = weights(4096, ml_dtypes.float8_e4m3fn, 7)
    ecf8.save_file({"p": x, "n": -x}, tmp_path / "m.safetensors")
    out = tmp_path / "m.safetensors"
    sizes = {r.name: r.stored_bytes for r in compressed.inspect_file(out)}
    assert sizes["p"] == sizes["n"]

    def swap(header, data):
        header["p"], header["n"] = header["n"], header["p"]
        return header, data
    _rewrite(out, swap)
    _expect_caught_on_gpu_path(out, "p", monkeypatch)


def test_deleting_the_last_tensor_is_caught(packed, tmp_path):
    _, out = packed

    def drop(header, data):      # the record moves down to fill the gap: still valid safetensors
        header.pop("w")
        rec = header["__ecf8__"]
        a, b = rec["data_offsets"]
        blob = bytes(data[a:b])
        end = max(v["data_offsets"][1] for k, v in header.items() if k not in ("__metadata__", "__ecf8__"))
        rec["data_offsets"] = [end, end + len(blob)]
        return header, data[:end] + blob
    _rewrite(out, drop)
    _all_refuse(out, tmp_path, "'w'")


@pytest.mark.parametrize("where", ["record", "crc", "original header", "split"])
def test_the_record_is_checked(packed, tmp_path, where):
    src, out = packed
    if where == "record":                                  # a flipped bit inside the record
        a, b = _stored_range(out, "__ecf8__")
        patch(out, (a + b) // 2, bytes([out.read_bytes()[(a + b) // 2] ^ 0x40]))
    else:
        def edit(header, data):
            info = json.loads(header["__metadata__"]["ecf8"])
            if where == "crc":
                info["crc"] ^= 1
            elif where == "split":      # the original header ends in padding: one space less
                info["header"] -= 1
            else:               # a re-made record that holds another header, with a matching crc
                raw = src.read_bytes()[8:8 + info["header"]].replace(b'"pt"', b'"px"')
                raw += json.dumps({k: v for k, v in _table(out).items()}).encode()
                blob = __import__("zstandard").ZstdCompressor().compress(raw)
                a, b = header["__ecf8__"]["data_offsets"]
                data = data[:a] + blob
                header["__ecf8__"] = {"dtype": "U8", "shape": [len(blob)], "data_offsets": [a, a + len(blob)]}
                info.update(size=len(raw), crc=zlib.crc32(raw, zlib.crc32(info["header"].to_bytes(8, "little"))))
            header["__metadata__"]["ecf8"] = json.dumps(info)
            return header, data
        _rewrite(out, edit)
    _all_refuse(out, tmp_path)


def _table(path):
    import zstandard
    header, start = header_of(path)
    info = json.loads(header["__metadata__"]["ecf8"])
    a, b = header["__ecf8__"]["data_offsets"]
    raw = zstandard.ZstdDecompressor().decompress(path.read_bytes()[start + a: start + b])
    return json.loads(raw[info["header"]:])


def _deep(n):
    return "[" * n + "]" * n


@pytest.mark.parametrize("edit", [
    lambda h: h.__setitem__("a", 7),                                             # int for an object
    lambda h: h["a"].__setitem__("shape", [2 ** 64]),
    lambda h: h["a"].__setitem__("shape", [2 ** 63, 0]),
    lambda h: h["a"].__setitem__("shape", [12.5]),
    lambda h: h["a"].__setitem__("data_offsets", None),
    lambda h: h["a"].__setitem__("dtype", ["U8"]),
    lambda h: h.__setitem__("__metadata__", {"ecf8": 5}),
    lambda h: h["__metadata__"].__setitem__("ecf8", _deep(100_000)),             # RecursionError
    lambda h: h["__metadata__"].__setitem__("ecf8", '{"format":"ecf8.safetensors","version":2,'
                                                    '"record":"__ecf8__","header":1e999,"size":-1,"crc":null}'),
    lambda h: h["__metadata__"].__setitem__("ecf8", json.dumps(
        dict(json.loads(h["__metadata__"]["ecf8"]), size=2 ** 62))),              # a huge record
    lambda h: h["__metadata__"].__setitem__("ecf8", json.dumps(
        dict(json.loads(h["__metadata__"]["ecf8"]), version=3))),
    lambda h: h["__metadata__"].__setitem__("format", "np"),                     # metadata differs
    lambda h: h.__setitem__("__metadata__", {}),
    lambda h: h.__setitem__("x" * 3, h.pop("s1")),                                # renamed tensor
    lambda h: h["__metadata__"].__setitem__("ecf8", json.dumps(
        dict(json.loads(h["__metadata__"]["ecf8"]), extra=None))),                 # an unknown key
    lambda h: h["s1"].update(dtype="I8"),                                          # not U8 bytes
    lambda h: h["s1"].update(dtype="U16", shape=[64]),
])
def test_malformed_header_values_are_ecf8_errors(packed, tmp_path, edit):
    _, out = packed

    def apply(header, data):
        edit(header)
        return header, data
    _rewrite(out, apply)
    _all_refuse(out, tmp_path)


def test_a_zstd_frame_claiming_a_huge_size_is_refused_before_allocating(packed, tmp_path):
    _, out = packed
    a, b = _stored_range(out, "ids")
    # frame header: magic, descriptor "8-byte content size, single segment", size 2**40, then a block
    forged = b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + struct.pack("<Q", 2 ** 40) + b"\x01\x00\x00"
    patch(out, a, forged + bytes(b - a - len(forged)))
    _, problems = compressed.check_file(out)
    assert len(problems) == 1 and "'ids'" in problems[0]


@pytest.mark.parametrize("cut", [1, 100, "all-but-8"])
def test_truncated_or_extended_files_are_refused(packed, tmp_path, cut):
    _, out = packed
    blob = out.read_bytes()
    out.write_bytes(blob[:8] if cut == "all-but-8" else blob[:-cut])
    _all_refuse(out, tmp_path)
    out.write_bytes(blob + b"\0")
    _all_refuse(out, tmp_path)


def test_version_1_files_stay_readable(tmp_path):
    # tests/golden/checkpoint-v1.safetensors was written by ecf8 at commit 08ebeb3 (format version 1)
    # from checkpoint-v1.plain.safetensors (see the golden-file commit).
    v1, plain = GOLDEN / "checkpoint-v1.safetensors", GOLDEN / "checkpoint-v1.plain.safetensors"
    assert json.loads(header_of(v1)[0]["__metadata__"]["ecf8"])["version"] == 1
    compressed.decompress_file(v1, tmp_path / "r.safetensors")
    assert (tmp_path / "r.safetensors").read_bytes() == plain.read_bytes()
    assert compressed.verify_file(v1) == 5
    assert [r.codec for r in compressed.inspect_file(v1)] == ["ecf8", "ecf8", "zstd", "none", "none"]
    with ecf8.safe_open(v1) as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor("ids").tolist() == list(range(256))
    loaded = ecf8.load_file(v1)
    assert loaded["w.e4m3"].dtype == ml_dtypes.float8_e4m3fn and loaded["w.e4m3"].shape == (64, 64)
