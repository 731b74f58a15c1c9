"""Compressed modules behave like modules: state_dict, .weight, threads, pickling, tied weights,
meta devices."""

import concurrent.futures as cf
import copy
import io
import pickle

import pytest

torch = pytest.importorskip("torch")
import ecf8  # noqa: E402
import ecf8.torch  # noqa: E402


def as_bits(t):
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bits(a), as_bits(b))


class TiedLM(torch.nn.Module):
    """A small LLM-shaped module: embedding, blocks, and an lm_head tied to the embedding."""

    def __init__(self, vocab=512, dim=128, layers=3):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(dim, dim, bias=k % 2 == 0) for k in range(layers))
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = torch.nn.functional.gelu(b(h))
        return self.head(h)


def tied_model(device="cpu"):
    torch.manual_seed(0)
    model = TiedLM().to(torch.bfloat16).to(device).requires_grad_(False)
    return model, torch.randint(0, 512, (2, 12), device=device)


def mlp(device="cpu", layers=6, dim=192):
    torch.manual_seed(1)
    model = torch.nn.Sequential(*[m for k in range(layers)
                                  for m in (torch.nn.Linear(dim, dim), torch.nn.Tanh())])
    return model.to(torch.bfloat16).to(device).requires_grad_(False)


# --- 1. state_dict, load_state_dict, .weight ----------------------------------------------------

def test_state_dict_holds_the_exact_weights():
    model = mlp()
    before = model.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    ecf8.torch.compress_module(model)
    after = model.state_dict()
    assert list(after) == list(before)                       # same keys, same order
    assert all(same(after[k], before[k]) for k in before)


def test_weight_attribute_decodes_on_demand():
    model = mlp()
    expected = model[0].weight.clone()
    ecf8.torch.compress_module(model)
    w = model[0].weight
    assert same(w, expected) and not w.requires_grad
    with pytest.raises(ecf8.ECF8Error, match="decompress_module"):
        del model[0].weight


def test_load_state_dict_into_a_compressed_module_and_back():
    model, x = mlp(), torch.randn(3, 192).to(torch.bfloat16)
    reference = copy.deepcopy(model)
    ecf8.torch.compress_module(model)
    other = mlp()                                             # same architecture, other weights
    for p in other.parameters():
        p.add_(1)
    model.load_state_dict(other.state_dict())                 # strict: every key accepted
    assert same(model(x), other(x))
    ecf8.torch.decompress_module(model)
    reference.load_state_dict(model.state_dict())
    assert same(reference(x), other(x))
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_state_dict({**other.state_dict(), "0.weight": torch.zeros(4, 4)})
    ecf8.torch.compress_module(model)
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict({k: v for k, v in other.state_dict().items() if k != "2.weight"})


# --- 2. threads ---------------------------------------------------------------------------------

def test_concurrent_forwards_are_exact():
    model = mlp(layers=8, dim=256)
    xs = [torch.randn(4, 256, generator=torch.Generator().manual_seed(k)).to(torch.bfloat16)
          for k in range(48)]
    expected = [model(x) for x in xs]
    ecf8.torch.compress_module(model)
    with cf.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(model, xs * 3))
    wrong = sum(not same(g, e) for g, e in zip(got, expected * 3))
    assert wrong == 0, f"{wrong} of {len(got)} outputs differ"


# --- 3. torch.save, pickle, deepcopy ------------------------------------------------------------

@pytest.mark.parametrize("how", ["torch.save", "pickle", "deepcopy"])
def test_serialized_compressed_model_works_and_stays_compressed(how):
    model, ids = tied_model()
    expected = model(ids)
    ecf8.torch.compress_module(model, embeddings=True)
    model(ids)                                                # buffers exist now
    if how == "torch.save":
        f = io.BytesIO()
        torch.save(model, f)
        f.seek(0)
        clone = torch.load(f, weights_only=False)
    elif how == "pickle":
        clone = pickle.loads(pickle.dumps(model))
    else:
        clone = copy.deepcopy(model)
    assert same(clone(ids), expected)
    assert ecf8.torch.is_compressed(clone.head) and clone.embed.__dict__["_ecf8"] is clone.head.__dict__["_ecf8"]
    assert ecf8.torch.decompress_module(clone) == 5
    assert same(clone(ids), expected)


# --- 4. tied weights ----------------------------------------------------------------------------

def test_tied_weight_compressed_once_and_tie_survives():
    model, ids = tied_model()
    expected = model(ids)
    table = model.embed.weight
    stats = ecf8.torch.compress_module(model, embeddings=True)
    assert stats.weights == 4 and stats.modules == 5
    assert stats.original_bytes == sum(b.weight.numel() * 2 for b in model.blocks) + table.numel() * 2
    assert model.embed.__dict__["_ecf8"] is model.head.__dict__["_ecf8"]
    assert same(model(ids), expected)
    ecf8.torch.decompress_module(model)
    assert model.head.weight is model.embed.weight
    assert same(model.head.weight, table) and same(model(ids), expected)


