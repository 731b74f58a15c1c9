"""Interop on the CPU: the NumPy, PyTorch and JAX adapters, and just-in-time module decoding."""

import subprocess
import sys

import numpy as np
import pytest

import ecf8
import ecf8.numpy
from helpers import DTYPES, assert_bit_exact, bits, spin_kernel, weights_like

torch = pytest.importorskip("torch")
import ecf8.torch  # noqa: E402

TORCH = {DTYPES[0]: torch.float8_e4m3fn, DTYPES[1]: torch.float8_e5m2,
         DTYPES[2]: torch.bfloat16, DTYPES[3]: torch.float16}


def test_import_ecf8_imports_no_framework():
    code = "import sys, ecf8; print(sorted(m for m in ('torch', 'jax', 'cupy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_numpy_adapter(dtype):
    x = weights_like(10_000, dtype).reshape(100, 100)
    blob = ecf8.numpy.encode(x)
    assert_bit_exact(ecf8.numpy.decode(blob), x)
    out = np.empty(10_000, dtype)
    y = ecf8.numpy.decode(blob, out=out)
    assert np.shares_memory(y, out) and y.shape == x.shape and np.array_equal(bits(out), bits(x).reshape(-1))
    with pytest.raises(ecf8.UnsupportedError):
        ecf8.numpy.decode(blob, out=np.empty(9_999, dtype))
    with pytest.raises(ecf8.UnsupportedError):
        ecf8.numpy.decode(blob, device="cuda")


def torch_bits(t):
    return t.contiguous().view(torch.uint8 if t.element_size() == 1 else torch.int16).numpy()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_torch_adapter(dtype):
    x = weights_like(30_000, dtype).reshape(150, 200)
    t = torch.from_numpy(bits(x).view(np.uint8 if x.itemsize == 1 else np.int16)).view(TORCH[dtype])
    blob = ecf8.torch.encode(t)
    assert_bit_exact(ecf8.decode(blob), x)
    y = ecf8.torch.decode(blob)
    assert y.dtype == TORCH[dtype] and tuple(y.shape) == x.shape
    np.testing.assert_array_equal(torch_bits(y), torch_bits(t))
    out = torch.empty(30_000, dtype=TORCH[dtype])
    y = ecf8.torch.decode(blob, out=out)
    assert y.data_ptr() == out.data_ptr()
    np.testing.assert_array_equal(torch_bits(y), torch_bits(t))
    with pytest.raises(ecf8.UnsupportedError):
        ecf8.torch.encode(torch.zeros(4, dtype=torch.float32))
    # non-contiguous input
    assert_bit_exact(ecf8.decode(ecf8.torch.encode(t.T)), np.ascontiguousarray(x.T))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_jax_adapter(dtype):
    jnp = pytest.importorskip("jax.numpy")
    import ecf8.jax

    x = weights_like(20_000, dtype).reshape(100, 200)
    a = jnp.asarray(x)
    assert a.dtype == x.dtype
    blob = ecf8.jax.encode(a)
    y = ecf8.jax.decode(blob)
    assert y.dtype == a.dtype and y.shape == a.shape
    assert_bit_exact(np.asarray(y), x)
    with pytest.raises(ecf8.UnsupportedError):
        ecf8.jax.decode(blob, out=np.empty(1))


@pytest.mark.parametrize("versioned", [False, True])
def test_dlpack_capsule_retyping(versioned):
    """The typed export rewrites only the dtype code; torch then imports float8/bfloat16 as such."""
    from ecf8.decoder_cuda import DLPACK_CODES, _retype_capsule

    x = weights_like(1000, DTYPES[0])
    b = weights_like(1000, DTYPES[2])
    kwargs = {"max_version": (1, 0)} if versioned else {}
    if versioned and np.lib.NumpyVersion(np.__version__) < "2.1.0":
        pytest.skip("NumPy exports versioned capsules from 2.1 on")
    for arr, name, want in ((x, "float8_e4m3fn", torch.float8_e4m3fn), (b, "bfloat16", torch.bfloat16)):
        capsule = bits(arr).__dlpack__(**kwargs)
        _retype_capsule(capsule, DLPACK_CODES[name])
        t = torch.utils.dlpack.from_dlpack(capsule)
        assert t.dtype == want
        np.testing.assert_array_equal(torch_bits(t), bits(arr).view(np.uint8 if arr.itemsize == 1 else np.int16))


