"""ecf8 analyze: entropies and the tail fit on known distributions, the JSON schema, plots, errors."""

import json
import math
import sys

import ml_dtypes
import numpy as np
import pytest

from ecf8 import format as fmt
from ecf8.analysis import analyze_tensor, entropy_bits, fit_alpha, model_probabilities
from ecf8.safetensors_io import write_safetensors
from ecf8 import compressed
from ecf8.analyze_cli import tensors_of
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
    assert r.codec == "ecf8"
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
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"path", "compressed_input", "notes", "tensors", "total", "answer"}
    rows = doc["tensors"]
    assert [r["name"] for r in rows] == list(tensors)
    for r in rows:
        assert {"name", "dtype", "shape", "numel", "codec", "original_bytes", "stored_bytes", "saving",
                "exponent_entropy_bits", "achieved_bits_per_weight"} <= set(r)
        assert r["numel"] == tensors[r["name"]].size and r["shape"] == list(tensors[r["name"]].shape)
    by = {r["name"]: r for r in rows}
    assert by["layer.0.weight"]["dtype"] == "F8_E4M3" and by["layer.0.weight"]["codec"] == "ecf8"
    assert 2.0 < by["layer.0.weight"]["exponent_entropy_bits"] < 3.5
    assert by["position_ids"]["exponent_entropy_bits"] is None
    total = doc["total"]
    assert total["tensors"] == len(tensors) and total["numel"] == sum(x.size for x in tensors.values())
    assert total["original_bytes"] == sum(x.nbytes for x in tensors.values())
    assert total["stored_bytes"] == sum(r["stored_bytes"] for r in rows)
    assert total["codecs"] == {c: sum(r["codec"] == c for r in rows) for c in ("ecf8", "zstd", "none")}
    assert doc["compressed_input"] is False and doc["answer"].startswith("compress: ")


def test_verdicts_are_what_compress_does(tmp_path, capsys):
    """Every tensor's codec and stored size in analyze equal those of the compressed file."""
    rng = np.random.default_rng(5)
    tensors = {
        "fp8": weights_like(64 * 256, ml_dtypes.float8_e4m3fn).reshape(64, 256),
        "bf16": weights_like(5000, ml_dtypes.bfloat16),
        "bf16_noise": rng.integers(0, 2**16, 4096, dtype=np.uint16).view(ml_dtypes.bfloat16),  # not codable
        "fp16_zeros": np.zeros(4096, np.float16),
        "ids": np.arange(4096, dtype=np.int64),                 # zstd
        "noise32": rng.standard_normal(2048).astype(np.float32),  # zstd saves too little: kept
        "tiny": np.ones(3, np.float32),                         # too small for zstd
        "empty": np.zeros((0, 4), ml_dtypes.bfloat16),
    }
    src, dst = tmp_path / "m.safetensors", tmp_path / "c.safetensors"
    write_safetensors(tensors, src)
    assert main(["compress", str(src), "-o", str(dst), "-j", "1", "-q", "--zstd-level", "5"]) == 0
    stored = {r.name: (r.codec, r.stored_bytes) for r in compressed.inspect_file(dst)}
    assert main(["analyze", str(src), "--json", "--zstd-level", "5"]) == 0
    got = {r["name"]: (r["codec"], r["stored_bytes"]) for r in json.loads(capsys.readouterr().out)["tensors"]}
    assert got == stored
    assert {c for c, _ in got.values()} == {"ecf8", "zstd", "none"}


def test_table_totals_answer_and_npy(checkpoint, tmp_path, capsys):
    path, tensors = checkpoint
    assert main(["analyze", str(path)]) == 0
    out = capsys.readouterr().out
    total = next(l for l in out.splitlines() if l.startswith("total"))
    assert f"{sum(x.size for x in tensors.values()):,}" in total
    assert "Worth it at --threshold 5%: yes" in out
    assert main(["analyze", str(path), "--threshold", "99"]) == 0
    assert "Worth it at --threshold 99%: no" in capsys.readouterr().out
    np.save(tmp_path / "w.npy", weights_like(5000, ml_dtypes.float8_e4m3fn))
    assert main(["analyze", str(tmp_path / "w.npy"), "--dtype", "e4m3"]) == 0
    assert "F8_E4M3" in capsys.readouterr().out


def test_fp32_checkpoint_says_only_zstd_acts(tmp_path, capsys):
    path = tmp_path / "f32.safetensors"
    write_safetensors({"w": np.arange(10_000, dtype=np.float32)}, path)
    assert main(["analyze", str(path)]) == 0
    assert "nothing is entropy-coded" in capsys.readouterr().out


