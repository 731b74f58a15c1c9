"""Compressed files read ahead (``read_ahead``, ``compressed_stream``): worker threads read and
checksum the next tensors while the caller uses the current one.  The bytes and checksums are the
file's; host memory stays within the window (measured in fresh processes, VmHWM); a tensor is
never handed out before its checks hold, a file changed while it is read is refused, and a load
that fails leaves nothing behind.  The GPU half (pinned staging buffers, uploads) runs here with a
stand-in for CuPy whose "device" is host memory: its logic, not CuPy's, is what it tests."""

import contextlib
import ctypes
import os
import subprocess
import sys
import types
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import ecf8
from ecf8 import compressed, compressed_reader, compressed_stream, crc32
from ecf8.errors import CorruptDataError
from ecf8.read_ahead import ReadAhead, Span, Staging
from ecf8.stable_file import StableFile
from helpers import child_env

ROOT = Path(__file__).resolve().parents[1]
BF16 = ml_dtypes.bfloat16


def test_crc32_combine_and_shift_are_zlibs():
    rng = np.random.default_rng(0)
    for na, nb in [(0, 0), (0, 7), (7, 0), (1, 1), (1000, 12345), (3, (1 << 20) + 5)]:
        a, b = rng.bytes(na), rng.bytes(nb)
        assert crc32.combine(zlib.crc32(a), zlib.crc32(b), nb) == zlib.crc32(a + b)
        for s in (0, 1, 0xFFFFFFFF, 0x12345678):
            assert crc32.combine(s, zlib.crc32(b), nb) == zlib.crc32(b, s)
            assert zlib.crc32(b, s) ^ zlib.crc32(b, 99) == crc32.shift(s ^ 99, nb)


def _file(tmp_path, n=3 << 20, seed=0) -> Path:
    path = tmp_path / "bytes.bin"
    path.write_bytes(np.random.default_rng(seed).bytes(n))
    return path


def _spans(size) -> list[Span]:
    """Empty, tiny, piece-sized, window-sized and larger spans, seeds and coverage varied."""
    lengths = [0, 1, 3, 4, 5, 1000, 65536, 65537, 300_000, 1 << 20, 5, 0, (1 << 20) + 12345]
    spans, at = [], 0
    for i, n in enumerate(lengths):
        spans.append(Span(at, n, max(0, n - 4) if i % 2 else n, (i * 2654435761) & 0xFFFFFFFF))
        at += n + 17
    assert at <= size
    return spans


@pytest.mark.parametrize("window,piece,workers", [(1 << 20, 1 << 16, 3), (4096, 1000, 1),
                                                  (64 << 20, 8 << 20, 2)])
def test_spans_read_whole_are_the_files_bytes_and_checksums(tmp_path, window, piece, workers):
    path = _file(tmp_path)
    blob = path.read_bytes()
    spans = _spans(len(blob))
    with StableFile(path) as f, ReadAhead(f, spans, window=window, piece=piece, workers=workers) as ra:
        seen = []
        while (got := ra.take_span()) is not None:
            index, data, crc = got
            s = spans[index]
            assert data.tobytes() == blob[s.offset:s.offset + s.size]
            assert crc == zlib.crc32(blob[s.offset:s.offset + s.crc_bytes], s.seed)
            assert ra._ahead <= window              # (what is read ahead of the caller)
            seen.append(index)
    assert seen == list(range(len(spans)))


class _Use:
    """A staging buffer's use that finishes after two polls (or when waited for); it checks, when
    it finishes, that nobody wrote into the buffer meanwhile."""

    def __init__(self, buffer: memoryview, n: int):
        self.buffer, self.n, self.copy, self.polls, self.finished = buffer, n, bytes(buffer[:n]), 0, False

    def done(self) -> bool:
        self.polls += 1
        if self.polls > 2:
            self.finish()
        return self.finished

    def finish(self):
        if not self.finished:
            assert bytes(self.buffer[:self.n]) == self.copy, "a buffer was reused before its use ended"
            self.finished = True


