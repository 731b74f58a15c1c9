"""Greedy generation with a compressed model against the uncompressed one: tokens/s end
to end, and the largest batch that fits a fixed GPU memory budget.

    python bench/bench_generate.py [--layers 8] [--batches 1 16 64 256] [--tokens 32] [--kv-gib 2]
                                   [--max-len 1024] [--formats fp8 bf16] [--skip-budget] [--skip-e2e]
    python bench/bench_generate.py --cpu-smoke       # tiny shapes, BF16, eager: plumbing only
    python bench/bench_generate.py --fused --formats fp8 --batches 1 16 --skip-budget

Model: a minimal Llama-like decoder written here (RMSNorm, attention, SwiGLU; no rotary embedding)
with Llama-3-8B layer shapes (hidden 4096, MLP 14336, 32 heads / 8 KV heads, head dim 128) and a
vocabulary of 32000, RANDOM weights.  Linears are FP8 E4M3 (``torch._scaled_mm``; weights = Gaussian
scaled so amax maps to 448, per-tensor weight scale amax/448/sqrt(in) to keep activations O(1);
activations cast to E4M3 with scale 1; batches padded to 16 rows) or BF16 (``F.linear``).
Embedding, final norm and head are BF16 and stay uncompressed; ecf8 = ``compress_module`` on the
decoder layers (their 7 linears each).  Static KV cache ([B, 8, max_len, 128] BF16 per layer, K and
V) written at a device-side position with ``index_copy_``; attention = SDPA over the whole cache with
a boolean mask updated in place (cuDNN SDPA off: the memory-efficient kernel, which takes masks; the
4 query heads of a KV group are folded into SDPA's query axis: exact GQA, no repeated K/V).  One
decode step = embedding -> layers -> norm -> head -> argmax -> next ids written in place ->
position += 1, all on the device, so it is captured as one CUDA graph (warm-up on a side stream;
every run, eager or graph, on that one stream, so ecf8 keeps one decode buffer).

1. End to end: generation starts at position 0 of a --e2e-len cache (no prompt); N = --tokens
   greedy tokens per run; tok/s = batch * N / median seconds (CUDA events) of 5 runs of N graph
   replays, or of 3 runs of N eager steps (one untimed run first).  Before timing, per batch, the
   ecf8 and base token histories are compared ("tokens identical"; a mismatch is printed, not
   fatal).  ratio = ecf8 tok/s / base tok/s (1.0 = no tax).  A failed capture falls back to eager
   for that cell, marked "(eager)", with the error on its own line.
   With --fused (GPU): a third model whose decoder linears multiply through ``ecf8.fused`` (each
   weight an ECF8 frame decoded inside the product, never written to memory).  FP8: this file's
   ``FusedLinear`` (the same FP8 activations as float32, float32 sums in the kernel's order,
   times the weight's scale, then BF16).  BF16 (``torch.nn.Linear``): ``compress_module(fused=
   True)``, which times both paths per shape and rows at first use (the choices are printed).
   It is not cuBLAS's arithmetic, so its tokens may differ from the base's; the table says
   whether they do, and the ratio is fused tok/s / base tok/s.
2. Fixed memory budget: cap = the uncompressed model's bytes + --kv-gib, enforced with
   ``torch.cuda.set_per_process_memory_fraction`` in a fresh process per measurement, set once
   the model is built (the ecf8 one: built whole, compressed by one ``compress_module`` call, the
   originals freed), so only what the model keeps counts.  Largest batch whose --max-len cache plus two eager
   decode steps fit (powers of two, then bisection); tok/s at that batch with a CUDA graph (eager
   if the capture fails there: marked), 16 tokens.  The cap bounds everything torch's caching
   allocator holds: weights, ecf8 frames and decode tables (ecf8 allocates them through torch,
   ``ecf8.torch.torch_memory``), ecf8's decode buffer, KV caches, activations, the graph's private
   pool, cuBLAS workspace.  Not counted: the CUDA context and kernel images.  "weights GiB" =
   ``torch.cuda.memory_allocated()`` once the model is built (ecf8: frames, tables and buffer).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import statistics
import subprocess
import sys
import time
import traceback
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ecf8.torch
from ecf8.torch import fused_linear
from ecf8.torch.tensors import cupy_view

BF16, E4M3 = torch.bfloat16, torch.float8_e4m3fn
BUDGET_TOKENS, PAPER_EAGER_B16 = 16, 0.67


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int = 4096
    mlp: int = 14336
    heads: int = 32
    kv_heads: int = 8
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


LLAMA3_8B, TINY = Shape(), Shape(256, 512, 4, 2, 512)


def linear(n_in: int, n_out: int, fp8: bool, device: str) -> torch.nn.Module:
    """An FP8 ``Linear`` (below), or a bias-free BF16 ``torch.nn.Linear`` initialized the same way."""
    if fp8:
        return Linear(n_in, n_out, True, device)
    lin = torch.nn.Linear(n_in, n_out, bias=False, dtype=BF16, device=device)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, device=device) / n_in ** 0.5)
    return lin


class Linear(torch.nn.Module):
    """x [M, n_in] BF16 -> [M, n_out] BF16; FP8 E4M3 (``_scaled_mm``) or BF16 weight [n_out, n_in]."""

    def __init__(self, n_in: int, n_out: int, fp8: bool, device: str):
        super().__init__()
        w = torch.randn(n_out, n_in, device=device)
        if fp8:
            amax = w.abs().amax()
            self.weight = torch.nn.Parameter((w * (448 / amax)).to(E4M3), requires_grad=False)
            self.register_buffer("scale_b", (amax / 448 / n_in ** 0.5).float().reshape(()))
            self.register_buffer("one", torch.ones((), device=device))
        else:
            self.weight = torch.nn.Parameter((w / n_in ** 0.5).to(BF16), requires_grad=False)
        self.fp8 = fp8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fp8:
            return F.linear(x, self.weight)
        m = x.shape[0]
        pad = -m % 16                                   # cuBLASLt FP8: rows padded to 16
        xq = (F.pad(x, (0, 0, 0, pad)) if pad else x).to(E4M3)
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=self.one, scale_b=self.scale_b, out_dtype=BF16)
        return y[:m] if pad else y


class FusedLinear(torch.nn.Module):
    """An FP8 ``Linear`` whose product runs in ``ecf8.fused``: x [M, n_in] BF16 -> E4M3 (as the base
    path casts it) -> float32 -> fused product with the compressed weight, times scale_b -> BF16."""

    _workspaces: dict = {}                          # (device, rows) -> float32 scratch, shared
    _outgrown: list = []                            # smaller ones an earlier capture may still use

    def __init__(self, lin: Linear):
        super().__init__()
        from ecf8 import fused

        self.n_out, self.n_in = lin.weight.shape
        self.fw = fused.FusedWeight(ecf8.torch.encode(lin.weight.detach()))     # GPU-encoded, resident
        self.scale = float(lin.scale_b)             # a host float: nothing read back at run time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        x32 = x.to(E4M3).float().contiguous()
        y = torch.empty(m, self.n_out, dtype=torch.float32, device=x.device)
        key = (x.device, m)
        work = self._workspaces.get(key)
        if work is None or work.numel() < self.fw.workspace_floats(m):
            if work is not None:
                self._outgrown.append(work)
            work = self._workspaces[key] = torch.empty(self.fw.workspace_floats(m), dtype=torch.float32,
                                                       device=x.device)
        self.fw.matmul(cupy_view(x32), scale=self.scale, out=cupy_view(y), workspace=cupy_view(work),
                       stream=torch.cuda.current_stream(x.device).cuda_stream)
        return y.to(BF16)


def fuse(model: "Decoder") -> "Decoder":
    """model with every decoder-layer Linear replaced by its FusedLinear (in place)."""
    for block in model.layers:
        for name in ("q", "k", "v", "o", "gate", "up", "down"):
            setattr(block, name, FusedLinear(getattr(block, name)))
    return model


class Block(torch.nn.Module):
    def __init__(self, s: Shape, fp8: bool, device: str):
        super().__init__()
        kv = s.kv_heads * s.head_dim
        self.s = s
        self.attn_norm = torch.nn.RMSNorm(s.hidden, dtype=BF16, device=device)
        self.q, self.k = linear(s.hidden, s.hidden, fp8, device), linear(s.hidden, kv, fp8, device)
        self.v, self.o = linear(s.hidden, kv, fp8, device), linear(s.hidden, s.hidden, fp8, device)
        self.mlp_norm = torch.nn.RMSNorm(s.hidden, dtype=BF16, device=device)
        self.gate, self.up = linear(s.hidden, s.mlp, fp8, device), linear(s.hidden, s.mlp, fp8, device)
        self.down = linear(s.mlp, s.hidden, fp8, device)

    def forward(self, h, cache_k, cache_v, pos, mask):
        s, b = self.s, h.shape[0]
        x = self.attn_norm(h)
        q = self.q(x).view(b, s.kv_heads, s.heads // s.kv_heads, s.head_dim)   # query head = kv*group+g
        cache_k.index_copy_(2, pos, self.k(x).view(b, s.kv_heads, 1, s.head_dim))
        cache_v.index_copy_(2, pos, self.v(x).view(b, s.kv_heads, 1, s.head_dim))
        a = F.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=mask)
        h = h + self.o(a.reshape(b, s.hidden))
        x = self.mlp_norm(h)
        return h + self.down(F.silu(self.gate(x)) * self.up(x))


class Decoder(torch.nn.Module):
    def __init__(self, s: Shape, layers: int, fp8: bool, device: str):
        super().__init__()
        self.s = s
        self.embed = torch.nn.Embedding(s.vocab, s.hidden, dtype=BF16, device=device)
        self.layers = torch.nn.ModuleList()
        for _ in range(layers):
            self.layers.append(Block(s, fp8, device))
        self.norm = torch.nn.RMSNorm(s.hidden, dtype=BF16, device=device)
        self.head = torch.nn.Linear(s.hidden, s.vocab, bias=False, dtype=BF16, device=device)


class State:
    """Static decode state: ids [B], position [1], mask [1,1,1,L], K/V caches, token history [B, L]."""

    def __init__(self, s: Shape, layers: int, batch: int, max_len: int, device: str):
        shape = (batch, s.kv_heads, max_len, s.head_dim)
        self.k = [torch.zeros(shape, dtype=BF16, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=BF16, device=device) for _ in range(layers)]
        self.ids = torch.zeros(batch, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.mask = torch.zeros(1, 1, 1, max_len, dtype=torch.bool, device=device)
        self.history = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.first = (torch.arange(batch, device=device) * 7919 + 1) % s.vocab

    def reset(self) -> None:
        for c in self.k + self.v:
            c.zero_()
        self.ids.copy_(self.first)
        self.pos.zero_()
        self.mask.zero_()
        self.history.zero_()


def cache_bytes(s: Shape, layers: int, batch: int, max_len: int) -> int:
    return 2 * layers * batch * s.kv_heads * max_len * s.head_dim * 2


def step(model: Decoder, st: State) -> None:
    """One greedy decode step, device-side only (capturable)."""
    st.mask.index_fill_(3, st.pos, True)
    h = model.embed(st.ids)
    for block, k, v in zip(model.layers, st.k, st.v):
        h = block(h, k, v, st.pos, st.mask)
    nxt = model.head(model.norm(h)).argmax(-1)
    st.ids.copy_(nxt)
    st.history.index_copy_(1, st.pos, nxt[:, None])
    st.pos.add_(1)


def capture(model: Decoder, st: State) -> torch.cuda.CUDAGraph:
    """A CUDA graph of one step, captured on the current (side) stream after two warm-up steps."""
    st.reset()
    for _ in range(2):
        step(model, st)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()                        # the graph's private pool cannot reuse cached blocks
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=torch.cuda.current_stream()):
        step(model, st)
    return graph


def run_seconds(run, st: State, reps: int, cuda: bool) -> float:
    """Median seconds of `run()` after st.reset(), over reps runs (one untimed run first)."""
    times = []
    for i in range(reps + 1):
        st.reset()
        if cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            stop.record()
            stop.synchronize()
            seconds = start.elapsed_time(stop) / 1e3
        else:
            t = time.perf_counter()
            run()
            seconds = time.perf_counter() - t
        if i:
            times.append(seconds)
    return statistics.median(times)


def tok_s(model: Decoder, st: State, n: int, graph_mode: bool, cuda: bool) -> tuple[float, str]:
    """(tokens/s, "graph" | "eager: <why>") of n greedy steps from position 0."""
    batch = st.ids.shape[0]
    if graph_mode:
        try:
            graph = capture(model, st)
            return batch * n / run_seconds(lambda: [graph.replay() for _ in range(n)], st, 5, cuda), "graph"
        except Exception as e:                      # noqa: BLE001 - reported, then eager
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            graph = None
            gc.collect()
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            return tok_s(model, st, n, False, cuda)[0], f"eager: graph failed: {why}"
    return batch * n / run_seconds(lambda: [step(model, st) for _ in range(n)], st, 3, cuda), "eager"


def tokens(model: Decoder, st: State, n: int) -> torch.Tensor:
    st.reset()
    for _ in range(n):
        step(model, st)
    return st.history[:, :n].clone()


def model_bytes(model: torch.nn.Module, frames: int = 0, buffers: int = 0) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) + frames + buffers


def fail(case: str, e: BaseException) -> None:
    msg = str(e).splitlines()[0][:200] if str(e) else ""
    print(f"case {case}: failed: {type(e).__name__}: {msg}", flush=True)
    traceback.print_exception(e, limit=-8, file=sys.stderr)         # where it failed


# --- 1. end to end --------------------------------------------------------------------------------

def e2e(args, s: Shape, fmt: str, cuda: bool) -> list[str]:
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    base = Decoder(s, args.layers, fmt == "fp8", device)
    comp = copy.deepcopy(base)
    t = time.perf_counter()
    stats = ecf8.torch.compress_module(comp.layers, group_bytes=args.group_bytes)
    bits = stats.compressed_bytes * 8 / (stats.original_bytes / (1 if fmt == "fp8" else 2))
    print(f"# {fmt}: compress_module of {stats.weights} weights in {time.perf_counter() - t:.2f} s, "
          f"{bits:.3f} bits/weight, decode buffer {stats.buffer_bytes / 2**20:.1f} MiB", flush=True)
    models = [("base", base), ("ecf8", comp)]
    if args.fused and cuda and fmt == "fp8":
        models.append(("fused", fuse(copy.deepcopy(base))))
    elif args.fused and cuda:                   # BF16 nn.Linear: the library's own fused path
        fused_linear._choices = fused_linear.Choices(None)      # timed afresh, kept in memory
        model = copy.deepcopy(base)
        fstats = ecf8.torch.compress_module(model.layers, fused=True, group_bytes=args.group_bytes)
        print(f"# {fmt}: compress_module(fused=True): {fstats.fused} of {fstats.weights} weights with the "
              f"fused path", flush=True)
        models.append(("fused", model))
    rows = []
    for batch in args.batches:
        try:
            st = State(s, args.layers, batch, args.e2e_len, device)
            eager = {name: tokens(model, st, args.tokens) for name, model in models}   # each model's own
            ref = eager["base"]
            same = torch.equal(ref, eager["ecf8"])
            print(f"# {fmt} batch {batch}: tokens identical: {'yes' if same else 'NO'}", flush=True)
            r = {}
            if "fused" in eager:
                got = eager["fused"]
                r["fused same"] = bool(torch.equal(ref, got))
                r["fused agree"] = float((ref == got).float().mean())
                print(f"# {fmt} batch {batch}: fused tokens identical to the base's: "
                      f"{'yes' if r['fused same'] else 'NO'} ({r['fused agree']:.1%} of tokens equal)", flush=True)
            for name, model in models:
                for mode in (("graph", "eager") if cuda else ("eager",)):
                    try:
                        r[name, mode] = tok_s(model, st, args.tokens, mode == "graph", cuda)
                        if mode == "graph" and not torch.equal(st.history[:, :args.tokens], eager[name]):
                            print(f"# {fmt} batch {batch} {name}: graph tokens differ from its eager tokens",
                                  flush=True)
                        if r[name, mode][1].startswith("eager:"):
                            print(f"case {fmt} batch {batch} {name} graph: {r[name, mode][1]}", flush=True)
                    except Exception as e:  # noqa: BLE001
                        fail(f"{fmt} batch {batch} {name} {mode}", e)
            rows.append(row(fmt, batch, r, same))
            if len(models) > 2 and fmt == "bf16":
                print("# bf16 fused choices (timed at first use): " + "; ".join(
                    f"{k.split('|', 1)[1]}: {v['path']} ({v['fused_ms']:.3f} vs {v['default_ms']:.3f} ms)"
                    for k, v in sorted(fused_linear.choices().entries().items())), flush=True)
            del st
        except Exception as e:  # noqa: BLE001
            fail(f"{fmt} batch {batch}", e)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return rows


def row(fmt: str, batch: int, r: dict, same: bool) -> str:
    def cell(name, mode):
        if (name, mode) not in r:
            return "n/a"
        v, how = r[name, mode]
        return f"{v:,.0f}" + (" (eager)" if mode == "graph" and how != "graph" else "")

    def ratio(name, mode):
        if ("base", mode) in r and (name, mode) in r:
            return f"{r[name, mode][0] / r['base', mode][0]:.2f}"
        return "n/a"

    def line(label, name, same_cell):
        return (f"| {label} | {batch} | {cell('base', 'graph')} | {cell(name, 'graph')} | {ratio(name, 'graph')} | "
                f"{cell('base', 'eager')} | {cell(name, 'eager')} | {ratio(name, 'eager')} | {same_cell} |")

    lines = [line(fmt, "ecf8", "yes" if same else "NO")]
    if "fused same" in r:
        lines.append(line(f"{fmt}, fused", "fused", f"{'yes' if r['fused same'] else 'NO'} "
                                                    f"({r['fused agree']:.1%} of tokens equal)"))
    return "\n".join(lines)


# --- 2. fixed memory budget (one fresh process per measurement) ----------------------------------

def child(args, s: Shape, fmt: str, variant: str, cap: int, cuda: bool, tokens_at: int | None = None) -> dict:
    """One budget measurement (see the module docstring); tokens_at: also return the greedy tokens
    of a batch that size (0: the largest batch) under "tokens", to compare two variants."""
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    model = Decoder(s, args.layers, fmt == "fp8", device)
    frames = ([ecf8.torch.compress_module(model.layers, group_bytes=args.group_bytes).compressed_bytes]
              if variant == "ecf8" else [])
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        weights = torch.cuda.memory_allocated()
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / torch.cuda.get_device_properties(0).total_memory))
    else:
        largest = max(w.numel() for b in Decoder(s, 1, fmt == "fp8", "meta").layers for w in b.parameters())
        weights = model_bytes(model, sum(frames), largest * 2 if variant == "ecf8" else 0)
    limit = None if cuda else cap - weights         # CPU smoke: an emulated out-of-memory
    live: weakref.WeakSet = weakref.WeakSet()       # (CPU smoke) the States alive: their caches count

    def state(batch: int) -> State:
        """A State of `batch`; on the CPU, out of memory when the caches of every State alive and
        this one's exceed the cap (as on a GPU under set_per_process_memory_fraction)."""
        if limit is not None:
            held = sum(cache_bytes(s, args.layers, x.ids.shape[0], args.max_len) for x in live)
            if held + cache_bytes(s, args.layers, batch, args.max_len) > limit:
                raise torch.OutOfMemoryError("emulated (cpu smoke)")
        st = State(s, args.layers, batch, args.max_len, device)
        live.add(st)
        return st

    def fits(batch: int) -> bool:
        st = None
        gc.collect()                                # a previous failure's traceback is gone now
        if cuda:
            torch.cuda.empty_cache()
        try:
            st = state(batch)
            step(model, st)
            step(model, st)
            if cuda:
                torch.cuda.synchronize()
            return True
        except RuntimeError as e:                   # torch.OutOfMemoryError, or cuBLAS failing to allocate
            if isinstance(e, torch.OutOfMemoryError) or "ALLOC_FAILED" in str(e):
                return False
            raise
        finally:
            st = None
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()

    good, bad = 0, None
    batch = 1
    while batch <= 1024:
        if not fits(batch):
            bad = batch
            break
        good, batch = batch, batch * 2
    if good and bad:
        while bad - good > 1:
            mid = (good + bad) // 2
            good, bad = (mid, bad) if fits(mid) else (good, mid)
    out = {"weights": weights, "batch": good, "tok_s": None, "how": ""}
    if good:
        try:
            st = state(good)
            out["tok_s"], out["how"] = tok_s(model, st, BUDGET_TOKENS, cuda, cuda)
        except torch.OutOfMemoryError as e:
            out["how"] = f"eager: out of memory when timing ({str(e).splitlines()[0][:120]})"
        if tokens_at is not None:
            st = None                               # the timing State fills the budget: freed first
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()            # (and the graph's private pool)
            try:
                st = state(tokens_at or good)
                out["tokens"] = tokens(model, st, BUDGET_TOKENS).tolist()
            except torch.OutOfMemoryError as e:
                out["tokens_error"] = f"out of memory at batch {tokens_at or good}: {str(e).splitlines()[0][:120]}"
    return out


