"""Compressed checkpoints at their edges: compress_path inside a daemonic process (a worker of
another pool), safe_open handles used after their with block, what verify says of a format-1 file
(no checksums), and a record claiming far more bytes than its file could justify."""

import json
import multiprocessing
import struct

import ml_dtypes
import numpy as np
import pytest
import zstandard

import ecf8
from ecf8 import cli, compressed, compressed_reader, safetensors_io
from ecf8.errors import CorruptDataError, ECF8Error

from checkpoint_helpers import header_of, weights
from test_golden import GOLDEN


def _compress_in_worker(src: str, dst: str) -> bytes:
    compressed.compress_path(src, dst, jobs=2, progress=False)
    return open(dst, "rb").read()


def test_compress_path_in_a_daemonic_process_works_in_process(tmp_path):
    """(It raised multiprocessing's bare AssertionError: daemonic processes may have no children.)"""
    src = tmp_path / "m.safetensors"
    safetensors_io.write_safetensors({f"w{i}": weights(1 << 16, ml_dtypes.bfloat16, i) for i in range(3)}, src)
    with multiprocessing.get_context("fork").Pool(1) as pool:     # its workers are daemonic
        packed = pool.apply(_compress_in_worker, (str(src), str(tmp_path / "c.safetensors")))
    compressed.compress_file(src, tmp_path / "here.safetensors", jobs=2)
    assert packed == (tmp_path / "here.safetensors").read_bytes()
    compressed.decompress_file(tmp_path / "c.safetensors", tmp_path / "r.safetensors")
    assert (tmp_path / "r.safetensors").read_bytes() == src.read_bytes()


@pytest.mark.parametrize("call", ["keys", "metadata", "get_tensor", "get_tensor_unknown", "dtype_of",
                                  "get_bytes"])
def test_a_closed_safe_open_handle_says_it_is_closed(tmp_path, call):
    path = tmp_path / "c.safetensors"
    compressed.save_file({"w": weights(100, np.float16)}, path, metadata={"k": "v"})
    with ecf8.safe_open(path) as f:
        assert f.keys() == ["w"]
    args = {"keys": (), "metadata": (), "get_tensor_unknown": ("nope",)}.get(call, ("w",))
    with pytest.raises(ECF8Error, match=f"{path}: the file is closed"):
        getattr(f, call.replace("_unknown", ""))(*args)


def test_verify_says_a_format_1_file_has_no_checksums(tmp_path, capsys):
    v1 = GOLDEN / "checkpoint-v1.safetensors"
    v2 = tmp_path / "c.safetensors"
    compressed.save_file({"w": weights(100, np.float16)}, v2)
    assert cli.main(["verify", "-q", str(v1), str(v2)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{v1}: ok (5 tensors; format 1: no checksums; decoded only)", f"{v2}: ok (1 tensors)"]
    assert (compressed.file_version(v1), compressed.file_version(v2)) == (1, 2)


def _claiming(path, tensors: int) -> None:
    """Replace a compressed file's record with one of the same crc rules whose original header and
    table name `tensors` empty tensors (a small zstandard frame of some MB)."""
    head, start = header_of(path)
    info = json.loads(head["__metadata__"]["ecf8"])
    original = json.dumps({f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
                           for i in range(tensors)}).encode()
    raw = original + json.dumps({f"t{i}": ["none", 0, 0] for i in range(tensors)}).encode()
    record = zstandard.ZstdCompressor(level=19, write_checksum=True).compress(raw)
    info.update(header=len(original), size=len(raw), crc=compressed._record_crc(raw, len(original)))
    text = json.dumps({"__metadata__": {"ecf8": json.dumps(info)},
                       info["record"]: {"dtype": "U8", "shape": [len(record)],
                                        "data_offsets": [0, len(record)]}}).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + record)


def test_a_record_claiming_more_than_its_header_allows_is_refused_before_decompressing(tmp_path):
    """(A 0.5 MB file whose record named 10^6 tensors took 12-26 s and 1.4-1.8 GiB to refuse.)"""
    path = tmp_path / "c.safetensors"
    compressed.save_file({"w": weights(100, np.float16)}, path)
    _claiming(path, 30_000)
    assert path.stat().st_size < 100_000
    with pytest.raises(CorruptDataError, match=r"record '__ecf8__' claims [\d,]+ bytes, more than a "
                                               r"header of \d+ bytes allows"):
        compressed.verify_file(path)


def test_the_writer_pads_the_header_for_a_large_original_header(tmp_path):
    """An original header much longer than its compressed one (here 3 MB of trailing spaces, which
    safetensors allows) still compresses, and reads back, under the record bound."""
    x = weights(64, np.float16)
    text = json.dumps({"w": {"dtype": "F16", "shape": [64], "data_offsets": [0, 128]}}).encode()
    text += b" " * (3 << 20)
    src = tmp_path / "m.safetensors"
    src.write_bytes(struct.pack("<Q", len(text)) + text + x.tobytes())
    compressed.compress_file(src, tmp_path / "c.safetensors", jobs=1)
    n = struct.unpack("<Q", (tmp_path / "c.safetensors").read_bytes()[:8])[0]
    assert compressed.RECORD_PER_HEADER_BYTE * n + compressed.RECORD_SLACK >= len(text)   # (padded to the bound)
    compressed.decompress_file(tmp_path / "c.safetensors", tmp_path / "r.safetensors")
    assert (tmp_path / "r.safetensors").read_bytes() == src.read_bytes()


def test_a_zstandard_frame_claiming_more_than_any_frame_can_hold_is_refused_before_allocating():
    """A hand-made frame (one RLE block) whose header claims 2^40 bytes, as its tensor's (forged)
    original header does too: refused from the sizes alone (it raised MemoryError, allocating)."""
    frame = (b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + (1 << 40).to_bytes(8, "little")
             + (1 | 1 << 1 | 1 << 3).to_bytes(3, "little") + b"\x00")
    assert len(frame) * compressed_reader.ZSTD_MAX_RATIO < 1 << 40
    with pytest.raises(CorruptDataError, match="a zstandard frame of 17 bytes cannot hold"):
        compressed_reader._unzstd(frame, 1 << 40, "t")
    real = zstandard.ZstdCompressor(level=19).compress(bytes(1 << 24))   # the most a frame holds
    assert compressed_reader._unzstd(real, 1 << 24, "t") == bytes(1 << 24)
