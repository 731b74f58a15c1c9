"""Multi-GPU compression: `--device cuda` spreads a folder's shards over one worker
process per visible GPU, largest first to whichever worker is free, under one progress bar; the
files are the bytes the CPU writes; a failing shard, a dead worker, Ctrl-C or SIGTERM stop every
worker and leave nothing.

Without several GPUs the workers are pinned to what ``gpu_pool.gpus`` lists: the CPU tests list
"cpu" twice (two worker processes that encode on the CPU, so the whole multi-worker path runs in
CI), the GPU tests "cuda:0" twice (two workers sharing one GPU).
"""

import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import ecf8
from conftest import cuda_available
from ecf8 import gpu_pool, progress, compressed
from ecf8.cli import main
from ecf8.safetensors_io import read_layout, write_safetensors
from helpers import weights_like, child_env
from checkpoint_helpers import alive, interrupt, processes, still_running

ROOT = Path(__file__).resolve().parents[1]

# Shards: (elements, dtype); unequal, and their size order is neither their path order nor its reverse.
SHARDS = ((40_000, ml_dtypes.bfloat16), (300_000, ml_dtypes.float8_e4m3fn), (9_000, np.float16),
          (120_000, np.int64), (60_000, ml_dtypes.float8_e5m2))


def _model(root: Path, shards=SHARDS) -> Path:
    """A model folder: shard k holds tensors "s<k>.*" (shard 2 in a subfolder; shard 3 has nothing to
    entropy-code), plus a config file."""
    root.mkdir()
    for k, (n, dtype) in enumerate(shards):
        path = root / ("sub" if k == 2 else "") / f"model-{k:02d}.safetensors"
        path.parent.mkdir(exist_ok=True)
        if np.dtype(dtype).kind == "i":
            tensors = {f"s{k}.ids": np.arange(n, dtype=dtype)}
        else:
            tensors = {f"s{k}.weight": weights_like(n, dtype, seed=k), f"s{k}.scale": np.float32([k + 0.5])}
        write_safetensors(tensors, path, {"format": "pt"})
    (root / "config.json").write_text('{"model_type": "demo"}')
    return root


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _data_bytes(root: Path) -> int:
    return sum(read_layout(f).data_size for f in root.rglob("*.safetensors"))


@pytest.fixture
def workers(monkeypatch):
    """workers(devices): device="cuda" now sees these GPUs; returns the list of spreads made (the
    devices of each compress_shards call), to show that the multi-worker path ran."""
    spreads = []
    real = gpu_pool.compress_shards

    def spread(pairs, devices, **kwargs):
        spreads.append(list(devices))
        return real(pairs, devices, **kwargs)

    monkeypatch.setattr(gpu_pool, "compress_shards", spread)

    def use(devices):
        monkeypatch.setattr(gpu_pool, "gpus", lambda: list(devices))
        return spreads
    return use


def _spread_is_the_cpu_bytes(tmp_path, workers, devices, out):
    """Compress a model folder on the CPU, then with device="cuda" spread over `devices` into
    tmp_path/out; assert one spread over exactly those devices and the CPU's bytes.  Returns
    (the source folder, the spreads list, to which later compressions append)."""
    src = _model(tmp_path / "model")
    compressed.compress_path(src, tmp_path / "cpu", device="cpu", jobs=1)
    spreads = workers(devices)
    compressed.compress_path(src, tmp_path / out, device="cuda")
    assert spreads == [devices]
    assert _tree(tmp_path / out) == _tree(tmp_path / "cpu")
    return src, spreads


# ----------------------------------------------------------------- the multi-worker path, on the CPU

def test_shards_spread_over_two_workers_are_the_cpu_bytes(tmp_path, workers):
    _spread_is_the_cpu_bytes(tmp_path, workers, ["cpu", "cpu"], "spread")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu", "model", "spread"]
    assert multiprocessing.active_children() == []


