"""compress_module(fused=True): which weights get the fused path and why not, the timed choices
and their file, and (GPU) the fused forward equal bit for bit to the same kernel on the
uncompressed weight, the default path where the fused one does not apply, CUDA graphs, edits."""

import json
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import ecf8.torch  # noqa: E402
from ecf8.torch import fused_linear  # noqa: E402

BF16 = torch.bfloat16


def linears(device="cpu", bias=True):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(1024, 512, bias=bias, dtype=BF16, device=device),
                               torch.nn.Linear(512, 384, dtype=BF16, device=device),
                               torch.nn.Linear(384, 512, dtype=BF16, device=device),
                               torch.nn.LayerNorm(512, dtype=BF16, device=device))


def test_stats_say_which_weights_get_the_fused_path_and_why_not():
    model = linears()
    stats = ecf8.torch.compress_module(model, fused=True)
    assert stats.weights == 3 and stats.fused == 2
    assert stats.not_fused == {"the fused kernel needs K (columns) a multiple of 512, not 384": 1}
    assert ecf8.torch.compress_module(linears()).fused == 0            # opt-in


def test_other_classes_and_dtypes_are_named():
    class MyLinear(torch.nn.Linear):
        pass

    model = torch.nn.Sequential(MyLinear(512, 512, dtype=BF16), torch.nn.Linear(512, 512, dtype=torch.float16))
    stats = ecf8.torch.compress_module(model, fused=True)
    assert stats.fused == 0
    assert stats.not_fused == {"MyLinear is not torch.nn.Linear": 1,
                               "float16 weights: the fused path multiplies bfloat16 nn.Linear weights": 1}


def test_cpu_forward_and_pickles_unchanged():
    model = linears()
    x = torch.randn(3, 1024, dtype=BF16)
    before = model(x)
    ecf8.torch.compress_module(model, fused=True)
    assert torch.equal(model(x), before)                              # the fused path needs a GPU
    again = pickle.loads(pickle.dumps(model))
    assert isinstance(again[0].__dict__["_ecf8"].fused, fused_linear.FusedLinear)
    assert torch.equal(again(x), before)


def test_choices_file_roundtrip_merge_and_damage(tmp_path):
    path = tmp_path / "sub" / "choices.json"
    a = fused_linear.Choices(path)
    assert a.get("k1") is None
    assert a.put("k1", 1.0, 2.0) == "fused"
    b = fused_linear.Choices(path)                  # another process, later
    assert b.get("k1") == "fused"
    assert b.put("k2", 3.0, 2.0) == "default"
    assert a.put("k3", 1.0, 1.5) == "fused"         # a's write keeps b's entry
    data = json.loads(path.read_text())
    assert {k: v["path"] for k, v in data.items()} == {"k1": "fused", "k2": "default", "k3": "fused"}
    assert a.entries()["k1"] == {"path": "fused", "fused_ms": 1.0, "default_ms": 2.0}
    path.write_text("{not json")
    assert fused_linear.Choices(path).get("k1") is None                # damaged: ignored
    assert fused_linear.Choices(None).put("k", 2.0, 1.0) == "default"  # memory only


def test_choices_path_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ECF8_FUSED_CHOICES", str(tmp_path / "c.json"))
    assert fused_linear.choices_path() == tmp_path / "c.json"
    monkeypatch.setenv("ECF8_FUSED_CHOICES", "")
    assert fused_linear.choices_path() is None
    monkeypatch.delenv("ECF8_FUSED_CHOICES")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert fused_linear.choices_path() == tmp_path / "ecf8" / "fused-choices.json"


def test_choices_are_keyed_by_the_kernels_sources():
    """Choices timed with other kernels (another ecf8) are not reused: the key starts with a
    CRC-32 of the decoder's and the fused kernel's sources."""
    import re
    import zlib

    from ecf8 import gpu

    tag = fused_linear._kernels_tag()
    assert re.fullmatch(r"kernels [0-9a-f]{8}", tag)
    text = gpu.kernel_source("ecf8_decode.cu") + gpu.kernel_source("ecf8_fused.cu")
    assert tag == f"kernels {zlib.crc32(text.encode()):08x}"


# --- GPU ------------------------------------------------------------------------------------------

def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA build of PyTorch and a GPU")
    pytest.importorskip("cupy")


