"""Load a Llama-shaped model from an ecf8 checkpoint, against the uncompressed safetensors load, in
the same run, from one file and from shards: load time (file -> ready on the device), peak host
memory (VmHWM of a fresh process), peak GPU memory, greedy tokens and the logits they came from,
and (--caps) a GPU memory cap under which only ecf8 loads.

    python bench/bench_load.py --dir /tmp/bench_load --out bench_load.md            # GPU
    python bench/bench_load.py --device cpu --fp8-layers 1 --bf16-layers 1          # CPU

Random weights, Llama-2-7B layer shapes (hidden 4096, MLP 14336, 32 heads / 8 KV heads, vocab
32000): an FP8 E4M3 variant (linears with 128x128 block scales, embeddings and head BF16) and a
BF16 variant, each saved as one file and as --shards files.  Every measurement runs in a fresh
process, so each peak is that load's own.  The model code is a minimal Llama-like decoder
(RMSNorm, causal SDPA attention, SwiGLU), built on the meta device; ecf8 keeps the linears, the
embedding and the head compressed (embeddings=True; on the CPU compress=True: the frames are held
as read and decoded at each forward, as on a GPU).  Plain safetensors maps its files: on the CPU
its pages are read in by the first forward, so the host peak compared is the one after it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
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
    """Greedy tokens after ids, and the first step's logits (the prompt's last position)."""
    first = None
    for _ in range(steps):
        logits = model(ids)
        first = logits if first is None else first
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    return ids, first


def digest(t: torch.Tensor) -> str:
    """A short hash of a tensor's bytes: the same digest, bit-identical logits."""
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def folders(root: Path, variant: str, layout: str) -> tuple[Path, Path]:
    """(plain folder, ecf8 folder) of a variant saved as one file ("one") or as shards."""
    return root / f"{variant}-{layout}", root / f"{variant}-{layout}.ecf8"


