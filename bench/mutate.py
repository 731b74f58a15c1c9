"""Mutation campaign against ECF8 frames, compressed checkpoints and the commands (not
run in CI).

    python bench/mutate.py --frames 100000 --checkpoints 5000 --inputs 2000 --checkpoints-v1 1000 \\
        --signals 40 --cli-every 50 --seed 0 --jobs 2 --out bench/mutate_reproducers.json
    python bench/mutate.py --replay checkpoints:1234 --seed 0 --dump /tmp/case.safetensors

Campaigns (each in its own module):
    frames          bench/mutate_frames.py: single frames, all four dtypes, coded and stored, v1 and
                    v2; ecf8.info + ecf8.decode (CPU)
    checkpoints     bench/mutate_checkpoints.py: a compressed FP8 checkpoint; verify_file,
                    decompress_file and load_file (CPU and the GPU path's checkpoint checks), every
                    --cli-every-th case also `ecf8 info / verify / decompress`
    inputs          bench/mutate_inputs.py: plain safetensors files, edited, given to compress:
                    refusal with nothing left behind, or an exact round trip
    checkpoints-v1  bench/mutate_checkpoints_v1.py: the version-1 golden compressed file
    signals         bench/mutate_signals.py: `ecf8 compress/decompress` interrupted by SIGINT or
                    SIGTERM at a random moment (its own table; see that module)

Every case is a deterministic function of (seed, campaign, case number) and of the code that
builds the base files: the mutation kind is ``KINDS[case % len(KINDS)]`` and its random choices
come from ``numpy.random.default_rng``.  Cases run in worker processes with an address-space limit
(RLIMIT_AS, --mem), a per-case soft deadline (SIGALRM, --timeout) and a hard one (the worker is
killed), so each outcome is one of:

    ECF8Error   clean refusal (the only acceptable outcome for a corrupt input)
    identical   the input still decodes / restores to exactly the original
    DIFFERENT   silently different output (frames: decode returned other data; checkpoints:
                decompress exited normally with other bytes, or load_file returned other tensors)
    accepted    (forged-checksum kinds only) a frame whose checksums were recomputed decodes to
                what its header says, or a checkpoint whose record crc was recomputed restores to
                what its forged record says: undetectable by design, listed for completeness
    v1-unchecked  (checkpoints-v1) a version-1 file, which has no checksums for this, restores to
                other bytes: by design of version 1, listed for completeness
    verify-missed  (checkpoints) verify (or compress) passed a file that decompress/load refuses
    left-files  a refusal left an output or temp file behind
    other:T     an exception that is not an ECF8Error (T = its type); cli:X  the command sample
                found X where the in-process API was fine
    hang        past the deadline;   crash   worker died;   memory   MemoryError under RLIMIT_AS

Each campaign prints a table of counts per mutation kind x outcome, then the distinct problems.
Every case that is not ECF8Error / identical / accepted / v1-unchecked is saved (seed, campaign,
case, kind, outcome, message, replay command) to --out, for turning into tests.  Exit status 1
when any problem was found.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import multiprocessing as mp
import os
import resource
import signal
import sys
import tempfile
import time
from multiprocessing.connection import wait
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

CAMPAIGNS = {"frames": "mutate_frames", "checkpoints": "mutate_checkpoints", "inputs": "mutate_inputs",
             "checkpoints-v1": "mutate_checkpoints_v1"}
FINE = {"ECF8Error", "identical", "accepted", "v1-unchecked"}


class Deadline(BaseException):
    """Raised by SIGALRM inside a worker when a case runs past its soft deadline."""


def _alarm(signum, frame):
    raise Deadline()


def run_one(module, state, seed: int, case: int, timeout: float) -> tuple[str, str]:
    """(outcome, message) of one case, in this process, with the soft deadline."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        return module.run_case(state, seed, case)
    except Deadline:
        return "hang", f"past the {timeout:g} s deadline"
    except MemoryError as e:
        return "memory", f"MemoryError {e}"[:300]
    except RecursionError as e:
        return "other:RecursionError", str(e)[:300]
    except Exception as e:        # a bug of the campaign itself, not of ecf8
        import traceback

        return f"harness:{type(e).__name__}", traceback.format_exc()[-600:]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _worker(conn, progress, campaign: str, setup_arg, seed: int, mem_bytes: int, timeout: float):
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    module = importlib.import_module(CAMPAIGNS[campaign])
    workdir = tempfile.mkdtemp(prefix=f"ecf8-mutate-{campaign}-")
    state = module.setup(setup_arg, workdir)
    conn.send(("ready", None))
    while True:
        batch = conn.recv()
        if batch is None:
            return
        for case in batch:
            progress[0] = case
            progress[1] = time.time()
            outcome, message = run_one(module, state, seed, case, timeout)
            conn.send(("result", (case, outcome, message)))
        conn.send(("done", None))


