"""ecf8 info / verify: every input checked, every problem reported with its file and tensor, exit 1
on any; compressed folders accepted.  Interrupts (the
folder-compress hang): Ctrl-C / SIGINT to the pid while a folder's worker processes start gives
one line, 130, nothing written and no worker left; workers die with the command; Ctrl-C the
instant a temporary output appears, or again during the clean-up, leaves nothing; Ctrl-C that an
import turns into ImportError at start-up is still one line and 130."""

import concurrent.futures as cf
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from ecf8 import compressed, signals, tensor_codecs
from ecf8.cli import main
from ecf8.safetensors_io import atomic_dir, atomic_file, write_safetensors
from checkpoint_helpers import header_of, patch, processes, still_running, weights
from helpers import child_env


def _packed(path, seed=0):
    plain = path.with_suffix(".plain")
    write_safetensors({"a": weights(4096, ml_dtypes.bfloat16, seed), "s": np.float32([1, 2, 3, 4]),
                       "t": np.float32([5, 6, 7, 8])}, plain)
    compressed.compress_file(plain, path, jobs=1)
    plain.unlink()
    return path


def _flip(path, name):
    header, start = header_of(path)
    a, _ = header[name]["data_offsets"]
    patch(path, start + a + 1, bytes([path.read_bytes()[start + a + 1] ^ 0x04]))


