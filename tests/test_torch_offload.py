"""Compressed offloading: frames in host memory, copied into two staging buffers and decoded per
block.  CPU tests run the same schedule with host buffers in place of the GPU's (the stand-in);
GPU tests run the copy stream, events and the GPU decoder."""

import copy
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
import ecf8  # noqa: E402
import ecf8.torch  # noqa: E402
from ecf8.torch import is_offloaded, offload_module  # noqa: E402


def as_bits(t):
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bits(a), as_bits(b))


class Block(torch.nn.Module):
    def __init__(self, dim, hidden, dtype):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim, dtype=dtype)
        self.up = torch.nn.Linear(dim, hidden, dtype=dtype)
        self.down = torch.nn.Linear(hidden, dim, bias=False, dtype=dtype)

    def forward(self, h):
        return h + self.down(torch.nn.functional.gelu(self.up(self.norm(h))))


class Net(torch.nn.Module):
    """An LLM-shaped stack: a head outside the blocks, blocks of two linears each."""

    def __init__(self, layers=5, dim=64, hidden=160, dtype=torch.bfloat16):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(dim, hidden if k % 2 else hidden + 32, dtype)
                                          for k in range(layers))
        self.head = torch.nn.Linear(dim, 96, bias=False, dtype=dtype)

    def forward(self, h):
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def net(device="cpu", layers=5, seed=0, dtype=torch.bfloat16):
    torch.manual_seed(seed)
    return Net(layers, dtype=dtype).to(device).requires_grad_(False)


def fp8_net(device="cpu", layers=4):
    """Net with FP8 E4M3 weights, run by upcasting in forward (a CPU stand-in for _scaled_mm)."""
    model = net(device, layers, dtype=torch.float32)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.weight = torch.nn.Parameter(m.weight.to(torch.float8_e4m3fn), requires_grad=False)
            m.forward = None                                  # the class forward below
            del m.forward
            m.__class__ = F8Linear
    return model


class F8Linear(torch.nn.Linear):
    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.float(), self.bias)


def compressed(model):
    ecf8.torch.compress_module(model, min_numel=1024)
    return model


def inputs(device="cpu", dtype=torch.bfloat16, n=3):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(4, 64, generator=g).to(dtype).to(device) for _ in range(n)]


# --- exactness --------------------------------------------------------------------------------

@pytest.mark.parametrize("layers", [1, 2, 5])
def test_offloaded_forwards_equal_the_uncompressed_model(layers):
    base = net(layers=layers)
    model = compressed(copy.deepcopy(base))
    stats = offload_module(model, "cpu")
    assert stats.offloaded_blocks == layers and stats.resident_blocks == 0
    assert all(is_offloaded(b.up) and is_offloaded(b.down) for b in model.blocks)
    assert not is_offloaded(model.head) and ecf8.torch.is_compressed(model.head)
    for _ in range(3):                                        # the staging buffers rotate
        for x in inputs():
            assert same(model(x), base(x))


def test_fp8_weights_stream_exactly():
    base = fp8_net()
    model = compressed(copy.deepcopy(base))
    offload_module(model, "cpu")
    x = inputs(dtype=torch.float32)[0]
    for _ in range(2):
        assert same(model(x), base(x))


def test_blocks_in_any_order_decode_their_own_weights():
    base = net(layers=4)
    model = compressed(copy.deepcopy(base))
    offload_module(model, "cpu")
    x = inputs()[0]
    for k in [3, 0, 2, 2, 1, 3, 1, 0]:                        # misses, hits and repeats
        assert same(model.blocks[k](x), base.blocks[k](x)), k


@pytest.mark.parametrize("layers, copies", [(1, 0), (2, 0), (3, 3), (5, 5)])
def test_each_block_is_copied_once_per_forward_and_only_when_needed(layers, copies, monkeypatch):
    """In order, every block's frames cross once per forward (prefetched while the previous block
    computes); one or two blocks stay in the two staging buffers after the first forward."""
    import ecf8.torch.offload as off

    issued = []
    real = off._Streamer._issue
    monkeypatch.setattr(off._Streamer, "_issue", lambda self, k, s: (issued.append((k, s)), real(self, k, s)))
    base = net(layers=layers)
    model = compressed(copy.deepcopy(base))
    offload_module(model, "cpu")
    x = inputs()[0]
    model(x)                                                  # first forward: fills the buffers
    issued.clear()
    for _ in range(3):
        assert same(model(x), base(x))
    assert len(issued) == 3 * copies
    assert all(s1 != s2 for (_, s1), (_, s2) in zip(issued, issued[1:]))   # the buffers alternate


