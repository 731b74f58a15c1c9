"""A decoded GPU array exported through DLPack stays valid and bit-exact when everything that
produced it is gone before the consumer reads it: the CudaArray, the compressed DeviceTensor the
kernel reads, the producer stream (a CuPy stream, or a torch stream passed as a raw handle, whose
ecf8 wrapper is dropped too), with the decode still queued behind a spin on that stream, and the
GPU memory pool busy handing out (and overwriting) freed blocks meanwhile.  The frame goes up
with ``to_device`` before the spin (an upload from pageable host memory waits for the stream's
earlier work, so ``ecf8.decode`` of bytes would wait out the spin instead of queueing behind it).

Marked ``gpu``: skipped without CuPy, a CUDA build of PyTorch and a GPU.
"""

import gc

import numpy as np
import pytest

import ecf8
from helpers import DTYPES, bits, spin_kernel, weights_like

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")

def _churn(cupy, nbytes: int) -> None:
    """Allocate, fill and free blocks of every size near nbytes on the current and the null stream:
    memory the pool got back too early would be handed out here and overwritten."""
    for size in (nbytes, nbytes // 2, nbytes * 2, 1 << 20):
        for _ in range(4):
            cupy.full(max(size, 1), 0xA5, cupy.uint8)
    with cupy.cuda.Stream.null:
        for _ in range(4):
            cupy.full(max(nbytes, 1), 0x5A, cupy.uint8)


@pytest.mark.parametrize("producer_kind", ["cupy-stream", "torch-handle"])
@pytest.mark.parametrize("dtype", [DTYPES[0], DTYPES[2]], ids=lambda d: d.name)
def test_dlpack_export_outlives_its_producer(producer_kind, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA build of PyTorch and a GPU")
    import cupy
    from ecf8 import gpu
    from ecf8.decoder_cuda import to_device

    x = weights_like(1 << 22, dtype)
    expected, blob = bits(x), ecf8.encode(x)
    spin = spin_kernel()
    ecf8.decode(blob, device="cuda")                       # kernels compiled before the spin starts
    dt = to_device(blob)                                   # the compressed bytes, up before the spin
    consumer = torch.cuda.Stream()                         # (torch's CUDA start-up, before the spin too)
    torch.from_dlpack(ecf8.decode(dt, device="cuda"))
    spin((1,), (1,), (np.int64(1000),))
    cupy.cuda.Device().synchronize()
    if producer_kind == "cupy-stream":
        producer = cupy.cuda.Stream(non_blocking=True)
        handle, cupy_stream = producer, producer
    else:
        producer = torch.cuda.Stream()
        handle = producer.cuda_stream                      # an int: ecf8 wraps it itself
        cupy_stream = cupy.cuda.ExternalStream(handle)
    with cupy_stream:
        spin((1,), (1,), (np.int64(2_000_000_000),))       # ~1 s: the decode stays queued
    del cupy_stream
    y = ecf8.decode(dt, device="cuda", stream=handle)     # no out=: ecf8 allocates it
    with torch.cuda.stream(consumer):
        t = torch.from_dlpack(y)                           # the consumer waits for the decode
    pending = not (producer.done if producer_kind == "cupy-stream" else producer.query())
    del y, dt, handle, producer                            # the CudaArray, the DeviceTensor, the stream
    gpu._external_streams.clear()                 # (ecf8's cached wrapper of a raw handle)
    gc.collect()
    _churn(cupy, x.nbytes)
    with torch.cuda.stream(consumer):
        copy = t.clone()
    consumer.synchronize()
    assert pending, "the spin ended before the producer was dropped: the test proved nothing"
    got = copy.cpu().reshape(-1).view(torch.uint8).numpy()
    np.testing.assert_array_equal(got, expected.reshape(-1).view(np.uint8))
