"""Files that change while ecf8 reads them, or after it loaded them: replaced by a rename, written in
place, truncated.  compress reads its input through one open file (workers check they reopened the
same one); readers copy what they load, never viewing a memory map.  Every change is one
CorruptDataError (one ``ecf8: error:`` line) naming the file, with nothing left behind; nothing
loaded changes; no process dies of SIGBUS."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ecf8
from ecf8 import compressed, safetensors_io, tensor_codecs
from ecf8.errors import CorruptDataError

from checkpoint_helpers import weights
from helpers import child_env

ROOT = Path(__file__).resolve().parents[1]
OLD = (1_600_000_000, 1_600_000_000)        # an mtime no write made during the test can have


def _plain(path: Path, tensors: int = 8, n: int = 1 << 16, seed: int = 0) -> Path:
    """A safetensors file of `tensors` BF16 tensors of n elements (>= tensor_codecs.INLINE bytes:
    they go to worker processes with jobs > 1), plus incompressible bytes (stored unchanged); an
    old mtime."""
    arrays = {f"w{i}": weights(n, _bf16(), seed + i) for i in range(tensors)}
    arrays["noise"] = np.random.default_rng(seed).integers(0, 256, 1 << 17, dtype=np.uint8)
    safetensors_io.write_safetensors(arrays, path)
    os.utime(path, ns=tuple(t * 10**9 for t in OLD))
    return path


def _bf16():
    import ml_dtypes

    return ml_dtypes.bfloat16


class _AfterFirstTensor:
    """A compressed._Progress stand-in that runs `act` once, when the first tensor is written (by then
    only the first 2 * jobs tensors have been handed out)."""

    def __init__(self, act):
        self.act, self.done = act, False

    def __call__(self, *args, **kwargs):
        outer = self

        class Bar:
            enabled = False

            def advance(self, *a):
                if not outer.done:
                    outer.done = True
                    outer.act()

            def close(self):
                pass
        return Bar()


def _left(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith("out"))


def _replace(src: Path, other: Path):
    return lambda: os.replace(other, src)


def _overwrite(src: Path, other: Path):
    def act():
        with open(src, "r+b") as f:          # same inode, same size, other bytes (cp, rsync --inplace)
            f.write(other.read_bytes())
    return act


@pytest.mark.parametrize("jobs", [1, 2])
@pytest.mark.parametrize("how", ["rename", "in-place"])
def test_compress_refuses_an_input_changed_meanwhile(tmp_path, monkeypatch, jobs, how):
    src = _plain(tmp_path / "m.safetensors")
    other = _plain(tmp_path / "other.safetensors", seed=99)        # same layout, other weights
    act = _replace(src, other) if how == "rename" else _overwrite(src, other)
    monkeypatch.setattr(compressed, "_Progress", _AfterFirstTensor(act))
    with pytest.raises(CorruptDataError, match=f"{src}: the file changed while being read"):
        compressed.compress_file(src, tmp_path / "out.safetensors", jobs=jobs)
    assert _left(tmp_path) == []


def test_compress_of_an_unchanged_file_still_works_with_workers(tmp_path):
    src = _plain(tmp_path / "m.safetensors")
    compressed.compress_file(src, tmp_path / "c.safetensors", jobs=2)
    compressed.decompress_file(tmp_path / "c.safetensors", tmp_path / "r.safetensors")
    assert (tmp_path / "r.safetensors").read_bytes() == src.read_bytes()


_TRUNCATE_MID_COMPRESS = """
import os, sys
from ecf8 import cli, compressed
src = sys.argv[1]
class Bar:
    enabled = False
    def advance(self, *a):
        os.truncate(src, 4096)
    def close(self):
        pass
