"""Diffusers integration: ``from_pretrained`` of a Diffusers model (a DiT, a UNet, a VAE) or
pipeline loads an ecf8 model folder compressed.

A compressed component folder (``ecf8 compress`` of a pipeline or model folder) says
``"quantization_config": {"quant_method": "ecf8", ...}`` in its ``config.json``; ``register()``
(on import of ``diffusers.quantizers`` after ``import ecf8.torch``, or ``ecf8.torch.enable()``)
adds ecf8 to Diffusers' quantizer registries, so that
``FluxTransformer2DModel.from_pretrained(folder, device_map="cuda")`` or
``DiffusionPipeline.from_pretrained(pipeline_folder, ...)`` load it through Diffusers' own path
(its dtype rules, fp32 modules, device map).  Each checkpoint entry is handed to Diffusers as an
empty (meta) tensor of its original dtype and shape; the quantizer then reads it from the file,
one tensor at a time: on a GPU an eligible weight (as for ``ecf8.torch.load_model``) is uploaded
as its ECF8 frame and stays compressed, every other tensor is decoded once, in the dtype Diffusers
chose for it.  ``model.save_pretrained(folder)`` writes an ecf8 folder
(``ecf8.torch.pretrained_save``).  Loading options (min_numel, embeddings, compress) come from the
folder's quantization_config only (Diffusers ignores a ``quantization_config=`` argument then,
with a warning).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from diffusers.quantizers import auto as dq_auto
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin

from ..errors import UnsupportedError
from ..model_config import FORMAT, QUANT_METHOD
from .folder_reader import NOT_COMPRESSED, RECORD_PATTERN, ConfigOptions, Reader, torch_dtype
from .pretrained_save import check_saving, install

__all__ = ["ECF8DiffusersConfig", "ECF8DiffusersQuantizer", "register"]


class ECF8DiffusersConfig(ConfigOptions, QuantizationConfigMixin):
    """The ``quantization_config`` of an ecf8 Diffusers model folder (fields: see
    ``ConfigOptions``).  Diffusers uses a folder's own config only: given to ``from_pretrained``,
    it is ignored with Diffusers' warning."""

    def __init__(self, format: str = FORMAT, min_numel: int = 4096, embeddings: bool = False,
                 compress: bool | None = None, original: str | None = None, **kwargs: Any):
        self._set_options(format, min_numel, embeddings, compress, original)

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


def _meta_tensor(info) -> torch.Tensor:
    """An empty (meta) tensor of a checkpoint entry's original dtype and shape."""
    return torch.empty(info.shape, dtype=torch_dtype(info.dtype, info.name), device="meta")


class ECF8DiffusersQuantizer(DiffusersQuantizer):
    """Loads ecf8 Diffusers model folders (see the module docstring)."""

    requires_calibration = True
    use_keep_in_fp32_modules = True
    quantization_config: ECF8DiffusersConfig

    def __init__(self, quantization_config: ECF8DiffusersConfig, **kwargs: Any):
        if not kwargs.get("pre_quantized", True):
            raise UnsupportedError(NOT_COMPRESSED)
        super().__init__(quantization_config, **kwargs)
        self.reader: Reader | None = None

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]) -> list[str]:
        cfg = self.quantization_config
        self.reader = Reader([f for f in checkpoint_files if isinstance(f, str)] or checkpoint_files,
                             min_numel=cfg.min_numel, embeddings=cfg.embeddings, compress=cfg.compress)
        return [k for k in loaded_keys if k in self.reader.index]

    def maybe_update_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """The stored bytes of each entry become an empty tensor of its dtype and shape (read later,
        in create_quantized_param); the record entry goes."""
        out = {}
        for name in state_dict:
            if name in self.reader.index:
                out[name] = _meta_tensor(self.reader.index[name][1])
            elif not re.match(RECORD_PATTERN, name):
                raise UnsupportedError(f"{name!r} is not a tensor of the ecf8 checkpoint (renamed on "
                                       "load by the model class: not supported)")
        return out

    def check_if_quantized_param(self, model, param_value, param_name: str, state_dict, **kwargs) -> bool:
        return self.reader is not None and param_name in self.reader.index and param_value.device.type == "meta"

    def check_quantized_param_shape(self, param_name, current_param, loaded_param) -> bool:
        if tuple(current_param.shape) != tuple(loaded_param.shape):
            raise UnsupportedError(f"{param_name}: shape {tuple(loaded_param.shape)} in the checkpoint, "
                                   f"{tuple(current_param.shape)} in the model")
        return True

    def create_quantized_param(self, model, param_value, param_name: str, target_device, state_dict,
                               unexpected_keys=None, **kwargs) -> None:
        dev, device = Reader.device(target_device)
        module_path, _, attr = param_name.rpartition(".")
        module = model.get_submodule(module_path) if module_path else model
        ref = getattr(module, attr)
        dtype = param_value.dtype                 # what Diffusers' own rules made of the entry's dtype
        if self.reader.keeps(param_name, module, attr, dtype, dev):
            self.reader.attach(param_name, module, ref, dev, device)
            return
        value = self.reader.value(param_name, device, dtype)
        if attr in module._buffers:
            module._buffers[attr] = value
        else:
            module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)

    def _process_model_before_weight_loading(self, model, **kwargs):
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.reader is not None:
            self.reader.finish(model)
        install(model)
        return model

    @property
    def is_serializable(self) -> bool:
        """True: ``model.save_pretrained`` writes an ecf8 folder (``ecf8.torch.pretrained_save``)."""
        return True

    def get_state_dict_and_metadata(self, state_dict: dict[str, Any], safe_serialization: bool = False
                                    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Saving: refused unless through the model's ecf8 ``save_pretrained``."""
        check_saving()
        return state_dict, {}

    @property
    def is_trainable(self) -> bool:
        return False

    def get_cuda_warm_up_factor(self) -> int:
        return 8                                 # compressed weights: less than half is allocated


def register() -> None:
    """Make ecf8 Diffusers' quantizer for ``quant_method: "ecf8"`` (Diffusers has no register
    function: its two registries are filled directly)."""
    dq_auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = ECF8DiffusersConfig
    dq_auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = ECF8DiffusersQuantizer


register()      # importing this module imported Diffusers' registry: ecf8 joins it now (idempotent)
