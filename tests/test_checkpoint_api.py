"""save_file checks names and metadata as safetensors does; safe_open reads the
metadata and one tensor at a time."""

import ml_dtypes
import numpy as np
import pytest
import safetensors

import ecf8
from checkpoint_helpers import header_of, patch, weights


@pytest.mark.parametrize("tensors, metadata", [
    ({"__metadata__": np.arange(6, dtype=np.float32)}, None),
    ({1: np.zeros(2, np.float32)}, None),
    ({"w": np.zeros(2, np.float32)}, {"k": 1}),
    ({"w": np.zeros(2, np.float32)}, {"k": None}),
    ({"w": np.zeros(2, np.float32)}, {1: "v"}),
    ({"w": np.zeros(2, np.float32)}, ["k", "v"]),
    ({"\ud800": np.zeros(2, np.float32)}, None),
])
def test_save_file_refuses_what_safetensors_cannot_store(tmp_path, tensors, metadata):
    with pytest.raises(ecf8.UnsupportedError):
        ecf8.save_file(tensors, tmp_path / "m.safetensors", metadata=metadata)
    assert list(tmp_path.iterdir()) == []


def test_save_file_keeps_odd_names_and_an_ecf8_metadata_key(tmp_path):
    tensors = {"": np.float32([1, 2]), "ünï cödé 😀": weights(4096, ml_dtypes.bfloat16), "__ecf8__": np.int8([3])}
    ecf8.save_file(tensors, tmp_path / "m.safetensors", metadata={"ecf8": "the user's own", "format": "pt"})
    with safetensors.safe_open(str(tmp_path / "m.safetensors"), "numpy") as f:     # valid safetensors
        assert len(f.keys()) == 4
    with ecf8.safe_open(tmp_path / "m.safetensors") as f:
        assert f.keys() == list(tensors)
        assert f.metadata() == {"ecf8": "the user's own", "format": "pt"}
        for name, x in tensors.items():
            assert f.get_tensor(name).tobytes() == x.tobytes()


def test_safe_open_reads_one_tensor_without_the_others(tmp_path):
    tensors = {"a": weights(4096, ml_dtypes.float8_e4m3fn, 1), "b": weights(4096, ml_dtypes.float8_e4m3fn, 2)}
    path = tmp_path / "m.safetensors"
    ecf8.save_file(tensors, path)
    header, start = header_of(path)
    a, _ = header["a"]["data_offsets"]
    patch(path, start + a + 100, b"\xff\xff")                  # "a" is damaged, "b" is not
    with ecf8.safe_open(path, device="cpu") as f:
        assert f.metadata() is None
        np.testing.assert_array_equal(f.get_tensor("b").view(np.uint8), tensors["b"].view(np.uint8))
        with pytest.raises(ecf8.CorruptDataError, match="'a'"):
            f.get_tensor("a")
        with pytest.raises(KeyError):
            f.get_tensor("c")
    with pytest.raises(ecf8.UnsupportedError, match="framework"):
        ecf8.safe_open(path, "pt")
    torch = pytest.importorskip("torch")
    with ecf8.safe_open(path, device=torch.device("cpu")) as f:         # device objects, as decode
        assert f.get_tensor("b").dtype == ml_dtypes.float8_e4m3fn


def test_save_file_writes_what_compressing_the_plain_file_writes(tmp_path, monkeypatch):
    """save_file compresses the arrays where they are: the same bytes as write_safetensors then
    compress_file, and no plain file on the way."""
    from ecf8 import compressed, safetensors_io

    rng = np.random.default_rng(3)
    tensors = {"e4m3": (rng.standard_normal((64, 96)) * 8).astype(ml_dtypes.float8_e4m3fn),
               "empty": np.zeros((0, 3), ml_dtypes.bfloat16), "scalar": np.float32(2.5),
               "bf16": rng.standard_normal((80, 64)).astype(ml_dtypes.bfloat16)[:, ::2],
               "ids": np.arange(1000, dtype=np.int64), "e5m2": np.zeros(0, ml_dtypes.float8_e5m2)}
    safetensors_io.write_safetensors(tensors, tmp_path / "plain.safetensors", {"k": "v"})
    compressed.compress_file(tmp_path / "plain.safetensors", tmp_path / "a.safetensors", jobs=1,
                             progress=False)
    made = []
    real = safetensors_io.atomic_file
    monkeypatch.setattr(safetensors_io, "atomic_file", lambda *a, **k: made.append(a[0]) or real(*a, **k))
    monkeypatch.setattr(compressed, "atomic_file", lambda *a, **k: made.append(a[0]) or real(*a, **k))
    ecf8.save_file(tensors, tmp_path / "b.safetensors", {"k": "v"})
    assert made == [tmp_path / "b.safetensors"]
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "plain.safetensors"]
