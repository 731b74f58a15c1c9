"""The decode tax: the weight path of a compressed model against the uncompressed one.

    python bench/bench_tax.py [--layers 8] [--batches 1 16 64 256] [--reps 20] [--chunk-size auto]

Setup: the linear layers of --layers Llama-3-8B-shaped layers (q k v o gate up
down: 218 M weights a layer), one decode step with every GEMM captured in one CUDA graph:

- FP8 E4M3, per-tensor scales: base = ``torch._scaled_mm`` on the FP8 weights; ecf8 = decode
  each weight into one shared buffer (one launch each, on the capturing stream), then the same
  ``_scaled_mm`` on the buffer.
- FP8 E4M3, 128x128 block scales (the DeepSeek / Transformers fine-grained recipe): the same with
  ``_scaled_mm``'s blockwise 1x128 x 128x128 recipe, where this PyTorch build has it.
- BF16: ``torch.matmul`` with the BF16 weights, or with the decoded buffer.
- Three more ways to feed the FP8 per-tensor GEMMs: the groups ``compress_module`` makes by
  default (q k v o in one launch, ``GroupDecoder``, into the shared weight-sized buffer; the MLP
  weights one launch each); one decode launch per layer (``BatchDecoder``, the layer's 7 weights
  into a layer-sized buffer); and the same with the decode of layer i + 1 on a second stream, into
  the other of two layer buffers, while layer i's GEMMs run ("overlap").  A further layered row
  bounds any overlap: every decode on a second stream beside the GEMMs on the raw weights, with no dependency
  between them (if the GPU ran the two side by side, its time would approach the longer of
  "decode alone" and "base"; it is their sum when they take turns).

Weights are real all-MiniLM-L6-v2 bytes (bench/minilm.py: block-128 E4M3, and BF16) tiled to each
shape, so the exponent statistics are those of a trained model.  Every decoded weight is compared
with the original before anything is timed.  Times are medians of --reps graph replays (CUDA
events, each replay behind a spin kernel so the host's replay latency is not timed) after
warm-up; "ratio" = base ms / ecf8 ms (1.0 = no tax); "decode TB/s" = decoded bytes / median time
of a graph holding only the decodes; "copy TB/s" = a device-to-device copy of the same
bytes in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ecf8  # noqa: E402
import minilm  # noqa: E402
from ecf8.decoder_cuda import BatchDecoder, GroupDecoder  # noqa: E402
from ecf8.encoder import decode_chunk_size  # noqa: E402

SHAPES = {"q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096),
          "gate": (14336, 4096), "up": (14336, 4096), "down": (4096, 14336)}


SPIN_CYCLES = 1_000_000        # ~0.5 ms at H200 clocks


def graph_ms(fn, reps: int, warmup: int = 3) -> float:
    """Median time of one replay of a CUDA graph capturing fn, each behind a spin kernel
    (torch.cuda._sleep) so that the host's replay latency is not timed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.3:          # clocks ramp up
        graph.replay()
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(SPIN_CYCLES)     # the replay is enqueued before the start event fires
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


