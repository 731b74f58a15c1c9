"""PyTorch adapter: tensors in and out, checkpoints, and just-in-time decoding of a module's weights.

    blob = ecf8.torch.encode(w)                       # w: float8_e4m3fn / float8_e5m2 / bfloat16 / float16
    w2 = ecf8.torch.decode(blob, device="cuda")       # on torch's current stream
    ecf8.torch.save_file({"w": w}, "x.safetensors")   # like safetensors.torch, compressed
    stats = ecf8.torch.compress_module(model)          # weights stay compressed, decoded per forward
    ecf8.torch.decompress_module(model)
    ecf8.torch.load_model(meta_model, "ckpt/", device="cuda")   # file -> compressed GPU storage

GPU decoding writes into memory from torch's caching allocator on torch's current stream (or the
``stream`` given: a ``torch.cuda.Stream``, an int handle or an object with ``__cuda_stream__``).

A compressed module (after ``compress_module`` or ``load_model``) behaves like the original module
for inference: ``module.weight`` decodes on demand (inside ``forward``: the just-in-time copy),
``state_dict()`` holds the decoded weights under their usual keys and ``load_state_dict`` re-encodes
what it is given; ``torch.save``/``pickle``/``copy.deepcopy`` give a compressed module again.  ``.to(device)``
moves the compressed frames; a dtype conversion makes the weight an ordinary Parameter again.  Its
compressed weights are not ``parameters()`` (they have no gradient); tied weights stay tied.

Tensor parallelism: a weight that is a DTensor (``torch.distributed.tensor``, e.g. after
``parallelize_module`` with ColwiseParallel / RowwiseParallel, or Transformers' ``tp_plan``) is held
as this rank's local shard only, compressed; ``module.weight``, ``state_dict()`` and
``decompress_module`` give back a DTensor with the same device mesh, placements, global shape and
stride, so the module's TP collectives are exactly those of the uncompressed model.

Transformers and Diffusers: after ``import ecf8.torch``, their own ``from_pretrained`` loads an
ecf8 model folder (``ecf8 compress`` of a ``save_pretrained`` folder: its config.json says
``quant_method: "ecf8"``) with its weights held compressed on a GPU, and ``save_pretrained``
writes an ecf8 folder again.  ecf8's quantizers are registered when those libraries' quantizer
registries are imported (``enable()`` registers at once).

Modules: ``tensors`` (tensors and files), ``runtime`` (the just-in-time weight runtime: held
weights, decode buffers, groups), ``modules`` (``compress_module``), ``loading`` (``load_model``,
``from_pretrained``), ``parallel`` (DTensor shards), ``offload`` (``offload_module``: compressed
weights streamed from pinned host memory when even the compressed model does not fit),
``registration`` (``enable``), ``transformers_quantizer`` / ``diffusers_quantizer`` (the
libraries' quantizers) on ``folder_reader`` (an ecf8 folder read tensor by tensor),
``pretrained_save`` (``save_pretrained`` writing an ecf8 folder).
"""

from __future__ import annotations

from .loading import from_pretrained, load_model
from .modules import compress_module, decompress_module, is_compressed, rebuild
from .offload import OffloadStats, is_offloaded, offload_module
from .parallel import Layout, is_dtensor
from .registration import enable, watch
from .runtime import CompressionStats, Group, Pool, Weight
from .tensors import (TORCH_DTYPES, decode, encode, from_numpy, load_file, save_file,  # noqa: F401
                      to_numpy, torch_memory)

__all__ = ["encode", "decode", "save_file", "load_file", "compress_module", "decompress_module",
           "load_model", "from_pretrained", "CompressionStats", "is_compressed", "is_dtensor",
           "offload_module", "OffloadStats", "is_offloaded", "enable"]

# Pickles of compressed modules written while this package was one module (ecf8/torch.py) name
# these objects by these paths; keep them, or such pickles no longer load.
_rebuild, _Weight, _Pool, _Group, _Layout = rebuild, Weight, Pool, Group, Layout

watch()         # ecf8's quantizers join Transformers' and Diffusers' registries when those load

_LAZY = ("transformers_quantizer", "diffusers_quantizer")   # import their library: only on use


def __getattr__(name: str):
    """``ecf8.torch.transformers_quantizer`` (e.g. its ``ECF8Config``) and ``diffusers_quantizer``
    as attributes, imported on first use."""
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
