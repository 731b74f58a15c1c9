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