class _Slot:
    """One worker process and the batch it is working on."""

    def __init__(self, ctx, campaign, setup_arg, seed, mem_bytes, timeout):
        self.args = (campaign, setup_arg, seed, mem_bytes, timeout)
        self.ctx = ctx
        self.start()

    def start(self):
        self.conn, child = self.ctx.Pipe()
        self.progress = self.ctx.Array("d", [-1.0, 0.0], lock=False)
        self.proc = self.ctx.Process(target=_worker, args=(child, self.progress) + self.args,
                                     daemon=True)
        self.proc.start()
        child.close()
        self.pending: list[int] = []
        self.busy = False
        kind, _ = self.conn.recv()
        assert kind == "ready"

    def send(self, batch: list[int]):
        self.pending = list(batch)
        self.busy = True
        self.progress[0], self.progress[1] = -1.0, time.time()
        self.conn.send(batch)

    def restart(self):
        self.proc.kill()
        self.proc.join()
        self.conn.close()
        self.start()


def run_campaign(campaign: str, n: int, seed: int, jobs: int, setup_arg, timeout: float,
                 mem_bytes: int, batch: int = 50, log=print) -> dict[int, tuple[str, str]]:
    """{case: (outcome, message)} for cases 0..n-1, spread over `jobs` workers."""
    ctx = mp.get_context("fork")
    todo = collections.deque(range(n))
    results: dict[int, tuple[str, str]] = {}
    slots = [_Slot(ctx, campaign, setup_arg, seed, mem_bytes, timeout) for _ in range(jobs)]
    t0, last = time.time(), time.time()

    def feed(slot):
        if todo:
            slot.send([todo.popleft() for _ in range(min(batch, len(todo)))])

    for slot in slots:
        feed(slot)
    hard = 3 * timeout + 10
    while any(s.busy for s in slots):
        wait([s.conn for s in slots if s.busy] + [s.proc.sentinel for s in slots if s.busy], timeout=1.0)
        for slot in slots:
            if not slot.busy:
                continue
            died = False
            try:
                while slot.conn.poll():
                    kind, value = slot.conn.recv()
                    if kind == "result":
                        case, outcome, message = value
                        results[case] = (outcome, message)
                        slot.pending.remove(case)
                    elif kind == "done":
                        slot.pending, slot.busy = [], False
                        feed(slot)
                        break
            except (EOFError, OSError):
                died = True
            if died or not slot.proc.is_alive():
                slot.proc.join(1)
                case = int(slot.progress[0])
                case = case if case in slot.pending else (slot.pending or [None])[0]
                if case is not None:
                    results[case] = ("crash", f"worker died (exit code {slot.proc.exitcode})")
                rest = [c for c in slot.pending if c != case]
                slot.restart()
                slot.send(rest) if rest else feed(slot)
                continue
            if slot.pending and slot.progress[0] >= 0 and time.time() - slot.progress[1] > hard:
                case = int(slot.progress[0])
                results[case] = ("hang", f"killed after {hard:g} s")
                rest = [c for c in slot.pending if c != case]
                slot.restart()
                slot.send(rest) if rest else feed(slot)
        if time.time() - last > 30:
            last = time.time()
            rate = len(results) / (last - t0)
            log(f"  {campaign}: {len(results)}/{n} cases, {rate:.0f}/s", file=sys.stderr)
    for slot in slots:
        slot.conn.send(None)
        slot.proc.join(5)
        if slot.proc.is_alive():
            slot.proc.kill()
    return results


