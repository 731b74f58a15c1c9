"""A model folder's shards compressed on several GPUs at once: one worker process per GPU.

``compress_path(folder, out, device="cuda")`` uses this when more than one GPU is visible.  The
shards go largest first to whichever worker is free (a work queue: unequal shards balance); each
worker runs the function it is given (``compressed.compress_file``, passed in by compressed, which imports
this module and not the other way round) on its own GPU, so every file is the same bytes as from
the CPU or one GPU.  Workers are started with "spawn" (CUDA cannot be forked; a script calling this must
guard its top level with ``if __name__ == "__main__":``, as for any spawned worker), talk to the
parent through one pipe each (the next shard; each tensor done, for the parent's one progress
bar; done or the error), leave Ctrl-C to the parent, die on SIGTERM and die with the parent.  The
first failure, or an interrupt, kills every worker at once and propagates: an ECF8Error naming the
shard (a worker's CUDA, memory or file error, or its death, included), or the KeyboardInterrupt.
"""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Callable

from . import progress as _progress
from .errors import ECF8Error, UnsupportedError
from .safetensors_io import read_layout
from .signals import held, worker_init

__all__ = ["gpus", "compress_shards"]


def gpus() -> list[str]:
    """'cuda:N' for every GPU this process sees (CUDA_VISIBLE_DEVICES applies); UnsupportedError
    without CuPy or a GPU."""
    from . import gpu

    cupy = gpu.cupy()
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError:           # no driver, no device
        count = 0
    if not count:
        raise UnsupportedError("cuda: no GPU is visible")
    return [f"cuda:{i}" for i in range(count)]


def _serve(conn: Connection, device: str, relay: bool, one_file: Callable[..., None],
           parent: int | None = None) -> None:
    """A worker: one_file (compressed.compress_file) on each (src, dst, options) it is sent, on
    `device`, until sent None; sends
    ("advance", bytes, tensor) while working (relay), then ("done", what one_file returned) or
    ("error", ECF8Error).
    It dies with `parent` (the pid that started it; see signals.worker_init)."""
    worker_init(parent)
    # (always a relay: a bar of its own, even disabled, would make tqdm create a semaphore, which a
    # killed worker leaves behind for the resource tracker to warn about)
    _progress.relay((lambda amount, what: conn.send(("advance", amount, what))) if relay else
                    (lambda amount, what: None))
    try:
        while (task := conn.recv()) is not None:
            src, dst, options = task
            try:
                result = one_file(src, dst, jobs=1, progress=None, device=device, **options)
            except ECF8Error as e:
                conn.send(("error", type(e)(str(e) if str(src) in str(e) else f"{src}: {e}")))
            except Exception as e:  # noqa: BLE001 - a CUDA error, out of memory, a full disk: name the shard
                first = str(e).splitlines()[0] if str(e) else ""
                conn.send(("error", ECF8Error(f"{src}: on {device}: {type(e).__name__}: {first}")))
            else:
                conn.send(("done", result))
    except (EOFError, OSError):         # the parent is gone
        pass


def _give(conn: Connection, todo: list, busy: dict, options: dict) -> None:
    """Send a free worker the next (largest) shard, or None (no more work: it ends)."""
    task = (*todo.pop(0), options) if todo else None
    try:
        conn.send(task)
    except OSError:             # (dead after its last shard was written and checked: no loss)
        if task is not None:
            raise ECF8Error(f"{task[0]}: its worker process died (out of memory?)") from None
    if task is not None:
        busy[conn] = task[0]


def compress_shards(pairs: list[tuple[Path, Path]], devices: list[str], *, one_file: Callable[..., object],
                    progress: bool | None = None, jobs: int | None = None, known: dict | None = None,
                    **options) -> dict[Path, object]:
    """one_file(src, dst, **options) for each (src, dst), spread over one worker process per
    entry of `devices` ('cuda:N'; the same one twice: two workers on that GPU), the largest src
    first to whichever worker is free; one progress bar over all the files' tensor bytes.  jobs is
    not used; known: {src: its read_layout} already read (for the bar's total; each worker reads
    its shard again, so that a shard changed since is caught).  Returns {dst: what one_file
    returned}.  Raises the first failing shard's ECF8Error,
    or ECF8Error naming the shard of a worker that died, after killing every worker (on an
    interrupt too)."""
    options.pop("device", None)
    todo = sorted(pairs, key=lambda p: os.path.getsize(p[0]), reverse=True)     # (ties: path order)
    known = known or {}
    total = sum((known.get(src) or read_layout(src, check=False)).data_size for src, _ in pairs)
    bar = _progress._Progress(total, f"compress {len(pairs)} files on {len(devices)} GPU workers", progress)
    ctx = multiprocessing.get_context("spawn")
    workers: dict[Connection, multiprocessing.process.BaseProcess] = {}
    busy: dict[Connection, Path] = {}
    dst_of, results = dict(pairs), {}
    try:
        with held():           # (each worker is registered before a signal can stop us)
            for device in devices[:len(pairs)]:
                conn, child = ctx.Pipe()
                workers[conn] = ctx.Process(target=_serve, args=(child, device, bar.enabled, one_file,
                                                                 os.getpid()))
                workers[conn].start()
                child.close()           # (so that the worker's death reads as the pipe's end)
        for conn in workers:
            _give(conn, todo, busy, options)
        while busy:
            for conn in wait(list(busy)):
                try:
                    message = conn.recv()
                except (EOFError, OSError):     # (a socket pair: reset, or ended)
                    raise ECF8Error(f"{busy[conn]}: its worker process died (out of memory?)") from None
                if message[0] == "advance":
                    bar.advance(*message[1:])
                elif message[0] == "error":
                    raise message[1]
                else:
                    results[dst_of[busy.pop(conn)]] = message[1]
                    _give(conn, todo, busy, options)
        for proc in workers.values():
            proc.join()
    except BaseException:
        with held():                    # (a second Ctrl-C waits until every worker is killed)
            started = [proc for proc in workers.values() if proc.pid is not None]
            for proc in started:
                proc.kill()
            for proc in started:
                proc.join(5)
        raise
    finally:
        for conn in workers:
            conn.close()
        bar.close()
    return results