def test_tied_weight_left_alone_when_the_embedding_stays():
    """embeddings=False: the embedding keeps the matrix, so compressing the head would free nothing."""
    model, ids = tied_model()
    expected = model(ids)
    stats = ecf8.torch.compress_module(model)
    assert stats.weights == 3 and not ecf8.torch.is_compressed(model.head)
    assert stats.original_bytes == sum(b.weight.numel() * 2 for b in model.blocks)
    assert stats.resident_bytes < stats.original_bytes
    assert model.head.weight is model.embed.weight
    assert same(model(ids), expected)


# --- 5. meta and mixed devices ------------------------------------------------------------------

def test_meta_weights_are_refused_before_anything_changes():
    model = mlp()
    with torch.device("meta"):
        model[6] = torch.nn.Linear(192, 192, dtype=torch.bfloat16)
    kept = {id(p) for p in model.parameters()}
    with pytest.raises(ecf8.ECF8Error, match="'6.weight'.*meta"):
        ecf8.torch.compress_module(model)
    assert {id(p) for p in model.parameters()} == kept
    assert not any(ecf8.torch.is_compressed(m) for m in model.modules())


def test_failure_midway_restores_the_model(monkeypatch):
    model, x = mlp(), torch.randn(2, 192).to(torch.bfloat16)
    expected = model(x)
    calls = []
    real = ecf8.torch.encode

    def flaky(t, **options):
        calls.append(1)
        if len(calls) == 3:
            raise ecf8.ECF8Error("injected")
        return real(t, **options)
    monkeypatch.setattr(ecf8.torch.modules, "encode", flaky)      # compress_module encodes through it
    with pytest.raises(ecf8.ECF8Error, match="injected"):
        ecf8.torch.compress_module(model)
    assert not any(ecf8.torch.is_compressed(m) for m in model.modules())
    assert all(isinstance(m.weight, torch.nn.Parameter) for m in model if hasattr(m, "weight"))
    assert same(model(x), expected)


def test_dtype_conversion_makes_plain_parameters_and_keeps_the_tie():
    model, ids = tied_model()
    reference = copy.deepcopy(model).float()
    ecf8.torch.compress_module(model, embeddings=True)
    model.to("cpu")                                           # same device: still compressed
    assert ecf8.torch.is_compressed(model.head)
    model.float()
    assert not any(ecf8.torch.is_compressed(m) for m in model.modules())
    assert model.head.weight is model.embed.weight and model.head.weight.dtype == torch.float32
    assert same(model(ids), reference(ids))


# --- GPU ----------------------------------------------------------------------------------------

def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA build of PyTorch and a GPU")


@pytest.mark.gpu
def test_cuda_module_behaves_like_a_module():
    _cuda()
    model, ids = tied_model("cuda")
    expected = model(ids)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    stats = ecf8.torch.compress_module(model, embeddings=True)
    assert stats.weights == 4
    assert same(model(ids), expected)
    assert all(same(v, sd[k]) for k, v in model.state_dict().items())
    clone = copy.deepcopy(model)
    f = io.BytesIO()
    torch.save(model, f)
    f.seek(0)
    loaded = torch.load(f, weights_only=False)
    assert same(clone(ids), expected) and same(loaded(ids), expected)
    ecf8.torch.decompress_module(model)
    assert model.head.weight is model.embed.weight and same(model(ids), expected)


@pytest.mark.gpu
def test_cuda_forward_allocates_nothing_for_the_weights():
    """After a warm-up forward, the just-in-time decode is launch-only: a compressed model's
    forward makes exactly as many torch allocations as the uncompressed one's (its activations)."""
    _cuda()
    plain, compressed = mlp("cuda"), mlp("cuda")
    ecf8.torch.compress_module(compressed)
    x = torch.randn(16, 192, device="cuda").to(torch.bfloat16)

    def allocations(model):
        model(x)                                        # warm-up: buffers and views made here
        torch.cuda.synchronize()
        before = torch.cuda.memory_stats()["allocation.all.allocated"]
        for _ in range(10):
            model(x)
        torch.cuda.synchronize()
        return torch.cuda.memory_stats()["allocation.all.allocated"] - before

    assert allocations(compressed) == allocations(plain) > 0


