"""Models that do not fit a GPU memory cap: ecf8 against the offloading users reach for, one table.

    python bench/bench_budget.py --out results/            # every case, H200/H100: about 6-8 minutes
    python bench/bench_budget.py --smoke --out /tmp/x      # every code path, tiny, on the CPU

The cap is ``torch.cuda.set_per_process_memory_fraction(cap / total memory)``, set once a model is
built and the allocator's cache emptied: it bounds everything torch's caching allocator holds
(weights, ecf8 frames, decode tables and buffers, staging buffers, KV caches, activations,
cuBLAS workspaces, and the unused tails of its segments); not the CUDA context.  Weights are
RANDOM with real shapes (Gaussian, made on the GPU in their own dtype; FP8: E4M3 scaled to amax
448 with a per-tensor scale, as ``bench_generate.py``), every tensor of a model allocated before
any is filled, so that no temporary of the build leaves a segment half used.  Every row says
whether its outputs are bit-identical to the baseline's (the same kernels see the same weights);
a row that could not run says FAILED and why, and the run goes on.  Each case frees its GPU
memory and lifts the cap before the next (kv-budget runs first, on a fresh process).

Caps (``budget_caps.py``): each is derived, not a constant, and the table's header says how
("# cap" lines): halfway between what must fit (ecf8's model, measured as the memory the
allocator holds after compress_module, plus the working set of the largest batch) and what must
not (the uncompressed model plus the same working set; in case 4, ecf8's whole model held on the
GPU), so that both miss the cap by the same margin.  Working set of the LLM at batch 16 (64 +
8 tokens): KV cache 0.15 GiB, prefill activations 0.15, logits 0.02, cuBLAS workspaces 0.06 =
0.38 GiB (FP8; BF16 0.37).  Byte counts (Llama-3-8B shapes; ecf8 from one real-shape layer
compressed on the CPU, 32x, and the first GPU run's footprints): FP8 model 8.46 GiB
uncompressed (linears 6.50 at 1 byte, embedding + head 1.96 in BF16), ecf8 7.47 GiB held (frames
and decode tables 5.45 at 6.7-6.8 bits/weight, decode buffer 0.05, the BF16 rest 1.96) plus
~0.19 of allocator rounding (a frame over 10 MiB gets a segment of its own, in 2 MiB steps; the
first run allocated 7.48); BF16 model 14.96 GiB, ecf8 10.76 (frames 8.69 at 10.7 bits/weight,
buffer 0.11) plus ~0.25 (10.82 allocated in the first run).  Only the decoder linears are
compressed: the embedding (``embeddings=True``) and the head would save another 0.65 GiB (10.7
bits/weight of 16), but each is decoded whole, into a 0.98 GiB decode buffer in place of the 56 MiB
one (FP8): 0.92 GiB more, a net loss.

1. llm-over-cap: a Llama-3-8B-shaped Transformers ``LlamaForCausalLM`` (32 layers, hidden 4096,
   MLP 14336, 32/8 heads, vocabulary 128256, SDPA) that does not fit under the cap uncompressed
   and does compressed.  FP8: every decoder linear is an E4M3 weight with a per-tensor
   ``torch._scaled_mm`` forward (what bench_generate/bench_tax build; Transformers' own FP8 paths
   are block-scaled Triton kernels or compressed-tensors checkpoints, another computation);
   embedding and head BF16 and uncompressed.  Cap FP8 ~8.44 GiB: must fit 7.67 + 0.38, must not
   8.46 + 0.38, margin ~0.4 GiB each way (FP8 compression saves only ~1 GiB, 16% of the linears,
   so the uncompressed weights alone are about at the cap: the uncompressed model needs 8.54 GiB
   even at batch 1, and accelerate gets cap - headroom); BF16 ~13.4 GiB: 11.07 + 0.37 against
   14.96 + 0.37, margin ~1.9.  Baseline: Transformers + accelerate offloading exactly as
   ``from_pretrained(device_map="auto", max_memory={0: cap - headroom, "cpu": ...})`` does it
   (``transformers.integrations.accelerate._get_device_map`` then ``accelerate_dispatch``:
   ``dispatch_model`` with AlignDevicesHook, the CPU layers copied in per forward).  ecf8:
   ``compress_module`` on the decoder layers, all on the GPU.  Greedy
   ``generate`` of --new-tokens after a --prompt-token prompt; TTFT = seconds of
   ``generate(max_new_tokens=1)``; tok/s = batch * (new tokens - 1) / (seconds of the whole
   generate - TTFT): decoding only.
2. dit-over-cap: a FLUX.1-dev-shaped Diffusers ``FluxTransformer2DModel`` (19 double + 38 single
   blocks, BF16, 11.9 G weights) at 512x512 (1024 image + 256 text tokens), --dit-steps Euler
   steps; s/step.  Cap ~19.0 GiB: ecf8 ~15.2 (14.99 allocated in the first run) + 0.30 working
   set (activations 0.16, attention scores 0.07, workspaces 0.06) against 22.17 + 0.30, margin
   ~3.5.  Baselines as Diffusers applies them to a pipeline's transformer: sequential CPU
   offload (``accelerate.cpu_offload``), model CPU offload (``accelerate.cpu_offload_with_hook``:
   the whole transformer is moved in, so it cannot fit the cap: reported as such), and group
   offload (``enable_group_offload``, block level, CUDA stream, pinned: Diffusers' fastest).
   ecf8: ``compress_module``, all on the GPU.  Final latents compared bit for bit.
3. kv-budget: bench_generate.py's fixed-memory table (8 layers, vocabulary 32000; cap = the
   uncompressed model + --kv-gib: FP8 2.11 + 2 GiB, BF16 3.74 + 2; the largest batch whose KV
   cache of --kv-max-len positions fits, tok/s there, greedy tokens of both at the uncompressed
   model's largest batch compared), run in this process, first.
4. compressed-offload: the LLM of case 1 under a cap that even its compressed weights exceed:
   halfway between ecf8 with every layer streamed (the BF16 rest, two staging buffers of a
   layer's frames, a decoded layer: FP8 1.96 + 0.34 + 0.20 = 2.50 GiB, BF16 1.96 + 0.54 + 0.41 =
   2.91) and ecf8 held whole (7.67 / 11.07), both plus the working set: FP8 ~5.5 GiB (11 of 32
   layers resident), BF16 ~7.4 (12 of 32).  Baseline: accelerate offloading as in case 1, same cap.  ecf8:
   ``ecf8.torch.offload_module(model, max_gpu_memory=cap - headroom)``: the first layers resident
   compressed, the others' frames in pinned host memory, copied per forward on a copy stream and
   decoded on the GPU; it fills cap - headroom, so its spare is headroom - working set (0.6
   GiB).  Control row: the same runtime streaming the raw bits (stored frames, no entropy
   coding), so that the row above it shows what compression adds to pinned, overlapped
   streaming alone.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.metadata as md
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import budget_caps as caps  # noqa: E402
import ecf8.torch  # noqa: E402
from ecf8.torch import offload_module  # noqa: E402

BF16, E4M3 = torch.bfloat16, torch.float8_e4m3fn
GiB = 2**30
ROWS: list[str] = []
NOTES: list[str] = []           # the header lines that say how each cap was derived
HEADER = ("| case | format | cap GiB | variant | weights on GPU GiB | batch | TTFT s | tok/s or s/step | "
          "ratio ecf8/base | outputs identical |")


# --- random weights, made where they live --------------------------------------------------------

def _values(shape: tuple, dtype: torch.dtype, seed: int, device: str, kind: str) -> torch.Tensor:
    """Deterministic tensor number `seed` (the same in every build), made on `device` in `dtype`."""
    g = torch.Generator(device=device).manual_seed(1000 + seed)
    if kind == "ones":
        return torch.ones(shape, dtype=dtype, device=device)
    make = BF16 if dtype == E4M3 else dtype
    if kind == "bias":
        return (torch.randn(shape, generator=g, device=device, dtype=make) * 0.02).to(dtype)
    w = torch.randn(shape, generator=g, device=device, dtype=make)
    if kind == "embedding" or len(shape) < 2:
        return w.to(dtype)
    return (w * shape[1] ** -0.5).to(dtype)


class FP8Linear(torch.nn.Module):
    """x [..., n_in] BF16 -> [..., n_out] BF16 with an E4M3 weight [n_out, n_in] and a per-tensor
    scale (``torch._scaled_mm``, rows padded to 16; on the CPU: upcast, for --smoke only)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.in_features, self.out_features = n_in, n_out
        self.weight = torch.nn.Parameter(torch.empty(n_out, n_in, dtype=E4M3), requires_grad=False)
        self.register_buffer("scale_b", torch.empty((), dtype=torch.float32))
        self.register_buffer("one", torch.empty((), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if not x.is_cuda:
            y = F.linear(x.float(), self.weight.float() * self.scale_b).to(BF16)
        else:
            m, pad = x.shape[0], -x.shape[0] % 16
            xq = (F.pad(x, (0, 0, 0, pad)) if pad else x).to(E4M3)
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=self.one, scale_b=self.scale_b, out_dtype=BF16)
            y = y[:m] if pad else y
        return y.reshape(*shape[:-1], self.out_features)


def materialize(model: torch.nn.Module, device: str, place=lambda name: None) -> None:
    """Fill a meta-built model with deterministic random tensors made on `device`: matrices
    N(0, 1/fan_in) (FP8: scaled to amax 448, per-tensor scale), Embedding tables N(0, 1), norm
    weights 1, other vectors N(0, 0.02^2).  place(name): another device for that tensor
    (accelerate's CPU share), None for `device`.

    Every tensor of the model is allocated first, in module order, and only then filled: the
    model's tensors lie side by side in the allocator's segments.  Made one by one, each would land
    in a block a temporary of the build had freed (the FP8 path makes FP32 temporaries, 4x its
    weights), and that segment would stay reserved, against the cap, for the model's lifetime."""
    made = []
    for i, (name, p) in enumerate(model.named_parameters(remove_duplicate=False)):
        if p.device.type != "meta":
            continue
        owner_name, last = name.rpartition(".")[::2]
        owner = model.get_submodule(owner_name)
        target = place(name) or device
        t = torch.empty(tuple(p.shape), dtype=p.dtype, device=target)
        owner._parameters[last] = torch.nn.Parameter(t, requires_grad=False)
        if p.dtype == E4M3:
            owner.scale_b = torch.empty((), dtype=torch.float32, device=target)
            owner.one = torch.empty((), dtype=torch.float32, device=target)
        made.append((i, owner, owner_name, last, t))
    left = [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if left:
        raise RuntimeError(f"buffers left on the meta device: {left[:3]}")
    for i, owner, owner_name, last, t in made:
        if t.dim() >= 2:
            kind = "embedding" if isinstance(owner, torch.nn.Embedding) else "weight"
        else:
            kind = "ones" if "norm" in owner_name.rsplit(".", 1)[-1] and last == "weight" else "bias"
        if t.dtype == E4M3:
            w = _values(tuple(t.shape), BF16, i, device, "embedding")
            amax = w.float().abs().amax()
            t.copy_((w.float() * (448 / amax)).to(E4M3))
            owner.scale_b.copy_((amax / 448 / t.shape[1] ** 0.5).float().reshape(()))
            owner.one.fill_(1.0)
        else:
            t.copy_(_values(tuple(t.shape), t.dtype, i, device, kind))


# --- the GPU memory cap ----------------------------------------------------------------------------

def settle(device: str) -> None:
    """Free what nothing references: garbage, torch's cached blocks, cuBLAS workspaces."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear is not None:                   # one workspace per stream used: re-made on demand
            clear()
        torch.cuda.empty_cache()


def cap_to(device: str, cap: float | None) -> None:
    """Bound torch's allocator to `cap` bytes (None: lift the bound); settles first."""
    settle(device)
    if device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(1.0 if cap is None else min(1.0, cap / total))


def reserved(device: str) -> int:
    """Bytes torch's allocator holds (what the cap bounds); 0 on the CPU."""
    return torch.cuda.memory_reserved() if device == "cuda" else 0


def note(line: str) -> None:
    """A header line of the table (why a cap is what it is), printed now."""
    NOTES.append(line)
    print(line, flush=True)


def failed(e: BaseException) -> str:
    """The cell of a row that did not run: FAILED, the exception's type and first line."""
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"FAILED: {type(e).__name__}: {msg[:90]}"


def on_gpu(device: str) -> float:
    return torch.cuda.memory_allocated() / GiB if device == "cuda" else float("nan")


def now(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def row(case, fmt, cap, variant, weights, batch, ttft, value, ratio, same) -> None:
    def f(x, spec):
        return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)
    line = (f"| {case} | {fmt} | {f(cap / GiB if cap else None, '.2f')} | {variant} | {f(weights, '.2f')} | "
            f"{f(batch, 'd')} | {f(ttft, '.3f')} | {value} | {f(ratio, '.2f')} | {same} |")
    ROWS.append(line)
    print(line, flush=True)


# --- 1 and 4: an LLM over the cap ------------------------------------------------------------------

def llm_config(args):
    import transformers

    if args.smoke:
        dims = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                    vocab_size=512, num_hidden_layers=3)
    else:
        dims = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                    vocab_size=128256, num_hidden_layers=args.llm_layers)
    config = transformers.LlamaConfig(**dims, max_position_embeddings=4096, rms_norm_eps=1e-5,
                                      tie_word_embeddings=False, attn_implementation="sdpa",
                                      bos_token_id=None, eos_token_id=None, pad_token_id=0)
    config.dtype = BF16
    return config


