"""Input mutations for bench/mutate.py: plain safetensors files, edited, given to compress.

The base is the plain checkpoint of mutate_checkpoints.py.  Each case edits it (bit flips and
boundary bytes in the header, JSON values of the wrong type or at boundary values, deleted and
duplicated entries, deep nesting, truncations, extensions, gaps, overlaps) and runs
``compressed.compress_file``.  Acceptable outcomes: ECF8Error with nothing left in the folder, or a
compressed file that verifies, opens with ``safetensors.safe_open`` and decompresses to the
mutated input byte for byte ("identical").  Anything else is a problem: DIFFERENT (restored bytes
differ), verify-missed (compress wrote a file that verify or decompress refuses), left-files,
other:T, hang, crash, memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open

import mutate_checkpoints as mc
from ecf8 import compressed

KINDS = ["bitflip_header", "overwrite_header", "truncate", "extend", "header_value",
         "header_delete", "header_duplicate", "header_deep", "gap", "overlap", "reorder_data",
         "metadata_value"]


def prepare(tmp, args):
    return mc.prepare(tmp, args)


def setup(arg, workdir) -> dict:
    state = dict(arg)
    state["blob"] = Path(arg["plain"]).read_bytes()
    state["workdir"] = Path(workdir)
    state["header"] = mc.parse(state["blob"])[2]
    return state


def _hdr_end(state) -> int:
    return 8 + int.from_bytes(state["blob"][:8], "little")


def m_bitflip_header(rng, state):
    return mc.m_bitflip(rng, state, 0, _hdr_end(state))


def m_overwrite_header(rng, state):
    b = bytearray(state["blob"])
    pos = int(rng.integers(_hdr_end(state)))
    b[pos] = mc.pick(rng, [v for v in mc.BOUNDARY_BYTES if v != b[pos]])
    return b


def m_truncate(rng, state):
    b = state["blob"]
    return b[: int(mc.pick(rng, [rng.integers(len(b)), rng.integers(_hdr_end(state)), len(b) - 1]))]


def m_extend(rng, state):
    return mc.m_extend(rng, state)


def _entries(state):
    return [k for k in state["header"] if k != "__metadata__"]


def m_header_value(rng, state):
    n, text, header, data = mc.parse(state["blob"])
    return mc.m_header_value(rng, state) if rng.random() < 0.5 else _field(rng, header, data)


def _field(rng, header, data):
    name = mc.pick(rng, [k for k in header if k != "__metadata__"])
    field = mc.pick(rng, ["dtype", "shape", "data_offsets"])
    values = {"dtype": ["F32", "I32", "U8", "BOOL", "F8_E4M3", "BF16", "X_FUTURE", "f32", 5, None],
              "shape": [[], [0], [2**63], [2**64 - 1], [1.5], [-1], [2**32, 2**32], ["1"]],
              "data_offsets": [[0, 0], [-1, 3], [0, 2**64], [1.5, 2], [None, 4], [5, 3], [0]]}[field]
    header[name] = dict(header[name], **{field: mc.pick(rng, values)})
    return mc.assemble(mc.dumps(header), data)


def m_header_delete(rng, state):
    return mc.m_header_delete(rng, state)


def m_header_duplicate(rng, state):
    """A name twice in the JSON object (json.loads keeps the last; serde refuses)."""
    n, text, header, data = mc.parse(state["blob"])
    name = mc.pick(rng, _entries(state))
    entry = json.dumps(name) + ":" + json.dumps(header[name], separators=(",", ":"))
    t = text.decode().rstrip()
    return mc.assemble((t[:-1] + "," + entry + "}").encode(), data)


def m_header_deep(rng, state):
    return mc.m_header_deep(rng, state)


def m_gap(rng, state):
    """Bytes inserted before one tensor (offsets after it shifted): gaps, or trailing bytes."""
    n, text, header, data = mc.parse(state["blob"])
    names = sorted(_entries(state), key=lambda k: header[k]["data_offsets"][0])
    at = int(rng.integers(len(names) + 1))
    k = int(mc.pick(rng, [1, 7, 64]))
    cut = header[names[at]]["data_offsets"][0] if at < len(names) else len(data)
    for name in names[at:]:
        a, b = header[name]["data_offsets"]
        header[name] = dict(header[name], data_offsets=[a + k, b + k])
    return mc.assemble(mc.dumps(header), data[:cut] + bytes(k) + data[cut:])


def m_overlap(rng, state):
    """One tensor's range pointed into another's (same size, or shared storage)."""
    n, text, header, data = mc.parse(state["blob"])
    names = _entries(state)
    x, y = (names[i] for i in rng.choice(len(names), 2, replace=False))
    ax, bx = header[x]["data_offsets"]
    ay, by = header[y]["data_offsets"]
    start = ay + int(rng.integers(max(by - ay, 1)))
    header[x] = dict(header[x], data_offsets=[start, start + (bx - ax)])
    return mc.assemble(mc.dumps(header), data)


def m_reorder_data(rng, state):
    """The data section in another order, header offsets consistent: a valid file."""
    n, text, header, data = mc.parse(state["blob"])
    names = _entries(state)
    out = bytearray()
    for i in rng.permutation(len(names)):
        a, b = header[names[i]]["data_offsets"]
        header[names[i]] = dict(header[names[i]], data_offsets=[len(out), len(out) + b - a])
        out += data[a:b]
    return mc.assemble(mc.dumps(header), bytes(out))


def m_metadata_value(rng, state):
    n, text, header, data = mc.parse(state["blob"])
    v = mc.pick(rng, mc.VALUES + ["ok", "ecf8"])
    if rng.random() < 0.3:
        header["__metadata__"] = v
    else:
        header["__metadata__"] = dict(header["__metadata__"], **{mc.pick(rng, ["format", "ecf8", ""]): v})
    return mc.assemble(mc.dumps(header), data)


MUTATORS = {k: globals()["m_" + k] for k in KINDS}


def mutated_input(state, seed, case) -> bytes:
    rng = np.random.default_rng([seed, 3, case])
    return bytes(MUTATORS[KINDS[case % len(KINDS)]](rng, state))


def _opens(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="numpy") as f:
            f.keys()
    except Exception as e:
        return str(e)
    return None


def run_case(state, seed, case):
    workdir = state["workdir"]
    mc._clean(workdir, "")
    src, dst, back = workdir / "in.safetensors", workdir / "c.safetensors", workdir / "r.safetensors"
    blob = mutated_input(state, seed, case)
    src.write_bytes(blob)
    c, cmsg = mc._call(lambda a, b: compressed.compress_file(a, b, jobs=1, progress=False), src, dst)
    if c.startswith("other"):
        return c, f"compress: {cmsg}"[:400]
    if c == "ECF8Error":
        left = sorted(p.name for p in workdir.iterdir() if p.name != src.name)
        return ("left-files", f"compress refused ({cmsg}) but left {left}") if left else ("ECF8Error", cmsg[:300])
    problem = _opens(dst)
    if problem:
        return "DIFFERENT", f"compress wrote a file safetensors cannot open: {problem}"[:400]
    v, vmsg = mc._call(lambda p: compressed.verify_file(p, progress=False), dst)
    d, dmsg = mc._call(lambda a, b: compressed.decompress_file(a, b, progress=False), dst, back)
    for r, m, what in ((v, vmsg, "verify"), (d, dmsg, "decompress")):
        if r.startswith("other"):
            return r, f"{what}: {m}"[:400]
        if r == "ECF8Error":
            return "verify-missed", f"compress ok, then {what} refused: {m}"[:400]
    if back.read_bytes() != blob:
        return "DIFFERENT", f"restored {back.stat().st_size} bytes differ from the {len(blob)}-byte input"
    return "identical", ""