def test_real_weights_stream_exactly(real_weights):
    """The bundled MiniLM FP8 weights, one block per weight: state_dict gives them back bit for bit."""
    arrays = list(real_weights["e4m3"].values())
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList()
    for a in arrays:
        lin = torch.nn.Linear(a.shape[1], a.shape[0], bias=False)
        lin.weight = torch.nn.Parameter(ecf8.torch.from_numpy(np.array(a)), requires_grad=False)
        model.blocks.append(torch.nn.Sequential(lin))
    ecf8.torch.compress_module(model)
    offload_module(model, "cpu")
    for _ in range(2):
        for k, a in enumerate(arrays):
            assert same(model.state_dict()[f"blocks.{k}.0.weight"], ecf8.torch.from_numpy(np.array(a)))


@settings(max_examples=15)
@given(st.integers(0, 2**31 - 1), st.sampled_from([torch.bfloat16, torch.float16, torch.float8_e5m2]))
def test_any_bit_pattern_streams_exactly(seed, dtype):
    """Random bits (NaN, inf, subnormals included) in three blocks: every weight comes back whole."""
    g = torch.Generator().manual_seed(seed)
    width = torch.int16 if dtype.itemsize == 2 else torch.uint8
    lo, hi = (-2**15, 2**15) if dtype.itemsize == 2 else (0, 256)
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList()
    weights = []
    for k in range(3):
        w = torch.randint(lo, hi, (48 + 16 * k, 64), generator=g, dtype=torch.int64).to(width).view(dtype)
        lin = torch.nn.Linear(64, w.shape[0], bias=False)
        lin.weight = torch.nn.Parameter(w, requires_grad=False)
        model.blocks.append(torch.nn.Sequential(lin))
        weights.append(w.clone())
    ecf8.torch.compress_module(model, min_numel=1)
    offload_module(model, "cpu")
    for k in [2, 0, 1, 1]:
        with model.blocks[k][0].__dict__["_ecf8"].decoded() as got:
            assert same(got, weights[k])


# --- the ordinary module surface --------------------------------------------------------------

def test_state_dict_weight_and_decompress_give_the_weights_back():
    base = net()
    model = compressed(copy.deepcopy(base))
    offload_module(model, "cpu")
    expected = base.state_dict()
    got = model.state_dict()
    assert list(got) == list(expected) and all(same(got[k], expected[k]) for k in expected)
    assert same(model.blocks[3].up.weight, base.blocks[3].up.weight)
    assert ecf8.torch.decompress_module(model) == 11
    assert not any(is_offloaded(m) for m in model.modules())
    x = inputs()[0]
    assert same(model(x), base(x))


