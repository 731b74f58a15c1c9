"""Tensor-parallel scenarios for tests/test_torch_tp.py, run in `world` processes.

    python tests/tp_worker.py OUT_DIR [--world 2] [--backend gloo|nccl] [--device cpu|cuda]

Spawns the ranks (torch.multiprocessing, a free localhost port), builds a small transformer block
sharded with ColwiseParallel / RowwiseParallel, runs every scenario below on every rank and writes
OUT_DIR/rank<k>.json: {scenario: {"checks": {name: bool}, "error": str | null}}.  The test reads
those files; a scenario that raises records the error instead of stopping the others.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import socket
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import ecf8
import ecf8.torch

DIM, HIDDEN, HEADS = 128, 256, 4
PLAN = {"q": ColwiseParallel(), "k": ColwiseParallel(), "v": ColwiseParallel(), "o": RowwiseParallel(),
        "up": ColwiseParallel(), "down": RowwiseParallel()}


class Block(torch.nn.Module):
    """Attention + MLP with residuals; heads and hidden units split over the ranks by PLAN."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(DIM)
        self.q, self.k, self.v = (torch.nn.Linear(DIM, DIM, bias=False) for _ in range(3))
        self.o = torch.nn.Linear(DIM, DIM)
        self.up = torch.nn.Linear(DIM, HIDDEN)
        self.down = torch.nn.Linear(HIDDEN, DIM)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x):
        b, t, _ = x.shape
        h = self.norm(x)
        q, k, v = (f(h).view(b, t, -1, DIM // HEADS).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
        x = x + self.o(a)
        return x + self.scale * self.down(F.gelu(self.up(self.norm(x))))


class FP8Linear(torch.nn.Linear):
    """FP8 E4M3 weight storage, dequantized in forward (CPU torch has no FP8 matmul)."""

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype) * 0.125, self.bias)


def fp8_mlp(seed, device):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(FP8Linear(DIM, HIDDEN, bias=False), torch.nn.GELU(),
                                FP8Linear(HIDDEN, DIM, bias=False))
    for m in (model[0], model[2]):
        m.weight = torch.nn.Parameter((torch.randn_like(m.weight) * 8).to(torch.float8_e4m3fn),
                                      requires_grad=False)
    return model.to(device).requires_grad_(False)


