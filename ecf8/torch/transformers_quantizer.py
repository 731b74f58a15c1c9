"""Transformers integration: ``from_pretrained`` loads ecf8 model folders, compressed.

An ecf8 model folder (``ecf8 compress`` of a ``save_pretrained`` folder) says in its
``config.json`` ``"quantization_config": {"quant_method": "ecf8", ...}``.  ``register()`` (on
import of ``transformers.quantizers`` after ``import ecf8.torch``, or ``ecf8.torch.enable()``)
adds ecf8 to Transformers' registries of quantization configs and quantizers, so that

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cuda")

(or any ``AutoModel*`` / model class) builds the model as usual and fills it through Transformers'
own loading (its key renaming, base-model prefixes, dtype rules and tied weights), each checkpoint
tensor read and decoded by ecf8 one at a time: on a GPU an eligible weight (as for
``ecf8.torch.load_model``: a 2-D FP8/BF16/FP16 ``weight`` of a Linear-like module, at least
``min_numel`` elements, Embedding tables only with ``embeddings=True``, not tied, and of the dtype
the model wants) is uploaded as its ECF8 frame and stays compressed; every other tensor is decoded
once.  On the CPU every tensor is decoded to an ordinary parameter (held compressed too when the
folder's quantization_config says ``"compress": true``).  Checkpoint tensors that a model's own
conversion ops merge or split (fused MoE experts) are decoded before those ops.

``from_pretrained(folder, quantization_config=ECF8Config(compress=True, min_numel=...))`` sets
these loading options for one load (Transformers warns that the folder's quantization_config is
used, with the options given).  ``ECF8Config`` on a folder that ``ecf8 compress`` did not write is
an UnsupportedError: ecf8 does not compress while loading (load the folder, then
``ecf8.torch.compress_module(model)``).  ``model.save_pretrained(folder)`` writes an ecf8 folder
(``ecf8.torch.pretrained_save``).
"""

from __future__ import annotations

import re
import weakref
from typing import Any

import torch
from transformers.core_model_loading import (ConversionOps, _IdentityOp, WeightConverter, WeightRenaming,
                                             dot_natural_key, rename_source_key)
from transformers.integrations.accelerate import get_device
from transformers.quantizers import auto as quantizers_auto
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import ECF8Error, UnsupportedError
from ..model_config import FORMAT, QUANT_METHOD
from .folder_reader import NOT_COMPRESSED, RECORD_PATTERN, ConfigOptions, Reader
from .pretrained_save import check_saving, install

__all__ = ["ECF8Config", "ECF8Quantizer", "register"]


class ECF8Config(ConfigOptions, QuantizationConfigMixin):
    """The ``quantization_config`` of an ecf8 model folder, as Transformers holds it (fields: see
    ``ConfigOptions``).  Given to ``from_pretrained(folder, quantization_config=ECF8Config(...))``,
    its loading options (min_numel, embeddings, compress) replace the folder's."""

    def __init__(self, format: str = FORMAT, min_numel: int = 4096, embeddings: bool = False,
                 compress: bool | None = None, original: str | None = None, **kwargs: Any):
        self._set_options(format, min_numel, embeddings, compress, original)


class _Load(ConversionOps):
    """Replaces a checkpoint entry (the stored bytes Transformers read) by its tensor, decoded
    by ecf8 from the folder's file; an eligible weight is attached compressed instead (no output)."""

    def __init__(self, quantizer: "ECF8Quantizer", decode_only: bool = False):
        self.hf_quantizer = quantizer          # (Transformers then leaves the entry's dtype alone)
        self.decode_only = decode_only

    def __deepcopy__(self, memo) -> "_Load":   # one per target key: share the quantizer
        return self

    @property
    def reverse_op(self) -> ConversionOps:       # saving: tensors are already decoded
        return _IdentityOp()

    def convert(self, input_dict: dict, source_patterns=None, target_patterns=None, full_layer_name=None,
                model=None, missing_keys=None, **kwargs) -> dict:
        q = self.hf_quantizer
        if self.decode_only:                   # before a model's own ops: plain tensors, in order
            names = q.merged[full_layer_name]
            return {pattern: [q.tensor(n, full_layer_name, model) for n in names[pattern]]
                    for pattern in input_dict}
        return q.place(full_layer_name, model, missing_keys)