def fp8_linears(model) -> None:
    """Every decoder-layer nn.Linear of a meta-built Llama becomes an FP8Linear (meta too)."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, torch.nn.Linear):
                    with torch.device("meta"):
                        setattr(parent, name, FP8Linear(lin.in_features, lin.out_features))


def build_llm(args, fmt: str, device: str, place=lambda name: None):
    """A random-weight LlamaForCausalLM (FP8 decoder linears for fmt fp8), eval mode."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = llm_config(args)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).to(BF16)
    if fmt == "fp8":
        fp8_linears(model)
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)
    materialize(model, device, place)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval().requires_grad_(False)


def accelerate_llm(args, fmt: str, device: str, budget: int | None):
    """The baseline as from_pretrained(device_map="auto", max_memory=...) builds it: Transformers'
    own device-map and dispatch helpers over accelerate."""
    import transformers
    from transformers.integrations import accelerate as hf_acc

    config = llm_config(args)
    with torch.device("meta"):
        shell = transformers.LlamaForCausalLM(config).to(BF16)
    if fmt == "fp8":
        fp8_linears(shell)
    if device == "cuda":
        max_memory = {0: budget, "cpu": 400 * GiB}
    else:                                           # smoke: the same calls, the CPU as the "GPU"
        max_memory = {"cpu": 400 * GiB}
    device_map = hf_acc._get_device_map(shell, "auto", max_memory, None)
    del shell
    cpu = {k for k, v in device_map.items() if v == "cpu"} if device == "cuda" else set()

    def place(name: str):
        return "cpu" if any(name == k or name.startswith(k + ".") for k in cpu) else None

    model = build_llm(args, fmt, device, place)
    if device == "cuda":
        hf_acc.accelerate_dispatch(model, None, device_map, None, None, False)
    share = sum(1 for v in device_map.values() if v == "cpu")
    return model, share, len(device_map)


