"""Write the frozen pickle of a compressed PyTorch model (torch-module.pt) and what it must compute
(torch-module.expected.pt).  Run only when pickles of compressed models change on purpose:

    python tests/golden/make_golden_torch.py

The model: a BF16 MLP (two Linear), an FP16 Linear, an FP8 (E4M3) Linear and a BF16 Embedding
tied to a BF16 head, fixed-seed weights, held compressed by ``ecf8.torch.compress_module`` on the
CPU.  The pickle names ecf8's classes by the module paths of the day it was written, so a later
ecf8 that still loads it keeps those paths importable.
"""

from pathlib import Path

import torch

import ecf8.torch

HERE = Path(__file__).parent


def build() -> torch.nn.ModuleDict:
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({
        "mlp": torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 64)),
        "fp16": torch.nn.Linear(64, 64),
        "fp8": torch.nn.Linear(64, 64, bias=False),
        "embed": torch.nn.Embedding(100, 64),
        "head": torch.nn.Linear(64, 100, bias=False),
    })
    model["mlp"].to(torch.bfloat16)
    model["fp16"].to(torch.float16)
    model["fp8"].weight.data = (model["fp8"].weight.data * 64).to(torch.float8_e4m3fn)
    model["embed"].to(torch.bfloat16)
    model["head"].to(torch.bfloat16)
    model["head"].weight = model["embed"].weight
    return model


def outputs(model: torch.nn.ModuleDict) -> dict[str, torch.Tensor]:
    """What the model computes for fixed inputs, and its FP8 weight's bits (no FP8 matmul on CPU)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 64, generator=g)
    ids = torch.randint(0, 100, (8,), generator=g)
    return {"mlp": model["mlp"](x.to(torch.bfloat16)), "fp16": model["fp16"](x.to(torch.float16)),
            "fp8": model["fp8"].weight.view(torch.uint8).clone(),
            "head": model["head"](model["embed"](ids))}


if __name__ == "__main__":
    model = build()
    expected = outputs(model)
    stats = ecf8.torch.compress_module(model, embeddings=True, min_numel=4096)
    assert stats.weights == 5, stats
    torch.save(model, HERE / "torch-module.pt")
    torch.save(expected, HERE / "torch-module.expected.pt")
    print(stats)