class ECF8Quantizer(HfQuantizer):
    """Loads ecf8 model folders (see the module docstring); ``register()`` makes it Transformers'
    quantizer for ``quant_method: "ecf8"``."""

    requires_calibration = True            # only compressed folders: nothing is compressed on load
    quantization_config: ECF8Config

    def __init__(self, quantization_config: ECF8Config, **kwargs: Any):
        if not kwargs.get("pre_quantized", True):
            raise UnsupportedError(NOT_COMPRESSED)
        super().__init__(quantization_config, **kwargs)
        self.device_map: Any = None
        self.reader: Reader | None = None
        self.sources: dict[str, str] = {}                   # model name -> checkpoint name
        self.merged: dict[str, dict[str, list[str]]] = {}   # target -> {pattern: checkpoint names}

    # --- Transformers' hooks -------------------------------------------------------------------
    def validate_environment(self, device_map: Any = None, **kwargs: Any) -> None:
        if device_map is not None:
            self.device_map = device_map

    def update_device_map(self, device_map: Any) -> Any:
        self.device_map = device_map
        return device_map

    def is_serializable(self) -> bool:
        """True: ``model.save_pretrained`` writes an ecf8 folder (``ecf8.torch.pretrained_save``)."""
        return True

    def get_state_dict_and_metadata(self, model) -> tuple[None, dict]:
        """Saving: refused unless through the model's ecf8 ``save_pretrained`` (which compresses
        what the library writes); the state dict is the model's own (weights decoded)."""
        check_saving()
        return None, {}

    @property
    def is_trainable(self) -> bool:
        return False

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, device_map=None, **kwargs):
        if device_map is not None:
            self.device_map = device_map
        if not checkpoint_files:
            raise UnsupportedError("an ecf8 model folder holds its weights in .safetensors files")
        cfg = self.quantization_config
        self.reader = Reader(checkpoint_files, min_numel=cfg.min_numel, embeddings=cfg.embeddings,
                             compress=cfg.compress)
        self._model = weakref.ref(model)          # for Transformers versions that do not pass it below
        ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
        model._keys_to_ignore_on_load_unexpected = ignore | {RECORD_PATTERN}

    def update_weight_conversions(self, weight_conversions: list, model=None) -> list:
        """Every checkpoint entry goes through _Load: entries the model's own converters take are
        decoded first (decode_only), all others get one converter per final name component.
        Older Transformers releases call it without the model: then it is the one being loaded."""
        model = model if model is not None else self._model()
        index = self.reader.index if self.reader is not None else {}
        leaves = sorted({n.rpartition(".")[2] for n in index})
        ours = [WeightConverter(re.escape(leaf), leaf, [_Load(self)], force_cpu=True) for leaf in leaves]
        decode = _Load(self, decode_only=True)
        updated = []
        for c in weight_conversions:
            if isinstance(c, WeightConverter):
                c = c.copy(c._original_source_patterns, c._original_target_patterns,
                           operations=[decode] + list(c.operations), force_cpu=True)
            updated.append(c)
        renamings = [c for c in updated if isinstance(c, WeightRenaming)]
        converters = [c for c in updated if isinstance(c, WeightConverter)] + ours
        ours_patterns = {p for c in ours for p in c.source_patterns}
        meta = model.state_dict()
        prefix = model.base_model_prefix
        for name in sorted(index, key=dot_natural_key):
            target, pattern = _renamed(name, renamings, converters, prefix, meta)
            if target not in meta or pattern is None:
                continue                # unexpected, or set unconverted: Transformers reports it
            if pattern in ours_patterns:
                self.sources[target] = name
            else:
                self.merged.setdefault(target, {}).setdefault(pattern, []).append(name)
        return updated + ours

    def param_element_size(self, model, param_name: str, param: torch.Tensor) -> float:
        name = self.sources.get(param_name)
        if name is None or self.reader is None or not param.numel():
            return param.element_size()
        return self.reader.index[name][1].stored_bytes / param.numel()

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.reader is not None:
            self.reader.finish(model)
        install(model)
        return model

    # --- loading ----------------------------------------------------------------------------------
    def _device(self, target: str) -> tuple[torch.device, str]:
        device_map = self.device_map if self.device_map is not None else {"": "cpu"}
        device = device_map if isinstance(device_map, (str, int, torch.device)) else get_device(device_map, target)
        return Reader.device(device)

    def tensor(self, name: str, target: str, model) -> torch.Tensor:
        """Checkpoint tensor `name`, decoded on `target`'s device."""
        return self.reader.value(name, self._device(target)[1], None)

    def place(self, target: str, model, missing_keys) -> dict[str, torch.Tensor]:
        """{target: tensor} for Transformers to set, or {} when attached compressed."""
        name = self.sources.get(target)
        if name is None:
            raise ECF8Error(f"{target}: no checkpoint tensor maps to it")
        dev, device = self._device(target)
        ref = model.get_parameter_or_buffer(target)
        module_path, _, attr = target.rpartition(".")
        module = model.get_submodule(module_path) if module_path else model
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        if (self.reader.keeps(name, module, attr, ref.dtype, dev, target in tied or target in set(tied.values()))
                and self._all_loaded(module_path, module)):
            self.reader.attach(name, module, ref, dev, device)
            # Transformers initializes every module not marked after loading; its init would write
            # over the compressed weight (an edit that re-encodes it), so the module is marked
            module._is_hf_initialized = True
            if missing_keys is not None:
                missing_keys.discard(target)
            return {}
        return {target: self.reader.value(name, device, ref.dtype if ref.is_floating_point() else None)}

    def _all_loaded(self, module_path: str, module: torch.nn.Module) -> bool:
        """Whether every parameter and buffer of `module` itself comes from the checkpoint (so that
        marking it initialized leaves nothing uninitialized)."""
        names = [n for n, t in list(module._parameters.items()) + list(module._buffers.items()) if t is not None]
        return all((f"{module_path}.{n}" if module_path else n) in self.sources for n in names)


