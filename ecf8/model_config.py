"""The ``quantization_config`` an ecf8 model folder declares in its ``config.json``.

``ecf8 compress`` of a model folder adds to each ``config.json`` beside safetensors files (a
Transformers model, or one component of a Diffusers pipeline)

    "quantization_config": {"quant_method": "ecf8", "format": "ecf8.safetensors",
                            "original": "<the original config.json, as text>"}

so that Transformers and Diffusers route the folder to ecf8's loaders (``ecf8.torch`` registers
them), or name ecf8 when it is not installed.  ``original`` makes the change reversible:
``ecf8 decompress`` writes the original bytes back while the config still says what they say
(the quantization_config aside); a config edited since is written as edited, without the key.
A ``config.json`` that is not a UTF-8 JSON object, or that already has a quantization_config
(a quantized model: its loader owns that key), is copied unchanged.  Imports nothing heavy.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["CONFIG_NAME", "QUANT_METHOD", "marked", "restored", "is_marked"]

CONFIG_NAME = "config.json"
QUANT_METHOD = "ecf8"
FORMAT = "ecf8.safetensors"
KEY = "quantization_config"


def _object(text: bytes) -> dict | None:
    """The JSON object `text` holds, or None (not UTF-8, not JSON, not an object)."""
    try:
        value = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _dump(config: dict[str, Any]) -> bytes:
    """JSON as Transformers writes a config (two-space indent, sorted keys, final newline)."""
    return (json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def _same(a: dict, b: dict) -> bool:
    """Equal as JSON (NaN equals NaN, key order aside)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def is_marked(config: Any) -> bool:
    """True when a parsed config (dict) declares ecf8 storage."""
    q = config.get(KEY) if isinstance(config, dict) else None
    return isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD


def marked(text: bytes) -> bytes | None:
    """The bytes of a ``config.json`` declaring ecf8 storage, or None when `text` stays as it is
    (not a UTF-8 JSON object, or it already has a quantization_config)."""
    config = _object(text)
    if config is None or KEY in config:
        return None
    config[KEY] = {"quant_method": QUANT_METHOD, "format": FORMAT, "original": text.decode("utf-8")}
    return _dump(config)


def restored(text: bytes) -> bytes:
    """The ``config.json`` bytes before ``marked``: the original, byte for byte, when the config
    is otherwise unchanged; an edited config without the ecf8 key; anything else as it is."""
    config = _object(text)
    if config is None or not is_marked(config):
        return text
    original = config[KEY].get("original")
    del config[KEY]
    if isinstance(original, str):
        before = _object(original.encode("utf-8", "surrogatepass"))
        if before is not None and _same(before, config):
            return original.encode("utf-8", "surrogatepass")
    return _dump(config)
