"""Compressed weights inside ``torch.compile``: the decode is one custom operator
(``torch.ops.ecf8.decode_weight``) that the compiler sees as an opaque call with a known output
(shape, dtype, device), so a compressed model compiles whole (TorchDynamo traces no ecf8 code),
with Inductor and with ``mode="reduce-overhead"`` (CUDA graphs record the decode launch).

A compiled graph names each weight by a token (its registry number and how many times it has been
re-encoded); the token is a string constant of the graph, so TorchDynamo guards on it: after a
weight is edited (re-encoded into new GPU memory), the next call recompiles instead of replaying
a CUDA graph that reads the old frame."""

from __future__ import annotations

import itertools
import weakref
from typing import Any, Sequence

import torch

from ..errors import ECF8Error


__all__ = ["register", "decode_in_graph", "token"]

_WEIGHTS: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
_NUMBERS = itertools.count(1)


def register(w: Any) -> int:
    """A new registry number for w (at creation and after unpickling)."""
    number = next(_NUMBERS)
    _WEIGHTS[number] = w
    return number


def token(w: Any) -> str:
    return f"{w.number}.{w.generation}"


@torch.library.custom_op("ecf8::decode_weight", mutates_args=())
def _decode_weight(token: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    w = _WEIGHTS.get(int(token.split(".")[0]))
    if w is None:
        raise ECF8Error(f"compressed weight {token} no longer exists (its model was dropped)")
    return w.fresh_local()


@_decode_weight.register_fake
def _(token: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def decode_in_graph(w: Any) -> torch.Tensor:
    """w decoded by the custom operator (what a compiled forward calls); a DTensor under tensor
    parallelism."""
    return w._wrap(torch.ops.ecf8.decode_weight(token(w), list(w.shape), w.dtype, w.device))