def raw_frames(module: torch.nn.Module) -> None:
    """Control only: every compressed weight of `module` re-held as a stored ECF8 frame (its raw
    bits, no entropy coding; a valid frame, checksum included) in host memory, so that
    ``offload_module`` streams the uncompressed bytes through the same runtime (and uploads the
    frames of the layers it keeps resident into fresh GPU memory)."""
    import struct
    import zlib

    import numpy as np

    from ecf8 import format as fmt

    seen = set()
    for m in module.modules():
        if not ecf8.torch.is_compressed(m) or id(m.__dict__["_ecf8"]) in seen:
            continue
        w = m.__dict__["_ecf8"]
        seen.add(id(w))
        if w.group is not None:
            w.group.dissolve()
        spec = fmt.spec_for_dtype(ecf8.torch.to_numpy(torch.empty(0, dtype=w.dtype)).dtype)
        bits = w.fresh().contiguous().view(torch.uint8).reshape(-1).cpu().numpy()
        head = fmt.build_header(spec, fmt.MODE_STORED, tuple(w.shape), 0, None, None, None, 0)
        start = fmt.align16(len(head))
        frame = np.zeros(start + bits.nbytes + 4, np.uint8)
        frame[: len(head)] = np.frombuffer(head, np.uint8)
        frame[start:-4] = bits
        crc = zlib.crc32(memoryview(frame[len(head):-4]), fmt.header_crc(head))
        frame[-4:] = np.frombuffer(struct.pack("<I", crc), np.uint8)
        w.move(torch.device("cpu"))             # the coded frame leaves the GPU ...
        w.blob = frame.tobytes()                # ... and the stored one takes its place on the host


