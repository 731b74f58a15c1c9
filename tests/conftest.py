"""Shared fixtures: hypothesis profiles, real weights (bundled, and the optional shared set), the GPU
marker."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SHARED_DATA = Path(os.environ.get("ECF8_SHARED_DATA",
                                  Path(__file__).resolve().parents[2] / "shared" / "data"))


def cuda_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def pytest_configure(config):
    """``ECF8_EXACT_ALLOCATIONS=1``: CuPy's pool and torch's cache off, for runs under memcheck
    (bench/exact_memory.py says why)."""
    if os.environ.get("ECF8_EXACT_ALLOCATIONS") == "1" and cuda_available():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
        import exact_memory  # noqa: F401  (importing it turns the caches off)


def pytest_collection_modifyitems(config, items):
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs CuPy and a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def real_weights() -> dict[str, dict[str, np.ndarray]]:
    """Real trained weights on every clone: the sample bundled in ecf8/data (all-MiniLM-L6-v2
    encoder.layer.0, see its README.md), read through ecf8's own loader (``bench_cli.sample_paths``).

    ``{"e4m3": six float8_e4m3fn linears (4 x 384x384, 1536x384, 384x1536; block-128 scaled),
    "bf16": four bfloat16 384x384 attention weights}``, each ``{tensor name: array}`` in file order;
    arrays are read-only copies (copy before writing).  Never skips.
    """
    from ecf8.bench_cli import sample_paths
    from ecf8.safetensors_io import iter_tensors
    from ecf8.names import short_name

    out: dict[str, dict[str, np.ndarray]] = {}
    for path in sample_paths():
        for e in iter_tensors(path):
            x = np.array(e.array)
            x.flags.writeable = False
            out.setdefault(short_name(e.dtype), {})[e.name] = x
    return out


SHARED_FILES = ("minilm-layer0-fp8-e4m3fn-block128.npz", "minilm-layer0-bf16.npz")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The optional real-weight set's folder (../shared/data or $ECF8_SHARED_DATA), for what the
    bundled ``real_weights`` lacks (the two BF16 MLP weights) and for checking the bundle against
    it; a skip (not an error) when the folder or one of its files is missing."""
    missing = [f for f in SHARED_FILES if not (SHARED_DATA / f).is_file()]
    if missing:
        pytest.skip(f"real weight samples {', '.join(missing)} not found in {SHARED_DATA} (set ECF8_SHARED_DATA)")
    return SHARED_DATA
