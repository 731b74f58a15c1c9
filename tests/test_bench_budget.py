"""bench/bench_budget.py --smoke: the over-the-cap bench's code paths, tiny, on the CPU (the
numbers mean nothing there; the outputs must still be identical in every row), its cap
arithmetic (bench/budget_caps.py) and the KV-budget measurement it runs (bench_generate.child)."""

import argparse
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCH))


def test_smoke_compressed_offload_rows_are_identical(tmp_path, capsys):
    bench_budget = _bench("bench_budget")
    bench_budget.ROWS.clear()
    bench_budget.NOTES.clear()
    bench_budget.main(["--smoke", "--out", str(tmp_path), "--cases", "compressed-offload", "--formats", "bf16"])
    table = (tmp_path / "budget.md").read_text()
    rows = [r for r in table.splitlines() if r.startswith("| compressed-offload")]
    assert len(rows) == 6               # accelerate, ecf8 and the raw-frame control, batches 1 and 2
    ends = [r.rstrip(" |").rsplit("|", 1)[-1].strip() for r in rows]
    assert ends.count("reference") == 2 and ends.count("yes") == 4, table
    assert sum("ecf8 offload (compressed)" in r for r in rows) == 2
    head = table.split("| case |")[0]   # how the cap came about, above the table (tiny: none separates)
    assert "# compressed-offload bf16: no cap separates" in head and "ecf8 resident" not in head


def test_caps_lie_halfway_and_say_why():
    caps = _bench("budget_caps")
    c = caps.halfway("llm-over-cap", "fp8", fits=7 * caps.GiB, exceeds=9 * caps.GiB, why="because", base=2**20)
    assert c.cap == 8 * caps.GiB + 2**20 and c.margin == caps.GiB == c.exceeds - c.cap
    line = c.line()
    assert line.startswith("# cap llm-over-cap fp8 = 8.00 GiB: because") and "margin 1.00 GiB" in line
    given = caps.halfway("llm-over-cap", "fp8", 7 * caps.GiB, 9 * caps.GiB, "x", given=5 * caps.GiB)
    assert given.cap == 5 * caps.GiB and "given on the command line" in given.line()
    with pytest.raises(ValueError, match="no cap separates"):
        caps.halfway("llm-over-cap", "fp8", fits=9 * caps.GiB, exceeds=9 * caps.GiB, why="")


def test_llm_working_set_counts_cache_prefill_and_logits():
    caps = _bench("budget_caps")
    import transformers

    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                      num_key_value_heads=8, vocab_size=128256, num_hidden_layers=32)
    w = caps.llm_work(config, True, batch=16, prompt=64, new=8, cuda=True)
    assert w["KV"] == 2 * 16 * 8 * 72 * 128 * 2 * 33           # K and V, 32 layers + one copy
    assert w["activations"] == 1024 * (4 * 4096 + 4 * 14336) * 2 + 1024 * 14336
    assert w["logits"] == 16 * 128256 * 10 and w["workspaces"] == caps.WORKSPACE
    assert caps.llm_work(config, False, 16, 64, 8, cuda=False)["workspaces"] == 0


def test_kv_budget_child_frees_the_timing_caches_before_the_token_run():
    """The largest batch's caches fill the budget: the token run at that batch must not be
    allocated while the timing run's are alive (on the GPU both variants ran out of memory
    there; the CPU smoke emulates the cap over every State alive)."""
    bg = _bench("bench_generate")
    sub = argparse.Namespace(layers=2, group_bytes=None, max_len=64)
    cap = bg.model_bytes(bg.Decoder(bg.TINY, 2, False, "meta")) + 4 * bg.cache_bytes(bg.TINY, 2, 1, 64)
    with torch.no_grad():
        out = bg.child(sub, bg.TINY, "bf16", "base", cap, False, tokens_at=0)
    assert out["batch"] == 4 and "tokens_error" not in out
    assert len(out["tokens"]) == 4 and all(len(t) == bg.BUDGET_TOKENS for t in out["tokens"])


def test_a_failed_case_is_a_failed_row_and_the_run_goes_on():
    bench_budget = _bench("bench_budget")
    bench_budget.ROWS.clear()

    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")

    bench_budget.run_case("llm fp8", out_of_memory, "cpu")
    assert bench_budget.ROWS == ["| llm fp8 | — | — | FAILED: OutOfMemoryError: CUDA out of memory. "
                                 "Tried to allocate 2.00 MiB | | | | | | |"]
    assert bench_budget.failed(torch.OutOfMemoryError("x\ny")) == "FAILED: OutOfMemoryError: x"
