"""``save_pretrained`` of a model loaded from an ecf8 folder writes an ecf8 folder.

A Transformers or Diffusers model loaded from an ecf8 model folder (through their
``from_pretrained`` or ``ecf8.torch.from_pretrained``) gets its own ``save_pretrained`` (an
instance attribute, so that the model's class stays what it is):

    model.save_pretrained(folder)       # also model.push_to_hub(...), a pipeline's save_pretrained

saves the model as the library does, into a temporary folder beside `folder` (the weights decoded
by the compressed modules' ``state_dict``), takes the ecf8 ``quantization_config`` out of each
config.json (what a plain save writes), compresses that folder with ``ecf8 compress``'s code
(safetensors shards compressed, config.json marked again) and moves its files into `folder`
(other files there stay; shards of an earlier save that this one does not replace are removed,
as the library does).  A failure while saving or compressing raises before `folder` changes.

Saving adapters only (PEFT), on a rank that does not save (``is_main_process=False``), goes to
the library unchanged.  ``push_to_hub=True``, ``distributed_checkpoint=True`` and
``safe_serialization=False`` are refused (UnsupportedError) before anything is written.  Memory:
the library's save holds the whole decoded state dict, as for any model.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

from ..errors import UnsupportedError
from ..model_config import CONFIG_NAME, restored

__all__ = ["SavePretrained", "install", "check_saving"]

_SHARD = re.compile(r"^(?P<stem>.+?)(?:-\d{5}-of-\d{5})?(?P<ext>\.safetensors)$")
_active = threading.local()


@contextlib.contextmanager
def _saving() -> Iterator[None]:
    """Within this block (this thread), the library's save of an ecf8 model goes ahead."""
    _active.depth = getattr(_active, "depth", 0) + 1
    try:
        yield
    finally:
        _active.depth -= 1


def check_saving(what: str = "save_pretrained") -> None:
    """UnsupportedError unless ``SavePretrained`` is saving in this thread: a library save that
    bypassed it would write uncompressed shards under an ecf8 config.json, a folder that does not
    load."""
    if not getattr(_active, "depth", 0):
        raise UnsupportedError(f"{what} of a model loaded from an ecf8 folder goes through the "
                               "model's own model.save_pretrained(folder), which writes an ecf8 folder "
                               "(`ecf8 decompress` makes a plain folder of it)")


class SavePretrained:
    """``model.save_pretrained`` writing an ecf8 model folder (see the module docstring); the
    library's own method is ``type(model).save_pretrained``.  Picklable with the model."""

    def __init__(self, model: Any):
        self.model = model

    def __repr__(self) -> str:
        return f"<ecf8 save_pretrained of {type(self.model).__name__}>"

    def __call__(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        model = self.model
        save = type(model).save_pretrained
        if args:
            raise UnsupportedError("save_pretrained of an ecf8 model takes its options by keyword")
        if (getattr(model, "_hf_peft_config_loaded", False) or kwargs.get("is_main_process", True) is False):
            with _saving():                                       # adapters only, or nothing written
                return save(model, save_directory, **kwargs)
        for option, refused, why in (
                ("push_to_hub", True, "save, then upload the folder (huggingface_hub.upload_folder), or "
                                      "use model.push_to_hub"),
                ("distributed_checkpoint", True, "ecf8 writes consolidated safetensors shards"),
                ("safe_serialization", False, "ecf8 folders hold safetensors files")):
            if kwargs.get(option, not refused) == refused:
                raise UnsupportedError(f"save_pretrained({option}={refused}) of an ecf8 model: {why}")
        from ..compressed import compress_path

        dst = Path(save_directory)
        if dst.exists() and not dst.is_dir():
            raise UnsupportedError(f"{dst} is a file, not a folder")
        dst.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.ecf8-", dir=dst.parent))
        try:
            plain, packed = work / "plain", work / "ecf8"
            with _saving():
                result = save(model, plain, **kwargs)
            for config in plain.rglob(CONFIG_NAME):
                config.write_bytes(restored(config.read_bytes()))
            compress_path(plain, packed)
            _move_into(packed, dst)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return result


def _move_into(src: Path, dst: Path) -> None:
    """Every file of folder `src` moved into `dst` at the same relative path; in each folder that
    received safetensors files, earlier shards of the same name pattern that were not replaced are
    removed (as the libraries' own save does)."""
    dst.mkdir(exist_ok=True)
    moved: dict[Path, set[str]] = {}
    for root, _, files in os.walk(src):
        for name in files:
            rel = Path(root, name).relative_to(src)
            (dst / rel.parent).mkdir(parents=True, exist_ok=True)
            os.replace(src / rel, dst / rel)
            moved.setdefault(rel.parent, set()).add(name)
    for folder, names in moved.items():
        patterns = {(m["stem"], m["ext"]) for m in map(_SHARD.match, names) if m}
        for old in (dst / folder).iterdir():
            m = re.match(r"^(?P<stem>.+)-\d{5}-of-\d{5}(?P<ext>\.safetensors)$", old.name)
            if m and old.name not in names and (m["stem"], m["ext"]) in patterns and old.is_file():
                old.unlink()


def install(model: Any) -> None:
    """Give `model` the ecf8 ``save_pretrained`` (see the module docstring)."""
    model.__dict__["save_pretrained"] = SavePretrained(model)
