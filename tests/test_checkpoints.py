"""Whole checkpoints: compress / decompress / info / verify, the Python API, numcodecs."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest

import ecf8
from ecf8 import compressed, tensor_codecs
from ecf8.cli import main
from ecf8.safetensors_io import iter_tensors, write_safetensors
from helpers import assert_bit_exact, weights_like


def real_checkpoint(real_weights) -> dict[str, np.ndarray]:
    """A small real FP8 checkpoint: MiniLM layer-0 E4M3 linears with block scales, BF16 rest."""
    tensors = {}
    for name, w in real_weights["e4m3"].items():
        tensors[name] = w
        tensors[name + "_scale_inv"] = np.linspace(1e-3, 2e-3, (w.shape[0] // 128) * (w.shape[1] // 128),
                                                   dtype=np.float32).reshape(w.shape[0] // 128, -1)
    tensors["extra.bf16.weight"] = next(iter(real_weights["bf16"].values()))
    tensors["embeddings.position_ids"] = np.arange(512, dtype=np.int64).reshape(1, 512)
    tensors["norm.weight"] = weights_like(384, ml_dtypes.bfloat16)
    tensors["scalar"] = np.array(3.5, np.float32)
    tensors["empty"] = np.zeros((0, 4), np.float16)
    tensors["mask"] = np.ones(1000, np.bool_)
    return tensors


@pytest.fixture
def plain(tmp_path, real_weights):
    tensors = real_checkpoint(real_weights)
    path = tmp_path / "model.safetensors"
    write_safetensors(tensors, path, metadata={"format": "pt", "note": "test"})
    return path, tensors


def test_round_trip_is_byte_identical(plain, tmp_path):
    path, tensors = plain
    packed, restored = tmp_path / "c.safetensors", tmp_path / "r.safetensors"
    compressed.compress_file(path, packed, jobs=1)
    assert packed.stat().st_size < 0.82 * path.stat().st_size          # measured 0.8172
    compressed.decompress_file(packed, restored)
    assert restored.read_bytes() == path.read_bytes()
    codecs = {r.name: r.codec for r in compressed.inspect_file(packed)}
    assert codecs["encoder.layer.0.attention.self.query.weight"] == "ecf8"
    assert codecs["extra.bf16.weight"] == "ecf8"
    assert codecs["embeddings.position_ids"] == "zstd"
    assert codecs["scalar"] == "none" and codecs["empty"] == "none"


# measured 0.8440 (six FP8 E4M3 linears) and 0.6675 (four BF16 attention weights) of the file size
@pytest.mark.parametrize("sample, ratio", [("minilm-layer0-e4m3.safetensors", 0.847),
                                           ("minilm-layer0-bf16.safetensors", 0.670)])
def test_bundled_sample_files_round_trip(tmp_path, sample, ratio):
    """The real files shipped in ecf8/data, as they are: byte for byte back, every tensor coded."""
    from ecf8.bench_cli import sample_paths

    path = next(p for p in sample_paths() if p.name == sample)
    packed, restored = tmp_path / "c.safetensors", tmp_path / "r.safetensors"
    compressed.compress_file(path, packed, jobs=1)
    assert packed.stat().st_size < ratio * path.stat().st_size
    assert {r.codec for r in compressed.inspect_file(packed)} == {"ecf8"}
    assert main(["verify", str(packed), "--quiet"]) == 0
    compressed.decompress_file(packed, restored)
    assert restored.read_bytes() == path.read_bytes()


def test_parallel_output_equals_serial(plain, tmp_path):
    path, _ = plain
    compressed.compress_file(path, tmp_path / "a.safetensors", jobs=1)
    compressed.compress_file(path, tmp_path / "b.safetensors", jobs=2)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_compressed_file_is_valid_safetensors(plain, tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    path, tensors = plain
    compressed.compress_file(path, tmp_path / "c.safetensors", jobs=1)
    loaded = safetensors_numpy.load_file(str(tmp_path / "c.safetensors"))
    assert set(loaded) == set(tensors) | {"__ecf8__"}         # + the record: original header, crcs
    assert all(x.dtype == np.uint8 for x in loaded.values())


def test_save_file_and_load_file(tmp_path, real_weights):
    tensors = real_checkpoint(real_weights)
    ecf8.save_file(tensors, tmp_path / "m.safetensors", metadata={"k": "v"})
    loaded = ecf8.load_file(tmp_path / "m.safetensors")
    assert list(loaded) == list(tensors)
    for name, x in tensors.items():
        assert_bit_exact(np.asarray(loaded[name]), x)
    with pytest.raises(ecf8.UnsupportedError, match="device='cuda'"):
        ecf8.load_file(tmp_path / "m.safetensors", compressed=True)


def test_shard_directory(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    weight_map = {}
    for k in range(3):
        shard = f"model-0000{k + 1}-of-00003.safetensors"
        tensors = {f"layers.{k}.weight": weights_like(20_000, ml_dtypes.bfloat16, seed=k).reshape(100, 200),
                   f"layers.{k}.bias": weights_like(100, ml_dtypes.bfloat16, seed=k)}
        write_safetensors(tensors, src / shard)
        weight_map.update({name: shard for name in tensors})
    index = json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    (src / "model.safetensors.index.json").write_text(index)
    assert main(["compress", str(src), "-o", str(tmp_path / "c"), "--quiet"]) == 0
    assert (tmp_path / "c" / "model.safetensors.index.json").read_text() == index
    assert main(["verify", str(tmp_path / "c" / "model-00002-of-00003.safetensors"), "--quiet"]) == 0
    assert main(["decompress", str(tmp_path / "c"), "-o", str(tmp_path / "r"), "--quiet"]) == 0
    for f in src.iterdir():
        assert (tmp_path / "r" / f.name).read_bytes() == f.read_bytes()


def test_cli_info_and_verify(plain, tmp_path, capsys):
    path, tensors = plain
    packed = tmp_path / "c.safetensors"
    assert main(["compress", str(path), "-o", str(packed), "--jobs", "1", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["info", str(packed)]) == 0
    out = capsys.readouterr().out
    assert "encoder.layer.0.intermediate.dense.weight" in out and "F8_E4M3" in out
    assert f"{len(tensors)} tensors" in out
    assert main(["verify", str(packed), "--quiet"]) == 0
    assert f"ok ({len(tensors)} tensors)" in capsys.readouterr().out


def _corrupt(packed, name, at=40):
    """Flip a byte inside one stored tensor's data."""
    n = struct.unpack("<Q", packed.read_bytes()[:8])[0]
    header = json.loads(packed.read_bytes()[8 : 8 + n])
    a, _ = header[name]["data_offsets"]
    data = bytearray(packed.read_bytes())
    data[8 + n + a + at] ^= 0x10
    packed.write_bytes(bytes(data))