def test_pieces_in_staging_buffers_are_the_files_bytes_and_no_buffer_is_reused_early(tmp_path):
    path = _file(tmp_path)
    blob = path.read_bytes()
    spans = _spans(len(blob))
    buffers = [memoryview(bytearray(1 << 16)) for _ in range(3)]
    staging = Staging(buffers, lambda use: use.done(), lambda use: use.finish())
    got = {i: bytearray() for i in range(len(spans))}
    crcs = {}
    with StableFile(path) as f, ReadAhead(f, spans, piece=1 << 16, workers=2, staging=staging) as ra:
        while (piece := ra.take()) is not None:
            assert piece.start == len(got[piece.index])
            got[piece.index] += piece.data
            c = crcs.get(piece.index)
            crcs[piece.index] = piece.crc if c is None else crc32.combine(c, piece.crc, piece.crc_bytes)
            ra.release(piece, _Use(buffers[piece.slot], len(piece.data)))
    for i, s in enumerate(spans):
        assert bytes(got[i]) == blob[s.offset:s.offset + s.size]
        assert crcs[i] == zlib.crc32(blob[s.offset:s.offset + s.crc_bytes], s.seed)


# --- compressed files ---------------------------------------------------------------------------

def _checkpoint(path: Path, tensors: int = 6, rows: int = 300) -> dict:
    """A compressed file of BF16 tensors of a few hundred KB (several pieces each with a small
    window), an int64 tensor (zstd) and a tiny one."""
    rng = np.random.default_rng(1)
    arrays = {f"l{i}.weight": (rng.standard_normal((rows, 1000 + i)) * 0.02).astype(BF16)
              for i in range(tensors)}
    arrays["ids"] = np.arange(70_000, dtype=np.int64)
    arrays["norm"] = np.ones(5, BF16)
    compressed.save_file(arrays, path)
    return arrays


@pytest.mark.parametrize("window", [1 << 18, 64 << 20])
def test_a_file_read_ahead_gives_what_one_tensor_at_a_time_gives(tmp_path, window):
    path = tmp_path / "c.safetensors"
    arrays = _checkpoint(path)
    assert {r.codec for r in compressed.inspect_file(path)} == {"ecf8", "zstd", "none"}
    got = list(compressed_reader.iter_decoded(path, window=window))
    assert [name for name, _, _ in got] == list(arrays)
    for name, dtype, x in got:
        assert x.dtype == arrays[name].dtype and np.array_equal(x.view(np.uint8), arrays[name].view(np.uint8))
    with ecf8.safe_open(path) as f:
        for name, _, x in compressed_reader.iter_decoded(path, frames=True, window=window):
            frame = f.get_frame(name)
            if frame is None:
                assert np.array_equal(x.view(np.uint8), arrays[name].view(np.uint8))
            else:
                assert x == frame
    golden = ROOT / "tests" / "golden" / "checkpoint-v1.safetensors"        # no stored checksums
    assert {n: x.tobytes() for n, _, x in compressed_reader.iter_decoded(golden, window=1 << 16)} == \
        {n: x.tobytes() for n, x in ecf8.load_file(golden).items()}


def _flip(path: Path, name: str, where: float | int) -> None:
    """Invert one byte of a tensor's stored bytes: `where` (0..1) of the way through them, or
    byte `where` (an int)."""
    with compressed_reader.PackedFile(path) as p:
        offset, size = p.spans[name]
    data = bytearray(path.read_bytes())
    data[offset + (where if isinstance(where, int) else int(where * (size - 5)))] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_frame_is_refused_before_it_is_handed_out(tmp_path):
    path = tmp_path / "c.safetensors"
    arrays = _checkpoint(path)
    _flip(path, "l3.weight", 0.6)
    for frames in (False, True):
        seen = []
        with pytest.raises(CorruptDataError, match="tensor 'l3.weight': its stored bytes fail their"):
            for name, _, _ in compressed_reader.iter_decoded(path, frames=frames, window=1 << 18):
                seen.append(name)
        assert seen == list(arrays)[:3]


@pytest.mark.parametrize("where,message", [(0.6, "payload checksum mismatch"),
                                           (0, "not an ECF8 frame"),
                                           (50, "header checksum mismatch")])
