"""bench/bench_budget.py --smoke: the over-the-cap bench's code paths, tiny, on the CPU (the
numbers mean nothing there; the outputs must still be identical in every row)."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_smoke_compressed_offload_rows_are_identical(tmp_path, capsys):
    sys.path.insert(0, str(BENCH))
    try:
        import bench_budget
    finally:
        sys.path.remove(str(BENCH))
    bench_budget.ROWS.clear()
    bench_budget.main(["--smoke", "--out", str(tmp_path), "--cases", "compressed-offload", "--formats", "bf16"])
    table = (tmp_path / "budget.md").read_text()
    rows = [r for r in table.splitlines() if r.startswith("| compressed-offload")]
    assert len(rows) == 6               # accelerate, ecf8 and the raw-frame control, batches 1 and 2
    ends = [r.rstrip(" |").rsplit("|", 1)[-1].strip() for r in rows]
    assert ends.count("reference") == 2 and ends.count("yes") == 4, table
    assert sum("ecf8 offload (compressed)" in r for r in rows) == 2
