"""Diffusers integration: ``from_pretrained`` of a Diffusers model (a DiT, a UNet, a VAE) loads an
ecf8 model folder compressed.

A compressed component folder (``ecf8 compress`` of a pipeline or model folder) says
``"quantization_config": {"quant_method": "ecf8", ...}`` in its ``config.json``; ``register()``
(done by ``ecf8.torch.enable()``) adds ecf8 to Diffusers' quantizer registries, so that
``FluxTransformer2DModel.from_pretrained(folder, device_map="cuda")`` or
``DiffusionPipeline.from_pretrained(pipeline_folder, ...)`` load it through Diffusers' own path
(its dtype rules, fp32 modules, device map).  Each checkpoint entry is handed to Diffusers as an
empty (meta) tensor of its original dtype and shape; the quantizer then reads it from the file,
one tensor at a time: on a GPU an eligible weight (see ``ecf8.hf_transformers``) is uploaded as
its ECF8 frame and stays compressed, every other tensor is decoded once, in the dtype Diffusers
chose for it.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from diffusers.quantizers import auto as dq_auto
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin

from .errors import UnsupportedError
from .hf_reader import RECORD_PATTERN, Reader
from .hf_transformers import Method
from .model_config import FORMAT, QUANT_METHOD

__all__ = ["ECF8DiffusersConfig", "ECF8DiffusersQuantizer", "register"]


class ECF8DiffusersConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of an ecf8 Diffusers model folder (options as for
    ``ecf8.hf_transformers.ECF8Config``)."""

    def __init__(self, format: str = FORMAT, min_numel: int = 4096, embeddings: bool = False,
                 compress: bool | None = None, original: str | None = None, **kwargs: Any):
        self.quant_method = Method.ECF8
        if format != FORMAT:
            raise UnsupportedError(f"quantization_config format {format!r}: ecf8 reads {FORMAT!r}")
        self.format = format
        self.min_numel = int(min_numel)
        self.embeddings = bool(embeddings)
        self.compress = compress
        self.original = original

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "format": self.format}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


_TORCH = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "BF16": torch.bfloat16,
          "F16": torch.float16, "F32": torch.float32, "F64": torch.float64, "BOOL": torch.bool,
          "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "U16": torch.uint16,
          "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64}


def _meta_tensor(info) -> torch.Tensor:
    """An empty (meta) tensor of a checkpoint entry's original dtype and shape."""
    if info.dtype not in _TORCH:
        raise UnsupportedError(f"tensor {info.name!r}: dtype {info.dtype} has no torch equivalent")
    return torch.empty(info.shape, dtype=_TORCH[info.dtype], device="meta")


class ECF8DiffusersQuantizer(DiffusersQuantizer):
    """Loads ecf8 Diffusers model folders (see the module docstring)."""

    requires_calibration = True
    use_keep_in_fp32_modules = True
    quantization_config: ECF8DiffusersConfig

    def __init__(self, quantization_config: ECF8DiffusersConfig, **kwargs: Any):
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
        return model

    @property
    def is_serializable(self) -> bool:
        return True

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
