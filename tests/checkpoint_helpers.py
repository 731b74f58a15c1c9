"""Builders of safetensors files byte by byte, and of compressed ones, for the checkpoint tests."""

import json
import os
import signal
import struct
import subprocess
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ecf8 import compressed


def raw_file(path: Path, header: bytes | dict, data: bytes) -> Path:
    """A safetensors file exactly as given: 8-byte length, header bytes (or dict as JSON), data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + data)
    return Path(path)


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def header_of(path: Path) -> tuple[dict, int]:
    """(header dict, start of the data section)."""
    blob = Path(path).read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), 8 + n


def round_trip(src: Path, tmp: Path, **kwargs) -> bytes:
    """compress, verify, decompress; the restored bytes."""
    packed, restored = tmp / "packed.safetensors", tmp / "restored.safetensors"
    compressed.compress_file(src, packed, jobs=1, **kwargs)
    compressed.verify_file(packed)
    compressed.decompress_file(packed, restored)
    return restored.read_bytes()


def patch(path: Path, at: int, new: bytes) -> None:
    """Overwrite bytes of a file in place."""
    blob = bytearray(Path(path).read_bytes())
    blob[at:at + len(new)] = new
    Path(path).write_bytes(bytes(blob))


def weights(n: int, dtype, seed: int = 0) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    return (w * (16 if np.dtype(dtype).itemsize == 1 else 0.02)).astype(dtype)


# --- processes (Linux /proc), for the interruption tests ----------------------------------------

def _stat(pid: int | str) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (0: state, 1: parent pid, 3: session)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    try:
        return _stat(pid)[0] != "Z"
    except OSError:
        return False


def processes(field: int, value: int) -> list[int]:
    """Live processes whose stat field `field` (see _stat) is value: children (1) or a session (3)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = _stat(stat.parent.name)
        except OSError:
            continue
        if int(fields[field]) == value and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def still_running(pids: Callable[[], list[int]], within: float = 10.0) -> list[int]:
    """pids() after waiting up to `within` seconds for it to become empty."""
    deadline = time.monotonic() + within
    while (left := pids()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def interrupt(cmd: list[str], tmp_path: Path, sig: int, code: int, family: Callable[[int], list[int]],
              workers: int, settle: float, env: dict) -> list[int]:
    """Start an ecf8 command line in its own session (stderr to tmp_path/stderr.txt), wait until
    family(pid) lists `workers` processes and `settle` s more, then interrupt it the way a user
    does (SIGINT: Ctrl-C, to the process group; SIGTERM: kill(1), to the parent only).  Checks it
    exits with `code` and the one line "ecf8: interrupted"; returns the processes it had."""
    with open(tmp_path / "stderr.txt", "wb") as err:      # (a file: an orphan cannot block a read)
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err, env=env,
                                start_new_session=True)
    start = time.monotonic()
    while len(family(proc.pid)) < workers and proc.poll() is None and time.monotonic() < start + 60:
        time.sleep(0.02)
    time.sleep(settle)
    had = family(proc.pid)
    assert proc.poll() is None, (f"the command ended ({proc.returncode}) after {time.monotonic() - start:.1f} s, "
                                 f"before it could be interrupted: {(tmp_path / 'stderr.txt').read_text()}")
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    assert proc.wait(timeout=60) == code
    assert (tmp_path / "stderr.txt").read_text().splitlines() == ["ecf8: interrupted"]
    return had