def test_the_largest_shard_goes_first(tmp_path, monkeypatch):
    src = _model(tmp_path / "model")
    (tmp_path / "out").mkdir()
    pairs = [(f, tmp_path / "out" / f.name) for f in sorted(src.rglob("*.safetensors"))]
    seen = []
    monkeypatch.setattr(progress.Bar, "advance", lambda self, amount, what="": seen.append((what, amount)))
    gpu_pool.compress_shards(pairs, ["cpu"], one_file=compressed.compress_file, progress=True)  # one worker: its order
    shards = list(dict.fromkeys(what.split(".")[0] for what, _ in seen))
    by_size = sorted(pairs, key=lambda p: p[0].stat().st_size, reverse=True)
    assert shards == [f"s{int(f.stem[-2:])}" for f, _ in by_size]
    assert shards != sorted(shards) and shards != sorted(shards, reverse=True)
    assert sum(amount for _, amount in seen) == _data_bytes(src)


def test_one_progress_bar_over_every_worker_and_quiet_is_quiet(tmp_path, monkeypatch, workers, capfd):
    src = _model(tmp_path / "model")
    workers(["cpu", "cpu"])
    bars = []
    real_init = progress.Bar.__init__

    def spy(self, total, label, enabled=None):         # as if stderr were a terminal
        real_init(self, total, label, True if enabled is None else enabled)
        bars.append(self)

    monkeypatch.setattr(progress.Bar, "__init__", spy)
    assert main(["compress", str(src), "-o", str(tmp_path / "out"), "--device", "cuda"]) == 0
    shown = [b for b in bars if b.enabled]
    assert len(shown) == 1 and shown[0]._bar.total == shown[0]._bar.n == _data_bytes(src)
    bars.clear()
    capfd.readouterr()
    assert main(["compress", str(src), "-o", str(tmp_path / "quiet"), "--device", "cuda", "-q"]) == 0
    assert [b for b in bars if b.enabled] == []
    assert capfd.readouterr() == ("", "")               # (workers' output too: fd level)
    assert _tree(tmp_path / "quiet") == _tree(tmp_path / "out")


def _cut_after_check(monkeypatch, victim: Path) -> None:
    """The shard changes after compress checked it (cut short), so the worker that takes it fails."""
    check = compressed._check_plain

    def check_then_cut(path, *known):
        layout = check(path, *known)
        if Path(path) == victim:
            victim.write_bytes(victim.read_bytes()[:1000])
        return layout
    monkeypatch.setattr(compressed, "_check_plain", check_then_cut)


def _one_error_line(tmp_path, monkeypatch, workers, capfd, devices, shard):
    """A shard cut short in a worker (after the parent checked it): `ecf8 compress --device cuda`
    exits 1 with one error line naming it, writes nothing and leaves no worker behind."""
    src = _model(tmp_path / "model")
    victim = src / shard
    _cut_after_check(monkeypatch, victim)
    workers(devices)
    assert main(["compress", str(src), "-o", str(tmp_path / "out"), "--device", "cuda"]) == 1
    out, err = capfd.readouterr()
    assert out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("ecf8: error: ") and str(victim) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert multiprocessing.active_children() == []


def test_a_shard_failing_in_a_worker_is_one_error_line_and_nothing_written(tmp_path, monkeypatch,
                                                                           workers, capfd):
    _one_error_line(tmp_path, monkeypatch, workers, capfd, ["cpu", "cpu"], "model-01.safetensors")


def test_a_worker_that_dies_is_an_ecf8_error_naming_its_shard(tmp_path, workers):
    src = _model(tmp_path / "model")
    workers(["cpu", "cpu"])
    killed = []

    def kill_the_first_worker():        # (say, the kernel's OOM killer) as soon as it starts
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline:
            for p in multiprocessing.active_children()[:1]:
                os.kill(p.pid, signal.SIGKILL)
                killed.append(p.pid)
            time.sleep(0.005)

    killer = threading.Thread(target=kill_the_first_worker)
    killer.start()
    try:
        with pytest.raises(ecf8.ECF8Error, match="worker process died") as e:
            compressed.compress_path(src, tmp_path / "out", device="cuda")
    finally:
        killed.append(0)
        killer.join()
    assert str(src) in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert multiprocessing.active_children() == []


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupt_stops_every_worker_and_leaves_nothing(tmp_path, sig, code):
    src = tmp_path / "model"
    src.mkdir()
    rng = np.random.default_rng(0)
    for k in range(4):      # 8 MB of float32 each: zstd level 19 takes a second or more per shard
        write_safetensors({"w": rng.standard_normal(1 << 21).astype(np.float32)}, src / f"m{k}.safetensors")
    script = ("import sys; from ecf8 import gpu_pool; gpu_pool.gpus = lambda: ['cpu', 'cpu']; "
              "from ecf8.cli import main; sys.exit(main())")
    cmd = [sys.executable, "-c", script, "compress", str(src), "-o", str(tmp_path / "out"), "--device", "cuda"]
    # (two workers and the resource tracker)
    family = interrupt(cmd, tmp_path, sig, code, lambda pid: processes(1, pid), 3, 0.5,
                       child_env())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "stderr.txt"]
    left = still_running(lambda: [p for p in family if alive(p)])
    assert not left, f"processes left running: {left}"


