"""ecf8 bench: the bundled real sample is shipped and real, the table, user files, honest checks,
and the GPU part degrading to a one-line note without CuPy or a device."""

import importlib.resources
import re
import sys
import types

import ml_dtypes
import numpy as np
import pytest

from ecf8 import bench_cli
from ecf8.analysis import analyze_tensor
from ecf8.cli import main
from ecf8.safetensors_io import iter_tensors, write_safetensors
from helpers import weights_like

ROW = re.compile(r"^(?:(\S+)\s+(\d+)\s+([\d,]+)\s+)?\s*(ecf8|zstd -\d+)\s+([\d.]+)\s+([\d.]+)%\s+([\d.]+)\s+([\d.]+)\s+(yes|NO)$")


def rows(text):
    return [m.groups() for m in map(ROW.match, text.splitlines()) if m]


def test_sample_is_shipped_with_its_license():
    base = importlib.resources.files("ecf8") / "data"
    names = {p.name for p in base.iterdir()}
    assert set(bench_cli.SAMPLE_FILES) | {"README.md"} <= names
    note = (base / "README.md").read_text()
    assert "all-MiniLM-L6-v2" in note and "Apache License, Version 2.0" in note
    assert sum((base / n).stat().st_size for n in bench_cli.SAMPLE_FILES) < 4 << 20


def test_sample_is_real_trained_weights():
    """Not zeros or noise: exponent entropy of trained weights, every tensor distinct."""
    seen = set()
    for path in bench_cli.sample_paths():
        for e in iter_tensors(path):
            r = analyze_tensor(e.name, e.array, e.dtype)
            assert 2.0 < r.exponent_entropy_bits < 3.2, e.name
            assert r.codec == "ecf8" and r.saving > 0.1
            seen.add(e.array.tobytes()[:4096])
    assert len(seen) == 10


def test_sample_matches_the_project_real_data(shared_data):
    fp8 = np.load(shared_data / "minilm-layer0-fp8-e4m3fn-block128.npz")
    bf16 = np.load(shared_data / "minilm-layer0-bf16.npz")
    e4m3, b16 = bench_cli.sample_paths()
    got = {e.name: e.array for e in iter_tensors(e4m3)}
    assert set(got) == set(fp8.files)
    for k in fp8.files:
        assert np.array_equal(got[k].view(np.uint8), fp8[k])
    for e in iter_tensors(b16):
        assert e.dtype == "BF16" and np.array_equal(e.array.view(np.uint16), bf16[e.name])


def test_bench_on_the_bundled_sample(capsys):
    assert main(["bench", "--runs", "1", "--cpu-only"]) == 0
    out = capsys.readouterr().out
    assert "all-MiniLM-L6-v2" in out and "Apache-2.0" in out and "median of 1 runs after a warm-up" in out
    table = rows(out)
    assert [r[3] for r in table] == ["ecf8", "zstd -3", "ecf8", "zstd -3"]
    assert table[0][:3] == ("F8_E4M3", "6", "1,769,472") and table[2][:3] == ("BF16", "4", "589,824")
    assert all(r[8] == "yes" for r in table)
    assert 6.0 < float(table[0][4]) < 7.5 and 9.5 < float(table[2][4]) < 12.0   # bits/weight
    assert all(float(r[6]) > 0 and float(r[7]) > 0 for r in table)
    assert "GPU" not in out


def test_bench_on_a_user_file(tmp_path, capsys):
    path = tmp_path / "m.safetensors"
    write_safetensors({"a": weights_like(4096, ml_dtypes.bfloat16), "b": np.ones(10, np.float32),
                       "c": weights_like(2048, ml_dtypes.float8_e5m2)}, path)
    assert main(["bench", str(path), "--runs", "1", "--cpu-only", "--zstd-level", "1"]) == 0
    out = capsys.readouterr().out
    assert str(path) in out and "skipped: 1 tensor of F32" in out
    assert [(r[0], r[1], r[3]) for r in rows(out)] == [("F8_E5M2", "1", "ecf8"), (None, None, "zstd -1"),
                                                       ("BF16", "1", "ecf8"), (None, None, "zstd -1")]
    assert main(["bench", str(path), "--tensor", "c", "--runs", "1", "--cpu-only"]) == 0
    assert [r[0] for r in rows(capsys.readouterr().out) if r[0]] == ["F8_E5M2"]
    np.save(tmp_path / "w.npy", weights_like(3000, ml_dtypes.float8_e4m3fn).view(np.uint8))
    assert main(["bench", str(tmp_path / "w.npy"), "--dtype", "F8_E4M3", "--runs", "1", "--cpu-only"]) == 0
    assert rows(capsys.readouterr().out)[0][:3] == ("F8_E4M3", "1", "3,000")


def test_bench_refuses_what_it_cannot_measure(tmp_path, capsys):
    path = tmp_path / "f32.safetensors"
    write_safetensors({"a": np.ones(10, np.float32)}, path)
    for argv, words in ((["bench", str(path)], ["no FP8/BF16/FP16 tensors", "1 F32"]),
                        (["bench", "--tensor", "nope"], ["no tensor named 'nope'"]),
                        (["bench", str(tmp_path / "missing.safetensors")], ["missing.safetensors"]),
                        (["bench", "--runs", "0"], None)):
        if words is None:
            with pytest.raises(SystemExit):
                main(argv)
            continue
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("ecf8: error:") and err.count("\n") == 1 and all(w in err for w in words)