def test_max_gpu_memory_keeps_leading_blocks_resident():
    base = net(layers=6)
    everything = offload_module(compressed(copy.deepcopy(base)), "cpu")
    kept = []
    for budget in range(everything.device_bytes, 8 * everything.device_bytes, everything.device_bytes // 8):
        stats = offload_module(compressed(copy.deepcopy(base)), "cpu", max_gpu_memory=budget)
        assert stats.device_bytes <= budget and stats.offloaded_blocks == 6 - stats.resident_blocks
        kept.append(stats.resident_blocks)
    assert kept == sorted(kept) and kept[0] == 0 and kept[-1] == 6
    middle = next(budget for budget, k in zip(range(everything.device_bytes, 8 * everything.device_bytes,
                                                     everything.device_bytes // 8), kept) if 0 < k < 6)
    model = compressed(copy.deepcopy(base))
    k = offload_module(model, "cpu", max_gpu_memory=middle).resident_blocks
    assert not any(is_offloaded(m) for b in model.blocks[:k] for m in b.modules())
    assert all(is_offloaded(b.up) for b in model.blocks[k:])
    x = inputs()[0]
    assert same(model(x), base(x))


def test_refusals_leave_the_model_as_it_was():
    base = net()
    model = compressed(copy.deepcopy(base))
    with pytest.raises(ecf8.UnsupportedError, match="max_gpu_memory"):
        offload_module(model, "cpu", max_gpu_memory=1000)
    with pytest.raises(ecf8.UnsupportedError, match="no compressed weight"):
        offload_module(model, "cpu", blocks=[model.blocks[0].norm])
    with pytest.raises(ecf8.UnsupportedError, match="device must be"):
        offload_module(model, "meta")
    assert not any(is_offloaded(m) for m in model.modules())
    x = inputs()[0]
    assert same(model(x), base(x))


def test_a_failure_while_moving_puts_the_streamed_weights_back(monkeypatch):
    base = net()
    model = compressed(copy.deepcopy(base))
    before = {id(m): m.__dict__["_ecf8"] for m in model.modules() if ecf8.torch.is_compressed(m)}

    def broken_to(*args, **kwargs):
        raise torch.OutOfMemoryError("emulated")
    monkeypatch.setattr(model, "to", broken_to)
    with pytest.raises(torch.OutOfMemoryError):
        offload_module(model, "cpu")
    assert not any(is_offloaded(m) for m in model.modules())
    assert all(m.__dict__["_ecf8"] is before[id(m)] for m in model.modules() if ecf8.torch.is_compressed(m))
    x = inputs()[0]
    assert same(model(x), base(x))


def test_a_weight_tied_outside_its_block_is_refused():
    model = net(layers=3, dtype=torch.float32).to(torch.bfloat16)
    model.head = torch.nn.Linear(160 + 32, 64, bias=False).to(torch.bfloat16)
    model.head.weight = model.blocks[0].up.weight
    ecf8.torch.compress_module(model, min_numel=1024)
    with pytest.raises(ecf8.UnsupportedError, match="tied"):
        offload_module(model, "cpu")
    assert not any(is_offloaded(m) for m in model.modules())


def test_what_an_offloaded_model_cannot_do_fails_loudly():
    model = compressed(net())
    offload_module(model, "cpu")
    with pytest.raises(ecf8.UnsupportedError, match="offloaded already"):
        offload_module(model, "cpu")
    with pytest.raises(ecf8.UnsupportedError, match="pickled"):
        pickle.dumps(model)
    with pytest.raises(ecf8.UnsupportedError, match="load_state_dict before"):
        model.load_state_dict(model.state_dict())
    with pytest.raises(ecf8.UnsupportedError, match="cannot move"):
        model.blocks[0].to("meta")


# --- loading a checkpoint straight into offloaded storage ------------------------------------

def saved_net(tmp_path, layers=4):
    base = net(layers=layers)
    path = tmp_path / "net.safetensors"
    ecf8.torch.save_file(base.state_dict(), path)
    with torch.device("meta"):
        empty = Net(layers)
    return base, path, empty


def test_load_model_offload_keeps_the_files_frames(tmp_path, monkeypatch):
    base, path, model = saved_net(tmp_path)
    import ecf8.torch.loading as loading
    monkeypatch.setattr(loading, "encode", lambda *a, **k: pytest.fail("re-encoded a frame read from the file"))
    stats = ecf8.torch.load_model(model, path, device="cpu", offload="cpu")
    assert stats.weights == 9 and all(is_offloaded(b.up) for b in model.blocks)
    with ecf8.safe_open(path) as f:
        frame = f.get_frame("blocks.2.down.weight")
        assert f.get_frame("blocks.2.norm.weight") is None              # too small: zstd or raw
    assert model.blocks[2].down.__dict__["_ecf8"].host_frame() == frame
    for x in inputs():
        assert same(model(x), base(x))


def test_load_model_offload_refusals_leave_the_model_empty(tmp_path):
    _, path, model = saved_net(tmp_path)
    with pytest.raises(ecf8.UnsupportedError, match="max_gpu_memory"):
        ecf8.torch.load_model(model, path, device="cpu", offload="cpu", max_gpu_memory=100)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert not any(ecf8.torch.is_compressed(m) for m in model.modules())
    with pytest.raises(ecf8.UnsupportedError, match="offload must be"):
        ecf8.torch.load_model(model, path, device="cpu", offload="disk")
    with pytest.raises(ecf8.UnsupportedError, match="offload must be"):
        ecf8.torch.load_model(model, path, device="cpu", max_gpu_memory=10**9)
    with pytest.raises(ecf8.UnsupportedError, match="do not apply"):
        ecf8.torch.load_model(model, path, device="cpu", offload="cpu", compress=False)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_get_frame_checks_what_it_returns(tmp_path):
    _, path, _ = saved_net(tmp_path, layers=1)
    with ecf8.safe_open(path) as f:
        frame = f.get_frame("blocks.0.up.weight")
        assert same(ecf8.torch.from_numpy(ecf8.decode(frame)), ecf8.torch.load_file(path)["blocks.0.up.weight"])
        with pytest.raises(KeyError):
            f.get_frame("nope")
    raw = bytearray(path.read_bytes())
    at = raw.rfind(frame[-64:])                               # a byte inside that frame's payload
    raw[at + 10] ^= 0x40
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    with ecf8.safe_open(bad) as f, pytest.raises(ecf8.CorruptDataError):
        f.get_frame("blocks.0.up.weight")


# --- GPU: the copy stream, events and the GPU decoder ------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("layers", [1, 2, 5])
def test_gpu_offloaded_forwards_equal_the_resident_compressed_model(layers):
    base = net("cuda", layers)
    resident = compressed(copy.deepcopy(base))
    model = compressed(net("cpu", layers))                   # frames on the host, then streamed
    stats = offload_module(model, "cuda")
    assert stats.offloaded_blocks == layers and model.head.__dict__["_ecf8"].device.type == "cuda"
    assert model.blocks[0].norm.weight.is_cuda and model.blocks[0].up.bias.is_cuda
    for _ in range(3):
        for x in inputs("cuda"):
            y = model(x)
            assert same(y, resident(x)) and same(y, base(x))


@pytest.mark.gpu
def test_gpu_frames_on_the_gpu_move_to_the_arena_and_stay_exact():
    base = net("cuda", 6)
    model = compressed(copy.deepcopy(base))                   # encoded on the GPU
    stats = offload_module(model, "cuda", max_gpu_memory=None)
    assert stats.offloaded_blocks == 6
    xs = inputs("cuda", n=4)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):                             # a stream other than the default
        got = [model(x) for x in xs]
    side.synchronize()
    assert all(same(g, base(x)) for g, x in zip(got, xs))
    streamer = model.blocks[0].up.__dict__["_ecf8"].unit.streamer
    assert all(len(r) <= 2 for r in streamer.readers)         # one event per stream and buffer
    assert all(same(model.state_dict()[k], v) for k, v in base.state_dict().items())


@pytest.mark.gpu
def test_gpu_fp8_and_max_gpu_memory():
    base = fp8_net("cuda", 5)
    whole = offload_module(compressed(copy.deepcopy(base)), "cuda")
    x = inputs("cuda", torch.float32)[0]
    kept = set()
    for budget in range(whole.device_bytes, 10 * whole.device_bytes, whole.device_bytes // 4):
        model = compressed(copy.deepcopy(base))
        stats = offload_module(model, "cuda", max_gpu_memory=budget)
        assert stats.device_bytes <= budget
        kept.add(stats.resident_blocks)
        for _ in range(2):
            assert same(model(x), base(x)), stats
    assert 0 in kept and 5 in kept and len(kept) > 2


@pytest.mark.gpu
def test_gpu_graph_capture_is_refused():
    model = compressed(net("cuda", 3))
    offload_module(model, "cuda")
    x = inputs("cuda")[0]
    model(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ecf8.UnsupportedError, match="CUDA-graph"):
        with torch.cuda.graph(graph):
            model(x)


@pytest.mark.gpu
def test_gpu_load_model_offload_streams_the_files_frames(tmp_path):
    base, path, model = saved_net(tmp_path, layers=5)
    base = base.cuda()
    ecf8.torch.load_model(model, path, device="cuda", offload="cpu")
    assert all(is_offloaded(b.up) for b in model.blocks) and model.head.__dict__["_ecf8"].device.type == "cuda"
    for _ in range(2):
        for x in inputs("cuda"):
            assert same(model(x), base(x))