def test_a_frame_is_checked_from_its_pieces_checksums(tmp_path, monkeypatch, where, message):
    """With the stored checksum out of the way (as a file whose record was rewritten to match
    would have it), the frame's own checksums still refuse it: the payload's, computed from the
    pieces' CRC-32s with no second pass, and the header's."""
    path = tmp_path / "c.safetensors"
    _checkpoint(path)
    _flip(path, "l3.weight", where)
    monkeypatch.setattr(compressed_reader.PackedFile, "check_stored", lambda self, name, crc: None)
    with pytest.raises(CorruptDataError, match=f"tensor 'l3.weight': {message}"):
        for _ in compressed_reader.iter_decoded(path, frames=True, window=1 << 18):
            pass


def _changing_on_read(monkeypatch, path: Path, nth: int) -> None:
    """The file is written to in place (same bytes, a new mtime) just before its nth read."""
    real = StableFile.read_into
    count = [0]

    def read_into(self, offset, view):
        count[0] += 1
        if count[0] == nth:
            os.utime(path, ns=(1, 1))
        return real(self, offset, view)
    monkeypatch.setattr(StableFile, "read_into", read_into)


def test_a_file_changed_while_it_is_read_ahead_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    _checkpoint(path)
    _changing_on_read(monkeypatch, path, 9)                  # (pieces of 64 KiB: in l1.weight)
    seen = []
    with pytest.raises(CorruptDataError, match=f"{path}: the file changed while being read"):
        for name, _, x in compressed_reader.iter_decoded(path, window=1 << 18):
            seen.append(name)
    assert seen in ([], ["l0.weight"])


def test_a_file_changed_after_its_last_read_is_still_refused(tmp_path):
    """The whole file is read ahead at once (the window holds it): a write after that, while the
    caller still takes tensors, is caught when the last is taken."""
    path = tmp_path / "c.safetensors"
    _checkpoint(path, tensors=2, rows=10)
    items = compressed_reader.iter_decoded(path)
    next(items)
    os.utime(path, ns=(1, 1))
    with pytest.raises(CorruptDataError, match="the file changed while being read"):
        list(items)