@pytest.fixture
def forced(monkeypatch, tmp_path):
    """Choices in a fresh file; force(path) makes every key answer `path` without timing."""
    table = fused_linear.Choices(tmp_path / "choices.json")
    monkeypatch.setattr(fused_linear, "_choices", table)

    def force(path):
        monkeypatch.setattr(table, "get", lambda key: path)
    return force


def twin_output(module, weight: torch.Tensor, bias, x: torch.Tensor) -> torch.Tensor:
    """The fused kernel on the uncompressed weight (at the chunk size of the module's frame), with
    the fused path's bias and rounding."""
    import cupy as cp
    from ecf8 import fused

    w = weight.detach().contiguous()
    size = 1 << module.__dict__["_ecf8"].blob.frame.chunk_log2
    twin = fused.PlainWeight(cp.from_dlpack(w.view(torch.int16).reshape(-1)), tuple(w.shape), size, dtype="bfloat16")
    x2 = x.reshape(-1, w.shape[1]).float().contiguous()
    y = torch.from_dlpack(twin.matmul(cp.from_dlpack(x2)))
    if bias is not None:
        y += bias.float()
    return y.to(BF16).reshape(*x.shape[:-1], w.shape[0])


def real_bf16_linear(real_weights, n: int, k: int, bias: bool = True) -> torch.nn.Linear:
    src = np.concatenate([w.reshape(-1) for w in real_weights["bf16"].values()])
    lin = torch.nn.Linear(k, n, bias=bias, dtype=BF16, device="cuda")
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(np.resize(src, n * k).view(np.int16).reshape(n, k)).view(BF16))
    return lin


def compressed_real_linear(real_weights, n: int, k: int) -> torch.nn.Linear:
    """real_bf16_linear(n, k), compressed with fused=True."""
    lin = real_bf16_linear(real_weights, n, k)
    ecf8.torch.compress_module(lin, fused=True)
    return lin


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 3, 8, 16])
@pytest.mark.parametrize("n,k", [(512, 1024), (1024, 3584), (256, 14336)])
def test_fused_forward_equals_twin(real_weights, forced, rows, n, k):
    _cuda()
    forced("fused")
    lin = real_bf16_linear(real_weights, n, k, bias=rows % 2 == 1)
    weight, bias = lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone()
    x = torch.randn(rows, k, dtype=BF16, device="cuda")
    base = lin(x)
    assert ecf8.torch.compress_module(lin, fused=True).fused == 1
    with torch.no_grad():
        y = lin(x)
    assert torch.equal(y.view(torch.int16), twin_output(lin, weight, bias, x).view(torch.int16))
    rel = ((y.float() - base.float()).abs().max() / base.float().abs().max()).item()
    assert rel < 2 ** -7                                  # BF16 rounding apart at most, here


@pytest.mark.gpu
def test_default_path_where_fused_does_not_apply(forced):
    """More than 16 rows, autograd, or a timed 'default' choice: the uncompressed module's bits."""
    _cuda()
    forced("fused")
    lin = torch.nn.Linear(1024, 512, dtype=BF16, device="cuda")
    x17, x1 = torch.randn(17, 1024, dtype=BF16, device="cuda"), torch.randn(2, 1, 1024, dtype=BF16, device="cuda")
    ref17, ref1 = lin(x17).detach(), lin(x1).detach()
    ecf8.torch.compress_module(lin, fused=True)
    with torch.no_grad():
        assert torch.equal(lin(x17), ref17)
    x1g = x1.clone().requires_grad_()
    assert torch.equal(lin(x1g).detach(), ref1)            # grad needed: decoded, F.linear
    forced("default")
    with torch.no_grad():
        assert torch.equal(lin(x1), ref1)


def _outcome(fn):
    """fn()'s result, or the type of the RuntimeError it raised."""
    try:
        return fn()
    except RuntimeError as e:
        return type(e)


@pytest.mark.gpu
def test_bias_of_another_dtype_and_autocast_take_the_default_path(forced):
    """Autocast to float16 computes (and returns) float16, and a float32 bias is F.linear's to
    accept or refuse: the fused path must not quietly answer in BF16 instead."""
    _cuda()
    forced("fused")
    lin = torch.nn.Linear(1024, 512, dtype=BF16, device="cuda")
    x = torch.randn(2, 1024, dtype=BF16, device="cuda")
    weight, bias32 = lin.weight.detach().clone(), lin.bias.detach().float()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        ref = lin(x)
    ecf8.torch.compress_module(lin, fused=True)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        y = lin(x)
    assert y.dtype == torch.float16 and torch.equal(y, ref)
    lin.bias.data = bias32.clone()
    with torch.no_grad():
        want = _outcome(lambda: torch.nn.functional.linear(x, weight, bias32))
        got = _outcome(lambda: lin(x))
    if isinstance(want, type):
        assert got is want
    else:
        assert isinstance(got, torch.Tensor) and torch.equal(got, want)


