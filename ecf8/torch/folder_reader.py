"""What the Transformers and Diffusers quantizers share: the ``quantization_config`` options of an
ecf8 model folder, and the folder's files read one tensor at a time, each tensor either decoded or
attached to its module still compressed (as ``load_model`` does)."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from ..compressed import CompressedFile, inspect_file
from ..errors import ECF8Error, UnsupportedError
from ..format import CODED_NAMES, DTYPES
from ..model_config import FORMAT, QUANT_METHOD
from ..safetensors_io import DTYPE_NAMES
from .loading import place_tensor, resolve_device
from .modules import group_weights, holders_ok
from .runtime import Pool, Weight
from .tensors import TORCH_DTYPES, to_torch, torch_memory

__all__ = ["Method", "ConfigOptions", "Reader", "RECORD_PATTERN", "NOT_COMPRESSED", "torch_dtype"]

RECORD_PATTERN = r"^__ecf8__\.*$"          # the record entry of every compressed file
NOT_COMPRESSED = ("an ecf8 quantization_config loads folders written by `ecf8 compress` (their config.json "
                  "says quant_method 'ecf8'); ecf8 does not compress while loading: load this folder "
                  "without it, then ecf8.torch.compress_module(model)")
_CODED_TORCH = {spec.name: TORCH_DTYPES[code] for code, spec in DTYPES.items()}


def torch_dtype(name: str, tensor: str = "") -> torch.dtype:
    """The torch dtype of a safetensors dtype name (UnsupportedError for one torch lacks)."""
    if name in _CODED_TORCH:
        return _CODED_TORCH[name]
    if name not in DTYPE_NAMES:
        raise UnsupportedError(f"tensor {tensor!r}: dtype {name} has no torch equivalent")
    return torch.from_numpy(np.empty(0, DTYPE_NAMES[name])).dtype


class Method(str, enum.Enum):
    """The quant_method value (a str; Diffusers also reads ``.value``)."""

    ECF8 = QUANT_METHOD


class ConfigOptions:
    """The fields of an ecf8 ``quantization_config`` (mixed into both libraries' config classes).

    min_numel, embeddings: which weights stay compressed (as for ``ecf8.torch.load_model``);
    compress: hold them compressed (default None: on a GPU yes, on the CPU no).  These are loading
    options: a folder's config.json needs just ``quant_method``.  ``original`` (the config.json
    before ``ecf8 compress``) is kept for ``ecf8 decompress`` and not saved again.  Raises
    UnsupportedError for a ``format`` other than "ecf8.safetensors"."""

    def _set_options(self, format: str, min_numel: int, embeddings: bool, compress: bool | None,
                     original: str | None) -> None:
        self.quant_method = Method.ECF8
        if format != FORMAT:
            raise UnsupportedError(f"quantization_config format {format!r}: ecf8 reads {FORMAT!r}")
        self.format = format
        self.min_numel = int(min_numel)
        self.embeddings = bool(embeddings)
        self.compress = compress
        self.original = original

    def to_dict(self) -> dict[str, Any]:
        """What a saved config.json holds: the method and the format (loading options are not saved)."""
        return {"quant_method": QUANT_METHOD, "format": self.format}

    def get_loading_attributes(self) -> dict[str, Any]:
        """The options that a ``quantization_config=`` given to ``from_pretrained`` sets."""
        return {"min_numel": self.min_numel, "embeddings": self.embeddings, "compress": self.compress}


class Reader:
    """The tensors of an ecf8 folder's compressed files, by checkpoint name.

    min_numel, embeddings, compress: which weights stay compressed (as for
    ``ecf8.torch.load_model``; compress None: on a GPU yes, on the CPU no).  Raises
    UnsupportedError for a file that is not ``.safetensors`` or a tensor in two files, and the
    ECF8Error of ``inspect_file`` for a file that is not ecf8-compressed."""

    def __init__(self, files: Iterable[str | Path], *, min_numel: int = 4096, embeddings: bool = False,
                 compress: bool | None = None):
        self.min_numel, self.embeddings, self.compress = min_numel, embeddings, compress
        self.index: dict[str, tuple[Path, Any]] = {}        # name -> (file, TensorInfo)
        self.handles: dict[tuple, CompressedFile] = {}
        self.pool = Pool()
        self.weights: list[Weight] = []
        for f in files:
            f = Path(f)
            if f.suffix != ".safetensors":
                raise UnsupportedError(f"{f}: an ecf8 model folder holds .safetensors files only")
            try:
                rows = inspect_file(f)
            except ECF8Error as e:
                raise type(e)(f"{e} (its config.json says quant_method 'ecf8')") from None
            for r in rows:
                if r.name in self.index:
                    raise UnsupportedError(f"{f}: tensor {r.name!r} appears in two files")
                self.index[r.name] = (f, r)

    @staticmethod
    def device(device: Any) -> tuple[torch.device, str]:
        """(torch device, ecf8 device name) of a device-map value: cpu, cuda[:N] or N.
        UnsupportedError for "disk" or another device type."""
        if isinstance(device, int):
            device = f"cuda:{device}"
        if str(device) == "disk":
            raise UnsupportedError("ecf8 cannot offload weights to disk")
        return resolve_device(device)

    def _file(self, name: str, device: str, compressed: bool) -> CompressedFile:
        path = self.index[name][0]
        key = (path, device, compressed)
        f = self.handles.get(key)
        if f is None:
            f = self.handles[key] = CompressedFile(path, device, compressed=compressed)
        return f

    def frame(self, name: str, device: str) -> Any:
        """Tensor `name`'s ECF8 frame, checked, not decoded: bytes on the CPU, a DeviceTensor on a
        GPU (in torch's memory)."""
        if device == "cpu":
            return self._file(name, "cpu", False).get_frame(name)
        with torch_memory():                 # uploads come from torch's allocator
            return self._file(name, device, True).get_tensor(name)

    def value(self, name: str, device: str, dtype: torch.dtype | None) -> torch.Tensor:
        """Tensor `name` decoded on `device`; a float tensor cast to `dtype` when given."""
        f = self._file(name, device, False)
        if device == "cpu":
            x = to_torch(f.get_tensor(name))
        else:
            with torch_memory():
                x = to_torch(f.get_tensor(name))
        if dtype is not None and x.is_floating_point() and x.dtype != dtype:
            x = x.to(dtype)
        return x

    def keeps(self, name: str, module: torch.nn.Module, attr: str, dtype: torch.dtype,
              dev: torch.device, tied: bool = False) -> bool:
        """Whether checkpoint tensor `name`, bound for `module`.`attr` as `dtype` on `dev`, is
        held compressed there."""
        info = self.index[name][1]
        keep = dev.type == "cuda" if self.compress is None else bool(self.compress)
        return (keep and not tied and info.codec == "ecf8" and attr == "weight" and info.dtype in CODED_NAMES
                and len(info.shape) == 2 and info.shape[0] * info.shape[1] >= self.min_numel
                and _CODED_TORCH[info.dtype] == dtype
                and isinstance(module._parameters.get("weight"), torch.nn.Parameter)
                and holders_ok([(module, "weight", name)], self.embeddings))

    def attach(self, name: str, module: torch.nn.Module, ref: torch.Tensor, dev: torch.device,
               device: str) -> None:
        """Hold checkpoint tensor `name` compressed as `module`'s weight (ref: its current one):
        the file's frame, as stored."""
        frame = self.frame(name, device)
        self.weights += place_tensor(("param", [(module, "weight", name)], ref, True, None), frame, dev,
                                     self.pool, {"chunk_size": None}, [])

    def finish(self, model: torch.nn.Module) -> None:
        """Group the compressed weights for decoding and size the buffers; close the files."""
        try:
            group_weights(model, self.weights, None)
            self.pool.warm(self.weights)
        finally:
            self.close()

    def close(self) -> None:
        """Close every file opened."""
        for f in self.handles.values():
            f.close()
        self.handles.clear()
