"""Tensor-parallel inference with ecf8: per-GPU resident weight memory and greedy tokens/s of the same
TP model with its weights uncompressed and held compressed by ecf8, in the same run.

    torchrun --nproc-per-node 2 bench/bench_tp.py --dir /tmp/bench_tp --out bench_tp.md
    torchrun --nproc-per-node 4 bench/bench_tp.py --dir /tmp/bench_tp --out bench_tp.md
    torchrun --nproc-per-node 2 bench/bench_tp.py --device cpu --tiny      # gloo dry run (CI-sized)

STATUS: run once on 2 H200s with one layer (bench/bench_tp.md: resident weights 0.712x, eager
tokens/s 0.761x, tokens identical on both ranks); not yet on 4 GPUs or at full depth.  Runs on
several GPUs append their tables to bench/bench_tp.md (--out).

Model: a Transformers LlamaForCausalLM from a config (random BF16 weights; Llama-2-7B shapes by
default, --layers of them), built without weights (accelerate.init_empty_weights), sharded with
PyTorch's own ``parallelize_module`` (q/k/v/gate/up and lm_head column-wise, o/down row-wise, the
embedding row-wise: the usual Llama TP plan), then filled by ``ecf8.torch.load_model`` from one
ecf8 checkpoint written by rank 0: with ``compress=False`` (baseline: ordinary DTensor parameters,
each rank its slice) and with ``compress=True`` (each rank's slices held compressed, decoded just
in time).  Every rank reports its own numbers; the greedy tokens of both runs must be identical.

Resident weight memory: ``torch.cuda.memory_allocated()`` after loading minus before (frames,
decode tables, decode buffers and uncompressed tensors); on the CPU the bytes held by the model.
tokens/s: batch * new tokens / wall time of ``generate`` (greedy, KV cache), median of --repeat.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import ecf8.compressed
import ecf8.torch

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                vocab_size=32000)
TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=4,
            vocab_size=1024)


def config(args):
    import transformers

    shape = TINY if args.tiny else LLAMA_7B
    return transformers.LlamaConfig(**shape, num_hidden_layers=args.layers, max_position_embeddings=4096,
                                    tie_word_embeddings=False, dtype="bfloat16")


def plan(layers: int) -> dict:
    p = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
         "lm_head": ColwiseParallel(output_layouts=Replicate())}
    for i in range(layers):
        pre = f"model.layers.{i}"
        p.update({f"{pre}.self_attn.{n}_proj": ColwiseParallel() for n in "qkv"})
        p.update({f"{pre}.mlp.{n}_proj": ColwiseParallel() for n in ("gate", "up")})
        p[f"{pre}.self_attn.o_proj"] = RowwiseParallel()
        p[f"{pre}.mlp.down_proj"] = RowwiseParallel()
    return p


def write_checkpoint(args, folder: Path) -> None:
    """Rank 0: random BF16 weights, compressed with ecf8 (all cores)."""
    import transformers

    torch.manual_seed(0)
    cfg = config(args)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    plain = folder / "plain"
    model.save_pretrained(plain, max_shard_size="2GB")
    del model
    ecf8.compressed.compress_path(plain, folder / "ecf8", progress=False)
    for f in ("config.json", "generation_config.json"):
        if (plain / f).exists():
            (folder / "ecf8" / f).write_bytes((plain / f).read_bytes())


def build(args, mesh):
    import transformers
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = transformers.LlamaForCausalLM(config(args))
    parallelize_module(model, mesh, plan(args.layers))
    return model.eval()


def held_bytes(model) -> int:
    """Bytes this rank holds for the model: local shards, compressed frames, decode buffers."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        local = t.to_local() if ecf8.torch.is_dtensor(t) else t
        total += local.numel() * local.element_size()
    for m in model.modules():
        if ecf8.torch.is_compressed(m):
            w = m.__dict__["_ecf8"]
            if id(w) not in seen:
                seen.add(id(w))
                total += w.stored_bytes
                pool = w.pool
    if seen:
        total += pool.buffer_bytes()
    return total


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure(args, mesh, dev, folder: Path, compress: bool) -> dict:
    model = build(args, mesh)
    gc.collect()
    sync(dev)
    before = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    t0 = time.perf_counter()
    stats = ecf8.torch.load_model(model, folder, dev, compress=compress)
    sync(dev)
    load_s = time.perf_counter() - t0
    resident = torch.cuda.memory_allocated(dev) - before if dev.type == "cuda" else held_bytes(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt), generator=g).to(dev)
    times, tokens = [], None
    with torch.inference_mode():
        for k in range(args.repeat + 1):                    # the first run warms up
            sync(dev)
            t = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False, pad_token_id=0)
            sync(dev)
            if k:
                times.append(time.perf_counter() - t)
            tokens = out[:, args.prompt:].tolist()
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    del model
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    return {"compress": compress, "resident_bytes": resident, "weights": stats.weights,
            "compressed_bytes": stats.compressed_bytes, "original_bytes": stats.original_bytes,
            "load_s": load_s, "tokens_per_s": args.batch * args.new_tokens / statistics.median(times),
            "peak_bytes": peak, "tokens": tokens}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench_tp"))
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (CPU dry run)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, help="append the markdown table to this file")
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    folder = args.dir / ("tiny" if args.tiny else f"llama7b-{args.layers}l")
    if args.prepare:                                  # a fresh process: no forks under torchrun
        return write_checkpoint(args, folder)

    local = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(args.device, (world,))
    if rank == 0 and not (folder / "ecf8" / "config.json").exists():
        subprocess.run([sys.executable, __file__, "--prepare", *(argv if argv is not None else sys.argv[1:])],
                       check=True)
    dist.barrier()
    rows = [measure(args, mesh, dev, folder / "ecf8", compress) for compress in (False, True)]
    everyone = [None] * world
    dist.all_gather_object(everyone, rows)
    if rank == 0:
        report(args, world, everyone)
    dist.destroy_process_group()


def report(args, world: int, everyone: list) -> None:
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU (gloo dry run)"
    shapes = "tiny" if args.tiny else "Llama-2-7B shapes"
    lines = [f"\n### TP={world}, {name}, {shapes}, {args.layers} layers, "
             f"batch {args.batch}, prompt {args.prompt}, {args.new_tokens} new tokens\n",
             "| rank | weights | resident weight MiB | ratio | peak MiB | load s | tokens/s | ratio |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    same = True
    for rank, (plain, packed) in enumerate(everyone):
        same &= plain["tokens"] == packed["tokens"]
        for r in (plain, packed):
            lines.append(f"| {rank} | {'ecf8' if r['compress'] else 'uncompressed'} | "
                         f"{r['resident_bytes'] / 2**20:.1f} | "
                         f"{r['resident_bytes'] / plain['resident_bytes']:.3f} | "
                         f"{r['peak_bytes'] / 2**20:.1f} | {r['load_s']:.2f} | {r['tokens_per_s']:.1f} | "
                         f"{r['tokens_per_s'] / plain['tokens_per_s']:.3f} |")
    lines.append(f"\ngreedy tokens identical with and without ecf8 on every rank: {same}\n")
    text = "\n".join(lines)
    print(text)
    print(json.dumps({"world": world, "ranks": [[{k: v for k, v in r.items() if k != "tokens"} for r in rows]
                                               for rows in everyone]}))
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    if not same:
        raise SystemExit("tokens differ with ecf8")


if __name__ == "__main__":
    main()
