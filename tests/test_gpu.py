"""GPU: the CUDA decoder equals the NumPy reference byte for byte; launch-only decoding.

Marked ``gpu``: skipped without CuPy and a CUDA device (run ``pytest -m gpu`` on a GPU machine).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ecf8
from helpers import DTYPES, assert_bit_exact, bits, from_bits, garbage_payload, uint_of, weights_like

pytestmark = pytest.mark.gpu

EDGE_LENGTHS = [1, 2, 15, 16, 17, 511, 512, 513, 4095, 4096, 4097, 32767, 32768, 32769, 100_003]


def gpu_roundtrip(x, **options):
    blob = ecf8.encode(x, **options)
    y = ecf8.decode(blob, device="cuda")
    assert y.shape == x.shape and y.dtype == x.dtype
    host = y.get()
    assert_bit_exact(host, ecf8.decode(blob))
    assert_bit_exact(host, x)
    return blob


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("n", EDGE_LENGTHS)
def test_lengths(dtype, n):
    gpu_roundtrip(weights_like(n, dtype, seed=n), chunk_size=4096, allow_stored=False)
    u = np.random.default_rng(n).integers(0, 1 << (8 * dtype.itemsize), n).astype(uint_of(dtype))
    gpu_roundtrip(from_bits(u, dtype), chunk_size=512, allow_stored=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape", [(), (0,), (5, 0), (3, 7, 11), (1000, 384)])
def test_shapes_and_stored(dtype, shape):
    x = weights_like(int(np.prod(shape)), dtype).reshape(shape)
    gpu_roundtrip(x)                                 # small ones are stored: a device copy
    if x.size:
        gpu_roundtrip(x, allow_stored=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_arbitrary_bit_patterns(dtype, data):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=600))
    x = data.draw(hnp.arrays(uint_of(dtype), shape)).view(dtype)
    gpu_roundtrip(x, chunk_size=data.draw(st.sampled_from([512, 2048, 32768])),
                  max_tables=data.draw(st.integers(1, 8)), allow_stored=False)


def test_all_fp8_and_16bit_codes():
    for dtype in DTYPES[:2]:
        gpu_roundtrip(np.arange(256, dtype=np.uint8).repeat(129).view(dtype), allow_stored=False)
    for dtype in DTYPES[2:]:
        gpu_roundtrip(np.arange(1 << 16, dtype=np.uint16).view(dtype), chunk_size=2048,
                      allow_stored=False)


def test_real_weights(real_weights):
    for tensors in real_weights.values():
        for x in tensors.values():
            gpu_roundtrip(x)


def test_out_stream_and_device_resident():
    import cupy

    x = weights_like(300_000, DTYPES[0]).reshape(600, 500)
    dt = ecf8.to_device(ecf8.encode(x))
    out = cupy.full(x.size, 0xAB, cupy.uint8)      # poisoned: every byte must be written
    stream = cupy.cuda.Stream(non_blocking=True)
    cupy.cuda.Device().synchronize()               # the fill ran on another stream
    y = ecf8.decode(dt, device="cuda", out=out, stream=stream)
    stream.synchronize()
    assert y.bits.data.ptr == out.data.ptr
    np.testing.assert_array_equal(out.get(), bits(x).reshape(-1))

    class Foreign:                                 # any object with __cuda_stream__
        def __cuda_stream__(self):
            return (0, stream.ptr)

    for s in (stream.ptr, Foreign(), None):
        out.fill(0)
        cupy.cuda.Device().synchronize()
        ecf8.decode(dt, device="cuda", out=out, stream=s)
        cupy.cuda.Device().synchronize()
        np.testing.assert_array_equal(out.get(), bits(x).reshape(-1))


def test_out_through_dlpack_only():
    import cupy

    x = weights_like(50_000, DTYPES[2])
    dt = ecf8.to_device(ecf8.encode(x))
    target = cupy.zeros(x.size, cupy.uint16)

    class DLPackOnly:                              # a foreign array exposing DLPack alone
        def __dlpack__(self, **kwargs):
            return target.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return target.__dlpack_device__()

    ecf8.decode(dt, device="cuda", out=DLPackOnly())
    cupy.cuda.Device().synchronize()
    np.testing.assert_array_equal(target.get(), bits(x))


def test_bad_out_rejected():
    import cupy

    dt = ecf8.to_device(ecf8.encode(weights_like(10_000, DTYPES[2]), allow_stored=False))
    for out in (cupy.empty(9_999, cupy.uint16), cupy.empty(20_000, cupy.uint8)[1:]):
        with pytest.raises(ecf8.UnsupportedError):
            ecf8.decode(dt, device="cuda", out=out)
    with pytest.raises(ecf8.UnsupportedError):
        ecf8.decode(dt, device="cuda", out=np.empty(10_000, np.uint16))


def test_cuda_graph_capture_and_replay():
    """Decoding a DeviceTensor into `out` is launch-only, so it can be captured in a graph."""
    import cupy

    x = weights_like(1 << 20, DTYPES[0])
    dt = ecf8.to_device(ecf8.encode(x))
    out = cupy.zeros(x.size, cupy.uint8)
    ecf8.decode(dt, device="cuda", out=out)        # compile outside the capture
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        ecf8.decode(dt, device="cuda", out=out, stream=stream)
        graph = stream.end_capture()
    out.fill(0)
    cupy.cuda.Device().synchronize()
    graph.launch(stream)
    stream.synchronize()
    np.testing.assert_array_equal(out.get(), bits(x))


def test_batched_decode_one_launch():
    import cupy

    from ecf8.decoder_cuda import BatchDecoder

    for dtype in DTYPES:
        xs = [weights_like(n, dtype, seed=n) for n in (1, 5000, 70_000, 4096 * 33 + 5, 200_000)]
        tensors = [ecf8.to_device(ecf8.encode(x, chunk_size=4096)) for x in xs]
        assert any(t.frame.mode == 1 for t in tensors) and any(t.frame.mode == 0 for t in tensors)
        outs = [cupy.full(x.size, 0x5A, uint_of(dtype)) for x in xs]
        batch = BatchDecoder(tensors, outs)
        assert batch.ntensors == sum(t.frame.mode == 0 for t in tensors)
        results = batch.run()
        cupy.cuda.Device().synchronize()
        for x, y in zip(xs, results):
            assert_bit_exact(y.get(), x)


def test_group_decode_into_any_buffer():
    """GroupDecoder: one launch writes every tensor at its offset of whichever buffer it is given;
    the bytes between and after the tensors are left alone."""
    import cupy

    from ecf8.decoder_cuda import GroupDecoder

    for dtype in DTYPES:
        xs = [weights_like(n, dtype, seed=n) for n in (5000, 1, 4096 * 33 + 5, 70_000)]
        tensors = [ecf8.to_device(ecf8.encode(x, chunk_size=4096)) for x in xs]
        width = xs[0].itemsize
        offsets = list(np.cumsum([0] + [-(-x.size * width // 256) * 256 + 256 for x in xs[:-1]]))
        group = GroupDecoder(tensors, offsets)
        size = offsets[-1] + xs[-1].size * width + 64
        for fill in (0x11, 0xEE):                 # two buffers, one GroupDecoder
            buf = cupy.full(size, fill, np.uint8)
            group.launch(buf.data.ptr)
            cupy.cuda.Device().synchronize()
            host = buf.get()
            covered = np.zeros(size, bool)
            for x, at in zip(xs, offsets):
                np.testing.assert_array_equal(host[at : at + x.size * width].view(uint_of(dtype)),
                                              bits(x).reshape(-1))
                covered[at : at + x.size * width] = True
            assert (host[~covered] == fill).all()


def test_garbage_payload_stays_in_bounds():
    """Checksums off and a random payload: decoding finishes and writes only `out`."""
    import cupy

    x = weights_like(1 << 18, DTYPES[0])
    blob = garbage_payload(ecf8.encode(x, chunk_size=4096))
    with pytest.raises(ecf8.CorruptDataError):
        ecf8.to_device(blob)
    dt = ecf8.to_device(blob, verify=False)
    guard = cupy.full(x.size + 4096, 0x77, cupy.uint8)
    ecf8.decode(dt, device="cuda", out=guard[:x.size])
    cupy.cuda.Device().synchronize()
    assert bool((guard[x.size:] == 0x77).all())
    assert_bit_exact(ecf8.decode(dt, device="cuda").get(), ecf8.decode(blob, verify=False))


def test_dlpack_and_cuda_array_interface():
    import cupy

    x = weights_like(4096, DTYPES[0]).reshape(64, 64)
    y = ecf8.decode(ecf8.encode(x), device="cuda")
    assert y.__dlpack_device__()[0] == 2                         # kDLCUDA
    via_dlpack = cupy.from_dlpack(y)
    assert via_dlpack.dtype == cupy.uint8 and via_dlpack.shape == (64, 64)
    np.testing.assert_array_equal(via_dlpack.get(), bits(x))
    via_cai = cupy.asarray(y)
    np.testing.assert_array_equal(via_cai.get(), bits(x))
    try:
        import torch
    except ImportError:
        return
    t = torch.from_dlpack(y).view(torch.float8_e4m3fn)
    np.testing.assert_array_equal(t.view(torch.uint8).cpu().numpy(), bits(x))


def test_load_file_on_gpu(tmp_path):
    """Compressed checkpoints load straight to the GPU, decoded or still compressed."""
    from ecf8.safetensors_io import write_safetensors
    from ecf8.compressed import compress_file

    tensors = {"w": weights_like(100_000, DTYPES[0]).reshape(250, 400),
               "b": weights_like(400, DTYPES[2]),
               "ids": np.arange(1000, dtype=np.int64)}
    write_safetensors(tensors, tmp_path / "m.safetensors")
    compress_file(tmp_path / "m.safetensors", tmp_path / "c.safetensors", jobs=1)
    decoded = ecf8.load_file(tmp_path / "c.safetensors", device="cuda")
    for name, x in tensors.items():
        assert_bit_exact(decoded[name].get(), x)
    lazy = ecf8.load_file(tmp_path / "c.safetensors", device="cuda", compressed=True)
    assert isinstance(lazy["w"], ecf8.DeviceTensor)
    assert_bit_exact(ecf8.decode(lazy["w"], device="cuda").get(), tensors["w"])
    assert_bit_exact(lazy["ids"].get(), tensors["ids"])
