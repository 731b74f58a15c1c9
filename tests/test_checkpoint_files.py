"""Files on disk: modes as cp/zstd give them; SIGINT/SIGTERM leave no output, no temp file and no
worker process, print one line and exit 130/143."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import ecf8
from ecf8 import compressed, tensor_codecs
from ecf8.safetensors_io import write_safetensors
from checkpoint_helpers import alive, interrupt, processes, still_running
from helpers import child_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_output_modes_follow_the_input_or_the_umask(tmp_path, umask_022):
    ecf8.save_file({"w": np.zeros(100, np.float32)}, tmp_path / "saved.safetensors")
    assert (tmp_path / "saved.safetensors").stat().st_mode & 0o777 == 0o644
    src = tmp_path / "in.safetensors"
    write_safetensors({"w": np.zeros(100, ml_dtypes.bfloat16)}, src)
    os.chmod(src, 0o640)
    compressed.compress_file(src, tmp_path / "c.safetensors", jobs=1)
    compressed.decompress_file(tmp_path / "c.safetensors", tmp_path / "r.safetensors")
    assert (tmp_path / "c.safetensors").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "r.safetensors").stat().st_mode & 0o777 == 0o640
    folder = tmp_path / "model"
    folder.mkdir()
    os.replace(src, folder / "model.safetensors")
    (folder / "config.json").write_text("{}")
    compressed.compress_path(folder, tmp_path / "cdir", jobs=1)
    assert (tmp_path / "cdir").stat().st_mode & 0o777 == folder.stat().st_mode & 0o777
    assert (tmp_path / "cdir" / "config.json").stat().st_mode & 0o777 == 0o644


def _die(*args):
    os._exit(3)          # a worker killed (say, by the kernel's OOM killer)


def test_a_dead_worker_is_an_ecf8_error(tmp_path, monkeypatch):
    src = tmp_path / "in.safetensors"
    write_safetensors({f"w{k}": np.zeros(1 << 17, ml_dtypes.bfloat16) for k in range(4)}, src)
    monkeypatch.setattr(tensor_codecs, "_worker", _die)
    with pytest.raises(ecf8.ECF8Error, match="worker process died"):
        compressed.compress_file(src, tmp_path / "out.safetensors", jobs=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_an_interrupt_without_workers_stays_an_interrupt(tmp_path):
    # a fresh interpreter: concurrent.futures.process is not imported when no pool was started
    src = tmp_path / "in.safetensors"
    write_safetensors({"w": np.ones(1000, np.float32)}, src)
    script = ("import sys; from ecf8 import compressed, tensor_codecs\n"
              "def stop(*a, **k): raise KeyboardInterrupt\n"
              "tensor_codecs.choose_codec = stop\n"
              "try: compressed.compress_file(sys.argv[1], sys.argv[2], jobs=1)\n"
              "except KeyboardInterrupt: sys.exit(0)\n")
    done = subprocess.run([sys.executable, "-c", script, str(src), str(tmp_path / "out.safetensors")],
                          env=child_env(), capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-500:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def _family(pid: int) -> list[int]:
    """Children and grandchildren (workers forked by a forkserver child)."""
    kids = processes(1, pid)
    return kids + [g for k in kids for g in processes(1, k)]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_compress_leaves_nothing(tmp_path, sig, code):
    rng = np.random.default_rng(0)
    src = tmp_path / "big.safetensors"
    write_safetensors({f"w{k}": (rng.standard_normal(1 << 19) * 0.02).astype(ml_dtypes.bfloat16)
                       for k in range(16)}, src)                          # 16 MB of BF16
    out = tmp_path / "out.safetensors"
    # Each finished tensor costs the parent 0.5 s more, so the signal surely lands mid-job
    # (workers busy or waiting for room in the window).
    slow = ("import sys, time; from ecf8 import progress; step = progress._Progress.advance; "
            "progress._Progress.advance = lambda self, *a: (time.sleep(0.5), step(self, *a)); "
            "from ecf8.cli import main; sys.exit(main())")
    cmd = [sys.executable, "-c", slow, "compress", str(src), "-o", str(out), "--jobs", "2"]
    # (the job takes 8 s or more: 1 s after two workers show, they are up)
    workers = interrupt(cmd, tmp_path, sig, code, _family, 2, 1.0, child_env())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.safetensors", "stderr.txt"]
    # (the workers, and a forkserver or resource tracker, end too)
    left = still_running(lambda: _running(str(out)) + [p for p in workers if alive(p)])
    assert not left, f"processes left running: {left}"


def _running(marker: str) -> list[int]:
    """Live processes whose command line mentions `marker`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker.encode() in cmdline.read_bytes() and alive(int(cmdline.parent.name)):
                found.append(int(cmdline.parent.name))
        except (OSError, ValueError):
            continue
    return found
