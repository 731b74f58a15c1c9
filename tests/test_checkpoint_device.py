"""`ecf8 compress --device cuda`: the CUDA encoder writes the same compressed file as the CPU."""

import ml_dtypes
import numpy as np
import pytest

import ecf8
from conftest import cuda_available
from ecf8 import compressed
from ecf8.cli import main
from ecf8.safetensors_io import write_safetensors
from helpers import weights_like


def checkpoint(path):
    rng = np.random.default_rng(3)
    write_safetensors({
        "a.weight": weights_like(300_000, ml_dtypes.float8_e4m3fn).reshape(600, 500),
        "a.weight_scale_inv": rng.random((5, 4), dtype=np.float32),
        "b.weight": weights_like(70_001, ml_dtypes.bfloat16),
        "c.weight": weights_like(5000, np.float16, seed=2).reshape(50, 100),
        "d.ids": np.arange(1000, dtype=np.int64),
        "e.empty": np.zeros((0, 3), ml_dtypes.bfloat16),
    }, path)


@pytest.mark.gpu
@pytest.mark.parametrize("jobs", [1, 2])
def test_gpu_encoding_writes_the_same_file(tmp_path, jobs):
    src = tmp_path / "m.safetensors"
    checkpoint(src)
    compressed.compress_file(src, tmp_path / "cpu.safetensors", jobs=1, chunk_size=4096)
    compressed.compress_file(src, tmp_path / "gpu.safetensors", jobs=jobs, chunk_size=4096, device="cuda")
    assert (tmp_path / "gpu.safetensors").read_bytes() == (tmp_path / "cpu.safetensors").read_bytes()
    assert main(["decompress", "-q", str(tmp_path / "gpu.safetensors"), "-o", str(tmp_path / "r.st")]) == 0
    assert (tmp_path / "r.st").read_bytes() == src.read_bytes()


@pytest.mark.skipif(cuda_available(), reason="checks the refusal without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:3", "tpu"])
def test_gpu_encoding_without_a_gpu_is_refused_before_writing(tmp_path, capsys, device):
    src = tmp_path / "m.safetensors"
    checkpoint(src)
    with pytest.raises(ecf8.ECF8Error):
        compressed.compress_file(src, tmp_path / "out.safetensors", device=device)
    assert main(["compress", str(src), "-o", str(tmp_path / "out.safetensors"), "--device", device]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ecf8: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