def generate(model, args, batch: int, device: str, vocab: int) -> tuple[float, float, torch.Tensor]:
    """(TTFT s, decode tok/s, generated ids) of greedy generation from a fixed random prompt."""
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(1, vocab, (batch, args.prompt_tokens), generator=g).to(device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    n = args.new_tokens
    model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)          # warm-up: prefill and decode steps
    t = now(device)
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    ttft = now(device) - t
    t = now(device)
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
    total = now(device) - t
    rate = batch * (n - 1) / (total - ttft) if total > ttft else float("nan")   # decoding alone
    return ttft, rate, out[:, ids.shape[1]:].cpu()


def measure_generate(results: dict, key: tuple, model, args, device, vocab: int, cap) -> None:
    """results[key + (batch,)] = (GiB on the GPU, TTFT, tok/s, tokens or FAILED: why) of every
    --batches batch, the cap set for the span; a failure (out of memory, say) is recorded in the
    table, not raised, and its memory freed before the next batch."""
    cap_to(device, cap)
    w = on_gpu(device)
    if device == "cuda":
        print(f"# {' '.join(key)}: {w:.2f} GiB allocated, {reserved(device) / GiB:.2f} reserved "
              f"under {'no cap' if cap is None else 'a cap of ' + caps.size(cap)}", flush=True)
    for b in args.batches:
        try:
            results[(*key, b)] = (w, *generate(model, args, b, device, vocab))
        except Exception as e:  # noqa: BLE001 - reported in the table
            results[(*key, b)] = (w, None, None, failed(e))
        if isinstance(results[(*key, b)][3], str):
            settle(device)                      # the failure's tensors, out of its traceback
    cap_to(device, None)