def run_child(args, fmt: str, variant: str, cap: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", fmt, variant, str(cap), "--layers", str(args.layers),
           "--max-len", str(args.max_len)] + (["--cpu-smoke"] if args.cpu_smoke else []) \
        + ([] if args.group_bytes is None else ["--group-bytes", str(args.group_bytes)])
    try:
        p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.child_timeout} s"}
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode or not lines:
        tail = [line for line in (p.stderr or p.stdout).splitlines() if line.strip()]
        return {"error": f"exit {p.returncode}: {tail[-1][:200] if tail else 'no output'}"}
    return json.loads(lines[-1])


def budget(args, s: Shape, fmt: str) -> str:
    base_bytes = model_bytes(Decoder(s, args.layers, fmt == "fp8", "meta"))
    kv = 2**20 if args.cpu_smoke else int(args.kv_gib * 2**30)
    cap = base_bytes + kv
    r = {}
    for variant in ("base", "ecf8"):
        r[variant] = run_child(args, fmt, variant, cap)
        if "error" in r[variant]:
            print(f"case budget {fmt} {variant}: failed: {r[variant]['error']}", flush=True)
        elif r[variant]["how"].startswith("eager:"):
            print(f"case budget {fmt} {variant} graph: {r[variant]['how']}", flush=True)

    def cells(x):
        if "error" in x:
            return "failed | failed"
        t = "n/a" if x["tok_s"] is None else f"{x['tok_s']:,.0f}" + ("" if x["how"] == "graph" else " (eager)")
        return f"{x['batch']} | {t}"

    gib = [f"{r[v]['weights'] / 2**30:.3f}" if "weights" in r[v] else "?" for v in ("ecf8", "base")]
    return f"| {fmt} | {cap / 2**30:.3f} | {cells(r['base'])} | {cells(r['ecf8'])} | {gib[0]} vs {gib[1]} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--e2e-len", type=int, default=128, help="KV cache length of the end-to-end runs")
    ap.add_argument("--kv-gib", type=float, default=2.0)
    ap.add_argument("--max-len", type=int, default=1024, help="KV cache length of the budget runs")
    ap.add_argument("--formats", nargs="+", default=["fp8", "bf16"], choices=["fp8", "bf16"])
    ap.add_argument("--group-bytes", type=int, default=None,
                    help="compress_module's group_bytes (default: its own; 0: one decode launch per weight)")
    ap.add_argument("--fused", action="store_true",
                    help="end to end (GPU): also a model whose linears multiply through ecf8.fused (FP8: "
                         "this file's FusedLinear; BF16: compress_module(fused=True))")
    ap.add_argument("--skip-budget", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, BF16, eager, on the CPU")
    ap.add_argument("--child-timeout", type=float, default=45.0)
    ap.add_argument("--child", nargs=3, metavar=("FORMAT", "VARIANT", "CAP"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    started = time.perf_counter()
    torch.set_grad_enabled(False)
    cuda = not args.cpu_smoke
    if cuda:                                    # SDPA: memory-efficient kernel (masks), math fallback
        torch.backends.cuda.enable_cudnn_sdp(False)
    s = TINY if args.cpu_smoke else LLAMA3_8B
    if args.cpu_smoke:
        args.formats, args.layers, args.e2e_len, args.max_len = ["bf16"], 2, 32, 64
        args.batches, args.tokens = [b for b in args.batches if b <= 16], min(args.tokens, 8)
    if args.tokens + 2 > args.e2e_len or BUDGET_TOKENS + 2 > args.max_len:
        ap.error("--e2e-len must exceed --tokens + 2 and --max-len must exceed 18")
    stream = torch.cuda.Stream() if cuda else None
    with torch.cuda.stream(stream) if cuda else torch.no_grad():   # one stream: one ecf8 buffer
        if args.child:
            fmt, variant, cap = args.child
            print(json.dumps(child(args, s, fmt, variant, int(cap), cuda)))
            return
        gpu = torch.cuda.get_device_name() if cuda else "CPU (smoke: tiny shapes, eager only)"
        print(f"# GPU: {gpu}; torch {torch.__version__}; {args.layers} layers of "
              f"{'Llama-3-8B' if cuda else 'tiny'} shapes (hidden {s.hidden}, MLP {s.mlp}, "
              f"{s.heads}/{s.kv_heads} heads), vocab {s.vocab}; RANDOM weights; no rotary embedding; "
              "ecf8 = compress_module on the decoder layers' linears (embedding/head BF16, uncompressed)",
              flush=True)
        if not args.skip_e2e:
            for fmt in args.formats:            # one table per format, printed when it is done
                try:
                    lines = e2e(args, s, fmt, cuda)
                    print(f"\n## End to end, {fmt}: {args.tokens} greedy tokens from position 0 (no prompt), "
                          f"static cache of {args.e2e_len}; tok/s = batch x tokens / median s "
                          f"({'CUDA events' if cuda else 'perf_counter'}); ratio = ecf8 / base")
                    print("| format | batch | base tok/s (graph) | ecf8 tok/s (graph) | ratio | base tok/s (eager) "
                          "| ecf8 tok/s (eager) | eager ratio | tokens identical |")
                    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
                    print("\n".join(lines))
                    print(f"paper (Qwen3-8B, H100, eager, batch 16): {PAPER_EAGER_B16:.2f}x\n", flush=True)
                except Exception as e:  # noqa: BLE001
                    fail(f"e2e {fmt}", e)
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
        if not args.skip_budget:
            kv = "1 MiB (smoke)" if args.cpu_smoke else f"{args.kv_gib:g} GiB"
            per_seq = cache_bytes(s, args.layers, 1, args.max_len) / 2**20
            print(f"\n## Fixed memory budget: cap = uncompressed model + {kv}; KV cache {args.max_len} "
                  f"positions = {per_seq:.1f} MiB per sequence; largest batch whose cache + 2 eager "
                  f"steps fit; tok/s of {BUDGET_TOKENS} tokens at that batch (graph unless marked); "
                  "one fresh process per cell")
            print("| format | cap GiB | base max batch | base tok/s | ecf8 max batch | ecf8 tok/s | "
                  "weights GiB ecf8 vs base |")
            print("|---|---:|---:|---:|---:|---:|---|", flush=True)
            for fmt in args.formats:            # rows printed as they come (failures on their own line)
                try:
                    print(budget(args, s, fmt), flush=True)
                except Exception as e:  # noqa: BLE001
                    fail(f"budget {fmt}", e)
        print(f"\n# total {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