def _renamed(name, renamings, converters, prefix, meta) -> tuple[str, str | None]:
    """The model name Transformers gives checkpoint entry `name`, and the converter pattern that
    took it (as in ``convert_and_load_state_dict_in_model``)."""
    target, pattern = rename_source_key(name, renamings, converters, prefix, meta)
    if target not in meta and name in meta:
        target, pattern = rename_source_key(name, [], [], base_model_prefix=prefix, meta_state_dict=meta)
    return target, pattern


def register() -> None:
    """Make ecf8 Transformers' quantizer for ``quant_method: "ecf8"`` (once; later calls do
    nothing), and ``ECF8Config`` one whose loading options a ``quantization_config=`` given to
    ``from_pretrained`` sets."""
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not ECF8Quantizer:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)     # (a stale class, e.g. a reload)
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(ECF8Config)
        register_quantizer(QUANT_METHOD)(ECF8Quantizer)
    types = getattr(quantizers_auto, "LOADING_ATTRIBUTES_CONFIG_TYPES", None)
    if isinstance(types, tuple) and ECF8Config not in types:
        quantizers_auto.LOADING_ATTRIBUTES_CONFIG_TYPES = types + (ECF8Config,)


register()      # importing this module imported Transformers' registry: ecf8 joins it now (idempotent)
