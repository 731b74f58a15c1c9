"""Exact GPU allocations, for runs under compute-sanitizer's memcheck.

memcheck reports an access past a buffer's end only when no other allocation lies there, but CuPy's
memory pool and torch's caching allocator carve buffers out of larger blocks (CuPy rounds up to 512
bytes and splits cached blocks; torch serves small tensors from 2 MiB segments), so an overrun that
stays inside the block goes unseen.  Importing this module, before torch, turns both caches off:
every buffer is then its own cudaMalloc of its own size.  The sanitizer scripts in bench/ import it;
the test suite does the same when ``ECF8_EXACT_ALLOCATIONS=1`` (tests/conftest.py).
"""

import os

os.environ["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"      # read when torch first allocates on a GPU

import cupy  # noqa: E402

cupy.cuda.set_allocator(None)