@pytest.mark.skipif(cuda_available(), reason="checks the refusal without a GPU")
def test_cuda_on_a_folder_without_a_gpu_is_refused_before_anything_is_written(tmp_path, capsys):
    src = _model(tmp_path / "model")
    with pytest.raises(ecf8.ECF8Error):
        compressed.compress_path(src, tmp_path / "out", device="cuda")
    assert main(["compress", str(src), "-o", str(tmp_path / "out"), "--device", "cuda"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("ecf8: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ------------------------------------------------------------------------------------ on a GPU

@pytest.mark.gpu
def test_gpu_folder_is_the_cpu_bytes(tmp_path):
    """Every visible GPU (one on a one-GPU machine: the in-process path; more: the workers)."""
    src = _model(tmp_path / "model")
    assert main(["compress", "-q", str(src), "-o", str(tmp_path / "cpu"), "--device", "cpu"]) == 0
    assert main(["compress", "-q", str(src), "-o", str(tmp_path / "gpu"), "--device", "cuda"]) == 0
    assert _tree(tmp_path / "gpu") == _tree(tmp_path / "cpu")


@pytest.mark.gpu
def test_gpu_two_workers_on_one_gpu_are_the_cpu_bytes(tmp_path, workers):
    src, spreads = _spread_is_the_cpu_bytes(tmp_path, workers, ["cuda:0", "cuda:0"], "gpu")
    one = src / "model-01.safetensors"                     # a single file: one GPU, no workers
    compressed.compress_path(one, tmp_path / "one.safetensors", device="cuda")
    assert spreads == [["cuda:0", "cuda:0"]]
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "cpu" / one.name).read_bytes()
    assert multiprocessing.active_children() == []


@pytest.mark.gpu
def test_gpu_a_shard_failing_in_a_worker_is_one_error_line(tmp_path, monkeypatch, workers, capfd):
    _one_error_line(tmp_path, monkeypatch, workers, capfd, ["cuda:0", "cuda:0"], "model-03.safetensors")


@pytest.mark.gpu
def test_gpu_out_of_memory_in_a_worker_is_one_error_line(tmp_path, monkeypatch, workers, capfd):
    src = _model(tmp_path / "model")
    monkeypatch.setenv("CUPY_GPU_MEMORY_LIMIT", str(1 << 16))      # the workers' CuPy: 64 KiB per GPU
    workers(["cuda:0", "cuda:0"])
    assert main(["compress", str(src), "-o", str(tmp_path / "out"), "--device", "cuda"]) == 1
    out, err = capfd.readouterr()
    assert out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("ecf8: error: ") and "out of GPU memory on cuda:0" in err and str(src) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert multiprocessing.active_children() == []


@pytest.mark.gpu
def test_gpu_out_of_memory_in_this_process_is_one_error_line(tmp_path, capsys):
    """One GPU, no workers: CuPy's OutOfMemoryError was a traceback; now one line naming the
    file and the tensor."""
    import cupy

    src = _model(tmp_path / "model")
    shard = src / "model-01.safetensors"
    pool = cupy.get_default_memory_pool()
    limit = pool.get_limit()
    pool.free_all_blocks()
    pool.set_limit(size=pool.used_bytes() + (1 << 16))         # 64 KiB more than is in use on GPU 0
    try:
        code = main(["compress", str(shard), "-o", str(tmp_path / "out.safetensors"), "--device", "cuda:0"])
    finally:
        pool.set_limit(size=limit)
    err = capsys.readouterr().err.splitlines()
    assert code == 1 and len(err) == 1, err
    assert "out of GPU memory on cuda:0" in err[0] and str(shard) in err[0] and "'s1.weight'" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
