"""Tensor-parallel compressed inference: DTensor-sharded linears (ColwiseParallel /
RowwiseParallel) held compressed per rank, on PyTorch's own TP engine.

The scenarios live in tests/tp_worker.py and run once per backend in real processes (2 ranks,
gloo on the CPU; NCCL on 2 GPUs when there are); each test checks one scenario on every rank.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import ecf8  # noqa: E402

HERE = Path(__file__).resolve().parent
WORLD = 2


def gloo_available() -> bool:
    """torch.distributed with gloo and the tensor-parallel API (torch >= 2.4 builds that have them)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        return False
    try:
        from torch.distributed.tensor.parallel import parallelize_module
    except Exception:  # noqa: BLE001 - an older or stripped torch build
        return False
    return callable(parallelize_module)


def run_ranks(out: Path, backend: str, device: str, world: int = WORLD) -> list[dict]:
    """Run every scenario on `world` ranks; [{scenario: {"checks": ..., "error": ...}}] per rank."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(ecf8.__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(HERE / "tp_worker.py"), str(out), "--world", str(world),
           "--backend", backend, "--device", device]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"tp_worker.py did not finish in 300 s:\n{(e.stderr or b'')[-3000:]!r}")
    files = [out / f"rank{r}.json" for r in range(world)]
    if proc.returncode or not all(f.is_file() for f in files):
        pytest.fail(f"tp_worker.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads(f.read_text()) for f in files]


@pytest.fixture(scope="module")
def gloo(tmp_path_factory):
    if not gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    return run_ranks(tmp_path_factory.mktemp("tp_gloo"), "gloo", "cpu")


SCENARIOS = ["compress_module", "colwise_exact", "fp8_weights", "state_dict_round_trip",
             "wrong_layout_refused", "load_model_decoded", "load_model_compressed",
             "load_model_refuses_partial", "transformers_generate", "uneven_shards"]


def check(ranks: list[dict], scenario: str, skip: tuple = ()) -> None:
    for rank, results in enumerate(ranks):
        result = results[scenario]
        assert result["error"] is None, f"rank {rank}: {result['error']}"
        failed = [name for name, ok in result["checks"].items() if not ok and name not in skip]
        assert result["checks"] and not failed, f"rank {rank}: {failed}"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_tp_on_cpu_with_gloo(gloo, scenario):
    """compress_module / load_model / state_dict on a 2-rank TP model: outputs bit-identical to the
    uncompressed TP model (and to the unsharded model for column-parallel layers)."""
    check(gloo, scenario)


@pytest.mark.gpu
@pytest.mark.parametrize("world", [2, 4])
def test_tp_on_gpus_with_nccl(tmp_path, world):
    """The same scenarios with NCCL, one GPU per rank: GPU decode and encode of the shards."""
    if torch.cuda.device_count() < world or not torch.distributed.is_nccl_available():
        pytest.skip(f"needs {world} CUDA GPUs and NCCL")
    ranks = run_ranks(tmp_path, "nccl", "cuda", world)
    for scenario in SCENARIOS:       # cuBLAS may pick other kernels for a narrower shard:
        check(ranks, scenario, skip=("uncompressed TP equals unsharded", "compressed TP equals unsharded"))