compressed._Progress = lambda *a, **k: Bar()
sys.exit(cli.main(["compress", "-q", "-j", sys.argv[3], src, "-o", sys.argv[2]]))
"""


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_compress_of_a_file_truncated_meanwhile_is_one_error_line(tmp_path, jobs):
    """(It died of SIGBUS, exit 135 and no message, leaving its temporary file.)"""
    src = _plain(tmp_path / "m.safetensors", tensors=12)
    out = tmp_path / "out.safetensors"
    run = subprocess.run([sys.executable, "-c", _TRUNCATE_MID_COMPRESS, str(src), str(out), jobs],
                         capture_output=True, text=True, timeout=120,
                         env=child_env())
    assert run.returncode == 1, (run.returncode, run.stderr)
    assert run.stderr.splitlines() == [f"ecf8: error: {src}: the file changed while being read "
                                       "(replaced, written to or truncated meanwhile)"]
    assert _left(tmp_path) == []


def _packed(tmp_path: Path) -> tuple[Path, dict]:
    arrays = {"w": weights(1 << 14, _bf16(), 1),
              "noise": np.random.default_rng(2).integers(0, 256, 1 << 16, dtype=np.uint8),
              "count": np.arange(5000, dtype=np.int64)}
    path = tmp_path / "c.safetensors"
    compressed.save_file(arrays, path)
    assert {r.codec for r in compressed.inspect_file(path)} == {"ecf8", "none", "zstd"}
    return path, arrays


def test_loaded_arrays_do_not_change_when_the_file_is_overwritten(tmp_path):
    path, arrays = _packed(tmp_path)
    loaded = ecf8.load_file(path)
    with ecf8.safe_open(path) as f:
        one = f.get_tensor("noise")
    blob = path.read_bytes()
    with open(path, "r+b") as f:              # in place, every byte inverted (rsync --inplace)
        f.write(bytes(255 - b for b in blob))
    for name, x in arrays.items():
        np.testing.assert_array_equal(loaded[name].view(np.uint8), x.view(np.uint8))
    np.testing.assert_array_equal(one, arrays["noise"])
    for name, x in arrays.items():            # (and they are the caller's own to change)
        loaded[name].view(np.uint8)[...] = 0


def test_plain_tensors_read_do_not_change_either(tmp_path):
    path = _plain(tmp_path / "m.safetensors", tensors=2, n=1024)
    before = {e.name: e.array for e in safetensors_io.iter_tensors(path)}
    copy = {k: v.copy() for k, v in before.items()}
    blob = path.read_bytes()
    with open(path, "r+b") as f:
        f.write(blob[:-4096] + bytes(4096))
    for k in before:
        np.testing.assert_array_equal(before[k], copy[k])


_TRUNCATE_AFTER_LOAD = """
import os, sys
import numpy as np
import ecf8
x = ecf8.load_file(sys.argv[1])
os.truncate(sys.argv[1], 0)
print(sum(int(np.asarray(v).view(np.uint8).sum()) for v in x.values()))
"""


def test_truncating_a_loaded_file_kills_nothing(tmp_path):
    """(The arrays were views of a memory map: reading them after the truncation was SIGBUS.)"""
    path, arrays = _packed(tmp_path)
    run = subprocess.run([sys.executable, "-c", _TRUNCATE_AFTER_LOAD, str(path)], capture_output=True,
                         text=True, timeout=120, env=child_env())
    assert run.returncode == 0, (run.returncode, run.stderr)
    assert int(run.stdout) == sum(int(x.view(np.uint8).sum()) for x in arrays.values())


@pytest.mark.parametrize("change", ["truncate", "rewrite"])
def test_a_file_changed_while_open_is_one_error(tmp_path, change):
    path, _ = _packed(tmp_path)
    os.utime(path, ns=tuple(t * 10**9 for t in OLD))
    with ecf8.safe_open(path) as f:
        f.get_tensor("w")
        if change == "truncate":
            os.truncate(path, path.stat().st_size // 2)
        else:
            with open(path, "r+b") as g:
                g.write(path.read_bytes())       # the same bytes: only the mtime tells
        with pytest.raises(CorruptDataError, match=f"{path}: the file changed while being read"):
            f.get_tensor("noise")


def test_a_worker_refuses_a_file_other_than_its_parents(tmp_path):
    from ecf8.stable_file import StableFile

    src = _plain(tmp_path / "m.safetensors", tensors=1)
    with StableFile(src) as f:
        identity = f.identity
    layout = safetensors_io.read_layout(src)
    t = layout.tensors[0]
    tensor_codecs._worker(str(src), identity, layout.data_start, t, {})          # the same file: fine
    os.replace(_plain(tmp_path / "o.safetensors", tensors=1, seed=5), src)
    with pytest.raises(CorruptDataError, match="changed while being read"):
        tensor_codecs._worker(str(src), identity, layout.data_start, t, {})