@pytest.mark.gpu
def test_weight_reloaded_incompressible_takes_the_default_path(real_weights, forced):
    """A weight re-encoded as a stored frame (random bits) has nothing to decode: the forward
    takes the default path (F.linear on its bits) instead of failing."""
    _cuda()
    forced("fused")
    lin = compressed_real_linear(real_weights, 512, 1024)
    x = torch.randn(2, 1024, dtype=BF16, device="cuda")
    with torch.no_grad():
        lin(x)                                            # the fused product of the coded frame
        g = torch.Generator(device="cuda").manual_seed(0)
        new = torch.randint(-2 ** 15, 2 ** 15, (512, 1024), dtype=torch.int16, device="cuda", generator=g)
        bias = lin.bias.detach().clone()
        lin.load_state_dict({"weight": new.view(BF16), "bias": bias})
        assert "stored" in fused_linear.fused_skip_reason(torch.nn.Linear, lin.__dict__["_ecf8"])
        y = lin(x)
        ref = torch.nn.functional.linear(x, new.view(BF16), bias)
    assert torch.equal(y.view(torch.int16), ref.view(torch.int16))


@pytest.mark.gpu
def test_compressed_on_the_cpu_then_moved_reaches_the_fused_path(real_weights, forced):
    _cuda()
    forced("fused")
    lin = real_bf16_linear(real_weights, 512, 1024).cpu()
    weight, bias = lin.weight.detach().cuda(), lin.bias.detach().cuda()
    assert ecf8.torch.compress_module(lin, fused=True).fused == 1
    lin.cuda()
    x = torch.randn(3, 1024, dtype=BF16, device="cuda")
    with torch.no_grad():
        y = lin(x)
    assert torch.equal(y.view(torch.int16), twin_output(lin, weight, bias, x).view(torch.int16))


@pytest.mark.gpu
def test_first_forward_times_both_paths_and_keeps_the_choice(monkeypatch, tmp_path):
    _cuda()
    table = fused_linear.Choices(tmp_path / "choices.json")
    monkeypatch.setattr(fused_linear, "_choices", table)
    lin = torch.nn.Linear(4096, 4096, dtype=BF16, device="cuda")
    ecf8.torch.compress_module(lin, fused=True)
    with torch.no_grad():
        lin(torch.randn(1, 4096, dtype=BF16, device="cuda"))
        lin(torch.randn(5, 4096, dtype=BF16, device="cuda"))
    data = json.loads((tmp_path / "choices.json").read_text())
    assert sorted(k.rsplit("|", 1)[1] for k in data) == ["rows 1", "rows 8"]
    assert all(k.startswith(fused_linear._kernels_tag() + "|NVIDIA") for k in data)
    assert all(v["path"] in ("fused", "default") and v["fused_ms"] > 0 and v["default_ms"] > 0 for v in data.values())


@pytest.mark.gpu
def test_cuda_graph_replays_the_fused_forward(real_weights, forced):
    _cuda()
    forced("fused")
    lin = compressed_real_linear(real_weights, 1024, 2048)
    x = torch.randn(4, 2048, dtype=BF16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        eager = lin(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = lin(x)
    torch.cuda.current_stream().wait_stream(side)
    x.copy_(torch.randn_like(x))
    graph.replay()
    with torch.no_grad():
        assert torch.equal(out, lin(x))
        assert not torch.equal(out, eager)


@pytest.mark.gpu
def test_loaded_weights_reach_the_fused_path(real_weights, forced):
    """load_state_dict re-encodes the weight: the next fused forward multiplies the new one."""
    _cuda()
    forced("fused")
    lin = compressed_real_linear(real_weights, 512, 1024)
    x = torch.randn(2, 1024, dtype=BF16, device="cuda")
    with torch.no_grad():
        lin(x)
    new = {"weight": torch.randn(512, 1024, dtype=BF16, device="cuda") * 0.02, "bias": lin.bias.detach().clone()}
    lin.load_state_dict(new)
    with torch.no_grad():
        y = lin(x)
    assert torch.equal(y.view(torch.int16), twin_output(lin, new["weight"], new["bias"], x).view(torch.int16))
