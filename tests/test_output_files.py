"""Where outputs are written: one rule for a missing output folder (file and folder outputs alike),
temporaries of a killed run cleaned by the next run and said so, I/O errors that name the file."""

import errno
import logging
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import ecf8
from ecf8 import compressed, safetensors_io
from ecf8.safetensors_io import atomic_dir, atomic_file, write_safetensors
from ecf8.cli import main
from helpers import weights_like, child_env

ROOT = Path(__file__).resolve().parents[1]
LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux process and rlimit semantics")


def _model(path: Path) -> Path:
    write_safetensors({"w": weights_like(64 * 64, ml_dtypes.bfloat16).reshape(64, 64),
                       "ids": np.arange(300, dtype=np.int64)}, path)
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    _model(path / "a.safetensors")
    (path / "config.json").write_text("{}")
    return path


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# --- one rule: the output's folder must exist ----------------------------------------------------

def test_file_and_folder_outputs_refuse_a_missing_folder_alike(tmp_path, capsys):
    src, model = _model(tmp_path / "m.safetensors"), _folder(tmp_path / "model")
    for lib_src in (src, model):
        with pytest.raises(ecf8.UnsupportedError, match="does not exist"):
            compressed.compress_path(lib_src, tmp_path / "no" / "out", jobs=1, progress=False)
    for cli_src in (src, model):
        assert main(["compress", "-q", str(cli_src), "-o", str(tmp_path / "no" / "out")]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"folder {tmp_path / 'no'} does not exist" in err
    assert not (tmp_path / "no").exists()           # nothing created, for the folder either


def test_atomic_writers_refuse_a_missing_folder_before_anything(tmp_path):
    for atomic in (atomic_file, atomic_dir):
        with pytest.raises(ecf8.UnsupportedError, match="does not exist"):
            with atomic(tmp_path / "a" / "b" / "out"):
                pass
    assert list(tmp_path.iterdir()) == []


# --- temporaries of a killed run --------------------------------------------------------------

def _dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@LINUX
def test_a_killed_compress_leaves_a_temporary_the_next_run_removes_and_mentions(tmp_path, capsys):
    """A SIGKILLed compress cannot clean up: the next compress of the same output removes what it
    left (its process is gone) and says so on one line."""
    src = _model(tmp_path / "m.safetensors")
    script = ("import os, signal, sys\n"
              "from ecf8 import compressed, tensor_codecs\n"
              "def die(*a):\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n"
              "tensor_codecs.choose_codec = die      # killed as the first tensor is compressed\n"
              "compressed.compress_file(sys.argv[1], sys.argv[2], jobs=1, progress=False)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(src), str(tmp_path / "c.safetensors")],
                          env=child_env(), capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    left = _leftovers(tmp_path)
    assert len(left) == 1 and left[0].startswith(".c.safetensors.")
    assert main(["compress", str(src), "-o", str(tmp_path / "c.safetensors")]) == 0
    err = capsys.readouterr().err
    assert f"removed {tmp_path / left[0]}" in err and "interrupted run" in err
    assert _leftovers(tmp_path) == []
    assert compressed.verify_file(tmp_path / "c.safetensors", progress=False) == 2


def test_stale_temporaries_of_files_and_folders_are_removed_and_logged(tmp_path, caplog):
    dead = _dead_pid()
    stale_file = tmp_path / f".out.{dead}.abcd_123.tmp"
    stale_file.write_bytes(b"partial")
    stale_dir = tmp_path / f".out.{dead}.zyxw_987.tmp"
    (stale_dir / "sub").mkdir(parents=True)
    (stale_dir / "sub" / "a.safetensors").write_bytes(b"partial")
    live = tmp_path / f".out.{os.getpid()}.live_123.tmp"          # a run still going: kept
    live.write_bytes(b"in progress")
    other = tmp_path / f".other.{dead}.abcd_123.tmp"               # another output's: kept
    other.write_bytes(b"x")
    unknown = tmp_path / ".out.abcd_123.tmp"                       # no process named: kept
    unknown.write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="ecf8"):
        with atomic_file(tmp_path / "out") as f:
            f.write(b"done")
    assert (tmp_path / "out").read_bytes() == b"done"
    assert not stale_file.exists() and not stale_dir.exists()
    assert live.exists() and other.exists() and unknown.exists()
    logged = [r.getMessage() for r in caplog.records if r.name == "ecf8"]
    assert len(logged) == 2 and all("interrupted run" in m and str(dead) in m for m in logged)
    (tmp_path / "out").unlink()
    stale_file.write_bytes(b"partial")
    with atomic_dir(tmp_path / "out"):                             # a folder output does the same
        pass
    assert not stale_file.exists()


def test_quiet_silences_the_note_but_still_cleans(tmp_path, capsys):
    src = _model(tmp_path / "m.safetensors")
    stale = tmp_path / f".c.safetensors.{_dead_pid()}.abcd_123.tmp"
    stale.write_bytes(b"partial")
    assert main(["compress", "-q", str(src), "-o", str(tmp_path / "c.safetensors")]) == 0
    assert capsys.readouterr() == ("", "")
    assert not stale.exists()


def test_temporary_names_carry_the_process_and_never_leak_into_messages(tmp_path):
    from ecf8.cli import _message

    seen = []
    real = safetensors_io.tempfile.mkstemp

    def spy(*args, **kwargs):
        made = real(*args, **kwargs)
        seen.append(Path(made[1]).name)
        return made

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(safetensors_io.tempfile, "mkstemp", spy)
        with atomic_file(tmp_path / "x.safetensors") as f:
            f.write(b"x")
    assert seen[0].startswith(f".x.safetensors.{os.getpid()}.") and seen[0].endswith(".tmp")
    e = OSError(errno.EIO, "Input/output error", str(tmp_path / seen[0]))
    assert _message(e) == f"Input/output error: {tmp_path / 'x.safetensors'}"


# --- I/O errors name the file ------------------------------------------------------------------

class _FullDisk:
    """A file object standing in for one on a disk that fills after `room` bytes."""

    def __init__(self, real, room: int):
        self.real, self.room = real, room

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if n > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= n
        return self.real.write(data)

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()


@pytest.mark.parametrize("room", [0, 1000, 6000])
def test_a_full_disk_names_the_output_and_leaves_nothing(tmp_path, capsys, monkeypatch, room):
    src = _model(tmp_path / "m.safetensors")
    folder = _folder(tmp_path / "model")
    real = os.fdopen
    monkeypatch.setattr(safetensors_io.os, "fdopen", lambda fd, mode: _FullDisk(real(fd, mode), room))
    out = tmp_path / "c.safetensors"
    with pytest.raises(OSError) as e:
        compressed.compress_file(src, out, jobs=1, progress=False)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(out)
    assert main(["compress", str(src), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err == f"ecf8: error: No space left on device: {out}\n"
    assert main(["compress", str(folder), "-o", str(tmp_path / "cm")]) == 1
    err = capsys.readouterr().err
    assert err == f"ecf8: error: No space left on device: {tmp_path / 'cm' / 'a.safetensors'}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "model"]


def test_an_io_error_without_a_name_still_names_the_command_files(tmp_path, capsys, monkeypatch):
    """The last resort: an error from somewhere that names no file names the input and output."""
    src = _model(tmp_path / "m.safetensors")

    def broken(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(compressed, "compress_path", broken)
    assert main(["compress", str(src), "-o", str(tmp_path / "c.safetensors")]) == 1
    err = capsys.readouterr().err
    assert str(src) in err and str(tmp_path / "c.safetensors") in err and "[Errno" not in err


@LINUX
def test_a_real_write_limit_names_the_output(tmp_path):
    """A real failing write (the file-size limit, EFBIG), not a stand-in: the command names the
    output and leaves nothing behind."""
    src = _model(tmp_path / "m.safetensors")
    out = tmp_path / "c.safetensors"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    proc = subprocess.run([sys.executable, "-m", "ecf8", "compress", "-q", "-j", "1", str(src), "-o", str(out)],
                          env=child_env(PYTHONDONTWRITEBYTECODE="1"),
                          capture_output=True, text=True, preexec_fn=limit, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == f"ecf8: error: File too large: {out}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