@pytest.mark.gpu
def test_cuda_two_streams_and_threads_are_exact():
    _cuda()
    model = mlp("cuda", layers=8, dim=1024)
    xs = [torch.randn(64, 1024, device="cuda").to(torch.bfloat16) for _ in range(8)]
    expected = [model(x) for x in xs]
    ecf8.torch.compress_module(model)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    torch.cuda.synchronize()
    outs = []
    for k, x in enumerate(xs):                # interleaved on two streams, no sync in between
        with torch.cuda.stream(streams[k % 2]):
            outs.append(model(x))
    torch.cuda.synchronize()
    assert all(same(o, e) for o, e in zip(outs, expected))

    def run(k):
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            y = [model(x) for x in xs]
        s.synchronize()
        return y
    with cf.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(4)))
    assert all(same(o, e) for r in results for o, e in zip(r, expected))


@pytest.mark.gpu
def test_cuda_to_moves_the_frames():
    _cuda()
    model, ids = tied_model()
    expected = model.cuda()(ids.cuda())
    model.cpu()
    ecf8.torch.compress_module(model, embeddings=True)
    model.cuda()
    assert ecf8.torch.is_compressed(model.head) and model.head.__dict__["_ecf8"].device.type == "cuda"
    assert same(model(ids.cuda()), expected)
    pool = model.head.__dict__["_ecf8"].pool
    model.cpu()
    assert set(d.type for d in pool.sizes) == {"cpu"}
    model.cuda()
    assert same(model(ids.cuda()), expected)


# --- weights decoded in groups, one launch each --------------------------------------

LLAMA_LIKE = [(256, 256), (64, 256), (64, 256), (256, 256), (1024, 256), (1024, 256), (256, 1024)] * 2


def linears(device="cuda"):
    """Two Llama-shaped layers of linears (q k v o gate up down, 1/16 of Llama-3-8B's sizes)."""
    torch.manual_seed(2)
    model = torch.nn.ModuleList(torch.nn.Linear(n_in, n_out, bias=False) for n_out, n_in in LLAMA_LIKE)
    return model.to(torch.bfloat16).to(device).requires_grad_(False)


def outputs(model, order):
    torch.manual_seed(3)
    xs = {k: torch.randn(8, k, device="cuda").to(torch.bfloat16) for k in (256, 1024)}
    return {i: model[i](xs[model[i].in_features]) for i in order}


def compressed_linears(**options):
    """(model, forward order, its uncompressed outputs, stats) of linears() compressed by
    compress_module(**options) on the GPU."""
    _cuda()
    model = linears()
    forward = list(range(len(model)))
    expected = outputs(model, forward)
    return model, forward, expected, ecf8.torch.compress_module(model, **options)


def groups_of(model):
    return [m.__dict__["_ecf8"].group for m in model]


@pytest.mark.gpu
def test_cuda_groups_decode_exactly_in_any_order():
    """By default q, k, v and o share one launch (their bytes fit in the largest weight's buffer,
    which does not grow), the MLP weights go alone; any call order gives the exact outputs."""
    model, forward, expected, stats = compressed_linears()
    g = groups_of(model)
    assert g[0] is not None and g[0] is g[1] is g[2] is g[3] and g[4] is g[5] is g[6] is None
    assert g[7] is g[10] and g[7] is not g[0]
    assert stats.buffer_bytes == 1024 * 256 * 2
    for order in (forward, forward[::-1], [3, 9, 0, 12, 1, 8, 7, 2, 13, 4, 10, 11, 5, 6]):
        got = outputs(model, order)
        assert all(same(got[i], expected[i]) for i in order)


@pytest.mark.gpu
def test_cuda_groups_survive_load_state_dict_pickling_moves_and_graphs():
    model, forward, expected, _ = compressed_linears(group_bytes=1 << 30)
    assert len({id(g) for g in groups_of(model)}) == 1 and groups_of(model)[0] is not None
    assert all(same(outputs(model, forward)[i], expected[i]) for i in forward)
    new = torch.randn(64, 256, device="cuda").to(torch.bfloat16)           # k of layer 0
    model[1].load_state_dict({"weight": new})
    reference = linears()
    reference[1].weight.copy_(new)
    expected = outputs(reference, forward)
    assert all(same(outputs(model, forward)[i], expected[i]) for i in forward)
    f = io.BytesIO()
    torch.save(model, f)
    f.seek(0)
    loaded = torch.load(f, weights_only=False)
    assert all(same(outputs(loaded, forward)[i], expected[i]) for i in forward)
    model.cpu()
    model.cuda()
    assert all(same(outputs(model, forward)[i], expected[i]) for i in forward)
    graphed = linears()
    graphed[1].weight.copy_(new)
    ecf8.torch.compress_module(graphed, group_bytes=1 << 30)
    torch.manual_seed(3)
    xs = {k: torch.randn(8, k, device="cuda").to(torch.bfloat16) for k in (256, 1024)}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        [graphed[i](xs[graphed[i].in_features]) for i in forward]            # warm-up
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [graphed[i](xs[graphed[i].in_features]) for i in forward]
    graph.replay()
    torch.cuda.synchronize()
    assert all(same(outs[i], expected[i]) for i in forward)
    plain = linears()
    ecf8.torch.compress_module(plain, group_bytes=0)
    assert groups_of(plain) == [None] * len(plain)