class FP8Linear(torch.nn.Module):
    """Like Transformers' fine-grained FP8 linear: E4M3 weight, 128x128 block scales beside it."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        rows, cols = w.shape
        tiles = w.reshape(rows // 128, 128, cols // 128, 128)
        scale = tiles.abs().amax(dim=(1, 3)) / 448
        q = (tiles / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
        self.weight = torch.nn.Parameter(q, requires_grad=False)
        self.weight_scale_inv = torch.nn.Parameter(scale, requires_grad=False)

    def forward(self, x):
        rows, cols = self.weight.shape
        s = self.weight_scale_inv.repeat_interleave(128, 0).repeat_interleave(128, 1)
        return x @ (self.weight.to(torch.float32) * s).T


def small_model():
    g = torch.Generator().manual_seed(0)
    layers = [torch.nn.Embedding(512, 256)]
    for k in range(10):
        layers += [torch.nn.Linear(256, 256, bias=k % 2 == 0), torch.nn.GELU()]
    model = torch.nn.Sequential(*layers).to(torch.bfloat16).requires_grad_(False)
    return model, torch.randint(0, 512, (4, 16), generator=g)


def test_compress_module_identical_outputs_and_smaller():
    model, ids = small_model()
    before = model(ids)
    weights = {n: p.clone() for n, p in model.named_parameters() if p.dim() == 2}
    original = sum(p.numel() * p.element_size() for p in weights.values())
    assert ecf8.torch.compress_module(model, min_numel=1 << 30).modules == 0
    stats = ecf8.torch.compress_module(model, embeddings=True)
    assert stats.modules == 11 and stats.original_bytes == original
    assert stats.compressed_bytes < 0.75 * original
    assert stats.buffer_bytes == 512 * 256 * 2                       # the largest: the embedding
    assert stats.resident_bytes < 0.9 * original
    assert all(p.dim() == 1 for p in model.parameters())             # only biases stay resident
    after = model(ids)
    assert torch.equal(before.view(torch.int16), after.view(torch.int16))
    assert "weight" not in model[1].__dict__                         # dropped after forward
    assert ecf8.torch.decompress_module(model) == 11
    for name, p in model.named_parameters():
        if name in weights:
            assert torch.equal(p.view(torch.int16), weights[name].view(torch.int16))
    assert torch.equal(model(ids).view(torch.int16), before.view(torch.int16))


def test_compress_module_fp8_linear():
    g = torch.Generator().manual_seed(1)
    layer = torch.nn.Sequential(FP8Linear(torch.randn(256, 384, generator=g) * 0.02),
                                FP8Linear(torch.randn(384, 256, generator=g) * 0.02))
    x = torch.randn(8, 384, generator=g)
    before = layer(x)
    stats = ecf8.torch.compress_module(layer)
    assert stats.modules == 2 and stats.compressed_bytes < stats.original_bytes
    assert isinstance(layer[0].weight_scale_inv, torch.nn.Parameter)   # scales untouched
    assert torch.equal(layer(x), before)
    ecf8.torch.decompress_module(layer)
    assert layer[0].weight.dtype == torch.float8_e4m3fn
    assert torch.equal(layer(x), before)


# --- GPU -----------------------------------------------------------------------------------------

def _torch_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA build of PyTorch and a GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_torch_cuda(dtype):
    _torch_cuda()
    x = weights_like(100_000, dtype).reshape(250, 400)
    blob = ecf8.encode(x)
    y = ecf8.torch.decode(blob, device="cuda")
    assert y.is_cuda and y.dtype == TORCH[dtype] and tuple(y.shape) == x.shape
    np.testing.assert_array_equal(torch_bits(y.cpu()), bits(x).view(np.uint8 if x.itemsize == 1 else np.int16))
    side = torch.cuda.Stream()
    out = torch.full((x.nbytes,), 7, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    y = ecf8.torch.decode(ecf8.to_device(blob), device="cuda", out=out, stream=side)
    side.synchronize()
    assert y.data_ptr() == out.data_ptr()
    np.testing.assert_array_equal(torch_bits(y.cpu()), bits(x).view(np.uint8 if x.itemsize == 1 else np.int16))
    assert_bit_exact(ecf8.decode(ecf8.torch.encode(y)), x)            # encode straight from GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_jax_and_cupy_cuda(dtype):
    import cupy

    import ecf8.cupy

    x = weights_like(50_000, dtype).reshape(100, 500)
    blob = ecf8.encode(x)
    c = ecf8.cupy.decode(blob)
    assert c.shape == x.shape
    assert c.dtype == (np.float16 if dtype == np.float16 else (np.uint8 if x.itemsize == 1 else np.uint16))
    np.testing.assert_array_equal(c.get().view(bits(x).dtype), bits(x))
    names = {DTYPES[0]: "e4m3", DTYPES[1]: "e5m2", DTYPES[2]: "bf16", DTYPES[3]: None}
    assert_bit_exact(ecf8.decode(ecf8.cupy.encode(c, dtype=names[dtype])), x)
    jax = pytest.importorskip("jax")
    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("JAX has no GPU backend here")
    import ecf8.jax

    j = ecf8.jax.decode(blob, device="cuda")
    assert j.dtype == x.dtype and j.shape == x.shape
    assert_bit_exact(np.asarray(j), x)
    del cupy


@pytest.mark.gpu
def test_dlpack_consumer_waits_for_the_decode_stream():
    """The decode is queued behind a ~0.2 s spin on its stream; a consumer on another stream must
    still see the decoded bytes: CudaArray.__dlpack__ makes the consumer's stream wait."""
    _torch_cuda()
    import cupy

    spin = spin_kernel()
    x = weights_like(1 << 22, DTYPES[0])
    dt = ecf8.to_device(ecf8.encode(x))
    out = cupy.zeros(x.size, cupy.uint8)
    cupy.cuda.Device().synchronize()
    producer = cupy.cuda.Stream(non_blocking=True)
    with producer:
        spin((1,), (1,), (np.int64(400_000_000),))
    y = ecf8.decode(dt, device="cuda", out=out, stream=producer)
    consumer = torch.cuda.Stream()
    with torch.cuda.stream(consumer):
        assert not producer.done                       # the decode has not run yet
        copy = torch.from_dlpack(y).clone()            # enqueued on the consumer stream
    consumer.synchronize()
    np.testing.assert_array_equal(copy.cpu().numpy(), bits(x))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [DTYPES[0], DTYPES[2]], ids=lambda d: d.name)
