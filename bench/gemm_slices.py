"""Does a GEMM on an N-slice of a weight give the same bits as those columns of the whole GEMM?

    python bench/gemm_slices.py

Decoding a weight in slices that stay in L2 and running cuBLAS on each slice keeps a
compressed model's outputs bit-identical only if it does.  FP8 E4M3 per-tensor ``torch._scaled_mm``
(scales 1, BF16 out; batches below 16 padded to 16) and BF16 ``matmul``, Llama-3-8B shapes (q, k,
gate, down), batch 1/16/64/256, slices of 512-4096 rows; random data (the question is the
kernel's accumulation order, not the values).  Prints one row per case and the count.  Needs a
CUDA GPU and PyTorch.
"""

import torch

SHAPES = {"q": (4096, 4096), "k": (1024, 4096), "gate": (14336, 4096), "down": (4096, 14336)}


def main() -> None:
    torch.manual_seed(0)
    one = torch.ones((), device="cuda")
    rows = []
    for fmt in ("fp8", "bf16"):
        dtype = torch.float8_e4m3fn if fmt == "fp8" else torch.bfloat16
        for name, (n, k) in SHAPES.items():
            w = (torch.randn(n, k, device="cuda") / k ** 0.5).to(dtype)
            for m in (1, 16, 64, 256):
                x = torch.randn(max(m, 16) if fmt == "fp8" else m, k, device="cuda").to(dtype)
                if fmt == "fp8":
                    def gemm(a, b):
                        return torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
                else:
                    def gemm(a, b):
                        return a @ b.t()
                full = gemm(x, w)
                for rows_per_slice in (512, 1024, 2048, 4096):
                    if rows_per_slice >= n:
                        continue
                    parts = torch.cat([gemm(x, w[i : i + rows_per_slice])
                                       for i in range(0, n, rows_per_slice)], dim=1)
                    same = torch.equal(parts.view(torch.int16), full.view(torch.int16))
                    diff = (parts.float() - full.float()).abs().max().item()
                    rows.append((fmt, name, m, rows_per_slice, same, diff))
    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    print("| format | weight | batch | slice rows | bit-identical | max abs diff |\n|---|---|---:|---:|---|---:|")
    for fmt, name, m, s, same, diff in rows:
        print(f"| {fmt} | {name} | {m} | {s} | {'yes' if same else 'NO'} | {diff:.3g} |")
    for fmt in ("fp8", "bf16"):
        mine = [r for r in rows if r[0] == fmt]
        print(f"{fmt}: {sum(r[4] for r in mine)} of {len(mine)} slicings bit-identical")


if __name__ == "__main__":
    main()
