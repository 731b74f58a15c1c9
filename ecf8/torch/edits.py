"""Editing a compressed weight: ``module.weight`` (outside ``forward``) and ``state_dict()`` give a
decoded copy whose in-place changes are written back, so an edit takes effect as it would on the
uncompressed model, bit for bit.

The copy is a ``DecodedWeight`` (a ``torch.Tensor`` subclass).  After every operation that changes
it in place, through the copy itself, ``.data``, a view (``w[0]``, ``w.t()``, ``w.view(...)``) or
as an ``out=`` argument (``add_``, ``copy_``, ``w[...] = x``, ``nn.init.*_``, ``w.data += delta``
as PEFT's LoRA merge does), and after ``w.data = other`` (same shape, dtype and device), the held
weight is re-encoded from the copy.  While a copy is referenced, ``module.weight`` returns that same
copy (as a Parameter would), and a weight replaced by other means (``load_state_dict``) is copied
into it.  Writes that bypass PyTorch (through ``data_ptr()`` or DLPack) are not seen; arrays from
``numpy()`` are read-only.  Any other operation gives an ordinary tensor.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from ..errors import UnsupportedError


__all__ = ["DecodedWeight", "copy_of", "refresh", "plain"]

_DATA = torch.Tensor.data.__set__
_TO_ARRAY = (torch.Tensor.numpy, torch.Tensor.__array__)


def plain(t: torch.Tensor) -> torch.Tensor:
    """t as an ordinary tensor sharing its memory (t itself when it is one)."""
    if type(t) is not DecodedWeight:
        return t
    with torch._C.DisableTorchFunctionSubclass():
        return t.as_subclass(torch.Tensor)


class DecodedWeight(torch.Tensor):
    """A decoded copy of a compressed weight (or a view of one): in-place changes re-encode the
    weight.  Its ``_ecf8_weight`` is the held weight, ``_ecf8_whole`` the whole copy."""

    _ecf8_weight: Any
    _ecf8_whole: torch.Tensor

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__reduce_ex__:           # pickles as an ordinary tensor
            return plain(args[0]).__reduce_ex__(*args[1:])
        if func is torch.Tensor.__deepcopy__:
            return copy.deepcopy(plain(args[0]), *args[1:])
        mine = [t for t in tree_leaves((args, kwargs)) if type(t) is DecodedWeight]
        with torch._C.DisableTorchFunctionSubclass():
            if func == _DATA and mine[0] is args[0] and args[0]._ecf8_whole is args[0]:
                return _set_whole(args[0], args[1])
            before = [t._version for t in mine]
            out = func(*args, **kwargs)
            written = {id(t._ecf8_weight): t for t, v in zip(mine, before) if t._version != v}
            for t in written.values():
                _write_back(t)
            if func in _TO_ARRAY:
                out.flags.writeable = False
                return out
            return _views(out, mine)


def _views(out: Any, mine: list) -> Any:
    """Results that share memory with a copy stay DecodedWeights of its weight (views, .data,
    detach); any other result is an ordinary tensor."""
    if isinstance(out, (tuple, list)):
        return type(out)(_views(o, mine) for o in out)
    if not isinstance(out, torch.Tensor) or type(out) is DecodedWeight:
        return out
    ptr = out.untyped_storage().data_ptr()
    for t in mine:
        if t.untyped_storage().data_ptr() == ptr and ptr:
            return _link(out, t._ecf8_weight, t._ecf8_whole)
    return out


def _link(t: torch.Tensor, w: Any, whole: torch.Tensor | None) -> DecodedWeight:
    out = t.as_subclass(DecodedWeight)
    out._ecf8_weight = w
    out._ecf8_whole = out if whole is None else whole
    return out


def _write_back(t: DecodedWeight) -> None:
    """Re-encode t's weight from its whole copy (torch functions disabled by the caller)."""
    t._ecf8_weight.assign(t._ecf8_whole.as_subclass(torch.Tensor), edit=True)


def _set_whole(whole: DecodedWeight, value: Any) -> None:
    """``whole.data = value``: the weight becomes value (same shape, dtype and device)."""
    w = whole._ecf8_weight
    if not isinstance(value, torch.Tensor) or (tuple(value.shape), value.dtype, value.device) != (
            w.shape, w.dtype, w.device):
        got = (tuple(value.shape), value.dtype, value.device) if isinstance(value, torch.Tensor) else type(value)
        raise UnsupportedError(f"weight.data = {got}: a compressed weight keeps its shape {w.shape}, "
                               f"dtype {w.dtype} and device {w.device}; call "
                               "ecf8.torch.decompress_module first to change them")
    value = value.as_subclass(torch.Tensor) if type(value) is DecodedWeight else value
    same = (value.data_ptr() == whole.data_ptr() and value.stride() == whole.stride())
    torch.Tensor.data.__set__(whole, value)
    if not same:                                    # (already written back otherwise)
        _write_back(whole)


def copy_of(w: Any) -> DecodedWeight:
    """The weight's decoded copy: the one handed out before while it is referenced, else a new
    one."""
    ref = w.__dict__.get("copy")
    t = ref() if ref is not None else None
    if t is None or t.device != w.device:
        with torch.inference_mode(False):           # a normal tensor: it counts its writes
            t = _link(w.fresh_local(), w, None)
        w.copy = weakref.ref(t)
    return t


def refresh(w: Any, value: torch.Tensor) -> None:
    """The weight was replaced by value (other than through its copy): a copy still referenced
    takes the new values."""
    ref = w.__dict__.get("copy")
    t = ref() if ref is not None else None
    if t is not None:
        with torch._C.DisableTorchFunctionSubclass(), torch.no_grad():
            target = t.as_subclass(torch.Tensor)
            if target.data_ptr() != value.data_ptr():
                target.copy_(value)
