"""Gradients through a compressed weight: training what sits around a compressed module (adapters
such as PEFT's LoRA, layers before it) while its weight stays compressed and frozen.

Inside a compressed module's ``forward`` the weight is a view of a decode buffer that the next
compressed module overwrites, so autograd must not keep it for the backward pass.  While grad mode
is on, a forward runs under ``torch.autograd.graph.saved_tensors_hooks`` that save a reference to
the compressed weight instead of the buffer, and decode it again when backward needs it (as
activation checkpointing recomputes activations): the backward sees exactly the forward's weight
and nothing decoded stays resident between the two.  Other saved tensors go to the hooks that were
active around the module (``torch.utils.checkpoint``'s, say), or are kept as autograd keeps them.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from ..errors import ECF8Error


__all__ = ["decode_again_in_backward", "records"]


class _Saved:
    """What autograd keeps of a saved view of the decoded weight: how to make it again."""

    __slots__ = ("weight", "generation", "size", "stride", "offset")

    def __init__(self, w: Any, t: torch.Tensor, base: torch.Tensor):
        self.weight, self.generation = w, w.generation
        self.size, self.stride = t.size(), t.stride()
        self.offset = t.storage_offset() - base.storage_offset()


class _Outer:
    """A saved tensor packed by the hooks that were active around the module."""

    __slots__ = ("packed",)

    def __init__(self, packed: Any):
        self.packed = packed


def _outer_hooks() -> Any:
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False)
    except (AttributeError, RuntimeError):       # (a private API; absent: no outer hooks honoured)
        return None


def records(module: torch.nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether autograd may save anything in module's forward (grad mode on): an input tensor or
    one of the module's own parameters requires grad."""
    return (any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
            or any(isinstance(a, torch.Tensor) and a.requires_grad for a in kwargs.values())
            or any(p is not None and p.requires_grad for p in module._parameters.values()))


@contextlib.contextmanager
def decode_again_in_backward(w: Any, view: torch.Tensor) -> Iterator[None]:
    """Within this block, autograd saves views of `view` (w decoded in a shared buffer) as a
    reference to w, decoded again in backward."""
    outer = _outer_hooks()
    storage = view.untyped_storage().data_ptr()
    end = view.storage_offset() + view.numel()

    def pack(t: torch.Tensor) -> Any:
        if (type(t) is torch.Tensor and t.dtype == view.dtype and t.device == view.device
                and t.untyped_storage().data_ptr() == storage
                and view.storage_offset() <= t.storage_offset() < end):
            return _Saved(w, t, view)
        if outer is not None:
            return _Outer(outer[0](t))
        return t.detach()

    def unpack(saved: Any) -> torch.Tensor:
        if isinstance(saved, _Saved):
            if saved.weight.generation != saved.generation:
                raise ECF8Error("a compressed weight was changed between forward and backward: "
                                "backward needs the weight the forward used")
            return saved.weight.fresh_local().as_strided(saved.size, saved.stride, saved.offset)
        if isinstance(saved, _Outer):
            return outer[1](saved.packed)
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