def layer_bytes(model) -> tuple[list[int], list[int]]:
    """(frame bytes, decoded bytes) of each decoder layer's compressed weights, each rounded up to
    256 as offload_module lays them out in its staging and decode buffers."""
    frames, decoded = [], []
    for layer in model.model.layers:
        ws = {id(m.__dict__["_ecf8"]): m.__dict__["_ecf8"] for m in layer.modules() if ecf8.torch.is_compressed(m)}
        lengths = [w.blob.payload.nbytes if w.device.type == "cuda" else len(w.blob) for w in ws.values()]
        frames.append(sum(-(-n // 256) * 256 for n in lengths))
        decoded.append(sum(-(-w.nbytes // 256) * 256 for w in ws.values()))
    return frames, decoded


def llm_caps(args, fmt: str, device: str, model, plain: int, held: int, start: int, stats) -> dict:
    """The caps of cases 1 and 4 for this format (bench/budget_caps.py: halfway between what must
    fit and what must not), each noted in the table's header."""
    config = llm_config(args)
    cuda = device == "cuda"
    work = caps.llm_work(config, fmt == "fp8", max(args.batches), args.prompt_tokens, args.new_tokens, cuda)
    w = sum(work.values())
    ws = f"working set at batch {max(args.batches)} {caps.size(w)} ({caps.parts(work)})"
    given = {c: None if g is None else int(g * GiB) for c, g in
             (("llm-over-cap", args.cap_gb[fmt]), ("compressed-offload", args.offload_cap_gb[fmt]))}
    out = {}
    if "llm-over-cap" in args.cases:
        why = (f"ecf8 {caps.size(held)} (reserved after compress_module: frames and decode tables "
               f"{caps.size(stats.compressed_bytes)}, decode buffer {caps.size(stats.buffer_bytes)}, "
               f"uncompressed embedding/head/norms {caps.size(caps.tensor_bytes(model))}) + {ws}; "
               f"uncompressed {caps.size(plain)} + the same working set")
        c = separate(args, "llm-over-cap", fmt, held + w, plain + w, why, given["llm-over-cap"], start)
        if c is not None:
            out["llm-over-cap"] = c
            note(c.line() + alone(args, start + plain, c.cap))
    if "compressed-offload" in args.cases:
        frames, decoded = layer_bytes(model)
        floor = caps.tensor_bytes(model) + 2 * max(frames) + max(decoded)
        headroom = int(args.headroom_gb * GiB)
        why = (f"ecf8 with every layer streamed {caps.size(floor)} (uncompressed rest "
               f"{caps.size(caps.tensor_bytes(model))}, two staging buffers of the largest layer's frames "
               f"{caps.size(2 * max(frames))}, its decode buffer {caps.size(max(decoded))}) + {ws}; "
               f"ecf8 resident whole {caps.size(held)} + the same working set")
        c = separate(args, "compressed-offload", fmt, floor + w, held + w, why, given["compressed-offload"],
                     start)
        if c is not None:
            out["compressed-offload"] = c
            note(c.line() + (" (smoke: not enforced)" if args.smoke else
                             f"; offload_module keeps layers resident up to cap - headroom = "
                             f"{caps.size(c.cap - start - headroom)}, so ecf8's spare is headroom - working "
                             f"set = {caps.size(headroom - w)}"))
    return out


def alone(args, weights: int, cap: int) -> str:
    """How the uncompressed weights alone stand to the cap (a phrase for a cap line)."""
    side = "over" if weights > cap else "under"
    return (f"; the uncompressed weights alone are {caps.size(abs(weights - cap))} {side} it"
            + (" (smoke: not enforced)" if args.smoke else ""))


def separate(args, case: str, fmt: str, fits: int, exceeds: int, why: str, given, start: int):
    """caps.halfway, noted; on the CPU (--smoke, nothing enforced) a tiny model that no cap
    separates is noted and gives None; on a GPU that raises ValueError (the case fails loudly)."""
    try:
        return caps.halfway(case, fmt, fits, exceeds, why, given, start)
    except ValueError as e:
        if not args.smoke:
            raise
        note(f"# {e} (smoke: tiny shapes, caps not enforced)")
        return None


def llm(args, fmt: str, device: str) -> None:
    """Cases 1 and 4 for one format: one ecf8 model (compressed once, then offloaded), a control
    model (raw frames, offloaded), two accelerate baselines (one per cap)."""
    vocab = llm_config(args).vocab_size
    cases = [c for c in ("llm-over-cap", "compressed-offload") if c in args.cases]
    if not cases:
        return
    headroom = args.headroom_gb * GiB
    results: dict = {}
    settle(device)
    start = reserved(device)
    t0 = time.perf_counter()
    model = build_llm(args, fmt, device)
    plain = caps.tensor_bytes(model)
    settle(device)
    stats = ecf8.torch.compress_module(model.model.layers)     # embedding and head stay BF16
    settle(device)
    held = (reserved(device) - start if device == "cuda"
            else caps.tensor_bytes(model) + stats.compressed_bytes + stats.buffer_bytes)
    print(f"# {fmt} LLM: {plain / GiB:.2f} GiB uncompressed, compressed weights "
          f"{stats.compressed_bytes / GiB:.2f} GiB of {stats.original_bytes / GiB:.2f}, held "
          f"{held / GiB:.2f} ({stats.weights} weights, {time.perf_counter() - t0:.1f} s to build and compress)",
          flush=True)
    chosen = llm_caps(args, fmt, device, model, plain, held, start, stats)
    caps_of = {c: None if args.smoke else chosen[c].cap for c in cases}       # smoke: nothing enforced

    def budget(cap):                            # for the model's weights (what was held before is not)
        return None if cap is None else int(cap - start - headroom)

    for case in cases:
        cap = caps_of[case]
        if case == "compressed-offload":
            off = offload_module(model, device, max_gpu_memory=budget(cap))
            print(f"# {fmt} ecf8 offload: {off.resident_blocks} layers resident, {off.offloaded_blocks} "
                  f"streamed ({off.host_bytes / GiB:.2f} GiB pinned host frames)", flush=True)
        measure_generate(results, (case, "ecf8"), model, args, device, vocab, cap)
    del model
    settle(device)
    if "compressed-offload" in cases and args.control:
        cap = caps_of["compressed-offload"]
        t0 = time.perf_counter()
        model = build_llm(args, fmt, device)
        settle(device)
        ecf8.torch.compress_module(model.model.layers)
        raw_frames(model.model.layers)
        settle(device)
        off = offload_module(model, device, max_gpu_memory=budget(cap))
        print(f"# {fmt} control, raw frames streamed by the same runtime: {off.resident_blocks} layers "
              f"resident, {off.offloaded_blocks} streamed ({off.host_bytes / GiB:.2f} GiB pinned host "
              f"frames; {time.perf_counter() - t0:.1f} s to build)", flush=True)
        measure_generate(results, ("compressed-offload", "control"), model, args, device, vocab, cap)
        del model
        settle(device)
    for case in cases:
        cap = caps_of[case]
        t0 = time.perf_counter()
        base, share, parts = accelerate_llm(args, fmt, device, budget(cap))
        print(f"# {fmt} accelerate ({case}): {share} of {parts} device-map entries on the CPU, "
              f"{time.perf_counter() - t0:.1f} s to build", flush=True)
        measure_generate(results, (case, "base"), base, args, device, vocab, cap)
        del base
        settle(device)
        for b in args.batches:
            r = results[case, "base", b]
            variants = [("accelerate offload", r)]
            variants.append(("ecf8 on GPU" if case == "llm-over-cap" else "ecf8 offload (compressed)",
                             results[case, "ecf8", b]))
            if (case, "control", b) in results:
                variants.append(("ecf8 offload, raw frames (control)", results[case, "control", b]))
            for variant, x in variants:
                ok = isinstance(x[3], torch.Tensor)
                same = ("—" if not ok or not isinstance(r[3], torch.Tensor) else "reference" if x is r
                        else "yes" if torch.equal(x[3], r[3]) else "NO")
                ratio = x[2] / r[2] if x is not r and ok and r[2] else None
                rate = "n/a" if not ok or math.isnan(x[2]) else f"{x[2]:,.1f} tok/s"
                row(case, fmt, cap, variant, x[0], b, x[1], rate if ok else x[3], ratio, same)


# --- 2. a diffusion transformer over the cap -------------------------------------------------------

def dit_config(args) -> dict:
    if args.smoke:
        return dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                    guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    return dict(patch_size=1, in_channels=64, num_layers=args.dit_double, num_single_layers=args.dit_single,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def shell_dit(args):
    """The FLUX-shaped transformer on the meta device (no weights), eval mode."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**dit_config(args)).to(BF16).eval().requires_grad_(False)


def build_dit(args, device: str, place=lambda name: None):
    model = shell_dit(args)
    materialize(model, device, place)
    return model


def dit_inputs(args, device: str) -> dict:
    cfg = dit_config(args)
    side = 4 if args.smoke else args.dit_size // 16
    text = 8 if args.smoke else args.dit_text
    g = torch.Generator().manual_seed(7)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    return dict(
        latents=torch.randn(1, side * side, cfg["in_channels"], generator=g).to(BF16).to(device),
        encoder_hidden_states=torch.randn(1, text, cfg["joint_attention_dim"],
                                          generator=g).to(BF16).to(device),
        pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=g).to(BF16).to(device),
        img_ids=img_ids.to(device), txt_ids=torch.zeros(text, 3, device=device),
        guidance=torch.full((1,), 3.5, device=device, dtype=torch.float32))


def denoise(model, args, device: str) -> tuple[float, torch.Tensor]:
    """(s/step, final latents) of --dit-steps Euler steps (one warm-up forward first)."""
    x = dit_inputs(args, device)
    lat = x.pop("latents")
    sigmas = torch.linspace(1.0, 0.0, args.dit_steps + 1).tolist()

    def step(lat, s, s_next):
        t = torch.full((1,), s, device=device, dtype=BF16)
        v = model(hidden_states=lat, timestep=t, return_dict=False, **x)[0]
        return lat + (s_next - s) * v

    step(lat, 1.0, 0.9)
    t0 = now(device)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        lat = step(lat, s, s_next)
    return (now(device) - t0) / args.dit_steps, lat.cpu()


def dit(args, device: str) -> None:
    import accelerate

    cuda = device == "cuda"
    res: dict = {}
    settle(device)
    start = reserved(device)
    t0 = time.perf_counter()
    model = build_dit(args, device)
    plain = caps.tensor_bytes(model)
    settle(device)
    stats = ecf8.torch.compress_module(model)
    settle(device)
    held = (reserved(device) - start if cuda
            else caps.tensor_bytes(model) + stats.compressed_bytes + stats.buffer_bytes)
    print(f"# DiT: {plain / GiB:.2f} GiB BF16, compressed {stats.compressed_bytes / GiB:.2f} GiB of "
          f"{stats.original_bytes / GiB:.2f}, held {held / GiB:.2f} ({time.perf_counter() - t0:.1f} s)", flush=True)
    cfg = dit_config(args)
    hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    tokens = (4 if args.smoke else args.dit_size // 16) ** 2 + (8 if args.smoke else args.dit_text)
    work = caps.dit_work(hidden, 4 * hidden, tokens, cfg["num_attention_heads"], cuda)
    w = sum(work.values())
    why = (f"ecf8 {caps.size(held)} (reserved after compress_module: frames and decode tables "
           f"{caps.size(stats.compressed_bytes)}, decode buffer {caps.size(stats.buffer_bytes)}, the rest "
           f"{caps.size(caps.tensor_bytes(model))}) + working set {caps.size(w)} ({tokens} tokens: "
           f"{caps.parts(work)}); uncompressed {caps.size(plain)} + the same working set")
    given = None if args.dit_cap_gb is None else int(args.dit_cap_gb * GiB)
    c = separate(args, "dit-over-cap", "bf16", held + w, plain + w, why, given, start)
    if c is not None:
        note(c.line() + alone(args, start + plain, c.cap))
    cap = None if args.smoke or c is None else c.cap
    cap_to(device, cap)
    res["ecf8 on GPU"] = (on_gpu(device), *run_or_error(functools.partial(denoise, model, args, device), device))
    cap_to(device, None)
    del model
    settle(device)
    t0 = time.perf_counter()
    host = build_dit(args, device, lambda name: "cpu").state_dict()   # on the host, as Diffusers wants
    print(f"# DiT host copy: {time.perf_counter() - t0:.1f} s", flush=True)
    execution = torch.device(device, 0) if device == "cuda" else torch.device("cpu")
    for variant in ("sequential CPU offload", "model CPU offload", "group offload (stream)"):
        t0 = time.perf_counter()
        model = shell_dit(args)
        model.load_state_dict(host, assign=True)                       # shares the host tensors
        if variant == "sequential CPU offload":
            accelerate.cpu_offload(model, execution, offload_buffers=len(model._parameters) > 0)
        elif variant == "model CPU offload":
            accelerate.cpu_offload_with_hook(model, execution)
        else:
            model.enable_group_offload(onload_device=execution, offload_device=torch.device("cpu"),
                                       offload_type="block_level", num_blocks_per_group=1,
                                       use_stream=device == "cuda")
        print(f"# DiT {variant}: {time.perf_counter() - t0:.1f} s to build", flush=True)
        cap_to(device, cap)
        res[variant] = (on_gpu(device), *run_or_error(functools.partial(denoise, model, args, device), device))
        cap_to(device, None)
        del model
        settle(device)
    del host
    base = res["sequential CPU offload"]
    e = res["ecf8 on GPU"]
    ref = base[2] if isinstance(base[2], torch.Tensor) else None
    for variant in ("sequential CPU offload", "model CPU offload", "group offload (stream)", "ecf8 on GPU"):
        w, sec, lat = res[variant]
        ok = isinstance(lat, torch.Tensor)
        same = ("—" if not ok or ref is None else "reference" if variant == "sequential CPU offload"
                else "yes" if torch.equal(lat, ref) else "NO")
        ratio = base[1] / sec if variant == "ecf8 on GPU" and ok and ref is not None else None
        row("dit-over-cap", "bf16", cap, variant, w, 1, None, f"{sec:.3f} s/step" if ok else lat, ratio, same)
    for variant in ("model CPU offload", "group offload (stream)"):
        r = res[variant]
        if isinstance(r[2], torch.Tensor) and isinstance(e[2], torch.Tensor):
            print(f"# DiT ecf8 on GPU vs {variant}: {r[1] / e[1]:.2f}x", flush=True)


def run_or_error(fn, device: str):
    """fn()'s (seconds, output), or (None, 'FAILED: ...') when it fails (out of memory, say; the
    failure's memory is freed)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a baseline that cannot run under the cap is a result
        out = None, failed(e)
    settle(device)
    return out


# --- 3. the KV-cache budget (bench_generate's table) -----------------------------------------------

def kv_budget(args, device: str) -> None:
    """bench_generate.py's fixed-memory table, in this process (run first, when the process holds
    nothing but its CUDA context, as bench_generate's fresh processes do)."""
    import bench_generate as bg

    s = bg.TINY if args.smoke else bg.LLAMA3_8B
    sub = argparse.Namespace(layers=2 if args.smoke else args.kv_layers, group_bytes=None,
                             max_len=64 if args.smoke else args.kv_max_len)
    cudnn = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)     # as bench_generate: SDPA's memory-efficient kernel (masks)
    try:
        for fmt in ["bf16"] if args.smoke else args.formats:
            kv_format(args, device, bg, s, sub, fmt)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn)


def kv_format(args, device: str, bg, s, sub, fmt: str) -> None:
    settle(device)
    start = reserved(device)
    base_bytes = bg.model_bytes(bg.Decoder(s, sub.layers, fmt == "fp8", "meta"))
    kv = 2**18 if args.smoke else int(args.kv_gib * GiB)
    cap = base_bytes + kv
    per_seq = bg.cache_bytes(s, sub.layers, 1, sub.max_len)
    note(f"# cap kv-budget {fmt} = {caps.size(cap)}: uncompressed {sub.layers}-layer model "
         f"{caps.size(base_bytes)} (vocabulary {s.vocab}) + {caps.size(kv)} for KV caches (bench_generate's rule; "
         f"{caps.size(per_seq)} a sequence at {sub.max_len} positions): the result is the largest batch "
         f"each fits; held before: {caps.size(start)}" + (" (smoke: an emulated cap)" if args.smoke else ""))
    out = {}
    for variant in ("base", "ecf8"):                  # ecf8's tokens at the base's largest batch
        at = out.get("base", {}).get("batch") or 0
        stream = torch.cuda.Stream() if device == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            try:
                out[variant] = bg.child(sub, s, fmt, variant, cap, device == "cuda", tokens_at=at)
            except Exception as e:  # noqa: BLE001
                out[variant] = {"error": failed(e)}
        cap_to(device, None)
        if "tokens_error" in out[variant]:
            print(f"# kv-budget {fmt} {variant}: tokens not compared: {out[variant]['tokens_error']}", flush=True)
    b, e = out["base"], out["ecf8"]
    same = ("yes" if b.get("tokens") is not None and b.get("tokens") == e.get("tokens") else
            "—" if "error" in b or "error" in e or not b.get("batch") or "tokens" not in b or "tokens" not in e
            else "NO")
    for variant, label in (("base", "uncompressed"), ("ecf8", "ecf8 on GPU")):
        x = out[variant]
        if "error" in x:
            row("kv-budget", fmt, cap, label, None, None, None, x["error"], None, "—")
            continue
        tok = "n/a" if x["tok_s"] is None else f"{x['tok_s']:,.0f} tok/s" + ("" if x["how"] == "graph"
                                                                          else " (eager)")
        ratio = (e["tok_s"] / b["tok_s"] if variant == "ecf8" and "error" not in b and e.get("tok_s")
                 and b.get("tok_s") else None)
        row("kv-budget", fmt, cap, f"{label}, largest batch", x["weights"] / GiB, x["batch"], None, tok,
            ratio, same)


# --- main ----------------------------------------------------------------------------------------

def versions() -> str:
    parts = [f"torch {torch.__version__}"]
    for name in ("transformers", "accelerate", "diffusers", "cupy-cuda13x", "cupy-cuda12x", "cupy"):
        with contextlib.suppress(md.PackageNotFoundError):
            parts.append(f"{name} {md.version(name)}")
    return ", ".join(parts)


@torch.no_grad()                # restores the grad mode for callers (the smoke test runs it in-process)
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for budget.md (the table)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: every code path, no numbers")
    ap.add_argument("--cases", nargs="+",
                    default=["llm-over-cap", "dit-over-cap", "kv-budget", "compressed-offload"])
    ap.add_argument("--formats", nargs="+", default=["fp8", "bf16"], choices=["fp8", "bf16"])
    ap.add_argument("--llm-layers", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=8)
    for flag, what in (("--cap-fp8-gb", "llm-over-cap, FP8"), ("--cap-bf16-gb", "llm-over-cap, BF16"),
                       ("--offload-cap-fp8-gb", "compressed-offload, FP8"),
                       ("--offload-cap-bf16-gb", "compressed-offload, BF16")):
        ap.add_argument(flag, type=float, default=None, help=f"{what} cap in GiB (default: derived, see above)")
    ap.add_argument("--headroom-gb", type=float, default=1.0,
                    help="cap minus this = weights budget (accelerate max_memory, ecf8 max_gpu_memory)")
    ap.add_argument("--dit-double", type=int, default=19)
    ap.add_argument("--dit-single", type=int, default=38)
    ap.add_argument("--dit-cap-gb", type=float, default=None, help="dit-over-cap cap in GiB (default: derived)")
    ap.add_argument("--dit-size", type=int, default=512, help="image side in pixels (latent tokens = (side/16)^2)")
    ap.add_argument("--dit-text", type=int, default=256, help="text tokens")
    ap.add_argument("--dit-steps", type=int, default=3)
    ap.add_argument("--kv-layers", type=int, default=8)
    ap.add_argument("--kv-gib", type=float, default=2.0)
    ap.add_argument("--kv-max-len", type=int, default=1024)
    ap.add_argument("--no-control", dest="control", action="store_false",
                    help="skip the control row: raw (stored) frames streamed by the same offload runtime")
    ap.add_argument("--max-seconds", type=float, default=480,
                    help="start no further case after this many seconds (the table says which were skipped)")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:                              # caps derived and noted, not enforced; every block streamed
        args.batches, args.prompt_tokens, args.new_tokens, args.dit_steps = [1, 2], 8, 3, 2
    args.cap_gb = {"fp8": args.cap_fp8_gb, "bf16": args.cap_bf16_gb}
    args.offload_cap_gb = {"fp8": args.offload_cap_fp8_gb, "bf16": args.offload_cap_bf16_gb}
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke: tiny shapes, numbers meaningless)"
    head = [f"# GPU: {gpu}; {versions()}",
            "# RANDOM weights, real shapes; cap = torch.cuda.set_per_process_memory_fraction after each build, "
            "halfway between what must fit under it and what must not (the '# cap' lines); "
            f"weights budget = cap - {args.headroom_gb:g} GiB (accelerate max_memory / ecf8 max_gpu_memory); "
            f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new; DiT {args.dit_size}px, "
            f"{args.dit_steps} steps; ratio = ecf8 speed / baseline speed (the row above it)"]
    print("\n".join(head), flush=True)
    print(HEADER + "\n|---|---|---:|---|---:|---:|---:|---:|---:|---|", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write() -> str:                         # after every case: a later hang loses nothing
        took = time.perf_counter() - started
        table = "\n".join(head + NOTES + ["", HEADER, "|---|---|---:|---|---:|---:|---:|---:|---:|---|", *ROWS,
                                  "", f"# total {took:.0f} s"])
        (out / "budget.md").write_text(table + "\n")
        return table

    cases = []                                  # kv-budget first: its cap assumes a fresh process
    if "kv-budget" in args.cases:
        cases.append(("kv-budget", lambda: kv_budget(args, device)))
    cases += [(f"llm {fmt}", lambda fmt=fmt: llm(args, fmt, device)) for fmt in args.formats
              if {"llm-over-cap", "compressed-offload"} & set(args.cases)]
    if "dit-over-cap" in args.cases:
        cases.append(("dit", lambda: dit(args, device)))
    for name, fn in cases:
        if time.perf_counter() - started > args.max_seconds:
            ROWS.append(f"| {name} | — | — | skipped: --max-seconds {args.max_seconds:g} reached "
                        "| | | | | | |")
            print(ROWS[-1], flush=True)
        else:
            run_case(name, fn, device)
        write()
    print(f"\n{write()}\n# written to {out / 'budget.md'}", flush=True)


def run_case(name: str, fn, device: str) -> None:
    """fn(); a failure becomes a FAILED row; either way the cap is lifted and the case's GPU
    memory freed before the next one (what is left is printed)."""
    t = time.perf_counter()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - one failed case does not lose the others
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        print(f"# case {name}: failed: {type(e).__name__}: {msg}", flush=True)
        ROWS.append(f"| {name} | — | — | FAILED: {type(e).__name__}: {msg[:100]} | | | | | | |")
    cap_to(device, None)
    left = (f"; left on the GPU: {torch.cuda.memory_allocated() / GiB:.2f} GiB allocated, "
            f"{reserved(device) / GiB:.2f} reserved" if device == "cuda" else "")
    print(f"# case {name}: {time.perf_counter() - t:.0f} s{left}", flush=True)


if __name__ == "__main__":
    main()
