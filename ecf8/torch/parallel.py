"""Tensor parallelism: DTensor weights (``torch.distributed.tensor``) held as this rank's local
shard, and the slice of a whole tensor that this rank holds."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import torch

from ..errors import UnsupportedError

__all__ = ["is_dtensor", "Layout", "check_sharded"]

_DTENSOR_MODULES = ("torch.distributed.tensor", "torch.distributed._tensor")   # the latter: torch < 2.4


def _dtensor_api() -> Any:
    """The module defining DTensor, once imported by anyone (no DTensor can exist before), or None."""
    for name in _DTENSOR_MODULES:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "DTensor"):
            return module
    return None


def is_dtensor(t: Any) -> bool:
    """True when t is a ``torch.distributed.tensor.DTensor`` (a Parameter wrapping one included)."""
    api = _dtensor_api()
    return api is not None and isinstance(t, api.DTensor)


class Layout:
    """How a DTensor is laid out over ranks: device mesh, placements, global shape and stride.
    A weight held compressed keeps only its local shard; wrap() makes the DTensor again."""

    def __init__(self, t: torch.Tensor):
        self.mesh, self.placements = t.device_mesh, tuple(t.placements)
        self.shape, self.stride = tuple(t.shape), tuple(t.stride())

    def wrap(self, local: torch.Tensor) -> torch.Tensor:
        """The DTensor whose local shard on this rank is `local` (no communication)."""
        return _dtensor_api().DTensor.from_local(local, self.mesh, self.placements, run_check=False,
                                                 shape=torch.Size(self.shape), stride=self.stride)

    def box(self, what: str) -> tuple[slice, ...]:
        """This rank's slice of the global tensor (Shard / Replicate placements only)."""
        return _shard_box(self.shape, self.mesh, self.placements, what)

    def local(self, value: torch.Tensor, what: str) -> torch.Tensor:
        """This rank's shard of `value`: a DTensor laid out as this one, or the whole tensor."""
        if is_dtensor(value):
            if value.device_mesh != self.mesh or tuple(value.placements) != self.placements:
                raise UnsupportedError(f"{what}: a DTensor placed {tuple(value.placements)} cannot replace "
                                       f"a weight placed {self.placements} on another mesh or layout")
            return value.to_local()
        return value[self.box(what)]


def _shard_box(shape: tuple, mesh: Any, placements: tuple, what: str) -> tuple[slice, ...]:
    """The slice of a tensor of global `shape` that this rank holds under `placements` on `mesh`
    (as ``distribute_tensor`` cuts it).  Raises UnsupportedError for placements other than
    Shard / Replicate (Partial, strided shards), whose local part is not one box."""
    api = _dtensor_api()
    utils = importlib.import_module(api.__name__ + "._utils")
    for pl in placements:
        if type(pl) not in (api.Shard, api.Replicate):
            raise UnsupportedError(f"{what}: ecf8 loads Shard and Replicate placements, "
                                   f"not {type(pl).__name__} ({pl})")
    local, offset = utils.compute_local_shape_and_global_offset(torch.Size(shape), mesh, list(placements))
    return tuple(slice(o, o + n) for o, n in zip(offset, local))


def check_sharded(p: torch.Tensor, holders: list, what: str) -> None:
    """A DTensor weight is held compressed only on modules whose class forward runs: a forward
    replaced per instance (Transformers' own tp_plan layers, which also swap DTensor parameters for
    local tensors inside it) would bypass the just-in-time decode and see a DTensor it does not expect."""
    if is_dtensor(p) and any("forward" in m.__dict__ for m, _, _ in holders):
        raise UnsupportedError(f"{what} is a DTensor on a module whose forward is replaced per instance "
                               "(e.g. Transformers' tp_plan): not supported; shard the model with "
                               "torch.distributed.tensor.parallel.parallelize_module instead")