@pytest.mark.gpu
def test_cuda_groups_in_graphs_captured_one_after_another_and_eager_on_the_capture_stream():
    """A capture records a group's decode but runs nothing: a second capture, or an eager run on
    the capture's stream before any replay, must not take the group as decoded."""
    model, forward, expected, _ = compressed_linears(group_bytes=1 << 30)
    torch.manual_seed(3)
    xs = {k: torch.randn(8, k, device="cuda").to(torch.bfloat16) for k in (256, 1024)}

    def run(order):
        return {i: model[i](xs[model[i].in_features]) for i in order}

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run(forward)                                                   # warm-up
    torch.cuda.current_stream().wait_stream(s)
    g1, g2 = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(g1, stream=s):
        out1 = run(forward)
    with torch.cuda.graph(g2, stream=s):
        out2 = run(forward[7:] + forward[:7])
    with torch.cuda.stream(s):
        eager = run(forward[::-1])                                     # before any replay
    s.synchronize()
    assert all(same(eager[i], expected[i]) for i in forward)
    g2.replay()
    torch.cuda.synchronize()
    assert all(same(out2[i], expected[i]) for i in forward)
    g1.replay()
    torch.cuda.synchronize()
    assert all(same(out1[i], expected[i]) for i in forward)
    with torch.cuda.stream(s):
        g2.replay()
        eager = run([5, 1, 12])                                        # after a replay, eager
    s.synchronize()
    assert all(same(eager[i], expected[i]) for i in (5, 1, 12))


@pytest.mark.gpu
def test_cuda_unpickled_groups_capture_and_dropped_models_free_their_frames():
    import gc

    model, forward, expected, _ = compressed_linears(group_bytes=1 << 30)
    f = io.BytesIO()
    torch.save(model, f)
    f.seek(0)
    loaded = torch.load(f, weights_only=False)
    assert groups_of(loaded)[0] is not None and groups_of(loaded)[0].decoder is not None
    torch.manual_seed(3)
    xs = {k: torch.randn(8, k, device="cuda").to(torch.bfloat16) for k in (256, 1024)}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):                  # its first forward, inside a capture
        outs = [loaded[i](xs[loaded[i].in_features]) for i in forward]
    graph.replay()
    torch.cuda.synchronize()
    assert all(same(outs[i], expected[i]) for i in forward)
    ecf8.torch.decompress_module(model[3])         # one weight leaves: the group dissolves
    assert not ecf8.torch.is_compressed(model[3])
    assert [m.__dict__["_ecf8"].group for m in model if ecf8.torch.is_compressed(m)] == [None] * (len(model) - 1)
    assert all(same(outputs(model, forward)[i], expected[i]) for i in forward)
    del outs, graph, loaded
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    gc.disable()
    try:
        dropped = linears()
        ecf8.torch.compress_module(dropped, group_bytes=1 << 30)
        outputs(dropped, forward)
        held = torch.cuda.memory_allocated()
        del dropped
        torch.cuda.synchronize()
        freed = held - torch.cuda.memory_allocated()
    finally:
        gc.enable()
    assert held > before and freed >= 0.9 * (held - before)


# --- chunk size: decode speed by default ---------------------------------------------

def test_decode_chunk_size_follows_the_tensor_size():
    from ecf8.encoder import decode_chunk_size

    assert [decode_chunk_size(n) for n in (0, 1, 4096 * 4096, 14336 * 4096, (1 << 27) - 1, 1 << 28, 1 << 40)] \
        == [4096, 4096, 4096, 8192, 16384, 32768, 32768]


def test_compress_module_picks_the_chunk_size_per_weight_unless_given():
    from ecf8 import format as fmt

    def chunk_log2s(model):
        return [fmt.parse(memoryview(m.__dict__["_ecf8"].blob)).chunk_log2
                for m in model.modules() if ecf8.torch.is_compressed(m)]

    big = torch.nn.Linear(4096, 8192, bias=False).to(torch.bfloat16).requires_grad_(False)  # 32 M
    small = torch.nn.Linear(192, 192).to(torch.bfloat16).requires_grad_(False)
    model = torch.nn.Sequential(big, small)
    ecf8.torch.compress_module(model)
    assert chunk_log2s(model) == [13, 12]          # 8192 and 4096 elements per chunk
    other = torch.nn.Sequential(torch.nn.Linear(192, 192).to(torch.bfloat16).requires_grad_(False))
    ecf8.torch.compress_module(other, chunk_size=512)
    assert chunk_log2s(other) == [9]