@pytest.mark.parametrize("victim", ["encoder.layer.0.attention.self.key.weight", "embeddings.position_ids"])
def test_verify_catches_corruption(plain, tmp_path, capsys, victim):
    path, _ = plain
    packed = tmp_path / "c.safetensors"
    compressed.compress_file(path, packed, jobs=1)
    _corrupt(packed, victim)
    assert main(["verify", str(packed), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ecf8: error:") and err.count("\n") == 1
    assert main(["decompress", str(packed), "-o", str(tmp_path / "r.safetensors"), "--quiet"]) == 1
    assert not (tmp_path / "r.safetensors").exists()


def test_bad_inputs_one_line_no_output(plain, tmp_path, capsys):
    path, _ = plain
    data = path.read_bytes()
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01" * 500)
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    compressed.compress_file(path, tmp_path / "c.safetensors", jobs=1)
    cases = [["compress", str(tmp_path / "missing.safetensors")],
             ["compress", str(tmp_path / "junk.safetensors")],
             ["compress", str(tmp_path / "trunc.safetensors")],
             ["compress", str(tmp_path / "c.safetensors")],          # already compressed
             ["decompress", str(path)]]                               # not compressed
    for argv in cases:
        out = tmp_path / "out.safetensors"
        assert main(argv + ["-o", str(out), "--quiet"]) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("ecf8: error:") and err.count("\n") == 1, err
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_failure_midway_leaves_no_output(plain, tmp_path, monkeypatch):
    path, _ = plain
    calls = []

    def failing(t, raw, options):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk on fire")
        return "none", None, 0, 0

    monkeypatch.setattr(tensor_codecs, "_compress_one", failing)
    with pytest.raises(OSError):
        compressed.compress_file(path, tmp_path / "c.safetensors", jobs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_reader_rejects_lying_offsets(tmp_path):
    write_safetensors({"a": np.zeros(10, np.float32)}, tmp_path / "a.safetensors")
    data = bytearray((tmp_path / "a.safetensors").read_bytes())
    text = data.replace(b'"data_offsets":[0,40]', b'"data_offsets":[0,4000]')
    (tmp_path / "b.safetensors").write_bytes(bytes(text))
    with pytest.raises(ecf8.CorruptDataError):
        list(iter_tensors(tmp_path / "b.safetensors"))


def test_numcodecs_codec():
    numcodecs = pytest.importorskip("numcodecs")
    codec = numcodecs.get_codec({"id": "ecf8"})
    x = weights_like(50_000, ml_dtypes.bfloat16).reshape(250, 200)
    y = codec.decode(codec.encode(x))
    assert_bit_exact(np.asarray(y).reshape(x.shape), x)
    bitview = numcodecs.get_codec({"id": "ecf8", "dtype": "e4m3", "chunk_size": 4096})
    u = weights_like(10_000, ml_dtypes.float8_e4m3fn).view(np.uint8)
    out = np.empty_like(u)
    bitview.decode(bitview.encode(u), out=out)
    np.testing.assert_array_equal(out, u)
    assert numcodecs.get_codec(bitview.get_config()).get_config() == bitview.get_config()
