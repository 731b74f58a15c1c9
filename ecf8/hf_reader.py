"""What the Transformers and Diffusers quantizers share: an ecf8 folder's files read one tensor at
a time, each tensor either decoded or (on a GPU) attached to its module still compressed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch

from . import torch as et
from .errors import ECF8Error, UnsupportedError
from .store import CODED, CompressedFile, inspect_file

__all__ = ["Reader"]

_CODES = {"F8_E4M3": 1, "F8_E5M2": 2, "BF16": 3, "F16": 4}
RECORD_PATTERN = r"^__ecf8__\.*$"          # the record entry of every compressed file


class Reader:
    """The tensors of an ecf8 folder's compressed files, by checkpoint name.

    min_numel, embeddings, compress: which weights stay compressed (as for
    ``ecf8.torch.load_model``; compress None: on a GPU yes, on the CPU no)."""

    def __init__(self, files: Iterable[str | Path], *, min_numel: int = 4096, embeddings: bool = False,
                 compress: bool | None = None):
        self.min_numel, self.embeddings, self.compress = min_numel, embeddings, compress
        self.index: dict[str, tuple[Path, Any]] = {}        # name -> (file, TensorInfo)
        self.handles: dict[tuple, CompressedFile] = {}
        self.pool = et._Pool()
        self.weights: list = []
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
        """(torch device, ecf8 device name) of a device-map value: cpu, cuda[:N] or N."""
        from .loading import _device

        if isinstance(device, int):
            device = f"cuda:{device}"
        if str(device) == "disk":
            raise UnsupportedError("ecf8 cannot offload weights to disk")
        return _device(device)

    def read(self, name: str, device: str, compressed: bool = False) -> Any:
        """Tensor `name`: a torch tensor on `device`, or with compressed=True its frame on the GPU."""
        path = self.index[name][0]
        key = (path, device, compressed)
        f = self.handles.get(key)
        if f is None:
            f = self.handles[key] = CompressedFile(path, device, compressed=compressed)
        if device == "cpu":
            return et._to_torch(f.get_tensor(name))
        with et.torch_memory():                 # uploads come from torch's allocator
            x = f.get_tensor(name)
        return x if compressed else et._to_torch(x)

    def keeps(self, name: str, module: torch.nn.Module, attr: str, dtype: torch.dtype,
              dev: torch.device, tied: bool = False) -> bool:
        """Whether checkpoint tensor `name`, bound for `module`.`attr` as `dtype` on `dev`, is
        held compressed there."""
        info = self.index[name][1]
        keep = dev.type == "cuda" if self.compress is None else bool(self.compress)
        return (keep and not tied and info.codec == "ecf8" and attr == "weight" and info.dtype in CODED
                and len(info.shape) == 2 and info.shape[0] * info.shape[1] >= self.min_numel
                and et.TORCH_DTYPES[_CODES[info.dtype]] == dtype
                and isinstance(module._parameters.get("weight"), torch.nn.Parameter)
                and et._holders_ok([(module, "weight", name)], self.embeddings))

    def attach(self, name: str, module: torch.nn.Module, ref: torch.Tensor, dev: torch.device,
               device: str) -> None:
        """Hold checkpoint tensor `name` compressed as `module`'s weight (ref: its current one)."""
        from .loading import _place

        # on the CPU the decoded tensor is encoded again (the same frame, by the CPU encoder)
        frame = self.read(name, device, compressed=dev.type == "cuda")
        self.weights += _place(("param", [(module, "weight", name)], ref, True, None), frame, dev,
                               self.pool, {"chunk_size": None}, [])

    def value(self, name: str, device: str, dtype: torch.dtype | None) -> torch.Tensor:
        """Tensor `name` decoded on `device`; a float tensor cast to `dtype` when given."""
        x = self.read(name, device)
        if dtype is not None and x.is_floating_point() and x.dtype != dtype:
            x = x.to(dtype)
        return x

    def finish(self, model: torch.nn.Module) -> None:
        """Group the compressed weights for decoding and size the buffers; close the files."""
        try:
            et._group(model, self.weights, None)
            self.pool.warm(self.weights)
        finally:
            self.close()

    def close(self) -> None:
        for f in self.handles.values():
            f.close()
        self.handles.clear()
