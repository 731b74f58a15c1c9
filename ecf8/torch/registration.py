"""ecf8's quantizers in Transformers' and Diffusers' registries, without importing either early.

``import ecf8.torch`` calls ``watch()``: when ``transformers.quantizers.auto`` or
``diffusers.quantizers.auto`` (their quantizer registries) is imported, now or later, ecf8's
quantizer is registered with it right after, so ``from_pretrained`` of an ecf8 model folder works
with no further call.  Importing Transformers costs seconds, so it is not imported here.
``enable()`` registers with both at once (importing them) and raises what goes wrong; a failure
in the import-time registration is a warning (the library's import goes on; loading an ecf8
folder then fails, naming ecf8).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import threading
import warnings
from typing import Any

from ..errors import UnsupportedError

__all__ = ["enable", "watch"]

# registry module -> (ecf8 module, library)
_WATCHED = {"transformers.quantizers.auto": ("ecf8.torch.transformers_quantizer", "transformers"),
            "diffusers.quantizers.auto": ("ecf8.torch.diffusers_quantizer", "diffusers")}
_lock = threading.RLock()


def _register(registry: str) -> None:
    """Register ecf8's quantizer with the (imported) registry module `registry`.  When that
    quantizer module is itself being imported (it imports the registry first), nothing happens
    here: the module registers at the end of its own import."""
    name = _WATCHED[registry][0]
    module = sys.modules.get(name)
    if module is not None and not hasattr(module, "register"):      # partly imported
        return
    importlib.import_module(name).register()


def _register_quietly(registry: str) -> None:
    try:
        _register(registry)
    except Exception as e:              # the library's own import must not fail because of ecf8
        warnings.warn(f"ecf8 could not register its quantizer with {_WATCHED[registry][1]} "
                      f"({type(e).__name__}: {e}); ecf8 model folders will not load through it",
                      RuntimeWarning, stacklevel=2)


class _Loader(importlib.abc.Loader):
    """The registry module's own loader, then the registration."""

    def __init__(self, loader: Any, registry: str):
        self.loader, self.registry = loader, registry

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        module.__loader__ = self.loader             # the module looks as if loaded plainly
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        _register_quietly(self.registry)

    def __getattr__(self, name: str) -> Any:       # get_code, get_source, is_package, ...
        return getattr(self.loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the watched registry modules through the other finders, with a _Loader."""

    def find_spec(self, name, path, target=None):
        if name not in _WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, _Finder) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, name)
                return spec
        return None


def watch() -> None:
    """Register with each registry module already imported, and with the others when they are
    imported (a finder on ``sys.meta_path``; installed once)."""
    with _lock:
        for registry in _WATCHED:
            module = sys.modules.get(registry)
            if module is not None and getattr(module, "AUTO_QUANTIZER_MAPPING", None) is not None:
                _register_quietly(registry)
        if not any(isinstance(f, _Finder) for f in sys.meta_path):
            sys.meta_path.insert(0, _Finder())


def enable() -> list[str]:
    """Register ecf8's quantizers with Transformers and Diffusers now (those installed; importing
    them); returns their names.  UnsupportedError when neither is installed; a registration that
    fails raises."""
    done = []
    for registry, (_, library) in _WATCHED.items():
        if importlib.util.find_spec(library) is None:
            continue
        importlib.import_module(registry)
        _register(registry)
        done.append(library)
    if not done:
        raise UnsupportedError("ecf8.torch.enable() registers with Transformers and Diffusers: "
                               "neither is installed (pip install transformers / diffusers)")
    return done