def test_load_model_leaves_nothing_behind_when_the_file_changes_or_is_damaged(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    import ecf8.torch

    path = tmp_path / "c.safetensors"
    arrays = _checkpoint(path)

    def empty():
        model = torch.nn.Module()
        with torch.device("meta"):
            for name, x in arrays.items():
                if name.endswith(".weight"):
                    model.add_module(name[:-7], torch.nn.Linear(x.shape[1], x.shape[0], bias=False,
                                                                dtype=torch.bfloat16))
                else:
                    model.register_buffer(name, torch.empty(x.shape, dtype=torch.int64 if name == "ids"
                                                            else torch.bfloat16))
        return model

    def state(model):
        return {k: v.contiguous().view(torch.uint8).numpy().tobytes() for k, v in model.state_dict().items()}

    model = empty()
    stats = ecf8.torch.load_model(model, path, "cpu", compress=True)
    assert stats.weights == 6
    assert state(model) == {k: x.tobytes() for k, x in arrays.items()}
    with monkeypatch.context() as m:
        _changing_on_read(m, path, 5)
        model = empty()
        with pytest.raises(CorruptDataError, match="changed while being read"):
            ecf8.torch.load_model(model, path, "cpu", compress=True)
        assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
        assert not any(ecf8.torch.is_compressed(x) for x in model.modules())
    _flip(path, "l5.weight", 0.5)
    model = empty()
    with pytest.raises(CorruptDataError, match="tensor 'l5.weight'"):
        ecf8.torch.load_model(model, path, "cpu", compress=True)
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert not any(ecf8.torch.is_compressed(x) for x in model.modules())


# --- host memory (fresh processes) ----------------------------------------------------------------

_MEASURE = """
import sys, time, warnings
import numpy as np
warnings.simplefilter("ignore")

def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))

path, how, window = sys.argv[1], sys.argv[2], int(sys.argv[3])
if how == "model":
    import torch, ecf8.torch
    from ecf8 import compressed
    model = torch.nn.Module()
    with torch.device("meta"):
        for r in compressed.inspect_file(path):
            model.add_module(r.name.split(".")[0], torch.nn.Linear(r.shape[1], r.shape[0], bias=False,
                                                                   dtype=torch.bfloat16))
from ecf8 import compressed_reader, compressed_stream
base = status("VmRSS")
if how == "model":
    stats = ecf8.torch.load_model(model, path, "cpu", compress=True)
    held = stats.compressed_bytes
else:
    held = 0
    for name, _, frame in compressed_reader.iter_decoded(path, frames=True, window=window):
        del frame
        time.sleep(0.01)        # a slow caller: the readers would run ahead if nothing held them
print(status("VmHWM") - base, held)
"""


@pytest.fixture(scope="module")
def big_file(tmp_path_factory) -> tuple[Path, int]:
    """A compressed file of 200 MB of BF16 weights (24 tensors of 8 MB; frames about 5.6 MB)."""
    folder = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(7)
    tile = (rng.standard_normal((4096, 1024), np.float32) * 0.02).astype(BF16)
    arrays = {f"l{i}.weight": np.roll(tile, i, axis=0) for i in range(24)}
    from ecf8.safetensors_io import write_safetensors
    write_safetensors(arrays, folder / "plain.safetensors")
    del arrays
    compressed.compress_file(folder / "plain.safetensors", folder / "c.safetensors", progress=False)
    (folder / "plain.safetensors").unlink()
    with compressed_reader.PackedFile(folder / "c.safetensors") as p:
        largest = max(size for _, size in p.spans.values())
    return folder / "c.safetensors", largest


def _growth(path: Path, how: str, window: int) -> tuple[int, int]:
    run = subprocess.run([sys.executable, "-c", _MEASURE, str(path), how, str(window)], capture_output=True,
                         text=True, timeout=300, env=child_env())
    assert run.returncode == 0, run.stderr
    grown, held = map(int, run.stdout.split())
    return grown, held


def test_load_model_to_the_cpu_holds_the_frames_and_a_window_more(big_file):
    """(This held already before the read-ahead: the reading was one tensor at a time.)"""
    path, largest = big_file
    grown, held = _growth(path, "model", 0)
    assert held > 100e6
    assert grown <= held + compressed_stream.WINDOW + 2 * largest + (24 << 20), (grown, held)


def test_reading_ahead_holds_at_most_its_window(big_file):
    """A slow caller that keeps nothing: the readers stop at the window (8 MiB here), far short
    of the file (140 MB of frames)."""
    path, largest = big_file
    window = 8 << 20
    grown, _ = _growth(path, "frames", window)
    assert grown <= window + 2 * largest + (24 << 20), grown
    assert path.stat().st_size > 2 * (window + 2 * largest + (24 << 20))


# --- the GPU path, with a stand-in for CuPy ---------------------------------------------------------

class _DeviceArray:
    def __init__(self, a):
        self.a, self.nbytes, self.data = a, a.nbytes, types.SimpleNamespace(ptr=a.ctypes.data)

    def view(self, dtype):
        return _DeviceArray(self.a.view(dtype))


class _Event:
    def __init__(self, block=False, disable_timing=False):
        self.polls = 0

    def record(self, stream):
        pass

    @property
    def done(self):
        self.polls += 1
        return self.polls > 1

    def synchronize(self):
        self.polls = 2


def _stand_in(monkeypatch) -> dict:
    """CuPy as far as the read path uses it: device memory is host memory filled with 0xAB,
    copies are memmoves; resident() records the frame and its device bytes."""
    log = {"synchronized": 0}

    class Stream:
        ptr = 0

        def synchronize(self):
            log["synchronized"] += 1
    runtime = types.SimpleNamespace(memcpyHostToDevice=1,
                                    memcpyAsync=lambda dst, src, n, kind, st: ctypes.memmove(dst, src, n))
    stream = Stream()
    cp = types.SimpleNamespace(empty=lambda n, dtype: _DeviceArray(np.full(n, 0xAB, np.uint8)),
                               cuda=types.SimpleNamespace(Device=lambda d: contextlib.nullcontext(),
                                                          get_current_stream=lambda: stream,
                                                          runtime=runtime, Event=_Event))
    from ecf8 import decoder_cuda, gpu

    def pinned(count, size):
        arrays = [np.empty(size, np.uint8) for _ in range(count)]
        return arrays, [a.ctypes.data for a in arrays]
    monkeypatch.setattr(gpu, "cupy", lambda: cp)
    monkeypatch.setattr(gpu, "pinned_buffers", pinned)
    monkeypatch.setattr(decoder_cuda, "resident", lambda frame, dev, buf: ("frame", frame, buf.a.tobytes()))
    return log


def test_the_gpu_path_uploads_each_frame_as_stored_piece_by_piece(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    arrays = _checkpoint(path)
    _stand_in(monkeypatch)
    with compressed_reader.PackedFile(path) as p:
        for window in (1 << 18, 64 << 20):
            out = list(compressed_stream.tensors(p, "cuda:0", compressed=True, window=window))
            assert [name for name, _, _ in out] == list(arrays)
            for name, _, value in out:
                if p.codecs[name][0] == "ecf8":
                    assert value[0] == "frame" and value[2] == p.stored(name).tobytes()
                    assert value[1].shape == arrays[name].shape
                else:
                    assert value.bits.a.view(arrays[name].dtype).tobytes() == arrays[name].tobytes()


def test_the_gpu_path_refuses_a_damaged_frame_and_waits_for_its_copies(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    arrays = _checkpoint(path)
    _flip(path, "l2.weight", 0.7)
    log = _stand_in(monkeypatch)
    seen = []
    with compressed_reader.PackedFile(path) as p:
        with pytest.raises(CorruptDataError, match="tensor 'l2.weight': its stored bytes fail their"):
            for name, _, _ in compressed_stream.tensors(p, "cuda:0", compressed=True, window=1 << 18):
                seen.append(name)
    assert seen == list(arrays)[:2] and log["synchronized"] == 1


# --- on a GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("window", [1 << 18, 64 << 20])
def test_cuda_read_ahead_uploads_the_stored_frames(tmp_path, window):
    path = tmp_path / "c.safetensors"
    arrays = _checkpoint(path)
    with compressed_reader.PackedFile(path) as p:
        stored = {name: p.stored(name).tobytes() for name in arrays}
    kept = list(compressed_reader.iter_decoded(path, "cuda", compressed=True, window=window))
    assert [name for name, _, _ in kept] == list(arrays)
    for name, _, x in kept:
        if isinstance(x, ecf8.DeviceTensor):
            assert x.tobytes() == stored[name]
            x = ecf8.decode(x, device="cuda")
        assert x.get().tobytes() == arrays[name].tobytes(), name
    for name, _, x in compressed_reader.iter_decoded(path, "cuda", window=window):
        assert isinstance(x, ecf8.CudaArray) and x.get().tobytes() == arrays[name].tobytes(), name


@pytest.mark.gpu
def test_cuda_read_ahead_refuses_a_damaged_frame_before_handing_it_out(tmp_path):
    path = tmp_path / "c.safetensors"
    arrays = _checkpoint(path)
    _flip(path, "l2.weight", 0.7)
    seen = []
    with pytest.raises(CorruptDataError, match="tensor 'l2.weight': its stored bytes fail their"):
        for name, _, _ in compressed_reader.iter_decoded(path, "cuda", compressed=True, window=1 << 18):
            seen.append(name)
    assert seen == list(arrays)[:2]


_MEASURE_CUDA = """
import sys
import cupy
import ecf8

def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))

cupy.zeros(1).sum()                          # the CUDA context, before the baseline
from ecf8 import compressed, decoder_cuda
base = status("VmRSS")
x = ecf8.load_file(sys.argv[1], "cuda", compressed=True)
cupy.cuda.runtime.deviceSynchronize()
print(status("VmHWM") - base, cupy.get_default_pinned_memory_pool().n_free_blocks())
"""


@pytest.mark.gpu
def test_cuda_loading_keeps_host_memory_to_the_staging_window(big_file):
    """Frames go up through a window of pinned staging buffers freed after the load: nothing
    stays in CuPy's pinned memory pool (which kept a block of each frame's size: host memory that
    grew with the model) and the host's peak is the window, not the file."""
    path, largest = big_file
    run = subprocess.run([sys.executable, "-c", _MEASURE_CUDA, str(path)], capture_output=True, text=True,
                         timeout=300, env=child_env())
    assert run.returncode == 0, run.stderr
    grown, pooled = map(int, run.stdout.split())
    assert pooled == 0
    assert grown <= compressed_stream.WINDOW + 2 * largest + (32 << 20), grown