def make(variant: str, layers: int, root: Path, shards: int, device: str) -> None:
    """Random weights -> plain safetensors, as one file and as `shards` files (with the
    Transformers index file), and their ecf8 compression (each skipped when present)."""
    from safetensors.torch import save_file

    import ecf8.compressed

    todo = [(layout, n) for layout, n in (("one", 1), ("shards", shards))
            if not folders(root, variant, layout)[1].is_dir()]      # (written whole or not at all)
    if not todo:
        return
    with torch.device("meta"):
        model = LM(layers, variant == "fp8")
    gen = device if device == "cuda" else "cpu"
    g = torch.Generator(gen).manual_seed(0)
    tensors = {}
    for name, p in model.state_dict().items():
        if name.endswith("weight_scale_inv"):
            x = torch.rand(p.shape, generator=g, device=gen) * 1e-3 + 1e-4
        elif p.dim() == 1:
            x = 1 + 0.1 * torch.randn(p.shape, generator=g, device=gen)
        elif p.dtype == torch.float8_e4m3fn:      # Gaussian blocks scaled by amax/448, as quantizers do
            w = torch.randn(p.shape, generator=g, device=gen)
            r, c = p.shape
            amax = w.view(r // 128, 128, c // 128, 128).abs().amax(dim=(1, 3), keepdim=True)
            x = (w.view(r // 128, 128, c // 128, 128) / amax * 448).view(r, c)
        else:
            x = 0.02 * torch.randn(p.shape, generator=g, device=gen)
        tensors[name] = x.to(p.dtype).cpu()
    total = sum(t.nbytes for t in tensors.values())
    for layout, n in todo:
        plain, packed = folders(root, variant, layout)
        plain.mkdir(parents=True, exist_ok=True)
        groups: list[dict] = [{} for _ in range(n)]
        done = 0
        for name, t in tensors.items():         # consecutive tensors, about total/n bytes each
            groups[min(n - 1, done * n // total)][name] = t
            done += t.nbytes
        if n == 1:
            save_file(tensors, plain / "model.safetensors")
        else:
            weight_map = {}
            for k, group in enumerate(groups):
                file = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
                save_file(group, plain / file)
                weight_map.update(dict.fromkeys(group, file))
            (plain / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
        del groups
        t = time.perf_counter()
        ecf8.compressed.compress_path(plain, packed, progress=False,
                                      **({"device": "cuda"} if device == "cuda" else {}))
        size = sum(f.stat().st_size for f in packed.glob("*.safetensors"))
        print(f"# compressed {variant} ({layout}): {total / 1e9:.2f} GB -> {size / 1e9:.2f} GB in "
              f"{time.perf_counter() - t:.1f} s", flush=True)


def plain_files(folder: Path) -> list[Path]:
    index = folder / INDEX
    if index.exists():
        return [folder / f for f in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]
    return [folder / "model.safetensors"]


def child(variant: str, layers: int, mode: str, layout: str, root: Path, device: str, cap: float) -> dict:
    """One load + generate in this (fresh) process; the figures as a dict."""
    import ecf8.torch

    cuda = device == "cuda"
    steps = NEW if cuda else 1
    if cuda:
        torch.cuda.init()
        if cap:
            torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    ids = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(5)).to(device)
    if mode == "ecf8" and cuda:                # compile the kernels before the clock starts
        ecf8.torch.decode(ecf8.torch.encode(torch.zeros(512, dtype=torch.bfloat16)), "cuda")
        ecf8.torch.decode(ecf8.torch.encode(torch.zeros(512).to(torch.float8_e4m3fn)), "cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    plain, packed = folders(root, variant, layout)
    out = {"variant": variant, "layers": layers, "mode": mode, "layout": layout, "device": device,
           "cap_GB": cap / 1e9, "files": len(plain_files(plain)), "rss_before_GB": rss("VmRSS")}
    with torch.device("meta"):
        model = LM(layers, variant == "fp8")
    t = time.perf_counter()
    try:
        if mode == "ecf8":
            stats = ecf8.torch.load_model(model, packed, device, embeddings=True, compress=True)
            out["compressed_GB"] = stats.compressed_bytes / 1e9
            out["buffer_GB"] = stats.buffer_bytes / 1e9
        else:                                   # file by file, as Transformers reads them
            from safetensors.torch import load_file

            state = {}
            for file in plain_files(plain):
                state.update(load_file(file, device=device))
            model.load_state_dict(state, assign=True)
            del state
        if cuda:
            torch.cuda.synchronize()
            out["load_peak_GB"] = (torch.cuda.max_memory_allocated() - base) / 1e9
        out["load_s"] = time.perf_counter() - t
        out["load_rss_GB"] = rss()
        if cuda:
            generate(model, ids, 1)             # warm-up (cuBLAS, kernels) outside the timing
            torch.cuda.synchronize()
        t = time.perf_counter()
        tokens, logits = generate(model, ids, steps)
        if cuda:
            torch.cuda.synchronize()
        out["generate_s"] = time.perf_counter() - t
        out["tokens"] = tokens[0, PROMPT:].tolist()
        out["logits"] = digest(logits)
    except torch.OutOfMemoryError as e:
        out["error"] = "OutOfMemoryError: " + str(e).split(".")[0]
    if cuda:
        out["peak_GB"] = (torch.cuda.max_memory_allocated() - base) / 1e9
    out["rss_GB"] = rss()
    return out


def rss(field: str = "VmHWM") -> float:
    """This process's peak resident set (VmHWM; VmRSS: now) in GB.  ru_maxrss would include the
    parent's peak, which Linux hands down across fork and exec."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def run_child(args, variant, layers, mode, layout, cap=0.0) -> dict:
    """One row's run in a fresh process; mode "before" is ecf8's load from the ecf8 tree --before."""
    cmd = [sys.executable, __file__, "--child", variant, "ecf8" if mode == "before" else mode, str(layers),
           layout, "--dir", str(args.dir), "--device", args.device, "--cap", str(cap)]
    env = None
    if mode == "before":                        # the earlier tree first; the rest (e.g. zstandard) kept
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(args.before),
                                                                      os.environ.get("PYTHONPATH")])))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode or not lines:
        return {"variant": variant, "mode": mode, "layout": layout, "error": (p.stderr or p.stdout)[-800:]}
    result = json.loads(lines[-1])
    result["mode"] = mode
    print(json.dumps(result), flush=True)
    return result


def machine(device: str) -> str:
    if device == "cuda":
        return f"GPU: {torch.cuda.get_device_name(0)}"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return f"CPU: {line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return "CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/ecf8_bench_load"))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--fp8-layers", type=int, default=12)
    ap.add_argument("--bf16-layers", type=int, default=8)
    ap.add_argument("--shards", type=int, default=4, help="files of the sharded checkpoints")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each row: the fastest load and the highest peaks are shown")
    ap.add_argument("--caps", action="store_true", help="also load under a GPU memory cap between the peaks")
    ap.add_argument("--before", type=Path, help="another ecf8 source tree (e.g. a checkout of an earlier "
                    "commit): its load_model also runs, as rows 'ecf8 (before)'")
    ap.add_argument("--child", nargs=4, metavar=("VARIANT", "MODE", "LAYERS", "LAYOUT"))
    ap.add_argument("--cap", type=float, default=0.0, help="GPU memory cap in bytes (children)")
    args = ap.parse_args()
    if args.child:
        variant, mode, layers, layout = args.child
        print(json.dumps(child(variant, int(layers), mode, layout, args.dir, args.device, args.cap)))
        return
    cuda = args.device == "cuda"
    args.dir.mkdir(parents=True, exist_ok=True)
    rows, caps = [], []
    for variant, layers in (("fp8", args.fp8_layers), ("bf16", args.bf16_layers)):
        if not layers:
            continue
        make(variant, layers, args.dir, args.shards, args.device)
        if cuda:
            torch.cuda.empty_cache()
        for layout in ("one", "shards"):
            modes = ("plain", "ecf8") + (("before",) if args.before else ())
            runs: dict[str, list] = {mode: [] for mode in modes}
            for _ in range(args.repeat):                # interleaved: drifts of the machine hit all
                for mode in modes:
                    runs[mode].append(run_child(args, variant, layers, mode, layout))
            results = [summary(runs[mode]) for mode in modes]
            rows.append((variant, layers, layout, results))
            plain, packed = results[:2]
            if args.caps and cuda and layout == "shards" and "peak_GB" in plain and "peak_GB" in packed:
                # between the two peaks, nearer ecf8's: room for the allocator's rounding
                cap = (packed["peak_GB"] + 0.4 * (plain["peak_GB"] - packed["peak_GB"])) * 1e9
                caps.append((variant, cap, run_child(args, variant, layers, "plain", layout, cap),
                             run_child(args, variant, layers, "ecf8", layout, cap)))
    print("\n".join(report(args, rows, caps)))
    if args.out:
        args.out.write_text("\n".join(report(args, rows, caps)) + "\n")


def summary(runs: list[dict]) -> dict:
    """One row from its runs: the fastest load and generation, the highest peaks; tokens and logits
    where every run gave the same."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[0]
    best = dict(min(good, key=lambda r: r["load_s"]))
    for key in ("load_rss_GB", "rss_GB", "load_peak_GB", "peak_GB"):
        if key in best:
            best[key] = max(r[key] for r in good)
    best["generate_s"] = min(r["generate_s"] for r in good)
    for key in ("tokens", "logits"):
        if any(r.get(key) != best.get(key) for r in good):
            best[key] = None
    return best


def agreement(r: dict, plain: dict, key: str) -> str:
    """How a row's tokens (or logits digest) compare with the plain load's."""
    if r.get(key) is None:
        return "runs disagree"
    if r is plain:
        return "reference"
    return "identical" if r[key] == plain.get(key) else ("DIFFER" if key == "tokens" else "differ")


def report(args, rows, caps) -> list[str]:
    cuda = args.device == "cuda"
    steps = NEW if cuda else 1
    lines = [f"{machine(args.device)}; torch {torch.__version__}; Llama-2-7B layer shapes, random weights; "
             f"one file or up to {args.shards} shards; prompt {PROMPT}, {steps} greedy token{'s' * (steps > 1)}; "
             f"files in the page cache; load = file -> ready on {args.device}; of {args.repeat} runs a row: "
             "the fastest load and forward, the highest peaks", ""]
    if cuda:
        lines += ["| model | files | load | load s | host peak GB (load) | host peak GB | peak GPU GB | "
                  "ratio | generate s | tokens | logits |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|"]
    else:
        lines += ["| model | files | load | load s | host peak GB (load) | host peak GB (load + forward) | "
                  "forward s | tokens | logits |", "|---|---:|---|---:|---:|---:|---:|---|---|"]
    for variant, layers, layout, results in rows:
        plain = results[0]
        for r in results:
            name = f"{variant} x{layers}"
            if "error" in r:
                lines.append(f"| {name} | {layout} | {r['mode']} | error: {r['error'][-200:]!r} |")
                continue
            same, bits = (agreement(r, plain, key) for key in ("tokens", "logits"))
            what = r["mode"] if r["mode"] == "plain" else \
                f"ecf8{', before' if r['mode'] == 'before' else ''} ({r['compressed_GB']:.2f} GB frames)"
            if cuda:
                ratio = r["peak_GB"] / plain["peak_GB"] if "peak_GB" in plain else float("nan")
                lines.append(f"| {name} | {r['files']} | {what} | {r['load_s']:.2f} | {r['load_rss_GB']:.2f} | "
                             f"{r['rss_GB']:.2f} | {r['peak_GB']:.3f} | {ratio:.3f} | {r['generate_s']:.2f} | "
                             f"{same} | {bits} |")
            else:
                lines.append(f"| {name} | {r['files']} | {what} | {r['load_s']:.2f} | {r['load_rss_GB']:.2f} | "
                             f"{r['rss_GB']:.2f} | {r['generate_s']:.2f} | {same} | {bits} |")
    if caps:
        lines += ["", "| model | GPU cap GB | uncompressed | ecf8 |", "|---|---:|---|---|"]
        for variant, cap, plain, packed in caps:
            def what(r):
                return r["error"][:120] if "error" in r else f"loads, {len(r['tokens'])} tokens, peak {r['peak_GB']:.2f} GB"
            lines.append(f"| {variant} | {cap / 1e9:.2f} | {what(plain)} | {what(packed)} |")
    return lines


if __name__ == "__main__":
    main()
