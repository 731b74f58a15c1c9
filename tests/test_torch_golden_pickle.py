"""Compatibility: a compressed PyTorch model pickled by an earlier ecf8 (tests/golden/torch-module.pt,
written by tests/golden/make_golden_torch.py) still loads, stays compressed and computes the same
bits."""

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import ecf8.torch  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"


def test_golden_pickle_of_compressed_model_loads_and_runs_bit_identically():
    import sys

    sys.path.insert(0, str(GOLDEN))
    try:
        from make_golden_torch import outputs
    finally:
        sys.path.remove(str(GOLDEN))
    model = torch.load(GOLDEN / "torch-module.pt", weights_only=False)
    expected = torch.load(GOLDEN / "torch-module.expected.pt", weights_only=True)
    assert all(ecf8.torch.is_compressed(model[k]) for k in ("fp8", "fp16", "embed", "head"))
    assert ecf8.torch.is_compressed(model["mlp"][0]) and ecf8.torch.is_compressed(model["mlp"][2])
    assert model["head"].__dict__["_ecf8"] is model["embed"].__dict__["_ecf8"]
    got = outputs(model)
    assert set(got) == set(expected)
    for key, e in expected.items():
        assert got[key].dtype == e.dtype and got[key].shape == e.shape, key
        assert torch.equal(got[key].view(torch.uint8), e.view(torch.uint8)), key
    assert ecf8.torch.decompress_module(model) == 6
    for key, e in outputs(model).items():
        assert torch.equal(e.view(torch.uint8), expected[key].view(torch.uint8)), key