class Layers:
    """--layers copies of the 7 weights, raw on the GPU and as device-resident ECF8 frames."""

    def __init__(self, source: np.ndarray, layers: int, chunk_size: int | None, torch_dtype):
        self.raw, self.frames, self.shape_of = [], [], []
        self.layers = layers
        frame_bytes = weights = 0
        offset = 0
        for name, (n, k) in SHAPES.items():
            count = n * k
            part = minilm.tiled({"w": source}, offset + count)[offset:].reshape(n, k)
            offset += count
            blob = ecf8.encode(part, chunk_size=chunk_size or decode_chunk_size(count))
            frame_bytes += len(blob) * layers
            weights += count * layers
            bits = part.view(np.uint8 if part.itemsize == 1 else np.int16)
            raw = torch.from_numpy(bits.copy()).cuda().view(torch_dtype)
            for _ in range(layers):
                dt = ecf8.to_device(blob)
                self.frames.append(dt)
                self.raw.append(raw.clone())
                self.shape_of.append((n, k))
        self.bits_per_weight = frame_bytes * 8 / weights
        self.weights = weights
        self.itemsize = source.itemsize
        largest = max(n * k for n, k in SHAPES.values())
        self.buffer = torch.empty(largest * self.itemsize, dtype=torch.uint8, device="cuda")
        self.torch_dtype = torch_dtype
        self.batches = None

    def layer(self, i: int) -> list[int]:
        """Indices of layer i's 7 weights (weights are stored name by name, layer by layer)."""
        return [i + j * self.layers for j in range(len(SHAPES))]

    def batched(self) -> None:
        """Two layer-sized buffers, and per layer one BatchDecoder into buffer layer % 2."""
        per_layer = sum(-(-n * k * self.itemsize // 256) * 256 for n, k in SHAPES.values())
        self.layer_buffers = [torch.empty(per_layer, dtype=torch.uint8, device="cuda") for _ in range(2)]
        self.views: list[torch.Tensor] = [None] * len(self.frames)
        self.batches = []
        for i in range(self.layers):
            buf, at, outs = self.layer_buffers[i % 2], 0, []
            for w in self.layer(i):
                n, k = self.shape_of[w]
                size = n * k * self.itemsize
                self.views[w] = buf[at : at + size].view(self.torch_dtype).view(n, k)
                outs.append(buf[at : at + size])
                at += -(-size // 256) * 256
            self.batches.append(BatchDecoder([self.frames[w] for w in self.layer(i)], outs))
        self.attention = []                          # q k v o of each layer: one GroupDecoder
        for i in range(self.layers):
            ws, at, offsets = self.layer(i)[:4], 0, []
            for w in ws:
                offsets.append(at)
                at += -(-self.shape_of[w][0] * self.shape_of[w][1] * self.itemsize // 256) * 256
            self.attention.append((GroupDecoder([self.frames[w] for w in ws], offsets), offsets))

    def decode_layer(self, i: int, stream: torch.cuda.Stream) -> None:
        self.batches[i].run(stream.cuda_stream)

    def decoded(self, i: int) -> torch.Tensor:
        """Enqueue weight i's decode into the shared buffer; return the buffer as that weight."""
        n, k = self.shape_of[i]
        self.frames[i].launch(self.buffer.data_ptr(), torch.cuda.current_stream().cuda_stream)
        return self.buffer[: n * k * self.itemsize].view(self.torch_dtype).view(n, k)

    def check(self) -> None:
        """Every weight decodes to its original bits (before any timing)."""
        for i, raw in enumerate(self.raw):
            self.buffer.fill_(0xA5)
            w = self.decoded(i)
            if not torch.equal(w.view(torch.uint8), raw.view(torch.uint8)):
                raise AssertionError(f"weight {i} is not bit-exact after GPU decode")
        torch.cuda.synchronize()


def gemm_fp8(x: torch.Tensor, w: torch.Tensor, scales) -> torch.Tensor:
    sa, sb = scales
    return torch._scaled_mm(x, w.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)


def block_scales(m: int, n: int, k: int):
    """Scales of the DeepSeek recipe as cuBLASLt lays them out: activations 1x128 ([m, k/128],
    column-major), weights 128x128 ([k/128 rounded up to 4, n/128], column-major)."""
    sa = torch.ones(k // 128, m, device="cuda").t()
    l4 = -(-(k // 128) // 4) * 4
    sb = torch.ones(n // 128, l4, device="cuda").t()
    return sa, sb


def run_case(label: str, layers: Layers, batches, reps: int, gemm, make_inputs, rows: list) -> None:
    layers.check()
    decode_ms = graph_ms(lambda: [layers.decoded(i) for i in range(len(layers.frames))], reps)
    decoded_bytes = layers.weights * layers.itemsize
    for batch in batches:
        inputs = make_inputs(batch)
        try:
            gemm(inputs, layers.raw[0], 0)
            gemm(inputs, layers.raw[-1], 0)
        except Exception as e:        # e.g. a scaling recipe this PyTorch build lacks
            print(f"{label} batch {batch}: GEMM unavailable here ({str(e).splitlines()[0][:120]})")
            continue
        base = graph_ms(lambda: [gemm(inputs, w, i) for i, w in enumerate(layers.raw)], reps)
        comp = graph_ms(lambda: [gemm(inputs, layers.decoded(i), i)
                                 for i in range(len(layers.frames))], reps)
        rows.append(dict(case=label, batch=batch, base_ms=base, ecf8_ms=comp, ratio=base / comp,
                         decode_ms=decode_ms, decode_tbps=decoded_bytes / decode_ms / 1e9,
                         bits=layers.bits_per_weight))


def run_layered(label: str, layers: Layers, batches, reps: int, gemm, make_inputs, rows: list) -> None:
    """FP8 GEMMs fed by compress_module's groups, by one decode launch per layer (serial, and
    overlapped with the GEMMs), and the overlap bound (decodes beside raw-weight GEMMs)."""
    layers.batched()
    side = torch.cuda.Stream()
    done = [torch.cuda.Event() for _ in range(layers.layers)]
    for i in range(layers.layers):              # every weight bit-exact in its layer buffer
        layers.layer_buffers[i % 2].fill_(0xA5)
        layers.decode_layer(i, torch.cuda.current_stream())
        for w in layers.layer(i):
            if not torch.equal(layers.views[w].view(torch.uint8), layers.raw[w].view(torch.uint8)):
                raise AssertionError(f"weight {w} is not bit-exact after the layer decode")
        group, offsets = layers.attention[i]
        layers.buffer.fill_(0xA5)
        group.launch(layers.buffer.data_ptr(), torch.cuda.current_stream().cuda_stream)
        for w, at in zip(layers.layer(i)[:4], offsets):
            got = layers.buffer[at : at + layers.raw[w].numel() * layers.itemsize]
            if not torch.equal(got, layers.raw[w].view(torch.uint8).reshape(-1)):
                raise AssertionError(f"weight {w} is not bit-exact after the group decode")
    decode_ms = graph_ms(lambda: [layers.decode_layer(i, torch.cuda.current_stream())
                                  for i in range(layers.layers)], reps)

    def grouped(x):
        stream = torch.cuda.current_stream().cuda_stream
        for i in range(layers.layers):
            group, offsets = layers.attention[i]
            group.launch(layers.buffer.data_ptr(), stream)
            for w, at in zip(layers.layer(i)[:4], offsets):
                n, k = layers.shape_of[w]
                gemm(x, layers.buffer[at : at + n * k * layers.itemsize].view(layers.torch_dtype).view(n, k), w)
            for w in layers.layer(i)[4:]:
                gemm(x, layers.decoded(w), w)

    def serial(x):
        for i in range(layers.layers):
            layers.decode_layer(i, torch.cuda.current_stream())
            for w in layers.layer(i):
                gemm(x, layers.views[w], w)

    def overlapped(x):
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        layers.decode_layer(0, side)
        done[0].record(side)
        for i in range(layers.layers):
            if i + 1 < layers.layers:        # its buffer was last read by layer i - 1's GEMMs
                side.wait_stream(main)
                layers.decode_layer(i + 1, side)
                done[i + 1].record(side)
            main.wait_event(done[i])
            for w in layers.layer(i):
                gemm(x, layers.views[w], w)
        main.wait_stream(side)

    def unordered(x):
        """Every layer's decode on the second stream, the GEMMs on the raw weights on this one, no
        dependency between the two: the most overlap the GPU gives these kernels."""
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        for i in range(layers.layers):
            layers.decode_layer(i, side)
        for i, w in enumerate(layers.raw):
            gemm(x, w, i)
        main.wait_stream(side)

    decoded_bytes = layers.weights * layers.itemsize
    for batch in batches:
        inputs = make_inputs(batch)
        base = graph_ms(lambda: [gemm(inputs, w, i) for i, w in enumerate(layers.raw)], reps)
        for how, fn in (("compress_module's groups", grouped), ("one launch per layer", serial),
                        ("per layer + overlap", overlapped),
                        ("decodes beside raw-weight GEMMs, no dependencies (overlap bound)", unordered)):
            comp = graph_ms(lambda: fn(inputs), reps)
            rows.append(dict(case=f"{label}, {how}", batch=batch, base_ms=base, ecf8_ms=comp,
                             ratio=base / comp, decode_ms=decode_ms,
                             decode_tbps=decoded_bytes / decode_ms / 1e9, bits=layers.bits_per_weight))


def copy_tbps(nbytes: int, reps: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return nbytes / graph_ms(lambda: dst.copy_(src), reps) / 1e9


def single_weight(source: np.ndarray, reps: int) -> list[tuple[int, float, float]]:
    """(chunk size, bits/weight, decode us) of one 14336x4096 E4M3 weight at chunk sizes 4096,
    8192 (``decode_chunk_size``'s choice) and 32768 (``ecf8.encode``'s default)."""
    part = minilm.tiled({"w": source}, 14336 * 4096).reshape(14336, 4096)
    out = torch.empty(part.size, dtype=torch.uint8, device="cuda")
    rows = []
    for chunk in (4096, 8192, 32768):
        blob = ecf8.encode(part, chunk_size=chunk)
        dt = ecf8.to_device(blob)
        dt.launch(out.data_ptr(), torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        if not torch.equal(out.cpu(), torch.from_numpy(part.view(np.uint8).reshape(-1).copy())):
            raise AssertionError("14336x4096 decode is not bit-exact")
        ms = graph_ms(lambda: dt.launch(out.data_ptr(), torch.cuda.current_stream().cuda_stream), reps)
        rows.append((chunk, len(blob) * 8 / part.size, ms * 1000))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--chunk-size", type=lambda v: None if v == "auto" else int(v), default=None,
                    help="elements per chunk, or auto (default: ecf8.encoder.decode_chunk_size per weight)")
    ap.add_argument("--skip-bf16", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows: list[dict] = []
    e4m3 = np.concatenate([w.reshape(-1) for w in minilm.weights("e4m3").values()])

    fp8 = Layers(e4m3, args.layers, args.chunk_size, torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")

    def fp8_inputs(batch):
        return {k: torch.randn(batch, k, device="cuda").to(torch.float8_e4m3fn)
                for k in {k for _, k in SHAPES.values()}}

    run_case("E4M3 per-tensor", fp8, args.batches, args.reps,
             lambda x, w, i: gemm_fp8(x[w.shape[1]], w, (one, one)), fp8_inputs, rows)
    scales: dict = {}

    def block_gemm(x, w, i):
        n, k = w.shape
        m = x[k].shape[0]
        if (m, n, k) not in scales:
            scales[(m, n, k)] = block_scales(m, n, k)
        return gemm_fp8(x[k], w, scales[(m, n, k)])

    run_case("E4M3 block-128", fp8, args.batches, args.reps, block_gemm, fp8_inputs, rows)
    run_layered("E4M3 per-tensor", fp8, args.batches, args.reps,
                lambda x, w, i: gemm_fp8(x[w.shape[1]], w, (one, one)), fp8_inputs, rows)
    copy = copy_tbps(fp8.weights, args.reps)
    fp8_single = single_weight(e4m3, args.reps)
    del fp8
    if not args.skip_bf16:
        bf16_src = np.concatenate([w.reshape(-1) for w in minilm.weights("bf16").values()])
        bf16 = Layers(bf16_src, args.layers, args.chunk_size, torch.bfloat16)

        def bf16_inputs(batch):
            return {k: torch.randn(batch, k, device="cuda", dtype=torch.bfloat16)
                    for k in {k for _, k in SHAPES.values()}}

        run_case("BF16", bf16, args.batches, args.reps,
                 lambda x, w, i: torch.matmul(x[w.shape[1]], w.t()), bf16_inputs, rows)

    print(f"\nGPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; {args.layers} layers x "
          f"7 linears (Llama-3-8B shapes), chunk {args.chunk_size or 'auto'}; CUDA-graph replay medians of "
          f"{args.reps}; device copy of the FP8 bytes in the same run: {copy:.2f} TB/s")
    print("| weights | batch | base ms | ecf8 ms | ratio | decode alone ms | decode TB/s | bits/w |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['batch']} | {r['base_ms']:.3f} | {r['ecf8_ms']:.3f} | "
              f"{r['ratio']:.2f} | {r['decode_ms']:.3f} | {r['decode_tbps']:.2f} | {r['bits']:.3f} |")
    print("\n| one 14336x4096 E4M3 weight | bits/w | decode us |\n|---|---:|---:|")
    for chunk, bits, us in fp8_single:
        print(f"| chunk {chunk} | {bits:.3f} | {us:.1f} |")


if __name__ == "__main__":
    main()
