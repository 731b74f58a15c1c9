"""Checkpoints loaded straight into compressed storage: no uncompressed copy of the model exists.

    with accelerate.init_empty_weights():            # or torch.device("meta"): no weights made
        model = MyModel(config)
    ecf8.torch.load_model(model, "ckpt/", device="cuda")   # ecf8 file or shard folder
    model = ecf8.torch.from_pretrained("ckpt/", device="cuda")   # Transformers, config.json

On a GPU every eligible weight (a 2-D FP8/BF16/FP16 ``weight`` of a Linear-like module) is
uploaded as its ECF8 frame and stays compressed (a DeviceTensor), decoded just in time before its
module's forward, as ``compress_module`` does; every other tensor is decoded once on the GPU.  The
checkpoint is read one tensor at a time, so neither GPU nor host ever holds the uncompressed model:
worker threads read and checksum the next tensors while the current one is placed, at most a
window of tens of MB ahead (``ecf8.compressed_stream``; on a GPU through pinned staging buffers,
the frames uploaded as stored), so host memory beyond the model's own stays about that window.
On the CPU (device="cpu") tensors are decoded at load into ordinary parameters (host memory is
what CPU inference runs from) unless compress=True: eligible weights then keep the file's frames,
as read.  offload="cpu" loads that way, then streams the blocks that do not fit the GPU from
pinned host memory (``ecf8.torch.offload_module``).

Tensor parallelism: a model whose parameters are DTensors on the meta device (built without
weights, then sharded by ``torch.distributed.tensor.parallel.parallelize_module``) gets on each rank
only that rank's slice of each tensor, as a DTensor of the same layout.  An ECF8 frame codes a whole
tensor, so every rank reads and decodes each whole tensor (on a GPU: uploaded as its frame and
decoded there, which is fast), cuts out its slice and drops the rest; an eligible weight's slice
is then re-encoded where it is (GPU encoder on a GPU, CPU encoder on the CPU) and held compressed.
Transient memory: one whole decoded tensor at a time (on a GPU, plus up to 2 * threads whole
frames waiting to be placed); resident: only this rank's slices.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .. import checkpoint_folder
from ..errors import CorruptDataError, UnsupportedError
from ..format import CODED_NAMES, parse
from .modules import (attach, detach, encoder_options, group_weights, is_compressed, owners,
                      skip_reason, warn_nothing_held)
from .parallel import Layout, check_sharded, is_dtensor
from .runtime import CompressionStats, Pool, Weight
from .tensors import TORCH_DTYPES, check_device, cuda_index, decode, encode, to_torch, torch_memory

__all__ = ["load_model", "from_pretrained"]


def _read(path: Path, device: str, frames: bool = False, window: int | None = None
          ) -> Iterator[tuple[str, Any]]:
    """(name, value) of each tensor of one ecf8 checkpoint file, one at a time, read ahead by
    worker threads (at most `window` bytes: ``checkpoint_folder.read_file``): on a GPU, ECF8
    frames stay compressed (a DeviceTensor, uploaded into torch's memory) and other tensors are
    torch tensors there; on the CPU every value is a decoded torch tensor, or with frames=True
    each ECF8 frame its checked bytes."""
    items = checkpoint_folder.read_file(path, device, frames=frames, window=window)
    try:
        if device == "cpu":
            for name, x in items:
                yield name, x if isinstance(x, bytes) else to_torch(x)
            return
        from ..decoder_cuda import DeviceTensor

        while True:
            with torch_memory():                 # uploads come from torch's allocator
                item = next(items, None)
            if item is None:
                return
            name, x = item
            yield name, x if isinstance(x, DeviceTensor) else to_torch(x)
    finally:
        items.close()


# --- loading ------------------------------------------------------------------------------------

def resolve_device(device: str | torch.device) -> tuple[torch.device, str]:
    """(torch device, ecf8 device name) of "cpu" or a CUDA device; UnsupportedError otherwise."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return dev, "cpu"
    if dev.type != "cuda":
        raise UnsupportedError(f"device must be cpu or cuda, not {dev}")
    index = cuda_index(dev)
    check_device(torch.device("cuda", index), "the target device")
    return torch.device("cuda", index), f"cuda:{index}"


def load_model(model: torch.nn.Module, path: str | Path, device: str | torch.device = "cuda", *,
               embeddings: bool = False, min_numel: int = 4096, strict: bool = True, chunk_size: int | None = None,
               threads: int = 4, compress: bool | None = None, group_bytes: int | None = None,
               offload: str | None = None, max_gpu_memory: int | None = None) -> CompressionStats:
    """Fill `model` (built on the meta device, or anywhere) from an ecf8 checkpoint file or folder.

    Eligible weights (as for ``compress_module``: 2-D FP8/BF16/FP16 ``weight`` of every module
    holding it, at least min_numel elements, Embedding tables only with embeddings=True) stay
    compressed on a GPU; everything else is decoded onto `device`.  Tensors keep the checkpoint's
    dtype (like ``load_state_dict(assign=True)``); tied parameters stay tied (one checkpoint entry
    fills all of a parameter's names).  Parameters and non-persistent buffers missing from the
    checkpoint are moved to `device` when they hold data (strict=False, or buffers), else refused.

    Every name, shape and device is checked from the file headers before the model changes; a
    failure while reading puts the model back as it was.  Raises UnsupportedError (mismatched or
    missing tensors, bad device) or CorruptDataError (a damaged file).  chunk_size is used only
    when load_state_dict re-encodes a weight later (default: as compress_module); group_bytes:
    as for compress_module; threads: shards read at once.  compress: hold
    eligible weights compressed (default: on a GPU yes, on the CPU no, with a UserWarning saying so
    when there were weights to hold).  Returns what is held compressed (this rank's bytes under
    tensor parallelism); a UserWarning says why when compress holds nothing (an FP32 checkpoint).

    DTensor parameters (tensor parallelism, Shard / Replicate placements on a mesh of `device`'s
    type) receive this rank's slice, as a DTensor of the same layout; see the module docstring.

    offload="cpu": for a model whose compressed weights do not all fit `device`: the checkpoint's
    frames are read into host memory as they are (not decoded), then ``offload_module(model,
    device, max_gpu_memory=max_gpu_memory)`` keeps the first blocks on the device and streams the
    others from pinned host memory (see ``ecf8.torch.offload``); a failure there (e.g. a
    max_gpu_memory too small for the rest of the model) puts the model back as it was.
    """
    if offload is not None or max_gpu_memory is not None:
        if offload != "cpu":
            raise UnsupportedError(f"offload must be None or 'cpu' (pinned host memory), not {offload!r}; "
                                   "max_gpu_memory applies with offload='cpu'")
        if compress is False or group_bytes is not None:
            raise UnsupportedError("offload='cpu' holds the weights compressed, streamed block by block: "
                                   "compress=False and group_bytes do not apply")
        from .offload import offload_module

        undo: list[Callable[[], None]] = []
        stats = _load(model, path, "cpu", embeddings, min_numel, strict, chunk_size, threads, True, None, undo)
        try:
            offload_module(model, device, max_gpu_memory=max_gpu_memory)
        except BaseException:
            for action in reversed(undo):
                action()
            raise
        return stats
    return _load(model, path, device, embeddings, min_numel, strict, chunk_size, threads, compress,
                 group_bytes, [])


def _load(model, path, device, embeddings, min_numel, strict, chunk_size, threads, compress, group_bytes,
          undo: list) -> CompressionStats:
    """load_model without offloading; `undo` receives the actions that put the model back."""
    dev, target = resolve_device(device)
    keep = dev.type == "cuda" if compress is None else bool(compress)
    files, index = checkpoint_folder.index(path)
    plan, moves, reasons = _plan(model, index, dev, embeddings, min_numel, strict, str(path), keep)
    pool = Pool()
    options = {"chunk_size": chunk_size}
    weights: list[Weight] = []
    try:
        seen = set()
        window = checkpoint_folder.window_per_file(threads, len(files))
        for name, value in checkpoint_folder.read_files(files, lambda f: _read(f, target, keep, window),
                                                        threads):
            if name not in plan:                # a second name of a tied parameter
                continue
            seen.add(name)
            weights += place_tensor(plan[name], value, dev, pool, options, undo)
        if len(seen) != len(plan):
            raise CorruptDataError(f"{path}: {sorted(set(plan) - seen)[:3]} listed but not read")
        for module, kind, name, tensor in moves:
            _set(module, kind, name, tensor.to(dev), undo)
        group_weights(model, weights, group_bytes)
    except BaseException:
        for action in reversed(undo):
            action()
        raise
    pool.warm(weights)
    if not weights and keep:
        warn_nothing_held("ecf8 loading", reasons)       # (load_model or from_pretrained)
    elif not weights and compress is None and None in reasons:
        n = reasons.count(None)
        warnings.warn(f"ecf8 loading: on the CPU the {n} weight{'s' * (n != 1)} ecf8 could hold compressed "
                      "{} decoded into ordinary parameters; pass compress=True to hold them compressed "
                      "(decoded at each forward), or compress=False to decode them without this warning"
                      .format("were" if n != 1 else "was"), UserWarning, stacklevel=2)
    held = {id(w) for w in weights}
    modules = sum(1 for m in model.modules() if is_compressed(m) and id(m.__dict__["_ecf8"]) in held)
    return CompressionStats(modules, sum(w.nbytes for w in weights),
                               sum(w.stored_bytes for w in weights), pool.buffer_bytes(), len(weights))


def _plan(model, index, dev, embeddings, min_numel, strict, where, keep):
    """({checkpoint name: target}, [tensors to move], [skip_reason of each parameter]) after checking
    every name and shape.  A target is (kind, holders, tensor, held compressed?, DTensor layout or None)."""
    holders, params = owners(model)
    plan: dict[str, tuple] = {}
    moves: list[tuple] = []
    used: set[str] = set()
    reasons: list[str | None] = []
    for key, hs in holders.items():
        p = params[key]
        present = [q for _, _, q in hs if q in index]
        if not present:
            if p.device.type == "meta" or strict:
                raise UnsupportedError(f"{where}: parameter {hs[0][2]!r} is not in the checkpoint")
            moves += [(m, "param", n, p) for m, n, _ in hs]
            continue
        dtype, shape, _ = index[present[0]]
        for q in present:
            if index[q][1] != tuple(p.shape):
                raise UnsupportedError(f"{where}: {q!r} has shape {index[q][1]} in the checkpoint, "
                                       f"{tuple(p.shape)} in the model")
        used.update(present)
        reasons.append(skip_reason(dtype in CODED_NAMES, dtype, shape, hs, min_numel, embeddings))
        ok = keep and reasons[-1] is None
        layout = None
        if is_dtensor(p):
            layout = Layout(p)
            if layout.mesh.device_type != dev.type:
                raise UnsupportedError(f"{where}: {hs[0][2]!r} is a DTensor on a {layout.mesh.device_type} "
                                       f"device mesh, the model is loaded to {dev}")
            layout.box(f"{where}: {hs[0][2]!r}")          # refuses Partial / strided placements
            if ok:
                check_sharded(p, hs, f"{where}: {hs[0][2]!r}")
        plan[present[0]] = ("param", hs, p, ok, layout)
    for prefix, m in model.named_modules(remove_duplicate=False):
        for n, b in m._buffers.items():
            if b is None:
                continue
            q = f"{prefix}.{n}" if prefix else n
            if is_dtensor(b):
                raise UnsupportedError(f"{where}: buffer {q!r} is a DTensor: ecf8 loads DTensor "
                                       "parameters only")
            if q in index:
                if index[q][1] != tuple(b.shape):
                    raise UnsupportedError(f"{where}: {q!r} has shape {index[q][1]} in the checkpoint, "
                                           f"{tuple(b.shape)} in the model")
                plan.setdefault(q, ("buffer", [], None, False, None))[1].append((m, n))
                used.add(q)
            elif b.device.type == "meta":
                raise UnsupportedError(f"{where}: buffer {q!r} is on the meta device and not in the "
                                       "checkpoint (build the model with accelerate.init_empty_weights)")
            elif strict and n not in m._non_persistent_buffers_set:
                raise UnsupportedError(f"{where}: buffer {q!r} is not in the checkpoint")
            else:
                moves.append((m, "buffer", n, b))
    unexpected = sorted(set(index) - used)
    if unexpected and strict:
        raise UnsupportedError(f"{where}: {len(unexpected)} checkpoint tensors the model lacks, "
                               f"e.g. {unexpected[:3]}")
    return plan, moves, reasons


def _set(module: torch.nn.Module, kind: str, name: str, value: torch.Tensor, undo: list) -> None:
    table = module._parameters if kind == "param" else module._buffers
    old = table[name]
    table[name] = value

    def back():
        table[name] = old
    undo.append(back)


def place_tensor(target: tuple, value: Any, dev: torch.device, pool: Pool, options: dict, undo: list
                 ) -> list:
    """Put one checkpoint tensor in the model; returns the compressed weight made, if any.
    target: (kind, holders, tensor, held compressed?, DTensor layout or None) as ``_plan`` makes
    it; value: a torch tensor, an ECF8 frame's bytes (host) or a DeviceTensor (GPU)."""
    kind, hs, p, eligible, layout = target
    if layout is not None:                            # keep this rank's slice of the whole tensor
        if not isinstance(value, torch.Tensor):       # a whole frame on the GPU: decoded there
            value = decode(value, dev)
        value = value[layout.box(hs[0][2])].contiguous()
    if eligible:
        if isinstance(value, torch.Tensor):           # decoded on the host: (re-)encode
            tables = encoder_options(value.numel(), options)
            w = Weight(encode(value, **tables), value.dtype, tuple(value.shape), dev, False,
                           pool, tables, layout)      # a CUDA tensor is encoded on its GPU
        elif isinstance(value, bytes):                # an ECF8 frame read to the host: kept
            f = parse(memoryview(value), verify=False)     # (checked when read)
            w = Weight(value, TORCH_DTYPES[f.spec.code], f.shape, dev, False, pool,
                       encoder_options(f.n, options), layout)
        else:                                         # an ECF8 frame resident on the GPU: kept
            f = value.frame
            w = Weight(value, TORCH_DTYPES[f.spec.code], f.shape, dev, False, pool,
                           encoder_options(f.n, options), layout)
        for m, _, _ in hs:
            attach(m, w)
            undo.append(lambda m=m, p=p: detach(m, p))
        return [w]
    if not isinstance(value, torch.Tensor):           # an ECF8 frame resident on the GPU
        value = decode(value, dev)
    value = value.to(dev)
    if kind == "buffer":
        for m, n in hs:
            _set(m, "buffer", n, value, undo)
        return []
    if layout is not None:
        value = layout.wrap(value)
    new = torch.nn.Parameter(value, requires_grad=p.requires_grad and value.is_floating_point())
    for m, n, _ in hs:
        _set(m, "param", n, new, undo)
    return []


def from_pretrained(folder: str | Path, device: str | torch.device = "cuda", *, model_class: Any = None,
                    dtype: torch.dtype | None = None, **kwargs) -> torch.nn.Module:
    """A Transformers model from an ecf8 checkpoint folder (config.json beside the compressed
    safetensors file(s), e.g. ``ecf8 compress`` of a ``save_pretrained`` folder).

    The model class is model_class (a model class or an Auto class), else the first of the
    config's ``architectures`` that Transformers has (what ``save_pretrained`` wrote: e.g.
    LlamaForCausalLM, BertModel; a config without architectures: AutoModelForCausalLM, or
    AutoModel for a model type that has no causal LM).  The model is built without weights
    (accelerate.init_empty_weights), its weights tied as the config says, then filled by
    ``load_model(model, folder, device, **kwargs)``; it is returned in eval mode, with the
    folder's generation_config.json when there is one, and a ``save_pretrained`` that writes an
    ecf8 folder (``ecf8.torch.pretrained_save``).  Its config has no ecf8 quantization_config (the
    model's modules say what is compressed).  dtype: for tensors the checkpoint does not hold
    (default: the config's).  Raises UnsupportedError without transformers/accelerate, for a
    config.json Transformers does not read (a Diffusers model's), or when the config names no
    class Transformers has and model_class is not given.
    """
    try:
        import transformers
        from accelerate import init_empty_weights
    except ImportError:
        raise UnsupportedError("from_pretrained needs transformers and accelerate: "
                               "pip install transformers accelerate") from None
    from ..model_config import is_marked
    from .pretrained_save import install

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UnsupportedError(f"{folder}: no config.json (give a folder written by save_pretrained)")
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except (ValueError, OSError) as e:                  # e.g. a Diffusers folder: no model_type
        raise UnsupportedError(f"{folder}: not a Transformers model folder ({str(e).splitlines()[0]}); a "
                               "Diffusers model loads through Diffusers' own from_pretrained after "
                               "`import ecf8.torch`") from None
    if is_marked({"quantization_config": getattr(config, "quantization_config", None)}):
        del config.quantization_config          # ecf8 loads it here, not a Transformers quantizer
    dtype = dtype or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    cls = model_class or _architecture(config, transformers, folder)
    build = getattr(cls, "from_config", None) or cls._from_config      # Auto class, or model class
    with init_empty_weights():
        try:
            model = build(config, dtype=dtype)
        except TypeError:                               # transformers < 4.56
            model = build(config, torch_dtype=dtype)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    load_model(model, folder, device, **kwargs)
    if (folder / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    install(model)
    return model.eval()


def _architecture(config: Any, transformers: Any, folder: Path) -> Any:
    """The first model class of ``config.architectures`` that Transformers has; for a config that
    names none, AutoModelForCausalLM where it has the config's model type, else AutoModel."""
    names = list(getattr(config, "architectures", None) or [])
    if not names:
        causal = transformers.AutoModelForCausalLM
        return causal if type(config) in causal._model_mapping else transformers.AutoModel
    for name in names:
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    raise UnsupportedError(f"{folder}: config.json names no model class Transformers has "
                           f"(architectures: {names}); give model_class=, e.g. "
                           "transformers.AutoModelForCausalLM")
