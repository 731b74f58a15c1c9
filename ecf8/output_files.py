"""Where outputs are written: one rule for output paths, temporaries of killed runs, errors that
name the file.

- An output file or folder is written in its parent folder, which must exist (``check_parent``):
  a file and a folder output follow the same rule, and nothing is created before it is checked.
- A temporary output is named ``.NAME.PID.XXXXXXXX.tmp`` beside the output ``NAME``, PID the
  writing process.  A run killed outright (SIGKILL, power loss) cannot remove it; the next run
  writing the same output removes every such temporary whose process is gone, and says so on the
  ``ecf8`` logger (``remove_stale``).  Temporaries of a live process (a concurrent run) are left.
- An I/O error raised without a file name (a full disk: ``[Errno 28] No space left on device``)
  is raised again naming the file (``named``, ``NamedWriter``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from .errors import UnsupportedError

__all__ = ["check_parent", "temp_prefix", "remove_stale", "named", "NamedWriter", "TEMP_SUFFIX"]

TEMP_SUFFIX = ".tmp"
log = logging.getLogger("ecf8")


def check_parent(path: Path) -> None:
    """UnsupportedError unless the folder an output `path` goes into exists (it is never created)."""
    parent = Path(os.path.abspath(path)).parent
    if not parent.is_dir():
        where = Path(path).parent
        raise UnsupportedError(f"{path}: folder {where if str(where) != '.' else parent} does not exist "
                               "(create it first)")


def temp_prefix(path: Path) -> str:
    """The name prefix of this process's temporaries for output `path` (tempfile adds 8 characters
    and TEMP_SUFFIX)."""
    return f".{Path(path).name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):      # another user's process, a strange pid
        return True
    return True


def remove_stale(path: Path) -> list[Path]:
    """Remove the temporaries left beside output `path` by runs whose process is gone (files or
    folders named ``.NAME.PID.XXXXXXXX.tmp``); each removal is logged (WARNING, logger ``ecf8``).
    Returns the temporaries removed."""
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.") + r"(\d+)\.[A-Za-z0-9_]{8}" + re.escape(TEMP_SUFFIX))
    try:
        names = os.listdir(path.parent if str(path.parent) else ".")
    except OSError:
        return []
    removed = []
    for name in names:
        m = pattern.fullmatch(name)
        if not m or _alive(int(m.group(1))):
            continue
        stale = path.parent / name
        try:
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        except FileNotFoundError:
            continue                    # (another run removed it first)
        except OSError as e:
            log.warning("%s: a temporary left by an interrupted run (process %s) could not be removed: %s",
                        stale, m.group(1), e.strerror or e)
            continue
        log.warning("removed %s, a temporary left by an interrupted run (process %s, no longer running)",
                    stale, m.group(1))
        removed.append(stale)
    return removed


def named(error: OSError, path: Path | str) -> OSError:
    """`error` itself when it names a file; otherwise the same error (same class and errno)
    naming `path`."""
    if error.filename is not None or error.errno is None:
        return error
    return type(error)(error.errno, error.strerror or os.strerror(error.errno), str(path))


class NamedWriter:
    """A binary file object whose I/O errors name `path` (the output it will become), not nothing."""

    def __init__(self, file: Any, path: Path):
        self._file, self._path = file, path

    def _call(self, method: str, *args):
        try:
            return getattr(self._file, method)(*args)
        except OSError as e:
            raise named(e, self._path) from None

    def write(self, data) -> int:
        return self._call("write", data)

    def flush(self) -> None:
        self._call("flush")

    def close(self) -> None:
        self._call("close")

    def seek(self, *args) -> int:
        return self._call("seek", *args)

    def truncate(self, *args) -> int:
        return self._call("truncate", *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self) -> NamedWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
