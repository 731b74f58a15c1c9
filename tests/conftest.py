"""Shared fixtures: hypothesis profiles, real-data location, the GPU marker."""

import os
from pathlib import Path

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


def pytest_collection_modifyitems(config, items):
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs CuPy and a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


SHARED_FILES = ("minilm-layer0-fp8-e4m3fn-block128.npz", "minilm-layer0-bf16.npz")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-weight samples' folder; a skip (not an error) when it or one of its files is missing."""
    missing = [f for f in SHARED_FILES if not (SHARED_DATA / f).is_file()]
    if missing:
        pytest.skip(f"real weight samples {', '.join(missing)} not found in {SHARED_DATA} (set ECF8_SHARED_DATA)")
    return SHARED_DATA