def test_bench_reports_a_round_trip_failure(monkeypatch, capsys):
    """The bit-exact column is a real check: a decoder returning other bits makes bench fail."""
    real = bench_cli.api.decode

    def wrong(blob):
        y = real(blob).copy()
        y.reshape(-1).view(np.uint8)[0] ^= 1
        return y

    monkeypatch.setattr(bench_cli.api, "decode", wrong)
    assert main(["bench", "--runs", "1", "--cpu-only"]) == 1
    captured = capsys.readouterr()
    assert rows(captured.out)[0][8] == "NO" and "did not round-trip bit-exactly" in captured.err


def test_gpu_part_degrades_to_a_note(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert main(["bench", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert "GPU: not measured (CuPy is not installed" in out and out.rstrip().endswith(")")
    broken = types.ModuleType("cupy")
    broken.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(
        getDeviceCount=lambda: (_ for _ in ()).throw(RuntimeError("cudaErrorNoDevice: no CUDA-capable device"))))
    monkeypatch.setitem(sys.modules, "cupy", broken)
    assert bench_cli.gpu_status() == (None, "GPU: not measured (CUDA unavailable: cudaErrorNoDevice: "
                                            "no CUDA-capable device)")
    broken.cuda.runtime.getDeviceCount = lambda: 0
    assert bench_cli.gpu_status() == (None, "GPU: not measured (no CUDA device)")


@pytest.mark.gpu
def test_bench_on_the_gpu(capsys):
    assert main(["bench", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert len(gpu_rows(out)) == 2 and all(r[4] == "yes" for r in gpu_rows(out)), out


def gpu_rows(text):
    return [m.groups() for m in (re.match(r"^(F8_E4M3|BF16)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(yes|NO)\b", l)
                                 for l in text.splitlines()) if m]


class _DevArray(np.ndarray):
    """A host array standing in for a CuPy array: .data.ptr is its address."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)


def fake_cupy():
    """Just enough of CuPy, on the host, to run bench_gpu's logic without a GPU."""
    import ctypes
    import time

    class Event:
        def record(self, stream=None):
            self.t = time.perf_counter()

        def synchronize(self):
            pass

    cp = types.ModuleType("cupy")
    cp.__version__ = "0-fake"
    runtime = types.SimpleNamespace(
        getDeviceCount=lambda: 1, getDeviceProperties=lambda i: {"name": b"Fake GPU"},
        memcpyDeviceToDevice=3, memcpyAsync=lambda dst, src, n, kind, stream: ctypes.memmove(dst, src, n))
    cp.cuda = types.SimpleNamespace(
        runtime=runtime, Device=lambda *a: types.SimpleNamespace(id=0),
        Stream=lambda non_blocking=False: types.SimpleNamespace(ptr=0, synchronize=lambda: None),
        Event=Event, get_elapsed_time=lambda a, b: (b.t - a.t) * 1e3 + 1e-3)
    cp.asarray = lambda x: np.array(x).view(_DevArray)
    cp.empty = lambda n, dtype: np.empty(n, dtype).view(_DevArray)
    cp.empty_like = lambda x: np.empty_like(x).view(_DevArray)
    return cp


def fake_decoder(corrupt=False):
    """to_device / BatchDecoder on the host: the batch's outputs are CPU decodes of its frames."""
    from ecf8 import api

    class Out:
        def __init__(self, y):
            self.y = y

        def get(self):
            return self.y

    class Batch:
        def __init__(self, tensors):
            self.outs = [Out(api.decode(t)) for t in tensors]
            if corrupt:
                self.outs[-1].y = self.outs[-1].y.copy()
                self.outs[-1].y.reshape(-1).view(np.uint8)[-1] ^= 0x80

        def run(self, stream=None):
            return self.outs

    return (lambda blob, device: bytes(blob)), Batch


@pytest.mark.parametrize("corrupt", [False, True])
def test_gpu_path_logic_on_a_fake_gpu(monkeypatch, capsys, corrupt):
    """bench_gpu's checks, copies and table on host stand-ins for CuPy and the CUDA decoder (the
    real GPU run is test_bench_on_the_gpu); a wrong last copy must be caught."""
    from ecf8 import decoder_cuda

    monkeypatch.setitem(sys.modules, "cupy", fake_cupy())
    to_device, batch = fake_decoder(corrupt)
    monkeypatch.setattr(decoder_cuda, "to_device", to_device)
    monkeypatch.setattr(decoder_cuda, "BatchDecoder", batch)
    monkeypatch.setattr(bench_cli, "GPU_BYTES", 4 << 20)
    assert main(["bench", "--runs", "1"]) == int(corrupt)
    out = capsys.readouterr().out
    assert "GPU: Fake GPU, CuPy 0-fake" in out
    rows_ = gpu_rows(out)
    if corrupt:
        assert rows_[0][0] == "F8_E4M3" and rows_[0][4] == "NO"
        return
    assert [(r[0], r[4]) for r in rows_] == [("F8_E4M3", "yes"), ("BF16", "yes")]
    assert float(rows_[0][1]) == pytest.approx(3 * 1_769_472 / 1e6, abs=0.1)   # 3 copies >= 4 MiB
    assert "(3 separately uploaded copies of the tensors)" in out