def test_compressed_input_is_recognised(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    compressed.compress_file(path, tmp_path / "c.safetensors", jobs=1, progress=False)
    assert main(["analyze", str(path), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["analyze", str(tmp_path / "c.safetensors"), "--json"]) == 0
    packed = json.loads(capsys.readouterr().out)
    assert packed["compressed_input"] is True and "ecf8-compressed checkpoint" in packed["notes"][0]
    assert packed["tensors"] == plain["tensors"] and packed["total"] == plain["total"]
    assert main(["analyze", str(tmp_path / "c.safetensors")]) == 0
    assert "analysing its restored content" in capsys.readouterr().out


def test_tensor_detail_without_plot(checkpoint, capsys):
    path, tensors = checkpoint
    assert main(["analyze", str(path), "--tensor", "layer.0.weight"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("layer.0.weight: F8_E4M3 [64, 256], 16,384 elements")
    assert "compress stores it as ecf8" in out and "tail index alpha" in out
    counts = analyze_tensor("x", tensors["layer.0.weight"], "F8_E4M3").exponent_counts
    shown = {int(l.split()[0]): int(l.split("  ")[-2].replace(",", "").split()[-1])
             for l in out.splitlines() if l.strip() and l.split()[0].isdigit()}
    assert shown == {e: c for e, c in enumerate(counts) if min(i for i, v in enumerate(counts) if v) <= e
                     <= max(i for i, v in enumerate(counts) if v)}
    assert main(["analyze", str(path), "--tensor", "position_ids"]) == 0
    assert "no exponent statistics" in capsys.readouterr().out
    assert main(["analyze", str(path), "--tensor", "nope"]) == 1
    err = capsys.readouterr().err
    assert "no tensor named 'nope'" in err and str(path) in err


def test_plot_is_written(checkpoint, tmp_path):
    pytest.importorskip("matplotlib")
    path, _ = checkpoint
    assert main(["analyze", str(path), "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_names_tensors_and_dtypes(checkpoint):
    pytest.importorskip("matplotlib")
    from ecf8.analyze_cli import figure, short_label

    path, tensors = checkpoint
    reports = [analyze_tensor(n, x, d) for n, d, x in tensors_of(path)]
    fig = figure(reports)
    left, right = fig.axes
    labels = [t.get_text() for t in left.get_xticklabels()]
    assert labels == ["layer.0", "norm", "embed"]
    legend = " ".join(t.get_text() for t in left.get_legend().get_texts())
    assert "F8_E4M3" in legend and "BF16" in legend and "achieved" in legend and "entropy" in legend
    assert "F8_E4M3" in right.get_title() and "layer.0.weight" in right.get_title()
    assert any("alpha is the tail index" in t.get_text() for t in fig.texts)
    share = np.array(reports[0].exponent_counts) / reports[0].numel
    lo, hi = right.get_ylim()
    assert share[share > 0].min() / 10 < lo <= share[share > 0].min() and share.max() <= hi <= 1.0
    xlo, xhi = right.get_xlim()
    seen = np.flatnonzero(share)
    assert seen[0] - 1 < xlo < seen[0] and seen[-1] < xhi < seen[-1] + 1
    assert short_label("model.layers.12.self_attn.q_proj.weight") == "L12 self_attn.q_proj"
    import matplotlib.pyplot as plt

    plt.close(fig)


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


def test_analyze_passes_unknown_dtypes_through_like_compress(tmp_path):
    """Tensors of dtypes ecf8 does not know (F8_E8M0 scales, any string) are analysed as bytes,
    in plain and in compressed files, with the codec compress gives them."""
    import json
    import struct

    from ecf8 import compressed
    from ecf8.analyze_cli import tensors_of

    h = {"odd": {"dtype": "F8_E8M0", "shape": [64, 4], "data_offsets": [0, 256]},
         "foo": {"dtype": "FOO", "shape": [3], "data_offsets": [256, 268]}}
    text = json.dumps(h).encode()
    text += b" " * (-len(text) % 8)
    data = bytes(np.random.default_rng(0).integers(100, 140, 268, dtype=np.uint8))
    plain = tmp_path / "odd.safetensors"
    plain.write_bytes(struct.pack("<Q", len(text)) + text + data)
    packed = tmp_path / "odd.ecf8.safetensors"
    compressed.compress_file(plain, packed, jobs=1)
    for path in (plain, packed):
        got = {name: (dtype, x) for name, dtype, x in tensors_of(path)}
        assert got["odd"][0] == "F8_E8M0" and bytes(got["odd"][1].reshape(-1)) == data[:256]
        assert got["foo"][0] == "FOO" and bytes(got["foo"][1].reshape(-1)) == data[256:]
    codecs = {r.name: r.codec for r in compressed.inspect_file(packed)}
    assert codecs == {"odd": "zstd", "foo": "none"}