def test_info_refuses_a_file_it_cannot_account_for(tmp_path, capsys):
    path = _packed(tmp_path / "c.safetensors")
    path.write_bytes(path.read_bytes()[:-10])
    assert main(["info", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and str(path) in err


def test_verify_checks_every_input_and_reports_every_problem(tmp_path, capsys):
    good, bad, cut = (_packed(tmp_path / f"{n}.safetensors", k) for k, n in enumerate("abc"))
    _flip(bad, "s")
    _flip(bad, "t")
    cut.write_bytes(cut.read_bytes()[:100])
    assert main(["verify", str(good), str(bad), str(cut), "--quiet"]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"{good}: ok (3 tensors)"]
    lines = err.splitlines()
    assert len(lines) == 3 and all(line.startswith("ecf8: error: ") for line in lines)
    assert f"{bad}: tensor 's'" in lines[0] and f"{bad}: tensor 't'" in lines[1] and str(cut) in lines[2]


def test_compress_chunk_size_auto_picks_per_tensor_and_restores_exactly(tmp_path, capsys):
    """--chunk-size auto: each tensor's chunk size for GPU decoding (decode_chunk_size), the
    original back byte for byte; a bad value is still one line."""
    from ecf8 import format as fmt
    from ecf8.encoder import decode_chunk_size

    src = tmp_path / "m.safetensors"
    tensors = {"big": weights(8192 * 4096 + 5, ml_dtypes.float8_e4m3fn),
               "small": weights(70_000, ml_dtypes.bfloat16)}
    write_safetensors(tensors, src)
    out = tmp_path / "c.safetensors"
    assert main(["compress", str(src), "-o", str(out), "--chunk-size", "auto", "--quiet"]) == 0
    from safetensors.numpy import load_file

    stored = load_file(out)                        # the compressed file: each tensor's frame, U8
    logs = {name: fmt.parse(memoryview(stored[name].tobytes())).chunk_log2 for name in tensors}
    assert logs == {name: decode_chunk_size(x.size).bit_length() - 1 for name, x in tensors.items()}
    assert logs == {"big": 13, "small": 12}
    assert main(["decompress", str(out), "-o", str(tmp_path / "r.safetensors"), "--quiet"]) == 0
    assert (tmp_path / "r.safetensors").read_bytes() == src.read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["compress", str(src), "-o", str(tmp_path / "x"), "--chunk-size", "automatic"])
    assert stop.value.code == 2 and "--chunk-size" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_info_and_verify_take_a_compressed_folder(tmp_path, capsys):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    for shard in ("one.safetensors", "sub/two.safetensors"):
        write_safetensors({"w": weights(4096, ml_dtypes.bfloat16)}, src / shard)
    (src / "config.json").write_text("{}")
    assert main(["compress", str(src), "-o", str(tmp_path / "c"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "one.safetensors" in out and "sub/two.safetensors" in out
    assert main(["verify", str(tmp_path / "c"), "--quiet"]) == 0
    assert capsys.readouterr().out.count("ok (1 tensors)") == 2


# ------------------------------------------------------------------- interrupts and worker processes

ROOT = Path(__file__).resolve().parents[1]
LINUX_PROC = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")


def _gone(sid: int, within: float = 10.0) -> list[int]:
    """The processes of session `sid` (a command started with start_new_session=True) still alive
    after waiting up to `within` seconds for them to end."""
    left = still_running(lambda: processes(3, sid), within)
    for pid in left:                      # (the test fails; don't leave them to the next one)
        os.kill(pid, signal.SIGKILL)
    return left


def _folder(root: Path, shards: int = 2) -> Path:
    root.mkdir()
    rng = np.random.default_rng(0)
    for k in range(shards):     # tensors of 128 kB: past tensor_codecs.INLINE, so they go to the workers
        write_safetensors({f"w{i}": (rng.standard_normal(1 << 17) * 8).astype(ml_dtypes.float8_e4m3fn)
                           for i in range(3)}, root / f"m{k}.safetensors")
    (root / "config.json").write_text("{}")
    return root


def test_a_signal_another_thread_takes_waits_for_the_held_block():
    """The kernel gives a signal sent to the process (kill -INT pid) to any thread that does not
    block it (tqdm's monitor thread, say), and Python runs the handler in the main thread at once:
    blocking the signal in the main thread did not hold it, so Ctrl-C could land inside a pool's
    start-up, between a worker's fork and its registration (that worker then waited for ever)."""
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)        # started outside the block: signals unblocked
    other.start()
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    reached = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals.held():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.3)
                reached.append("end of the block")
    finally:
        stop.set()
        other.join()
    assert reached == ["end of the block"]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


# As `kill -INT pid` right after the first worker process of the command's first pool is forked, in
# the parent: before the pool has registered the worker (the parent waits 0.3 s there, so that the
# signal surely arrives).  "fork": ProcessPoolExecutor's workers (--jobs 2); "spawn_posix": the GPU pool's
# (ecf8.gpu_pool, its workers compressing on the CPU as in test_checkpoint_multigpu).
_INTERRUPT_AT_START = """
import os, signal, sys, time
from multiprocessing import popen_{kind} as popen
from ecf8 import gpu_pool
gpu_pool.gpus = lambda: ["cpu", "cpu"]
launch, parent, done = popen.Popen._launch, os.getpid(), []
def launch_then_interrupt(self, process_obj):
    launch(self, process_obj)
    if os.getpid() == parent and not done:
        done.append(1)
        os.kill(parent, signal.SIGINT)
        time.sleep(0.3)
popen.Popen._launch = launch_then_interrupt
from ecf8.__main__ import main
main()
"""


@LINUX_PROC
@pytest.mark.parametrize("kind, args", [("fork", ["--jobs", "2"]), ("spawn_posix", ["--device", "cuda"])])
def test_sigint_to_the_pid_while_workers_start_stops_them_all(tmp_path, kind, args):
    src = _folder(tmp_path / "model")
    cmd = [sys.executable, "-c", _INTERRUPT_AT_START.format(kind=kind), "compress", str(src),
           "-o", str(tmp_path / "out"), *args]
    with open(tmp_path / "stderr.txt", "wb") as err:      # (a file: a left worker cannot block a read)
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err,
                                env=child_env(), start_new_session=True)
    try:
        code = proc.wait(timeout=60)
    finally:
        left = _gone(proc.pid)
    assert (tmp_path / "stderr.txt").read_text().splitlines() == ["ecf8: interrupted"]
    assert code == 130
    assert not left, f"processes left running: {left}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "stderr.txt"]


# A worker that kills the command (as the OOM killer or `kill -9` would) and carries on.
_KILL_THE_PARENT = """
import os, signal, sys, time
from ecf8 import compressed, signals, tensor_codecs
def worker(*args):
    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(60)
tensor_codecs._worker = worker
compressed.compress_path(sys.argv[1], sys.argv[2], jobs=2, progress=False)
"""


@LINUX_PROC
def test_workers_die_with_the_command(tmp_path):
    src = _folder(tmp_path / "model", shards=1)
    proc = subprocess.Popen([sys.executable, "-c", _KILL_THE_PARENT, str(src), str(tmp_path / "out")],
                            env=child_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    left = _gone(proc.pid)
    assert not left, f"worker processes outlived the command: {left}"


@pytest.mark.parametrize("make, atomic", [("mkstemp", atomic_file), ("mkdtemp", atomic_dir)])
def test_ctrl_c_as_a_temporary_output_appears_leaves_nothing(tmp_path, monkeypatch, make, atomic):
    real = getattr(tempfile, make)

    def make_then_interrupt(*args, **kwargs):
        made = real(*args, **kwargs)
        signal.raise_signal(signal.SIGINT)      # Ctrl-C the instant the temporary exists
        return made

    monkeypatch.setattr(tempfile, make, make_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        with atomic(tmp_path / "out"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_a_second_ctrl_c_during_the_clean_up_still_removes_the_temporary(tmp_path, monkeypatch):
    real = shutil.rmtree

    def interrupted_rmtree(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)      # Ctrl-C pressed again as the clean-up starts
        return real(*args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", interrupted_rmtree)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "part.safetensors").write_bytes(b"x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@LINUX_PROC
def test_a_second_ctrl_c_while_the_workers_are_stopped_still_kills_them_all(monkeypatch):
    pool = cf.ProcessPoolExecutor(2, initializer=signals.worker_init, initargs=(os.getpid(),))
    pool.submit(abs, 0).result()            # (both workers are forked at the first submit)
    workers = list(pool._processes.values())
    kill = multiprocessing.process.BaseProcess.kill

    def interrupted_kill(self):
        signal.raise_signal(signal.SIGINT)      # Ctrl-C pressed again as the first worker is killed
        kill(self)

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "kill", interrupted_kill)
    try:
        with pytest.raises(KeyboardInterrupt):
            tensor_codecs._stop(pool)
        deadline = time.monotonic() + 10       # (the pool's own thread may be reaping them)
        while (left := [p.pid for p in workers if _running(p.pid)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not left, f"workers left running: {left}"
    finally:
        monkeypatch.undo()
        for p in workers:
            p.kill()
        pool.shutdown(wait=False)


def test_ctrl_c_that_an_import_turns_into_another_error_is_still_ctrl_c():
    """NumPy's C extensions, interrupted while loading, raise ImportError ("PyCapsule_Import could
    not import module ...") instead of KeyboardInterrupt: still one line and 130."""
    code = ("import signal, sys, importlib.abc\n"
            "class Interrupted(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name == 'numpy':\n"
            "            try:\n"
            "                signal.raise_signal(signal.SIGINT)\n"
            "            except KeyboardInterrupt:\n"
            "                raise ImportError('PyCapsule_Import could not import module') from None\n"
            "sys.meta_path.insert(0, Interrupted())\n"
            "from ecf8.__main__ import main\n"
            "main()\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=child_env())
    assert (run.returncode, run.stderr.splitlines()) == (130, ["ecf8: interrupted"])
