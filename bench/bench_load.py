"""Load a Llama-shaped model from an ecf8 checkpoint straight into compressed GPU storage, against
the uncompressed safetensors load, in the same run: peak GPU memory, peak host RSS, load time
(file -> ready on the GPU), greedy tokens, and a GPU memory cap under which only ecf8 loads.

    python bench/bench_load.py --dir /tmp/bench_load --out bench_load.md

Random weights, Llama-2-7B layer shapes (hidden 4096, MLP 14336, 32 heads / 8 KV heads, vocab
32000): an FP8 E4M3 variant (linears with 128x128 block scales, embeddings and head BF16) and a
BF16 variant.  Every measurement runs in a fresh process, so each peak is that load's own.  The
model code is a minimal Llama-like decoder (RMSNorm, causal SDPA attention, SwiGLU), built on the
meta device; ecf8 keeps the linears, the embedding and the head compressed (embeddings=True).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HIDDEN, MLP, HEADS, KV_HEADS, VOCAB = 4096, 14336, 32, 8, 32000
PROMPT, NEW = 32, 8
INDEX = "model.safetensors.index.json"


class Linear(torch.nn.Module):
    """A linear layer; FP8 E4M3 with 128x128 block scales (``weight_scale_inv``) or BF16.
    The FP8 forward dequantizes 1024 rows at a time, so its transient stays small."""

    def __init__(self, n_in: int, n_out: int, fp8: bool):
        super().__init__()
        dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
        self.weight = torch.nn.Parameter(torch.empty(n_out, n_in, dtype=dtype), requires_grad=False)
        if fp8:
            self.weight_scale_inv = torch.nn.Parameter(torch.empty(n_out // 128, n_in // 128),
                                                       requires_grad=False)
        self.fp8 = fp8

    def forward(self, x):
        w = self.weight
        if not self.fp8:
            return F.linear(x, w)
        outs = []
        for r in range(0, w.shape[0], 1024):
            block = w[r : r + 1024].to(torch.bfloat16).view(-1, 128, w.shape[1] // 128, 128)
            scale = self.weight_scale_inv[r // 128 : (r + 1024) // 128].to(torch.bfloat16)
            outs.append(F.linear(x, (block * scale[:, None, :, None]).view(-1, w.shape[1])))
        return torch.cat(outs, -1)


class Block(torch.nn.Module):
    def __init__(self, fp8: bool):
        super().__init__()
        kv = HIDDEN // HEADS * KV_HEADS
        self.attn_norm = torch.nn.RMSNorm(HIDDEN, dtype=torch.bfloat16)
        self.q, self.k, self.v = Linear(HIDDEN, HIDDEN, fp8), Linear(HIDDEN, kv, fp8), Linear(HIDDEN, kv, fp8)
        self.o = Linear(HIDDEN, HIDDEN, fp8)
        self.mlp_norm = torch.nn.RMSNorm(HIDDEN, dtype=torch.bfloat16)
        self.gate, self.up, self.down = Linear(HIDDEN, MLP, fp8), Linear(HIDDEN, MLP, fp8), Linear(MLP, HIDDEN, fp8)

    def forward(self, h):
        b, t, _ = h.shape
        x = self.attn_norm(h)
        q = self.q(x).view(b, t, HEADS, -1).transpose(1, 2)
        k = self.k(x).view(b, t, KV_HEADS, -1).transpose(1, 2)
        v = self.v(x).view(b, t, KV_HEADS, -1).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        h = h + self.o(a.transpose(1, 2).reshape(b, t, HIDDEN))
        x = self.mlp_norm(h)
        return h + self.down(F.silu(self.gate(x)) * self.up(x))


class LM(torch.nn.Module):
    def __init__(self, layers: int, fp8: bool):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN, dtype=torch.bfloat16)
        self.blocks = torch.nn.ModuleList(Block(fp8) for _ in range(layers))
        self.norm = torch.nn.RMSNorm(HIDDEN, dtype=torch.bfloat16)
        self.head = torch.nn.Linear(HIDDEN, VOCAB, bias=False, dtype=torch.bfloat16)

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = b(h)
        return self.head(self.norm(h[:, -1]))


@torch.no_grad()
def generate(model, ids, steps=NEW):
    for _ in range(steps):
        ids = torch.cat([ids, model(ids).argmax(-1, keepdim=True)], 1)
    return ids


def make(variant: str, layers: int, folder: Path, shards: int) -> None:
    """Random weights -> plain safetensors shards (with the Transformers index file) and their
    ecf8 compression (skipped when present)."""
    from safetensors.torch import save_file

    import ecf8.compressed

    plain, packed = folder / variant, folder / f"{variant}.ecf8"
    if (plain / INDEX).exists() and (packed / INDEX).exists():
        return
    plain.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = LM(layers, variant == "fp8")
    g = torch.Generator("cuda").manual_seed(0)
    tensors = {}
    for name, p in model.state_dict().items():
        if name.endswith("weight_scale_inv"):
            x = torch.rand(p.shape, generator=g, device="cuda") * 1e-3 + 1e-4
        elif p.dim() == 1:
            x = 1 + 0.1 * torch.randn(p.shape, generator=g, device="cuda")
        elif p.dtype == torch.float8_e4m3fn:      # Gaussian blocks scaled by amax/448, as quantizers do
            w = torch.randn(p.shape, generator=g, device="cuda")
            r, c = p.shape
            amax = w.view(r // 128, 128, c // 128, 128).abs().amax(dim=(1, 3), keepdim=True)
            x = (w.view(r // 128, 128, c // 128, 128) / amax * 448).view(r, c)
        else:
            x = 0.02 * torch.randn(p.shape, generator=g, device="cuda")
        tensors[name] = x.to(p.dtype).cpu()
    total = sum(t.nbytes for t in tensors.values())
    groups: list[dict] = [{} for _ in range(shards)]
    done = 0
    for name, t in tensors.items():             # consecutive tensors, about total/shards bytes each
        groups[min(shards - 1, done * shards // total)][name] = t
        done += t.nbytes
    weight_map = {}
    for k, group in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file(group, plain / file)
        weight_map.update(dict.fromkeys(group, file))
    (plain / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    del tensors, groups
    t = time.perf_counter()
    ecf8.compressed.compress_path(plain, packed, progress=False)
    size = sum(f.stat().st_size for f in packed.glob("*.safetensors"))
    print(f"# compressed {variant}: {total / 1e9:.2f} GB -> {size / 1e9:.2f} GB in "
          f"{time.perf_counter() - t:.1f} s", flush=True)


def child(variant: str, layers: int, mode: str, folder: Path, cap: float) -> dict:
    """One load + generate in this (fresh) process; the figures as a dict."""
    import ecf8.torch

    torch.cuda.init()
    if cap:
        torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    ids = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(5)).cuda()
    if mode == "ecf8":                         # compile the kernels before the clock starts
        ecf8.torch.decode(ecf8.torch.encode(torch.zeros(512, dtype=torch.bfloat16)), "cuda")
        ecf8.torch.decode(ecf8.torch.encode(torch.zeros(512).to(torch.float8_e4m3fn)), "cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = {"variant": variant, "mode": mode, "cap_GB": cap / 1e9}
    with torch.device("meta"):
        model = LM(layers, variant == "fp8")
    t = time.perf_counter()
    try:
        if mode == "ecf8":
            stats = ecf8.torch.load_model(model, folder / f"{variant}.ecf8", "cuda", embeddings=True)
            out["compressed_GB"] = stats.compressed_bytes / 1e9
            out["buffer_GB"] = stats.buffer_bytes / 1e9
        else:                                   # shard by shard, as Transformers reads them
            from safetensors.torch import load_file

            index = json.loads((folder / variant / INDEX).read_text())["weight_map"]
            state = {}
            for file in dict.fromkeys(index.values()):
                state.update(load_file(folder / variant / file, device="cuda"))
            model.load_state_dict(state, assign=True)
            del state
        torch.cuda.synchronize()
        out["load_s"] = time.perf_counter() - t
        out["load_peak_GB"] = (torch.cuda.max_memory_allocated() - base) / 1e9
        generate(model, ids, 1)                 # warm-up (cuBLAS, kernels) outside the timing
        torch.cuda.synchronize()
        t = time.perf_counter()
        tokens = generate(model, ids)
        torch.cuda.synchronize()
        out["generate_s"] = time.perf_counter() - t
        out["tokens"] = tokens[0, PROMPT:].tolist()
    except torch.OutOfMemoryError as e:
        out["error"] = "OutOfMemoryError: " + str(e).split(".")[0]
    out["peak_GB"] = (torch.cuda.max_memory_allocated() - base) / 1e9
    out["rss_GB"] = peak_rss()
    return out


def peak_rss() -> float:
    """This process's peak resident set in GB (VmHWM: ru_maxrss would include the parent's peak,
    which Linux hands down across fork and exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def run_child(args, variant, layers, mode, cap=0.0) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, mode, str(layers), "--dir", str(args.dir),
           "--cap", str(cap)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode or not lines:
        return {"variant": variant, "mode": mode, "error": (p.stderr or p.stdout)[-800:]}
    result = json.loads(lines[-1])
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/ecf8_bench_load"))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--fp8-layers", type=int, default=24)
    ap.add_argument("--bf16-layers", type=int, default=16)
    ap.add_argument("--shards", type=int, default=4, help="safetensors files per checkpoint")
    ap.add_argument("--child", nargs=3, metavar=("VARIANT", "MODE", "LAYERS"))
    ap.add_argument("--cap", type=float, default=0.0, help="GPU memory cap in bytes (children)")
    args = ap.parse_args()
    if args.child:
        variant, mode, layers = args.child
        print(json.dumps(child(variant, int(layers), mode, args.dir, args.cap)))
        return
    args.dir.mkdir(parents=True, exist_ok=True)
    rows, caps = [], []
    for variant, layers in (("fp8", args.fp8_layers), ("bf16", args.bf16_layers)):
        make(variant, layers, args.dir, args.shards)
        torch.cuda.empty_cache()
        plain = run_child(args, variant, layers, "plain")
        packed = run_child(args, variant, layers, "ecf8")
        rows.append((variant, layers, plain, packed))
        if "peak_GB" in plain and "peak_GB" in packed:
            # between the two peaks, nearer ecf8's: room for the allocator's rounding
            cap = (packed["peak_GB"] + 0.4 * (plain["peak_GB"] - packed["peak_GB"])) * 1e9
            caps.append((variant, cap, run_child(args, variant, layers, "plain", cap),
                         run_child(args, variant, layers, "ecf8", cap)))
    report = [f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; "
              f"Llama-2-7B layer shapes, random weights, {args.shards} shards, prompt {PROMPT}, {NEW} greedy "
              "tokens; files in the page cache; load = file -> ready on the GPU", "",
              "| model | load | peak GPU GB | ratio | load peak GB | host RSS GB | load s | generate s | tokens |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for variant, layers, plain, packed in rows:
        for r in (plain, packed):
            if "error" in r:
                report.append(f"| {variant} x{layers} | {r['mode']} | error: {r['error'][:200]} |")
                continue
            ratio = r["peak_GB"] / plain["peak_GB"] if "peak_GB" in plain else float("nan")
            same = "reference" if r is plain else ("identical" if r.get("tokens") == plain.get("tokens") else "DIFFER")
            report.append(f"| {variant} x{layers} | {r['mode']} | {r['peak_GB']:.3f} | {ratio:.3f} | "
                          f"{r['load_peak_GB']:.3f} | {r['rss_GB']:.2f} | {r['load_s']:.2f} | "
                          f"{r['generate_s']:.2f} | {same} |")
    report += ["", "| model | GPU cap GB | uncompressed | ecf8 |", "|---|---:|---|---|"]
    for variant, cap, plain, packed in caps:
        def what(r):
            return r["error"][:120] if "error" in r else f"loads, {len(r['tokens'])} tokens, peak {r['peak_GB']:.2f} GB"
        report.append(f"| {variant} | {cap / 1e9:.2f} | {what(plain)} | {what(packed)} |")
    text = "\n".join(report)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
