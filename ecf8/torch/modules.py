"""Compressed modules: ``compress_module`` / ``decompress_module``, and how a module comes to hold
its weight compressed (its class swapped for a compressed twin that decodes ``weight`` on demand)."""

from __future__ import annotations

import collections
import math
import warnings
from typing import Any

import torch

from ..errors import UnsupportedError
from .compiled import decode_in_graph
from .edits import DecodedWeight, copy_of, plain
from .fused_linear import FusedLinear, fused_skip_reason
from .training import decode_again_in_backward, records
from .parallel import Layout, check_sharded, is_dtensor
from .runtime import CompressionStats, Group, Pool, Weight, aligned
from .tensors import FROM_TORCH, check_device, encode

__all__ = ["compress_module", "decompress_module", "is_compressed", "rebuild", "attach", "detach",
           "owners", "holders_ok", "encoder_options", "group_weights", "skip_reason", "warn_nothing_held"]


class _CompressedModule:
    """Mixed into a compressed module's class: ``weight`` is decoded, not a Parameter."""

    _ecf8_base: type

    @property
    def weight(self) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return decode_in_graph(self._ecf8)
        return self.__dict__["_ecf8"].current()

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "weight":                # as on any module: the new Parameter replaces the weight
            w = self.__dict__["_ecf8"]
            if type(value) is DecodedWeight and value._ecf8_weight is w:
                return                      # its own weight given back (PEFT does so): no change
            if value is not None and not isinstance(value, torch.nn.Parameter):
                raise TypeError(f"cannot assign '{torch.typename(value)}' as parameter 'weight' "
                                "(torch.nn.Parameter or None expected)")
            detach(self, value)
            return
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if name == "weight":
            raise UnsupportedError(f"{type(self).__name__}.weight is held compressed by ecf8: call "
                                   "ecf8.torch.decompress_module first")
        super().__delattr__(name)

    def forward(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return self._ecf8_base.forward(self, *args, **kwargs)
        w = self.__dict__["_ecf8"]
        if w.fused is not None:
            y = w.fused.forward(self, args, kwargs)
            if y is not None:
                return y
        with w.decoded() as view:
            if w.layout is None and torch.is_grad_enabled() and records(self, args, kwargs):
                with decode_again_in_backward(w, view):
                    return self._ecf8_base.forward(self, *args, **kwargs)
            return self._ecf8_base.forward(self, *args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        w = self.__dict__["_ecf8"]          # like a Parameter's detach(): writes to it take effect
        destination[prefix + "weight"] = w.fresh() if w.layout is not None else copy_of(w).detach()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "weight"
        value = state_dict.pop(key, None)
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
        finally:
            if value is not None:
                state_dict[key] = value
        w = self.__dict__["_ecf8"]
        if value is None:
            if strict:
                missing_keys.append(key)
        elif not isinstance(value, torch.Tensor) or tuple(value.shape) != w.global_shape:
            error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                              f"{tuple(getattr(value, 'shape', ()))} from checkpoint, the shape in "
                              f"current model is {torch.Size(w.global_shape)}.")
        elif local_metadata.get("assign_to_params_buffers", False):
            value = plain(value)      # as PyTorch assigns: the module holds this tensor now
            if isinstance(value, torch.nn.Parameter):
                value.requires_grad_(w.requires_grad)
            else:
                value = torch.nn.Parameter(value, requires_grad=w.requires_grad)
            detach(self, value)
        else:
            w.assign(value, key)

    def _apply(self, fn, recurse=True):
        """.to() / .cuda() / .cpu() move the frames (nothing decoded); a dtype conversion
        (.float(), .half(), ...) turns the weight back into a Parameter, then converts it."""
        w = self.__dict__["_ecf8"]
        probe = fn(torch.empty(0, dtype=w.dtype, device=w.device))
        if probe.dtype != w.dtype:
            plain = w.__dict__.get("plain")             # one Parameter for all holders of a tie
            if plain is None:
                plain = w.plain = torch.nn.Parameter(w.fresh(), requires_grad=w.requires_grad)
            detach(self, plain)
            return self._apply(fn, recurse)
        if probe.device != w.device:
            w.move(probe.device)
        return super()._apply(fn, recurse)

    def __reduce_ex__(self, protocol):
        return rebuild, (self._ecf8_base,), self.__dict__


_CLASSES: dict[type, type] = {}


def _compressed_class(base: type) -> type:
    cls = _CLASSES.get(base)
    if cls is None:
        cls = _CLASSES[base] = type(base.__name__, (_CompressedModule, base),
                                    {"_ecf8_base": base, "__module__": __name__,
                                     "__qualname__": f"_CLASSES[{base.__qualname__}]"})
    return cls


def rebuild(base: type) -> torch.nn.Module:
    """Unpickling: an empty instance of the compressed class of `base` (its state follows)."""
    cls = _compressed_class(base)
    return cls.__new__(cls)


def is_compressed(module: torch.nn.Module) -> bool:
    """True when `module` itself holds its weight compressed."""
    return isinstance(module, _CompressedModule)


def attach(module: torch.nn.Module, w: Weight) -> None:
    """Make `module` hold `w` in place of its ``weight`` parameter."""
    params = module._parameters
    order = list(params)
    params.pop("weight", None)
    module.__dict__["_ecf8_order"] = order
    object.__setattr__(module, "__class__", _compressed_class(type(module)))
    module.__dict__["_ecf8"] = w


def detach(module: torch.nn.Module, param: torch.nn.Parameter) -> None:
    """Undo attach: `param` becomes the module's weight again, in its original place."""
    w = module.__dict__.get("_ecf8")
    if w is not None and w.group is not None:       # its neighbours decode on their own from now
        w.group.dissolve()
    order = module.__dict__.pop("_ecf8_order", ["weight"])
    module.__dict__.pop("_ecf8", None)
    object.__setattr__(module, "__class__", module._ecf8_base)
    params = dict(module._parameters, weight=param)
    module._parameters.clear()
    for name in [n for n in order if n in params] + [n for n in params if n not in order]:
        module._parameters[name] = params[name]


def owners(root: torch.nn.Module) -> tuple[dict, dict]:
    """({id(param): [(module, attribute name, qualified name)]}, {id: param}) over every module,
    tied parameters listed once with all their holders."""
    holders: dict[int, list] = {}
    params: dict[int, torch.nn.Parameter] = {}
    for prefix, m in root.named_modules(remove_duplicate=False):
        for name, p in m._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((m, name, f"{prefix}.{name}" if prefix else name))
                params[id(p)] = p
    for key, hs in holders.items():           # a module reached by two paths is one holder
        seen, unique = set(), []
        for h in hs:
            if (id(h[0]), h[1]) not in seen:
                seen.add((id(h[0]), h[1]))
                unique.append(h)
        holders[key] = unique
    return holders, params


def holders_ok(holders: list, embeddings: bool) -> bool:
    """Every holder is a module's `weight`, none compressed yet, no Embedding unless embeddings."""
    return all(name == "weight" and not is_compressed(m)
               and (embeddings or not isinstance(m, torch.nn.Embedding)) for m, name, _ in holders)


def _eligible(holders: list, p: torch.Tensor, min_numel: int, embeddings: bool) -> bool:
    """A parameter is compressed only where that frees it: every holder is a module's `weight`,
    and no holder is an Embedding unless embeddings=True (else the raw matrix stays anyway)."""
    return (p.dtype in FROM_TORCH and p.dim() == 2 and p.numel() >= min_numel
            and holders_ok(holders, embeddings))


def skip_reason(codable: bool, dtype: Any, shape: tuple, holders: list, min_numel: int,
                embeddings: bool) -> str | None:
    """Why a parameter is not held compressed, as a phrase for warn_nothing_held ({be}/{have}
    agree with the count); None: it is eligible; '': no module's ``weight`` (a bias, say)."""
    if not all(name == "weight" for _, name, _ in holders):
        return ""
    if any(is_compressed(m) for m, _, _ in holders):
        return "{be} held compressed already"
    if not codable:
        return f"{{be}} {dtype}, {_UNCODED}"
    if len(shape) != 2:
        return "{be} not 2-D"
    if math.prod(shape) < min_numel:
        return f"{{have}} fewer than min_numel={min_numel} elements"
    if not embeddings and any(isinstance(m, torch.nn.Embedding) for m, _, _ in holders):
        return "{be} held by an Embedding (embeddings=True compresses Embedding tables)"
    return None


_UNCODED = "which ecf8 does not code"


def warn_nothing_held(what: str, reasons: list[str | None], stacklevel: int = 3) -> None:
    """A UserWarning saying why `what` held no weight compressed, from the skip_reason of every
    parameter it considered."""
    counts = collections.Counter(r for r in reasons if r)
    if not counts:
        why = "the model has no module `weight` parameter (2-D FP8/BF16/FP16 weights of Linear-like modules)"
    else:
        why = "; ".join(f"{n} weight{'s' * (n != 1)} " + r.format(be="are" if n != 1 else "is",
                                                                  have="have" if n != 1 else "has")
                        for r, n in counts.most_common())
        if any(_UNCODED in r for r in counts):
            why += " (ecf8 codes FP8, BF16 and FP16: convert the model first, e.g. model.to(torch.bfloat16))"
    warnings.warn(f"{what}: no weight held compressed: {why}", UserWarning, stacklevel=stacklevel)


def encoder_options(numel: int, options: dict) -> dict:
    """Encoder options for one weight: max_tables one per 512 K weights (a GPU holds an 8 KB decode
    table per code table).  chunk_size None stays None: ``ecf8.encode`` then picks the chunk size
    that decodes fastest."""
    return dict(options, max_tables=options.get("max_tables", max(1, min(4, numel >> 19))))


def compress_module(module: torch.nn.Module, *, min_numel: int = 4096, embeddings: bool = False,
                    chunk_size: int | None = None, group_bytes: int | None = None, fused: bool = False,
                    **options) -> CompressionStats:
    """Hold the 2-D FP8/BF16/FP16 weights of `module`'s submodules compressed, on their device.

    Linear-like modules qualify, Transformers' fine-grained FP8 linears included (their
    ``weight_scale_inv`` stays as it is); Embedding tables only with embeddings=True, since the
    whole table is decoded at every forward.  A weight tied between modules is compressed once,
    and only when every module holding it qualifies.  Each weight is decoded just before its
    module's forward into a buffer (one per device, thread, CUDA stream and nesting depth) sized
    for the largest weight or group, and dropped after it.  chunk_size defaults to
    ``ecf8.encoder.decode_chunk_size`` of each weight (decode speed over up to +0.15 bits/weight)
    and max_tables to one per 512 K weights; options go to ``ecf8.encode``.

    On a GPU, consecutive weights (module order) of one dtype form a group decoded by one launch
    while their bytes (each rounded up to 256) add up to at most group_bytes; the first of them to
    run decodes the group, the others find it decoded.  Default: the largest compressed weight's
    size on that device, so the buffer does not grow (in a Llama layer with the MLP weights the
    largest: q, k, v and o together; a large compressed head lets groups span layers); 0: one
    launch per weight.  Inside a CUDA-graph capture a group is decoded once per capture; outside
    captures, a buffer a capture has used decodes weight by weight (a replay rewrites it unseen).
    ``.to()`` and ``decompress_module`` turn groups back into single weights.  Writing into
    ``module.weight`` in place during a forward changes what later forwards of its group see.
    Inference only: compressed weights have no gradient.

    fused=True (opt-in): BF16 ``torch.nn.Linear`` weights on a GPU may also multiply their frames
    directly (``ecf8.fused``: decoded inside the product, never written to memory) for inputs of
    up to 16 rows, wherever a first timed forward finds that faster than decoding
    (``ecf8.torch.fused_linear``, which says what it computes: float32 sums in the kernel's order,
    so outputs may differ from the uncompressed module's in the last bit).  Such weights are
    decoded one by one when the default path runs, not in groups.  The statistics count the
    weights given the fused path and, for the others, why not.

    Every target is checked before anything changes: a weight on the meta device or on a device
    other than cpu/cuda raises UnsupportedError and leaves the model as it was.  When no weight
    qualifies (an FP32 model, say), a UserWarning says why and the statistics are all zero.

    Tensor parallelism: a DTensor weight (any placements) is eligible by its global shape, so every
    rank makes the same choice; each rank encodes and holds only its local shard
    (``weight.to_local()``), and the statistics count this rank's bytes.  No communication.
    """
    options = dict(options, chunk_size=chunk_size)
    holders, params = owners(module)
    targets = [(params[k], hs) for k, hs in holders.items()
               if _eligible(hs, params[k], min_numel, embeddings)]
    if not targets:
        warn_nothing_held("compress_module", [
            skip_reason(params[k].dtype in FROM_TORCH, params[k].dtype, tuple(params[k].shape), hs,
                        min_numel, embeddings) for k, hs in holders.items()])
    for p, hs in targets:
        check_device(p.device, f"weight {hs[0][2]!r}")
        check_sharded(p, hs, f"weight {hs[0][2]!r}")
    pool = Pool()
    done: list[tuple[torch.nn.Parameter, list]] = []
    original = compressed = 0
    try:
        for p, hs in targets:
            layout = Layout(p) if is_dtensor(p) else None
            local = p.to_local() if layout is not None else p
            tables = encoder_options(local.numel(), options)
            blob = encode(local, **tables)                              # CUDA: encoded on its GPU
            w = Weight(blob, p.dtype, tuple(local.shape), local.device, p.requires_grad, pool,
                        tables, layout)
            for m, _, _ in hs:
                attach(m, w)
            done.append((p, hs))
            original += local.numel() * local.element_size()
            compressed += w.stored_bytes
        made = [hs[0][0].__dict__["_ecf8"] for _, hs in done]
        not_fused: dict[str, int] = {}
        if fused:
            for w, (_, hs) in zip(made, done):
                bases = {m._ecf8_base for m, _, _ in hs}
                why = fused_skip_reason(bases.pop(), w) if len(bases) == 1 else "held by modules of several classes"
                if why is None:
                    w.fused = FusedLinear(w)
                else:
                    not_fused[why] = not_fused.get(why, 0) + 1
        group_weights(module, [w for w in made if w.fused is None], group_bytes)
    except BaseException:
        for p, hs in done:                      # the originals are still referenced: put them back
            for m, _, _ in hs:
                detach(m, p)
        raise
    pool.warm(made)
    return CompressionStats(sum(len(hs) for _, hs in done), original, compressed, pool.buffer_bytes(),
                            len(done), sum(w.fused is not None for w in made), not_fused)


def decompress_module(module: torch.nn.Module) -> int:
    """Undo compress_module / load_model: each compressed weight becomes a Parameter again (tied
    modules share one Parameter again); returns how many modules changed."""
    params: dict[int, torch.nn.Parameter] = {}
    count = 0
    for m in module.modules():
        if not is_compressed(m):
            continue
        w = m.__dict__["_ecf8"]
        p = params.get(id(w))
        if p is None:
            p = params[id(w)] = torch.nn.Parameter(w.fresh(), requires_grad=w.requires_grad)
        detach(m, p)
        count += 1
    return count


def group_weights(model: torch.nn.Module, weights: list[Weight], limit: int | None) -> None:
    """Join consecutive GPU weights of `model` (module order) of one device and dtype into Groups
    of at most `limit` bytes; limit None: the largest weight on that device (the decode buffer
    does not grow); 0: no groups."""
    if limit == 0:
        return
    order: dict[int, int] = {}
    for i, m in enumerate(model.modules()):
        if is_compressed(m):
            order.setdefault(id(m.__dict__["_ecf8"]), i)
    largest: dict[torch.device, int] = {}
    for w in weights:
        largest[w.device] = max(largest.get(w.device, 0), w.nbytes)
    run: list[Weight] = []
    size = 0

    def close() -> None:
        if len(run) > 1:
            group = Group(list(run))
            pool = run[0].pool
            pool.sizes[run[0].device] = max(pool.sizes[run[0].device], group.nbytes)
        run.clear()

    for w in sorted(weights, key=lambda w: order.get(id(w), len(order))):
        if run and (w.device != run[0].device or w.dtype != run[0].dtype
                    or size + aligned(w.nbytes) > (limit or largest[w.device])):
            close()
        if w.device.type != "cuda" or w.group is not None:
            close()
            continue
        if not run:
            size = 0
        run.append(w)
        size += aligned(w.nbytes)
    close()
