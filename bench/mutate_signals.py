"""Interrupted runs for bench/mutate.py --signals N: ``ecf8 compress`` / ``decompress`` stopped by
SIGINT or SIGTERM at a random moment.

Each trial starts the command in its own process group, sends the signal to the process (as
``kill``) or to the whole group (as Ctrl-C in a terminal) after a random delay, and checks:

    completed   the run finished before the signal: exit 0 and an output that verifies
    clean       exit status 130 (SIGINT) / non-zero (SIGTERM), at most one line on stderr, no
                output, no temp file, no process of the group left 3 s later
    traceback   more than one line on stderr (Python tracebacks from the parent or its workers)
    left-files  an output or a hidden temp file remains after a non-zero exit
    orphans     processes of the group still run 3 s after the command exited
    late        the signal came after the complete output was in place (non-zero exit, output
                complete and correct): acceptable
    bad-exit    exit status 0 without a valid output, or 0 / wrong status after the signal
    hang        the command did not exit within 60 s of the signal

Run on its own, a sweep of one kind of trial at finely spread delays (the folder-compress hang):

    python bench/mutate_signals.py --trials 300 --seed 7 [--jobs 1,2,0] [--parallel 2] [--tensor-kib 128]

starts ``python -m ecf8 compress FOLDER -o OUT -j J`` on 5 small shards and sends SIGINT to its pid
after a delay drawn uniformly over the whole run (start-up, pool creation, work, finishing, rename;
110 % of a timed uninterrupted run).  Output goes to a file, so that the command's own exit is seen
apart from a worker left holding its stdout (which `trial` above counts as a hang); a command still
running 15 s after the signal, or a process of its session left 0.5 s after it exited, gets every
thread of every process dumped (faulthandler on SIGUSR1, registered through a sitecustomize on
PYTHONPATH) into the printed report.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ecf8 import compressed  # noqa: E402
from ecf8.safetensors_io import write_safetensors  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CMD = [sys.executable, "-m", "ecf8"]      # what the console script runs: ecf8.__main__.main()


def _tensors(seed: int, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = {}
    for i in range(n):
        t[f"layers.{i}.weight"] = (rng.standard_normal((1024, 1024)).astype(np.float32) * 16).astype(
            ml_dtypes.float8_e4m3fn)
        t[f"layers.{i}.weight_scale_inv"] = rng.random((4, 8)).astype(np.float32)
        t[f"layers.{i}.norm"] = (rng.standard_normal(1024) * 0.02).astype(ml_dtypes.bfloat16)
        t[f"layers.{i}.ids"] = np.arange(4096, dtype=np.int64)
    return t


def prepare(tmp: Path) -> dict:
    """A plain file, a model folder (3 shards + config) and their compressed forms."""
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    plain = tmp / "model.safetensors"
    write_safetensors(_tensors(0, 8), plain, {"format": "pt"})
    folder = tmp / "folder"
    (folder / "text").mkdir(parents=True)
    for i in range(3):
        write_safetensors(_tensors(i + 1, 3), folder / ("text" if i else "") / f"model-{i}.safetensors")
    (folder / "config.json").write_text("{}")
    packed, packed_folder = tmp / "packed.safetensors", tmp / "packed-folder"
    compressed.compress_file(plain, packed, jobs=1, progress=False)
    compressed.compress_path(folder, packed_folder, jobs=1, progress=False)
    base = {"file": plain, "folder": folder, "packed-file": packed, "packed-folder": packed_folder}
    for what in ("compress", "decompress"):       # how long each command takes, start-up included
        for target in ("file", "folder"):
            src = base[target if what == "compress" else "packed-" + target]
            t = time.time()
            subprocess.run(CMD + [what, str(src), "-o", str(tmp / "timing")], env=_env(), check=True,
                           capture_output=True)
            base[what, target] = time.time() - t
            subprocess.run(["rm", "-rf", str(tmp / "timing")], check=True)
    return base


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def _as_in_a_terminal() -> None:
    """Default SIGINT/SIGTERM dispositions in the command, as a shell in a terminal gives them
    (a campaign run in the background would otherwise pass SIGINT down as ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def trial(base: dict, work: Path, rng) -> tuple[str, str, str]:
    """(kind, outcome, detail) of one interrupted run."""
    what = ["compress", "decompress"][int(rng.integers(2))]
    target = ["file", "folder"][int(rng.integers(2))]
    sig = [signal.SIGINT, signal.SIGTERM][int(rng.integers(2))]
    to_group = bool(rng.integers(2))
    jobs = int(rng.integers(1, 3))
    delay = float(rng.uniform(0.05, 1.1) * base[what, target])
    src = base[target if what == "compress" else "packed-" + target]
    out = work / "out"
    args = [what, str(src), "-o", str(out)]
    if what == "compress":
        args += ["--jobs", str(jobs)]
    kind = f"{what} {target} {signal.Signals(sig).name} to {'group' if to_group else 'pid'}"
    p = subprocess.Popen(CMD + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=_env(), start_new_session=True, cwd=work, preexec_fn=_as_in_a_terminal)
    pgid = p.pid
    try:
        p.wait(delay)
        finished_first = True
    except subprocess.TimeoutExpired:
        finished_first = False
        (os.killpg if to_group else os.kill)(pgid, sig)
    try:
        _, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(pgid, signal.SIGKILL)
        p.communicate()
        return kind, "hang", f"no exit 60 s after {signal.Signals(sig).name}"
    time.sleep(3)
    orphans = _group_alive(pgid)
    if orphans:
        os.killpg(pgid, signal.SIGKILL)
    left = sorted(x.name for x in work.iterdir())
    lines = [x for x in err.splitlines() if x.strip()]
    try:
        if p.returncode == 0:
            ok = out.exists() and _valid(out, what, target, base=base, target_key=target)
            return (kind, "completed" if ok and not orphans else "bad-exit" if not ok else "orphans",
                    f"exit 0 after {delay:.2f} s" + ("" if finished_first else " (signal ignored?)"))
        detail = f"exit {p.returncode}, {len(lines)} stderr lines" + (f": {lines[-1][:120]}" if lines else "")
        frames = [x.strip() for x in lines if x.strip().startswith("File ")]
        if frames:
            inside = [f for f in frames if "/ecf8/" in f] or frames
            running = any(f.endswith(("in main", "in _run")) for f in frames)
            detail += f" (raised in {inside[-1][:150]}; {'main() running' if running else 'during start-up'})"
        if orphans:
            return kind, "orphans", detail
        if len(lines) > 1:
            return kind, "traceback", detail
        if left == ["out"] and _valid(out, what, target, complete=True, base=base, target_key=target):
            return kind, "late", f"{detail}; the complete output was already in place"
        if left:
            return kind, "left-files", f"{detail}; left {left}"
        want = 130 if sig == signal.SIGINT else None
        if (want and p.returncode != want) or p.returncode == 0:
            return kind, "bad-exit", detail
        return kind, "clean", detail
    finally:
        for x in work.iterdir():
            subprocess.run(["rm", "-rf", str(x)], check=False)


def _valid(out: Path, what: str, target: str, complete: bool = False, base=None, target_key=None) -> bool:
    """Is `out` a complete output (compress: verifies; decompress: equals the original)?"""
    try:
        if what == "compress":
            files = [out] if target == "file" else sorted(out.rglob("*.safetensors"))
            return bool(files) and all(compressed.verify_file(f, progress=False) >= 0 for f in files)
        if base is None:
            return True
        orig = base[target_key]
        if target == "file":
            return out.read_bytes() == orig.read_bytes()
        a = {p.relative_to(orig): p.read_bytes() for p in orig.rglob("*") if p.is_file()}
        b = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        return a == b
    except Exception:
        return False


def run(n: int, seed: int, tmp: Path) -> dict[str, collections.Counter]:
    base = prepare(Path(tmp) / "signals-base")
    work = Path(tmp) / "signals-work"
    work.mkdir()
    rng = np.random.default_rng([seed, 4])
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    examples: dict[tuple[str, str], str] = {}
    for i in range(n):
        kind, outcome, detail = trial(base, work, rng)
        counts[kind][outcome] += 1
        examples.setdefault((kind, outcome), f"trial {i}: {detail}")
    return counts, examples


def report(counts, examples) -> str:
    cols = ["completed", "clean", "late", "traceback", "left-files", "orphans", "bad-exit", "hang"]
    lines = ["| interrupted run | trials | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for kind in sorted(counts):
        c = counts[kind]
        lines.append(f"| {kind} | {sum(c.values())} | " + " | ".join(str(c.get(o, 0)) for o in cols) + " |")
    bad = [f"  {k} / {o}: {d}" for (k, o), d in sorted(examples.items()) if o not in ("completed", "clean", "late")]
    return "\n".join(lines + (["", "Examples of problems:"] + bad if bad else []))


# ------------------------------------------------------------------------------ the folder sweep

_FAULTHANDLER = "import faulthandler, signal\nfaulthandler.register(signal.SIGUSR1, all_threads=True)\n"


def _session(sid: int) -> list[int]:
    """Live processes of session `sid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _sweep_trial(cmd: list[str], env: dict, work: Path, jobs: str, delay: float) -> tuple[str, str]:
    """(outcome, stderr and dumps) of one `cmd -o OUT -j jobs` given SIGINT to its pid after `delay` s."""
    work.mkdir()
    with open(work / "stderr.txt", "wb") as err:
        p = subprocess.Popen(cmd + [str(work / "out"), "-j", jobs], stdout=err, stderr=err, env=env,
                             cwd=work, start_new_session=True, preexec_fn=_as_in_a_terminal)
    try:
        p.wait(delay)
        signalled = False
    except subprocess.TimeoutExpired:
        os.kill(p.pid, signal.SIGINT)
        signalled = True
    try:
        code = p.wait(15)
        time.sleep(0.5)
    except subprocess.TimeoutExpired:
        code = None
    left = _session(p.pid)
    if code is None or left:
        for pid in [p.pid] + left:          # every thread of every process, then kill them
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGUSR1)
        time.sleep(1)
        for pid in [p.pid] + left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        p.wait()
    text = (work / "stderr.txt").read_text(errors="replace")
    lines = [x for x in text.splitlines() if x.strip()]
    files = sorted(x.name for x in work.iterdir() if x.name != "stderr.txt")
    complete = files == ["out"] and _valid(work / "out", "compress", "folder")
    shutil.rmtree(work)
    if code is None:
        return "hang", text
    if left:
        return "orphans", text
    if code == 0:
        return ("completed" if not signalled else "late") if complete else "bad-exit", text
    errors = [x for x in lines if not x.startswith(("/", "nothing was entropy-coded"))]   # (not the summary)
    if len(errors) > 1:
        return "traceback", text
    if complete:
        return "late", text
    if files:
        return "left-files", text
    return ("clean" if code == 130 and errors == ["ecf8: interrupted"] else "bad-exit"), text


def sweep(trials: int, seed: int, tmp: Path, jobs: tuple[str, ...] = ("1", "2", "0"),
          parallel: int = 2, tensor_kib: int = 128) -> tuple[collections.Counter, list[str]]:
    """Counts of (jobs, outcome) and the problems' details of `trials` SIGINTs to the pid of a folder
    compress at delays spread over its whole run (see the module's docstring)."""
    tmp = Path(tmp)
    folder = tmp / "folder"
    rng = np.random.default_rng(seed)
    (folder / "sub").mkdir(parents=True)
    for k in range(5):                      # 5 shards of 4 FP8 tensors (past tensor_codecs.INLINE: to the workers)
        write_safetensors({f"l{i}.w": (rng.standard_normal(tensor_kib << 10) * 16).astype(ml_dtypes.float8_e4m3fn)
                           for i in range(4)} | {"ids": np.arange(100, dtype=np.int64)},
                          folder / ("sub" if k % 2 else "") / f"m{k}.safetensors")
    (folder / "config.json").write_text("{}")
    (tmp / "site").mkdir()
    (tmp / "site" / "sitecustomize.py").write_text(_FAULTHANDLER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp / "site"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = CMD + ["compress", str(folder), "-o"]
    took = {}
    for j in jobs:
        t = time.time()
        subprocess.run(cmd + [str(tmp / "timing"), "-j", j], env=env, check=True, capture_output=True)
        took[j] = time.time() - t
        shutil.rmtree(tmp / "timing")
    print("uninterrupted run, s: " + ", ".join(f"-j {j}: {t:.2f}" for j, t in took.items()), flush=True)
    counts: collections.Counter = collections.Counter()
    problems: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        r = random.Random(seed * 1_000_003 + i)
        j = jobs[r.randrange(len(jobs))]
        delay = r.uniform(0, 1.1 * took[j])
        outcome, text = _sweep_trial(cmd, env, tmp / f"trial{i}", j, delay)
        with lock:
            counts[j, outcome] += 1
            if outcome not in ("completed", "clean", "late"):
                problems.append(f"trial {i}, -j {j}, SIGINT after {delay:.3f} s: {outcome}\n{text}")
                print(f"trial {i}: -j {j}, SIGINT after {delay:.3f} s: {outcome}", flush=True)

    with cf.ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, range(trials)))
    return counts, problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="SIGINT to the pid of a folder compress, at delays spread "
                                "over its whole run (bench/mutate.py --signals runs the mixed trials)")
    p.add_argument("--trials", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", default="1,2,0", help="the -j values drawn from (default 1,2,0)")
    p.add_argument("--parallel", type=int, default=2, help="trials at once (default 2)")
    p.add_argument("--tensor-kib", type=int, default=128,
                   help="size of each of the 4 FP8 tensors of each of the 5 shards (default 128: a run of "
                   "~0.3 s, mostly start-up; 2048: ~2 s, mostly work)")
    args = p.parse_args(argv)
    t = time.time()
    with tempfile.TemporaryDirectory(prefix="ecf8-sweep-") as tmp:
        counts, problems = sweep(args.trials, args.seed, Path(tmp), tuple(args.jobs.split(",")), args.parallel,
                                 args.tensor_kib)
    cols = ["completed", "clean", "late", "traceback", "left-files", "orphans", "bad-exit", "hang"]
    print(f"\n## folder compress, SIGINT to the pid: {args.trials} trials, seed {args.seed}, tensors of "
          f"{args.tensor_kib} KiB, {time.time() - t:.0f} s\n")
    print("| -j | trials | " + " | ".join(cols) + " |\n|---|---:|" + "---:|" * len(cols))
    for j in sorted({j for j, _ in counts}):
        c = {o: n for (jj, o), n in counts.items() if jj == j}
        print(f"| {j} | {sum(c.values())} | " + " | ".join(str(c.get(o, 0)) for o in cols) + " |")
    for problem in problems:
        print("\n" + problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