def table(campaign: str, kinds: list[str], results: dict[int, tuple[str, str]]) -> str:
    """Counts per mutation kind x outcome, as a Markdown table."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for case, (outcome, _) in results.items():
        counts[kinds[case % len(kinds)]][outcome] += 1
    order = ["ECF8Error", "identical", "accepted", "v1-unchecked", "DIFFERENT", "verify-missed", "left-files",
             "hang", "crash", "memory"]
    seen = {o for c in counts.values() for o in c}
    cols = [o for o in order if o in seen or o in ("ECF8Error", "DIFFERENT", "hang", "crash", "memory")]
    cols += sorted(seen - set(cols))
    lines = [f"| {campaign} kind | cases | " + " | ".join(cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]
    total: collections.Counter = collections.Counter()
    for kind in kinds:
        c = counts.get(kind, collections.Counter())
        total.update(c)
        lines.append(f"| {kind} | {sum(c.values())} | " + " | ".join(str(c.get(o, 0)) for o in cols) + " |")
    lines.append(f"| **total** | {sum(total.values())} | " + " | ".join(str(total.get(o, 0)) for o in cols) + " |")
    return "\n".join(lines)


def messages(kinds, results, limit: int = 40) -> str:
    """The distinct (kind, outcome, message) of the bad cases, most frequent first."""
    seen = collections.Counter()
    first = {}
    for case, (outcome, message) in sorted(results.items()):
        if outcome in FINE:
            continue
        key = (kinds[case % len(kinds)], outcome, _generic(message))
        seen[key] += 1
        first.setdefault(key, case)
    lines = [f"  {n:6d}  {k} / {o}: {m}  (e.g. case {first[(k, o, m)]})" for (k, o, m), n in seen.most_common(limit)]
    return "\n".join(lines)


def _generic(message: str) -> str:
    import re

    message = re.sub(r"/tmp/\S+", "<file>", message)
    message = re.sub(r"\d{3,}", "N", message)
    return message[:160]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=100_000, help="frame mutations (0: skip)")
    p.add_argument("--checkpoints", type=int, default=5_000, help="checkpoint mutations (0: skip)")
    p.add_argument("--inputs", type=int, default=2_000,
                   help="mutations of plain safetensors files given to compress (0: skip)")
    p.add_argument("--checkpoints-v1", type=int, default=0,
                   help="mutations of the version-1 golden compressed checkpoint (0: skip)")
    p.add_argument("--signals", type=int, default=0,
                   help="ecf8 compress/decompress runs interrupted by SIGINT/SIGTERM (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--timeout", type=float, default=20.0, help="soft per-case deadline, seconds")
    p.add_argument("--mem", type=float, default=3.0, help="address-space limit per worker, GiB")
    p.add_argument("--cli-every", type=int, default=50,
                   help="run every N-th checkpoint case through the ecf8 command too (0: never)")
    p.add_argument("--out", type=Path, default=HERE / "mutate_reproducers.json")
    p.add_argument("--replay", help="CAMPAIGN:CASE: run one case here and print its outcome")
    p.add_argument("--dump", type=Path, help="with --replay: write the mutated input to this file")
    args = p.parse_args(argv)
    mem = int(args.mem * 2**30)

    if args.replay:
        campaign, case = args.replay.split(":")
        module = importlib.import_module(CAMPAIGNS[campaign])
        workdir = tempfile.mkdtemp(prefix="ecf8-replay-")
        state = module.setup(module.prepare(workdir, args), workdir)
        case = int(case)
        print(f"{campaign} case {case} (seed {args.seed}): kind {module.KINDS[case % len(module.KINDS)]}")
        if args.dump:
            args.dump.write_bytes(module.mutated_input(state, args.seed, case))
            print(f"mutated input written to {args.dump}")
        print(run_one(module, state, args.seed, case, args.timeout))
        return 0

    report = {"seed": args.seed, "command": " ".join(sys.argv), "cases": []}
    bad_total = 0
    with tempfile.TemporaryDirectory(prefix="ecf8-mutate-") as tmp:
        tempfile.tempdir = tmp               # the workers' scratch folders go in here too
        for campaign, n in (("frames", args.frames), ("checkpoints", args.checkpoints),
                            ("inputs", args.inputs), ("checkpoints-v1", args.checkpoints_v1)):
            if n <= 0:
                continue
            module = importlib.import_module(CAMPAIGNS[campaign])
            setup_arg = module.prepare(tmp, args)
            t = time.time()
            results = run_campaign(campaign, n, args.seed, args.jobs, setup_arg, args.timeout, mem)
            print(f"\n## {campaign}: {n} mutations, seed {args.seed}, {time.time() - t:.0f} s\n")
            print(table(campaign, module.KINDS, results))
            bad = {c: r for c, r in results.items() if r[0] not in FINE}
            bad_total += len(bad)
            if bad:
                print(f"\nDistinct problems ({len(bad)} cases):\n{messages(module.KINDS, results)}")
            for case, (outcome, message) in sorted(bad.items()):
                report["cases"].append({"campaign": campaign, "seed": args.seed, "case": case,
                                        "kind": module.KINDS[case % len(module.KINDS)],
                                        "outcome": outcome, "message": message,
                                        "replay": f"python bench/mutate.py --replay {campaign}:{case} "
                                                  f"--seed {args.seed}"})
            extra = getattr(module, "summary", None)
            if extra:
                print(extra(results))
        if args.signals > 0:
            import mutate_signals

            t = time.time()
            counts, examples = mutate_signals.run(args.signals, args.seed, Path(tmp))
            print(f"\n## interrupted runs: {args.signals} trials, seed {args.seed}, {time.time() - t:.0f} s\n")
            print(mutate_signals.report(counts, examples))
            for (kind, outcome), detail in sorted(examples.items()):
                if outcome not in ("completed", "clean", "late"):
                    bad_total += sum(c[outcome] for k, c in counts.items() if k == kind)
                    report["cases"].append({"campaign": "signals", "seed": args.seed, "kind": kind,
                                            "outcome": outcome, "message": detail})
    args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    print(f"\n{bad_total} reproducers written to {args.out}")
    return 1 if bad_total else 0


if __name__ == "__main__":
    sys.exit(main())
