"""The GPU memory caps of bench_budget.py, derived from byte counts instead of constants.

A cap separates two needs: one that must fit under it (ecf8's model plus the working set of the
largest batch) and one that must not (the uncompressed model plus the same working set; for
compressed offloading, the compressed model held whole plus that working set).  The cap is put
halfway between them, so both miss it by the same amount, the margin.  bench_budget.py measures
ecf8's side on the GPU (``torch.cuda.memory_reserved`` after the build: what the cap really
bounds); the uncompressed side and the working sets are arithmetic, below.
"""

from __future__ import annotations

import dataclasses

GiB = 2**30
WORKSPACE = 64 * 2**20      # cuBLAS and cuBLASLt workspaces a forward allocates (torch's allocator)


def size(x: float) -> str:
    """Bytes as GiB (2 decimals), or MiB / KiB below 10 MiB (the smoke's tiny models)."""
    if abs(x) >= 10 * 2**20:
        return f"{x / GiB:.2f} GiB"
    return f"{x / 2**20:.1f} MiB" if abs(x) >= 2**20 else f"{x / 2**10:.1f} KiB"


def tensor_bytes(module) -> int:
    """Bytes of a module's distinct parameters and buffers (its compressed weights are neither)."""
    seen: dict[int, int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def llm_work(config, fp8: bool, batch: int, prompt: int, new: int, cuda: bool) -> dict[str, int]:
    """Working set (bytes) of Transformers' greedy ``generate`` of a Llama at `batch`, upper bounds:
    KV: DynamicCache, K and V [batch, kv heads, prompt + new, head dim] BF16 per layer, plus one
    layer's copy (it grows by torch.cat).  Activations: the prefill (batch x prompt rows; decode
    steps have one row), residual stream and attention (4 x hidden) and MLP (4 x intermediate)
    BF16, plus the E4M3 copy of the MLP product an FP8 down projection quantizes.  Logits: the last
    position only (``generate`` passes logits_to_keep=1): BF16 logits, their FP32 copy and the
    processed scores.  Workspaces: cuBLAS/cuBLASLt (on a GPU)."""
    layers, hidden, inter = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    head_dim = hidden // config.num_attention_heads
    per_layer = 2 * batch * config.num_key_value_heads * (prompt + new) * head_dim * 2
    rows = batch * prompt
    return {"KV": per_layer * (layers + 1),
            "activations": rows * (4 * hidden + 4 * inter) * 2 + (rows * inter if fp8 else 0),
            "logits": batch * config.vocab_size * (2 + 4 + 4),
            "workspaces": WORKSPACE if cuda else 0}


def dit_work(hidden: int, mlp: int, tokens: int, heads: int, cuda: bool) -> dict[str, int]:
    """Working set (bytes) of one FLUX-style transformer forward over `tokens` (image + text),
    batch 1, upper bounds: activations (10 x hidden: streams, modulation, q/k/v, attention
    output; 3 x the MLP width) BF16, attention scores as the math SDPA kernel would hold them
    (heads x tokens^2 BF16; flash/efficient kernels hold none), workspaces (on a GPU)."""
    return {"activations": tokens * (10 * hidden + 3 * mlp) * 2,
            "attention": heads * tokens * tokens * 2,
            "workspaces": WORKSPACE if cuda else 0}


@dataclasses.dataclass
class Cap:
    """A cap and why: `fits` must fit under it, `exceeds` must not; margin = cap - fits."""

    case: str
    fmt: str
    cap: int
    fits: int
    exceeds: int
    why: str
    derived: bool = True

    @property
    def margin(self) -> int:
        return self.cap - self.fits

    def line(self) -> str:
        return (f"# cap {self.case} {self.fmt} = {size(self.cap)}: {self.why}; must fit {size(self.fits)}, "
                f"must not {size(self.exceeds)}: margin {size(self.margin)}"
                f"{'' if self.derived else ' (cap given on the command line)'}")


def halfway(case: str, fmt: str, fits: int, exceeds: int, why: str, given: int | None = None,
            base: int = 0) -> Cap:
    """The cap halfway between `fits` and `exceeds` (plus `base`: memory the process held before
    the build, which the cap bounds too), or `given`.  ValueError when nothing separates them:
    the saving is smaller than the working set."""
    if given is None and exceeds <= fits:
        raise ValueError(f"{case} {fmt}: no cap separates {size(fits)} that must fit from "
                         f"{size(exceeds)} that must not")
    cap = given if given is not None else base + (fits + exceeds) // 2
    return Cap(case, fmt, cap, base + fits, base + exceeds, why, given is None)


def parts(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {size(v)}" for k, v in d.items())