def test_bytes_decoded_on_another_stream_than_their_upload(dtype):
    """ecf8.torch.decode of bytes under a side stream uploads them on CuPy's current stream (the
    legacy default stream), which torch's side streams do not wait for: with a spin queued there
    first, a small copy left in flight would still be waiting behind it when the decode on the side
    stream read its memory.  Uploads are done when they return."""
    _torch_cuda()
    spin = spin_kernel()
    x = weights_like(1 << 14, dtype)                   # a frame of a few KB: staged without waiting
    blob = ecf8.encode(x)
    ecf8.torch.decode(blob, "cuda")                    # kernels compiled first
    side = torch.cuda.Stream()
    for _ in range(3):
        spin((1,), (1,), (np.int64(200_000_000),))     # on CuPy's current (legacy default) stream
        with torch.cuda.stream(side):
            y = ecf8.torch.decode(blob, "cuda")
            got = y.view(torch.uint8 if y.element_size() == 1 else torch.uint16).cpu()
        np.testing.assert_array_equal(got.numpy().reshape(-1), bits(x).reshape(-1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [DTYPES[0], DTYPES[2]], ids=lambda d: d.name)
def test_bytes_decoded_on_a_given_stream_hold_their_upload_until_the_decode(dtype):
    """ecf8.torch.decode(bytes, stream=side) with the side stream behind a spin returns before the
    decode runs and drops its upload; memory that torch then hands out on the current stream and
    overwrites must not be the upload the queued decode will read."""
    _torch_cuda()
    import cupy

    spin = spin_kernel()
    x = weights_like(1 << 20, dtype)
    blob = ecf8.encode(x)
    ecf8.torch.decode(blob, "cuda")                    # kernels compiled first
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    for _ in range(3):
        spin((1,), (1,), (np.int64(200_000_000),), stream=cupy.cuda.ExternalStream(side.cuda_stream))
        y = ecf8.torch.decode(blob, "cuda", stream=side)
        assert not side.query()                        # the decode is still queued
        junk = [torch.full((len(blob),), 255, dtype=torch.uint8, device="cuda") for _ in range(4)]
        side.synchronize()
        got = y.view(torch.uint8 if y.element_size() == 1 else torch.uint16).cpu()
        np.testing.assert_array_equal(got.numpy().reshape(-1), bits(x).reshape(-1))
        del junk


@pytest.mark.gpu
def test_cupy_decode_holds_the_compressed_tensor_it_reads():
    """ecf8.cupy.decode of a DeviceTensor on a stream behind a spin, the DeviceTensor then dropped
    and its memory handed out again and overwritten: the queued decode still reads the frame."""
    import cupy

    import ecf8.cupy

    spin = spin_kernel()
    x = weights_like(1 << 20, DTYPES[0])
    blob = ecf8.encode(x)
    ecf8.cupy.decode(blob)                             # kernels compiled first
    side = cupy.cuda.Stream(non_blocking=True)
    for _ in range(3):
        dt = ecf8.to_device(blob)
        cupy.cuda.Device().synchronize()
        with side:
            spin((1,), (1,), (np.int64(200_000_000),))
        y = ecf8.cupy.decode(dt, stream=side)
        assert not side.done
        del dt
        junk = [cupy.full(len(blob) + k, 255, cupy.uint8) for k in range(4)]
        side.synchronize()
        np.testing.assert_array_equal(y.get().reshape(-1), bits(x).reshape(-1))
        del junk


@pytest.mark.gpu
def test_compress_module_cuda():
    _torch_cuda()
    model, ids = small_model()
    model, ids = model.cuda(), ids.cuda()
    before = model(ids)
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    stats = ecf8.torch.compress_module(model)
    assert stats.modules == 10                                  # the embedding is opt-in
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() < allocated          # weights freed, buffer + frames on GPU
    after = model(ids)
    assert torch.equal(before.view(torch.int16), after.view(torch.int16))
    assert stats.resident_bytes < stats.original_bytes
    graph = torch.cuda.CUDAGraph()                             # decode-in-forward is capturable
    with torch.cuda.graph(graph):
        captured = model(ids)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured.view(torch.int16), before.view(torch.int16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_typed_dlpack_export(dtype):
    """logical() exports the element type itself: torch imports FP8/BF16/FP16 without a view."""
    _torch_cuda()
    x = weights_like(40_000, dtype).reshape(200, 200)
    y = ecf8.decode(ecf8.encode(x), device="cuda")
    t = torch.from_dlpack(y.logical())
    assert t.dtype == TORCH[dtype] and tuple(t.shape) == x.shape
    np.testing.assert_array_equal(torch_bits(t.cpu()), bits(x).view(np.uint8 if x.itemsize == 1 else np.int16))
    assert torch.from_dlpack(y).dtype in (torch.uint8, torch.uint16)     # the default: bits
