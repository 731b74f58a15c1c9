"""torch.compile of a compressed model: the just-in-time decode is one custom operator
(ecf8::decode_weight), so the model compiles whole, in either order (compress then compile, compile
then compress), and computes the same bits as the uncompressed model compiled alike; an edit to a
weight after compiling is seen by the compiled model."""

import copy

import pytest

torch = pytest.importorskip("torch")
import ecf8  # noqa: E402
import ecf8.torch  # noqa: E402

from test_torch_modules import same, tied_model  # noqa: E402


def mlp(device="cpu"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64, bias=False),
                                torch.nn.LayerNorm(64), torch.nn.Linear(64, 32))
    return model.to(torch.bfloat16).to(device).requires_grad_(False).eval()


def inputs(device="cpu"):
    return torch.randn(4, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(device)


def compiled_pair(order, backend, device="cpu", **options):
    """(compiled compressed model, compiled uncompressed twin, input)."""
    torch._dynamo.reset()
    model = mlp(device)
    twin = torch.compile(copy.deepcopy(model), backend=backend, **options)
    if order == "compress, compile":
        ecf8.torch.compress_module(model, min_numel=1024)
        compiled = torch.compile(model, backend=backend, **options)
    else:
        compiled = torch.compile(model, backend=backend, **options)
        ecf8.torch.compress_module(model, min_numel=1024)
    assert ecf8.torch.is_compressed(model[0])
    return compiled, twin, inputs(device)


@pytest.mark.parametrize("order", ["compress, compile", "compile, compress"])
def test_compiles_whole_and_computes_the_same_bits(order):
    compiled, twin, x = compiled_pair(order, "aot_eager", fullgraph=True)   # fullgraph: no graph break
    assert same(compiled(x), twin(x))
    assert same(compiled(x), compiled._orig_mod(x))                          # and the eager model


def test_inductor_on_cpu():
    compiled, twin, x = compiled_pair("compress, compile", "inductor")
    assert same(compiled(x), twin(x))


def test_compiled_model_sees_later_edits():
    compiled, twin, x = compiled_pair("compress, compile", "aot_eager")
    compiled(x)
    model, reference = compiled._orig_mod, twin._orig_mod
    for m in (model, reference):
        m[0].weight.data.mul_(-2)
        m[4].weight.data.add_(1)
    assert same(compiled(x), twin(x))
    new = {k: v + 1 for k, v in reference.state_dict().items()}
    model.load_state_dict(new)
    reference.load_state_dict(new)
    assert same(compiled(x), twin(x))


def test_tied_model_compiles():
    model, ids = tied_model()
    expected = model(ids)
    ecf8.torch.compress_module(model, embeddings=True)
    torch._dynamo.reset()
    assert same(torch.compile(model, backend="aot_eager", fullgraph=True)(ids), expected)


# --- GPU ----------------------------------------------------------------------------------------

def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA build of PyTorch and a GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [None, "reduce-overhead", "max-autotune-no-cudagraphs"])
@pytest.mark.parametrize("order", ["compress, compile", "compile, compress"])
def test_cuda_compiles_with_each_mode(order, mode):
    _cuda()
    compiled, twin, x = compiled_pair(order, "inductor", "cuda", mode=mode)
    eager = compiled._orig_mod(x)
    for _ in range(3):                              # reduce-overhead: warm-up, record, replay
        got = compiled(x).clone()                   # a CUDA graph's output lives until its next run
        expected = twin(x).clone()
        assert same(got, expected) or same(got, eager)
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_cuda_graphs_replay_the_edited_weights():
    """An edit re-encodes a weight into new GPU memory: the compiled model must not replay a CUDA
    graph reading the old frame."""
    _cuda()
    compiled, twin, x = compiled_pair("compress, compile", "inductor", "cuda", mode="reduce-overhead")
    for _ in range(3):
        compiled(x), twin(x)
    for m in (compiled._orig_mod, twin._orig_mod):
        m[2].weight.data.mul_(-1)
    for _ in range(3):
        got, expected = compiled(x).clone(), twin(x).clone()
    assert same(got, expected)