def bits(t):
    t = t.to_local() if isinstance(t, DTensor) else t
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def same(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def clone(t):
    if isinstance(t, DTensor):
        return DTensor.from_local(t.to_local().clone(), t.device_mesh, t.placements, run_check=False,
                                  shape=t.shape, stride=t.stride())
    return t.detach().clone()


def build(seed: int, dtype, device):
    torch.manual_seed(seed)
    return Block().to(dtype).to(device).requires_grad_(False).eval()


def sharded(model, mesh):
    return parallelize_module(model, mesh, PLAN)


def scenarios(mesh, device, tmp: Path):
    rank = dist.get_rank()
    dtype = torch.bfloat16
    torch.manual_seed(100)
    x = torch.randn(2, 6, DIM).to(dtype).to(device)
    full = build(0, dtype, device)
    expected_full = full(x)
    tp = sharded(build(0, dtype, device), mesh)
    expected = tp(x)
    before = {k: clone(v) for k, v in tp.state_dict().items()}

    def compress_module():
        model = sharded(build(0, dtype, device), mesh)
        local_bytes = sum(model.get_submodule(n).weight.to_local().nbytes for n in PLAN)
        stats = ecf8.torch.compress_module(model)
        w = model.q.weight
        out = model(x)
        floats = copy.deepcopy(model).float()                   # a dtype conversion decompresses
        fw = floats.q.weight
        converted = (not ecf8.torch.is_compressed(floats.q) and isinstance(fw, DTensor)
                     and fw.dtype == torch.float32 and fw.placements == (Shard(0),)
                     and torch.equal(fw.to_local(), w.to_local().float()))
        return {"dtype conversion gives float32 DTensors": converted,
                "six weights compressed": stats.weights == 6
                and all(ecf8.torch.is_compressed(model.get_submodule(n)) for n in PLAN),
                "only the local shards are held": stats.original_bytes == local_bytes,
                "weight is a DTensor laid out as before": isinstance(w, DTensor)
                and w.placements == (Shard(0),) and w.device_mesh == mesh and w.shape == (DIM, DIM)
                and w.to_local().shape == (DIM // mesh.size(), DIM),
                "outputs identical to uncompressed TP": same(out, expected),
                "TP matches the unsharded model within bf16":
                torch.allclose(out.float(), expected_full.float(), atol=0.05, rtol=0.05),
                "second forward identical": same(model(x), expected)}

    def state_dict_round_trip():
        model = sharded(build(0, dtype, device), mesh)
        ecf8.torch.compress_module(model)
        sd = model.state_dict()
        keys_ok = list(sd) == list(before)
        layout_ok = all(isinstance(sd[k], DTensor) == isinstance(before[k], DTensor)
                        and (not isinstance(sd[k], DTensor) or sd[k].placements == before[k].placements)
                        for k in before)
        values_ok = all(same(sd[k], before[k]) for k in before)
        other = sharded(build(1, dtype, device), mesh)
        want = other(x)
        model.load_state_dict(other.state_dict())               # DTensors in: re-encoded locally
        loaded_dtensors = (same(model(x), want)
                           and all(ecf8.torch.is_compressed(model.get_submodule(n)) for n in PLAN))
        whole = {k: v for k, v in build(0, dtype, device).state_dict().items() if k.endswith("weight")}
        model.load_state_dict({**before, **whole})                # whole weights in: rank slices kept
        loaded_whole = same(model(x), expected)
        copied = copy.deepcopy(model)
        deepcopy_ok = same(copied(x), expected) and ecf8.torch.is_compressed(copied.q)
        n = ecf8.torch.decompress_module(model)
        p = model.down.weight
        back = (n == 6 and isinstance(p, torch.nn.Parameter) and isinstance(p, DTensor)
                and p.placements == (Shard(1),) and same(p, before["down.weight"])
                and same(model(x), expected))
        return {"same keys": keys_ok, "DTensors with the same placements": layout_ok,
                "exact values": values_ok, "load_state_dict of DTensors": loaded_dtensors,
                "load_state_dict of whole tensors": loaded_whole, "deepcopy": deepcopy_ok,
                "decompress_module gives DTensor parameters": back}

    def wrong_layout_refused():
        model = sharded(build(0, dtype, device), mesh)
        ecf8.torch.compress_module(model)
        replicated = distribute_tensor(build(0, dtype, device).q.weight.detach(), mesh, [Replicate()])
        try:
            model.load_state_dict({**model.state_dict(), "q.weight": replicated})
        except ecf8.ECF8Error as e:
            refused = "Replicate" in str(e) and "q.weight" in str(e)
        else:
            refused = False
        def refuses(fn, *words):
            try:
                fn()
            except ecf8.ECF8Error as e:
                return all(w in str(e) for w in words)
            return False
        target = tmp / f"dtensor{rank}.safetensors"
        hooked = sharded(build(0, dtype, device), mesh)
        hooked.up.forward = lambda h, f=hooked.up.forward: f(h)    # a forward replaced per instance
        kept = [id(p) for p in hooked.parameters()]
        return {"ECF8Error naming the tensor and placement": refused,
                "model unchanged": same(model(x), expected),
                "encode(DTensor) names to_local": refuses(lambda: ecf8.torch.encode(replicated), "to_local"),
                "save_file(DTensor) names the tensor": refuses(
                    lambda: ecf8.torch.save_file({"q": replicated}, target), "'q'", "DTensor")
                and not target.exists(),
                "per-instance forward refused before any change": refuses(
                    lambda: ecf8.torch.compress_module(hooked), "'up.weight'", "per instance")
                and [id(p) for p in hooked.parameters()] == kept and same(hooked(x), expected)}

    path = tmp / "block.safetensors"
    if rank == 0:
        ecf8.torch.save_file(full.state_dict(), path)
    dist.barrier()

    def load_model(compress):
        def run():
            with torch.device("meta"):
                model = Block().to(dtype)
            sharded(model, mesh)
            stats = ecf8.torch.load_model(model, path, device, compress=compress)
            w = model.up.weight
            held = stats.weights == (6 if compress else 0)
            return {"nothing left on meta": not any(p.is_meta for p in model.parameters())
                    and not any(b.is_meta for b in model.buffers()),
                    "compressed as asked": held,
                    "rank slice only": isinstance(w, DTensor) and w.placements == (Shard(0),)
                    and w.to_local().shape == (HIDDEN // mesh.size(), DIM),
                    "bias sharded too": model.up.bias.to_local().shape == (HIDDEN // mesh.size(),),
                    "outputs identical to uncompressed TP": same(model(x), expected)}
        return run

    def colwise_exact():
        """Column-parallel layers gathered after each one: no cross-rank sum, so the TP output is
        the unsharded model's, bit for bit (each output column is the same dot product)."""
        torch.manual_seed(3)
        dims = [DIM, HIDDEN, DIM]
        mlp = torch.nn.Sequential(*[torch.nn.Linear(a, b) for a, b in zip(dims, dims[1:])]
                                  ).to(torch.float16).to(device).requires_grad_(False)
        xh = x.to(torch.float16)
        want = mlp(xh)
        plan = {str(i): ColwiseParallel(output_layouts=Replicate()) for i in range(len(dims) - 1)}
        parallelize_module(mlp, mesh, plan)
        plain = mlp(xh)
        ecf8.torch.compress_module(mlp)
        got = mlp(xh)
        return {"compressed TP equals uncompressed TP": same(got, plain),
                "uncompressed TP equals unsharded": same(plain, want),
                "compressed TP equals unsharded": same(got, want)}

    def fp8_weights():
        model = fp8_mlp(5, device)
        xf = x.float()
        plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
        parallelize_module(model, mesh, plan, src_data_rank=None)   # same seed on every rank
        want = model(xf)
        stats = ecf8.torch.compress_module(model)
        w = model[2].weight
        return {"FP8 weights compressed": stats.weights == 2 and w.dtype == torch.float8_e4m3fn,
                "DTensor sharded on dim 1": isinstance(w, DTensor) and w.placements == (Shard(1),),
                "outputs identical": same(model(xf), want)}

    def load_model_refuses_partial():
        with torch.device("meta"):
            model = Block().to(dtype)
        sharded(model, mesh)
        model.up.weight = torch.nn.Parameter(DTensor.from_local(
            torch.empty(HIDDEN, DIM, dtype=dtype, device="meta"), mesh, [Partial()], run_check=False))
        kept = [id(p) for p in model.parameters()]
        try:
            ecf8.torch.load_model(model, path, device)
        except ecf8.ECF8Error as e:
            refused = "'up.weight'" in str(e) and "Partial" in str(e)
        else:
            refused = False
        return {"ECF8Error naming the tensor and placement": refused,
                "model unchanged": [id(p) for p in model.parameters()] == kept
                and all(p.is_meta for p in model.parameters())}

    def transformers_generate():
        """A Transformers Llama sharded with PyTorch's TP plan: greedy tokens identical."""
        try:
            import transformers
        except ImportError:
            return {"skipped: transformers not installed": True}
        cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=160,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                       max_position_embeddings=128, tie_word_embeddings=False)
        torch.manual_seed(0)
        llm = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).to(device).eval()
        plan = {"lm_head": ColwiseParallel(output_layouts=Replicate())}
        for i in range(cfg.num_hidden_layers):
            pre = f"model.layers.{i}"
            plan.update({f"{pre}.self_attn.{n}_proj": ColwiseParallel() for n in "qkv"})
            plan.update({f"{pre}.mlp.{n}_proj": ColwiseParallel() for n in ("gate", "up")})
            plan.update({f"{pre}.self_attn.o_proj": RowwiseParallel(),
                         f"{pre}.mlp.down_proj": RowwiseParallel()})
        parallelize_module(llm, mesh, plan)
        ids = torch.randint(0, 320, (2, 6), generator=torch.Generator().manual_seed(1)).to(device)

        def greedy():
            return llm.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        want = greedy()
        stats = ecf8.torch.compress_module(llm, min_numel=1024)
        return {"every linear compressed": stats.weights == 1 + 7 * cfg.num_hidden_layers,
                "generate gives identical tokens": torch.equal(greedy(), want)}

    def uneven_shards():
        """129 rows over the ranks: shards of unequal size, cut as distribute_tensor cuts them."""
        def make():
            torch.manual_seed(7)
            return torch.nn.Sequential(torch.nn.Linear(DIM, 129), torch.nn.Linear(129, DIM)).to(dtype)
        plan = {"0": ColwiseParallel(output_layouts=Replicate()),
                "1": RowwiseParallel(input_layouts=Replicate())}
        model = parallelize_module(make().to(device).requires_grad_(False), mesh, plan)
        want = model(x)
        uneven = tmp / "uneven.safetensors"
        if rank == 0:
            ecf8.torch.save_file(make().state_dict(), uneven)
        dist.barrier()
        with torch.device("meta"):
            empty = make()
        parallelize_module(empty, mesh, plan)
        ecf8.torch.load_model(empty, uneven, device, compress=True)
        ecf8.torch.compress_module(model)
        rows = empty[0].weight.to_local().shape[0]
        return {"unequal local shapes": rows == model[0].weight.to_local().shape[0]
                and rows == torch.arange(129).chunk(mesh.size())[rank].numel()
                and empty[1].weight.to_local().shape[1] == rows,
                "compressed TP identical": same(model(x), want),
                "loaded TP identical": same(empty(x), want)}

    return {"compress_module": compress_module, "colwise_exact": colwise_exact,
            "fp8_weights": fp8_weights, "state_dict_round_trip": state_dict_round_trip,
            "wrong_layout_refused": wrong_layout_refused, "load_model_decoded": load_model(False),
            "load_model_compressed": load_model(True),
            "load_model_refuses_partial": load_model_refuses_partial,
            "transformers_generate": transformers_generate, "uneven_shards": uneven_shards}


def worker(rank: int, world: int, port: int, backend: str, device: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "cuda":
        torch.cuda.set_device(rank)
    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    results = {}
    try:
        mesh = init_device_mesh(device, (world,))
        dev = torch.device(device, rank) if device == "cuda" else torch.device("cpu")
        for name, fn in scenarios(mesh, dev, Path(out)).items():
            try:
                results[name] = {"checks": {k: bool(v) for k, v in fn().items()}, "error": None}
            except Exception:
                results[name] = {"checks": {}, "error": traceback.format_exc(limit=-3)}
    finally:
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
        # Every rank reaches this point before any tears down: a gloo rank whose peer has already
        # gone can abort in its own teardown (std::terminate, seen 1 run in 3 on the CI image).
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--backend", default="gloo")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    mp.spawn(worker, args=(a.world, free_port(), a.backend, a.device, a.out), nprocs=a.world)


if __name__ == "__main__":
    sys.exit(main())
