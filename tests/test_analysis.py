"""ecf8 analyze: entropies and the tail fit on known distributions, the JSON schema, plots, errors."""

import json
import math
import sys

import ml_dtypes
import numpy as np
import pytest

from ecf8 import format as fmt
from ecf8.analysis import analyze_tensor, entropy_bits, fit_alpha, model_probabilities
from ecf8.checkpoint import write_safetensors
from ecf8.cli import main
from helpers import weights_like

E4M3, BF16 = fmt.DTYPES[1], fmt.DTYPES[3]


def fp8_with_exponent_counts(counts, seed=0):
    """E4M3 elements whose exponent fields have exactly `counts`, random sign and mantissa."""
    rng = np.random.default_rng(seed)
    exp = np.repeat(np.arange(len(counts)), counts).astype(np.uint8)
    rng.shuffle(exp)
    u = (exp << 3) | rng.integers(0, 8, exp.size, dtype=np.uint8) | (rng.integers(0, 2, exp.size, dtype=np.uint8) << 7)
    u[(u & 0x7F) == 0x7F] ^= 1            # keep NaN out: it would sit in the top exponent anyway
    return u.view(ml_dtypes.float8_e4m3fn)


def test_entropy_exact_values():
    assert entropy_bits(np.array([1, 1, 1, 1])) == pytest.approx(2.0)
    assert entropy_bits(np.array([5, 0, 0])) == 0.0
    assert entropy_bits(np.array([1, 2, 1])) == pytest.approx(1.5)
    assert entropy_bits(np.zeros(3)) == 0.0


@pytest.mark.parametrize("alpha", [1.2, 2.0, 3.5])
def test_alpha_recovered_from_exact_geometric_histogram(alpha):
    p = model_probabilities(alpha, 9, E4M3)
    counts = np.round(p * 2**40).astype(np.int64)
    est, mode = fit_alpha(counts, E4M3)
    assert mode == 9
    assert est == pytest.approx(alpha, abs=1e-6)
    assert entropy_bits(counts) == pytest.approx(entropy_bits(p), abs=1e-9)


@pytest.mark.parametrize("alpha", [1.5, 2.5])
def test_alpha_and_entropy_from_sampled_exponents(alpha):
    """Exponents drawn from a two-sided geometric law with known ratios."""
    p = model_probabilities(alpha, 10, E4M3)
    counts = np.random.default_rng(1).multinomial(2_000_000, p)
    x = fp8_with_exponent_counts(counts)
    r = analyze_tensor("t", x, "F8_E4M3")
    assert r.alpha == pytest.approx(alpha, abs=0.05)
    assert r.exponent_entropy_bits == pytest.approx(entropy_bits(p), abs=0.005)
    assert r.model_exponent_entropy_bits == pytest.approx(entropy_bits(p), abs=0.02)
    assert r.raw_entropy_bits == pytest.approx(4.0, abs=0.01)       # uniform sign and mantissa
    assert r.ecf8_bound_bits_per_weight == pytest.approx(r.exponent_entropy_bits + 4)
    assert r.achieved_bits_per_weight >= r.order0_bound_bits_per_weight - 1e-9


def test_exponent_entropy_matches_an_independent_computation():
    """Exponents recomputed from the values with frexp agree with the bit-field histogram."""
    x = weights_like(300_000, ml_dtypes.float8_e4m3fn, seed=3)
    v = x.astype(np.float64)
    mant, e2 = np.frexp(np.abs(v))
    biased = np.where(np.abs(v) >= 2.0**-6, e2 + 6, 0)   # E4M3 bias 7: |v| in [2^(b-7), 2^(b-6))
    h = 0.0
    for count in np.unique(biased, return_counts=True)[1]:
        q = count / v.size
        h -= q * math.log2(q)
    assert analyze_tensor("t", x, "F8_E4M3").exponent_entropy_bits == pytest.approx(h, abs=1e-9)


def test_too_short_tail_gives_no_alpha():
    counts = np.zeros(16, np.int64)
    counts[14], counts[15] = 1000, 3
    assert math.isnan(fit_alpha(counts, E4M3)[0])
    r = analyze_tensor("t", fp8_with_exponent_counts(counts), "F8_E4M3")
    assert r.alpha is not None and math.isnan(r.alpha) and r.as_json()["alpha"] is None


@pytest.fixture
def checkpoint(tmp_path):
    tensors = {
        "layer.0.weight": weights_like(64 * 256, ml_dtypes.float8_e4m3fn).reshape(64, 256),
        "layer.0.weight_scale_inv": np.ones((1, 2), np.float32),
        "norm.weight": weights_like(256, ml_dtypes.bfloat16),
        "embed.weight": weights_like(100 * 64, ml_dtypes.bfloat16).reshape(100, 64),
        "position_ids": np.arange(8, dtype=np.int64),
    }
    path = tmp_path / "model.safetensors"
    write_safetensors(tensors, path)
    return path, tensors


def test_json_schema(checkpoint, capsys):
    path, tensors = checkpoint
    assert main(["analyze", str(path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(tensors)
    for r in rows:
        assert {"name", "dtype", "numel", "exponent_entropy_bits", "achieved_bits_per_weight",
                "verdict"} <= set(r)
        assert r["numel"] == tensors[r["name"]].size
    by = {r["name"]: r for r in rows}
    assert by["layer.0.weight"]["dtype"] == "F8_E4M3" and by["layer.0.weight"]["verdict"] == "compress"
    assert 2.0 < by["layer.0.weight"]["exponent_entropy_bits"] < 3.5
    assert by["position_ids"]["exponent_entropy_bits"] is None
    assert by["position_ids"]["verdict"].startswith("keep")


def test_table_threshold_and_npy(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    assert main(["analyze", str(path), "--threshold", "99"]) == 0
    out = capsys.readouterr().out
    assert "store raw" in out and "total (coded tensors)" in out
    np.save(tmp_path / "w.npy", weights_like(5000, ml_dtypes.float8_e4m3fn))
    assert main(["analyze", str(tmp_path / "w.npy"), "--dtype", "e4m3"]) == 0
    assert "F8_E4M3" in capsys.readouterr().out


def test_plot_is_written(checkpoint, tmp_path):
    pytest.importorskip("matplotlib")
    path, _ = checkpoint
    assert main(["analyze", str(path), "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_what_to_install(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path, _ = checkpoint
    assert main(["analyze", str(path), "--plot", str(tmp_path / "p.png")]) == 1
    assert "pip install 'ecf8[plot]'" in capsys.readouterr().err


def test_unreadable_input(tmp_path, capsys):
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    for argv in (["analyze", str(tmp_path / "missing.safetensors")],
                 ["analyze", str(tmp_path / "junk.safetensors")],
                 ["analyze", str(tmp_path)]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("ecf8: error:") and err.count("\n") == 1
