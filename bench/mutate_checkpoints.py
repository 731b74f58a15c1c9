"""Checkpoint mutations for bench/mutate.py: a compressed, real-ish FP8 checkpoint, edited.

The base is a small DeepSeek-style FP8 layer: E4M3 weights (MiniLM layer-0 samples from
/work/shared/data, else synthetic) with F32 ``weight_scale_inv`` block scales, BF16 weights and
norms, an I64 buffer, compressed with ``ecf8.compressed.compress_file``.  Each case edits the compressed
file, then runs ``compressed.verify_file`` and ``compressed.decompress_file`` in-process (every
``--cli-every``-th case also ``ecf8 info``, ``verify`` and ``decompress`` as commands) and compares
the restored bytes with the original file; where those refuse cleanly or restore exactly,
``compressed.load_file`` must too (ECF8Error, or exactly the original tensors), on the CPU and on the
GPU path (``device="cuda"``, with the GPU decoder and upload replaced by the CPU ones: every check
of the compressed-checkpoint layer runs as on a GPU).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np
import zstandard

from ecf8 import compressed
from ecf8.safetensors_io import write_safetensors
from ecf8.errors import ECF8Error

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ECF8_SHARED_DATA", ROOT.parent / "shared" / "data"))
if not DATA.is_dir():
    DATA = Path("/work/shared/data")

KINDS = ["bitflip", "bitflip_data", "bitflip_header", "overwrite_boundary", "truncate", "extend",
         "raw_tensor_flip", "swap_same_size", "swap_frames", "swap_offsets", "frame_substitute",
         "header_value", "header_delete", "header_deep", "header_reorder", "meta_value",
         "meta_delete", "record_flip", "orig_header_edit", "orig_header_forged",
         "orig_header_delete", "table_edit", "zstd_huge", "zstd_replace"]
# Kinds that recompute the record's checksum: a restored file that differs is what the forged
# record describes, so "DIFFERENT" there counts as "accepted" when verify and decompress agree.
FORGED = {"orig_header_forged"}
BOUNDARY_BYTES = [0x00, 0xFF, 0x7F, 0x80, ord('"'), ord("{"), ord("9"), ord(" "), ord("-")]
DEEP = "__DEEP__"
VALUES = [0, -1, 1.5, 2**63, 2**64, 2**64 - 1, 10**30, None, True, "x", "", [], {}, [None, None],
          [0, 2**64], [-1, 5], [1.5, 2.5], [2**64], [1.5], [0], [2**63, 0], DEEP, {"a": 1}, [[1]]]


def pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


# ---------------------------------------------------------------------------------------------
# The base checkpoint


def base_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    f8 = ml_dtypes.float8_e4m3fn
    try:
        with np.load(DATA / "minilm-layer0-fp8-e4m3fn-block128.npz") as z:
            q = z["encoder.layer.0.attention.self.query.weight"][:256, :256].view(f8)
            k = z["encoder.layer.0.attention.self.key.weight"][:256, :256].view(f8)
            v = z["encoder.layer.0.attention.self.value.weight"][:128, :384].view(f8)
        with np.load(DATA / "minilm-layer0-bf16.npz") as z:
            o = z["encoder.layer.0.attention.output.dense.weight"][:64, :384].view(ml_dtypes.bfloat16)
    except OSError:
        def w(*shape):
            return (rng.standard_normal(shape).astype(np.float32) * 16).astype(f8)
        q, k, v = w(256, 256), w(256, 256), w(128, 384)
        o = (rng.standard_normal((64, 384)).astype(np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    t = {}
    p = "model.layers.0."
    t[p + "input_layernorm.weight"] = (1 + 0.05 * rng.standard_normal(384)).astype(ml_dtypes.bfloat16)
    for name, x in (("self_attn.q_proj", q), ("self_attn.k_proj", k), ("self_attn.v_proj", v)):
        t[p + name + ".weight"] = np.ascontiguousarray(x)
        blocks = (x.shape[0] // 128, x.shape[1] // 128)
        t[p + name + ".weight_scale_inv"] = (rng.random(blocks) * 1e-3 + 1e-4).astype(np.float32)
    t[p + "self_attn.o_proj.weight"] = np.ascontiguousarray(o)
    t[p + "post_attention_layernorm.weight"] = (1 + 0.05 * rng.standard_normal(384)).astype(ml_dtypes.bfloat16)
    t["model.rotary.position_ids"] = np.arange(512, dtype=np.int64).reshape(1, 512)
    t["model.norm.bias"] = np.zeros(0, np.float32)
    return t


def prepare(tmp, args) -> dict:
    tmp = Path(tmp)
    plain, packed = tmp / "base.safetensors", tmp / "base.ecf8.safetensors"
    write_safetensors(base_tensors(), plain, metadata={"format": "pt"})
    compressed.compress_file(plain, packed, jobs=1, progress=False)
    return {"plain": str(plain), "packed": str(packed), "cli_every": getattr(args, "cli_every", 0)}


def setup(arg, workdir) -> dict:
    state = dict(arg)
    state["original"] = Path(arg["plain"]).read_bytes()
    state["blob"] = Path(arg["packed"]).read_bytes()
    state["workdir"] = Path(workdir)
    n, text, header, data = parse(state["blob"])
    state["header"] = header
    info = json.loads(header["__metadata__"]["ecf8"])
    state["version"] = info["version"]
    state["dtypes"] = {k: v["dtype"] for k, v in parse(state["original"])[2].items() if k != "__metadata__"}
    if info["version"] == 1:         # original header and codec table in the metadata string
        state["codecs"] = {name: row[0] for name, row in info["tensors"].items()}
    else:                            # a zstd "record" entry: original header + {name: [codec, crc]}
        a, b = header[info["record"]]["data_offsets"]
        raw = zstandard.ZstdDecompressor().decompress(data[a:b])
        state["record"] = info["record"]
        state["codecs"] = {name: row[0] for name, row in json.loads(raw[info["header"]:]).items()}
    return state


# ---------------------------------------------------------------------------------------------
# safetensors surgery


def parse(blob: bytes):
    n = int.from_bytes(blob[:8], "little")
    text = blob[8 : 8 + n]
    return n, text, json.loads(text), blob[8 + n :]


def dumps(obj) -> bytes:
    text = json.dumps(obj, separators=(",", ":"))
    return text.replace(json.dumps(DEEP), "[" * 100_000 + "]" * 100_000).encode()


def assemble(header_text: bytes, data: bytes) -> bytes:
    header_text += b" " * (-len(header_text) % 8)
    return struct.pack("<Q", len(header_text)) + header_text + data


def tensors_of(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def relayout(header: dict, data: bytes, replace: dict[str, bytes]) -> bytes:
    """The file with some tensors' bytes replaced (U8 shapes and all offsets updated)."""
    names = sorted(tensors_of(header), key=lambda k: header[k]["data_offsets"][0])
    out, new = bytearray(), dict(header)
    for name in names:
        a, b = header[name]["data_offsets"]
        chunk = replace.get(name, data[a:b])
        entry = dict(header[name])
        entry["data_offsets"] = [len(out), len(out) + len(chunk)]
        if entry["dtype"] == "U8":
            entry["shape"] = [len(chunk)]
        new[name] = entry
        out += chunk
    return assemble(dumps(new), bytes(out))


def _by_codec(state, codec):
    return [k for k, c in state["codecs"].items() if c == codec]


def _range(state, name):
    n = int.from_bytes(state["blob"][:8], "little")
    a, b = state["header"][name]["data_offsets"]
    return 8 + n + a, 8 + n + b


def _edit_meta(state, edit) -> bytes:
    """Apply edit(info dict) to the ecf8 metadata object and re-serialize the file."""
    n, text, header, data = parse(state["blob"])
    info = json.loads(header["__metadata__"]["ecf8"])
    edit(info)
    header["__metadata__"]["ecf8"] = json.dumps(info, separators=(",", ":")).replace(
        json.dumps(DEEP), "[" * 100_000 + "]" * 100_000)
    return assemble(dumps(header), data)


def _edit_record(state, edit_header, edit_table, fix_crc: bool) -> bytes:
    """The file with its original header text and/or codec table edited (v2: inside the record,
    re-compressed, with the record's sizes updated and its crc recomputed when fix_crc)."""
    n, text, header, data = parse(state["blob"])
    info = json.loads(header["__metadata__"]["ecf8"])
    if info["version"] == 1:
        info["header"] = edit_header(info["header"])
        edit_table(info["tensors"])
        header["__metadata__"]["ecf8"] = json.dumps(info, separators=(",", ":"))
        return assemble(dumps(header), data)
    a, b = header[info["record"]]["data_offsets"]
    raw = zstandard.ZstdDecompressor().decompress(data[a:b])
    orig = edit_header(raw[: info["header"]].decode()).encode()
    table = json.loads(raw[info["header"]:])
    edit_table(table)
    raw = orig + dumps(table)
    info.update(header=len(orig), size=len(raw))
    if fix_crc:
        info["crc"] = zlib.crc32(raw)
    header["__metadata__"]["ecf8"] = json.dumps(info, separators=(",", ":"))
    record = zstandard.ZstdCompressor(level=9, write_checksum=True).compress(raw)
    return relayout(header, data, {info["record"]: record})


# ---------------------------------------------------------------------------------------------
# Mutations


def m_bitflip(rng, state, lo=0, hi=None):
    b = bytearray(state["blob"])
    hi = len(b) if hi is None else hi
    for _ in range(int(rng.integers(1, 4))):
        pos = int(rng.integers(lo, hi))
        b[pos] ^= 1 << int(rng.integers(8))
    return b


def m_bitflip_data(rng, state):
    return m_bitflip(rng, state, 8 + int.from_bytes(state["blob"][:8], "little"))


def m_bitflip_header(rng, state):
    return m_bitflip(rng, state, 0, 8 + int.from_bytes(state["blob"][:8], "little"))


def m_overwrite(rng, state):
    b = bytearray(state["blob"])
    pos = int(rng.integers(len(b)))
    b[pos] = pick(rng, [v for v in BOUNDARY_BYTES if v != b[pos]])
    return b


def m_truncate(rng, state):
    b = state["blob"]
    n = 8 + int.from_bytes(b[:8], "little")
    ends = [r[1] for r in (_range(state, k) for k in tensors_of(state["header"]))]
    cut = pick(rng, [int(rng.integers(len(b))), int(rng.integers(n)), pick(rng, ends) - 1,
                     len(b) - 1, pick(rng, sorted(ends)[:-1] or [n])])
    return b[: min(cut, len(b) - 1)]


def m_extend(rng, state):
    k = pick(rng, [1, 8, 4096])
    return state["blob"] + (bytes(k) if rng.random() < 0.5 else rng.integers(0, 256, k, dtype=np.uint8).tobytes())


def m_raw_tensor_flip(rng, state):
    """One bit of a tensor kept unchanged (the F32 scales, ...)."""
    names = [k for k in _by_codec(state, "none") if _range(state, k)[1] > _range(state, k)[0]]
    a, b = _range(state, pick(rng, names))
    out = bytearray(state["blob"])
    out[int(rng.integers(a, b))] ^= 1 << int(rng.integers(8))
    return out


def m_swap_same_size(rng, state):
    """Swap the bytes of two tensors that take the same number of bytes."""
    sizes: dict[int, list[str]] = {}
    for k in tensors_of(state["header"]):
        a, b = _range(state, k)
        if b > a:
            sizes.setdefault(b - a, []).append(k)
    groups = [g for g in sizes.values() if len(g) > 1]
    if not groups:                               # (no two of one size: swap any two, relaid out)
        return _swap_any(rng, state, [k for g in sizes.values() for k in g])
    g = pick(rng, groups)
    x, y = rng.choice(len(g), 2, replace=False)
    (a0, b0), (a1, b1) = _range(state, g[x]), _range(state, g[y])
    out = bytearray(state["blob"])
    out[a0:b0], out[a1:b1] = state["blob"][a1:b1], state["blob"][a0:b0]
    return out


def m_swap_frames(rng, state):
    """Two ECF8 tensors of one dtype exchange their frames (the outer header kept consistent)."""
    n, text, header, data = parse(state["blob"])
    names = _by_codec(state, "ecf8")
    pairs = [(x, y) for x in names for y in names if x < y and state["dtypes"][x] == state["dtypes"][y]]
    if not pairs:
        return _swap_any(rng, state, names if len(names) > 1 else tensors_of(header))
    x, y = pick(rng, pairs)
    (ax, bx), (ay, by) = header[x]["data_offsets"], header[y]["data_offsets"]
    return relayout(header, data, {x: data[ay:by], y: data[ax:bx]})


def _swap_any(rng, state, names):
    n, text, header, data = parse(state["blob"])
    x, y = (names[i] for i in rng.choice(len(names), 2, replace=False))
    (ax, bx), (ay, by) = header[x]["data_offsets"], header[y]["data_offsets"]
    return relayout(header, data, {x: data[ay:by], y: data[ax:bx]})


def m_swap_offsets(rng, state):
    n, text, header, data = parse(state["blob"])
    names = tensors_of(header)
    x, y = rng.choice(len(names), 2, replace=False)
    x, y = names[x], names[y]
    header[x], header[y] = header[y], header[x]
    return assemble(dumps(header), data)


def m_frame_substitute(rng, state):
    """An ECF8 tensor's frame replaced by another tensor's frame (any dtype)."""
    n, text, header, data = parse(state["blob"])
    names = _by_codec(state, "ecf8")
    x, y = rng.choice(len(names), 2, replace=False)
    a, b = header[names[y]]["data_offsets"]
    return relayout(header, data, {names[x]: data[a:b]})


def m_header_value(rng, state):
    n, text, header, data = parse(state["blob"])
    target = pick(rng, tensors_of(header) + ["__metadata__"])
    v = pick(rng, VALUES)
    if target == "__metadata__":
        if rng.random() < 0.5:
            header[target] = v
        else:
            header[target] = dict(header[target], **{pick(rng, ["format", "ecf8"]): v})
    else:
        field = pick(rng, ["dtype", "shape", "data_offsets", None])
        if field is None:
            header[target] = v
        else:
            header[target] = dict(header[target], **{field: v})
    return assemble(dumps(header), data)


def m_header_delete(rng, state):
    n, text, header, data = parse(state["blob"])
    del header[pick(rng, list(header))]
    return assemble(dumps(header), data)


def m_header_deep(rng, state):
    """JSON nested 64 to 100,000 deep: inside a tensor entry, or as the whole header."""
    n, text, header, data = parse(state["blob"])
    depth = pick(rng, [64, 1000, 100_000])
    nested = b"[" * depth + b"0" + b"]" * depth
    if rng.random() < 0.5:
        key = json.dumps(pick(rng, tensors_of(header))).encode() + b":"
        text = dumps(header).replace(key, key + nested + b',"_":', 1)
    else:
        text = nested
    return assemble(text, data)


def m_header_reorder(rng, state):
    """The compressed header's entries in another order (same meaning)."""
    n, text, header, data = parse(state["blob"])
    keys = list(header)
    order = rng.permutation(len(keys))
    return assemble(dumps({keys[i]: header[keys[i]] for i in order}), data)


def m_meta_value(rng, state):
    """A key of the ecf8 metadata object set to a boundary value or one of the wrong JSON type."""
    def edit(info):
        key = pick(rng, sorted(info) + ["extra"])
        cur = info.get(key)
        near = [cur + 1, cur - 1, cur ^ 1] if type(cur) is int else []
        if key == "record":
            near = [k for k in state["header"] if k != "__metadata__"]
        info[key] = pick(rng, VALUES + near + [1, 2, 3, "ecf8.safetensors"])
    return _edit_meta(state, edit)


def m_meta_delete(rng, state):
    if rng.random() < 0.2:
        n, text, header, data = parse(state["blob"])
        del header["__metadata__"]["ecf8"]
        return assemble(dumps(header), data)

    def edit(info):
        del info[pick(rng, list(info))]
    return _edit_meta(state, edit)


def m_record_flip(rng, state):
    """Bit flips inside the record (v2) / the ecf8 metadata string (v1)."""
    if state["version"] == 1:
        lo, hi = 8, 8 + int.from_bytes(state["blob"][:8], "little")
    else:
        lo, hi = _range(state, state["record"])
    return m_bitflip(rng, state, lo, hi)


SAME_SIZE = {"F32": "I32", "I32": "F32", "F8_E4M3": "F8_E5M2", "F8_E5M2": "F8_E4M3", "BF16": "F16",
             "F16": "BF16", "I64": "F64", "F64": "I64", "U8": "I8", "BOOL": "U8"}


def _header_edit(rng):
    def edit(text: str) -> str:
        h = json.loads(text)
        names = tensors_of(h)
        what = int(rng.integers(6))
        if what == 0:
            return text + pick(rng, [" ", "  ", "\n"])
        if what == 1:
            name = pick(rng, names)
            h[name]["dtype"] = SAME_SIZE.get(h[name]["dtype"], "U8")
        elif what == 2:
            h["__metadata__"] = {"format": pick(rng, ["np", "", "tf"])}
        elif what == 3:
            name = pick(rng, [k for k in names if len(h[k]["shape"]) == 2] or names)
            shape = h[name]["shape"]
            h[name]["shape"] = [shape[1], shape[0]] if len(shape) == 2 else shape + [1]
        elif what == 4:
            keys = list(h)
            h = {keys[i]: h[keys[i]] for i in rng.permutation(len(keys))}
        else:
            name = pick(rng, names)
            h[name] = dict(h[name], **{pick(rng, ["dtype", "shape", "data_offsets"]): pick(rng, VALUES)})
        return dumps(h).decode()
    return edit


def m_orig_header_edit(rng, state):
    """The embedded original header edited; the record's crc left as it was."""
    return _edit_record(state, _header_edit(rng), lambda t: None, fix_crc=False)


def m_orig_header_forged(rng, state):
    """The embedded original header edited and the record's crc recomputed (a forgery)."""
    return _edit_record(state, _header_edit(rng), lambda t: None, fix_crc=True)


def m_orig_header_delete(rng, state):
    """An entry (often the last tensor) deleted from the original header, record crc recomputed;
    half the time its codec-table row goes too (a consistent forgery)."""
    kept: set[str] = set()

    def header(text: str) -> str:
        h = json.loads(text)
        names = sorted(tensors_of(h), key=lambda k: h[k]["data_offsets"][0])
        h.pop(names[-1] if rng.random() < 0.5 else pick(rng, names + ["__metadata__"]), None)
        kept.update(h)
        return dumps(h).decode()

    def table(t: dict) -> None:
        if rng.random() < 0.5:
            for k in [k for k in t if k not in kept]:
                del t[k]
    return _edit_record(state, header, table, fix_crc=True)


def m_table_edit(rng, state):
    """The codec table: codec names, crcs (v2) at boundary values, entries deleted; record crc fixed
    or not."""
    def edit(table):
        name = pick(rng, list(table))
        what = int(rng.integers(4))
        if what == 0:
            del table[name]
        elif what == 1:
            table[name] = pick(rng, VALUES)
        else:
            row = list(table[name]) if isinstance(table[name], list) else [table[name]]
            i = int(rng.integers(len(row)))
            row[i] = pick(rng, [["none", "zstd", "ecf8", "raw", 5, None],
                                [0, 2**32, -1, 1.5, None, "x", 2**64]][min(i, 1)] +
                          ([row[i] ^ 1] if type(row[i]) is int else []))
            table[name] = row
    return _edit_record(state, lambda text: text, edit, fix_crc=rng.random() < 0.7)


def _fcs_field(frame: bytes) -> tuple[int, int]:
    """(offset, size) of a zstd frame's Frame_Content_Size field."""
    fhd = frame[4]
    single = (fhd >> 5) & 1
    size = [1 if single else 0, 2, 4, 8][fhd >> 6]
    return 5 + (0 if single else 1) + [0, 1, 2, 4][fhd & 3], size


def _zstd_entries(state) -> list[str]:
    return _by_codec(state, "zstd") + ([state["record"]] if "record" in state else [])


def m_zstd_huge(rng, state):
    """A zstd tensor's (or the record's) frame claims a huge content size (patched in place)."""
    a, b = _range(state, pick(rng, _zstd_entries(state)))
    out = bytearray(state["blob"])
    off, size = _fcs_field(out[a:b])
    if size:
        out[a + off : a + off + size] = bytes([0xFF] * size) if rng.random() < 0.5 else \
            (1 << (8 * size - 2)).to_bytes(size, "little")
    return out


def m_zstd_replace(rng, state):
    """A zstd tensor's bytes replaced by a hand-made frame claiming 2**40..2**63 bytes of content."""
    n, text, header, data = parse(state["blob"])
    name = pick(rng, _zstd_entries(state))
    claim = pick(rng, [2**40, 2**62, 2**63 + 5, 10**12])
    body = data[slice(*header[name]["data_offsets"])][:64]
    single = rng.random() < 0.5
    fhd = (3 << 6) | (single << 5)
    frame = b"\x28\xb5\x2f\xfd" + bytes([fhd]) + (b"" if single else b"\x58")
    frame += claim.to_bytes(8, "little") + ((len(body) << 3) | 1).to_bytes(3, "little") + body
    return relayout(header, data, {name: frame})


MUTATORS = {
    "bitflip": m_bitflip, "bitflip_data": m_bitflip_data, "bitflip_header": m_bitflip_header,
    "overwrite_boundary": m_overwrite, "truncate": m_truncate, "extend": m_extend,
    "raw_tensor_flip": m_raw_tensor_flip, "swap_same_size": m_swap_same_size,
    "swap_frames": m_swap_frames, "swap_offsets": m_swap_offsets,
    "frame_substitute": m_frame_substitute, "header_value": m_header_value,
    "header_delete": m_header_delete, "header_deep": m_header_deep,
    "header_reorder": m_header_reorder, "meta_value": m_meta_value, "meta_delete": m_meta_delete,
    "record_flip": m_record_flip, "orig_header_edit": m_orig_header_edit,
    "orig_header_forged": m_orig_header_forged, "orig_header_delete": m_orig_header_delete,
    "table_edit": m_table_edit,
    "zstd_huge": m_zstd_huge, "zstd_replace": m_zstd_replace,
}
assert list(MUTATORS) == KINDS


def mutated_input(state, seed, case) -> bytes:
    rng = np.random.default_rng([seed, 2, case])
    return bytes(MUTATORS[KINDS[case % len(KINDS)]](rng, state))


# ---------------------------------------------------------------------------------------------
# Running and classifying


def _call(fn, *args):
    try:
        return "ok", fn(*args)
    except ECF8Error as e:
        return "ECF8Error", str(e)
    except MemoryError:
        raise
    except RecursionError as e:
        return "other:RecursionError", f"{fn.__name__}: {e}"
    except Exception as e:
        return f"other:{type(e).__name__}", f"{fn.__name__}: {type(e).__name__}: {e}"


def _clean(workdir: Path, keep: str = "m.safetensors") -> list[str]:
    left = []
    for p in workdir.iterdir():
        if p.name != keep:
            left.append(p.name)
            p.unlink()
    return left


def run_case(state, seed, case):
    workdir = state["workdir"]
    _clean(workdir, "")
    path, out = workdir / "m.safetensors", workdir / "r.safetensors"
    path.write_bytes(mutated_input(state, seed, case))
    v, vmsg = _call(lambda p: compressed.verify_file(p, progress=False), path)
    d, dmsg = _call(lambda p, q: compressed.decompress_file(p, q, progress=False), path, out)
    restored = out.read_bytes() if d == "ok" and out.exists() else None
    left = [x for x in _clean(workdir) if not (d == "ok" and x == out.name)]
    outcome, message = classify(state, v, vmsg, d, dmsg, restored, left)
    if outcome == "DIFFERENT" and KINDS[case % len(KINDS)] in FORGED and v == "ok":
        outcome = "accepted"
    if outcome in ("ECF8Error", "identical"):
        loaded = check_load(state, path, v)
        if loaded:
            outcome, message = loaded
    if state.get("cli_every") and case % state["cli_every"] == 0:
        state["kind"] = KINDS[case % len(KINDS)]
        cli = run_cli(state, path)
        message = f"[cli: {cli[0]}: {cli[1][:150]}] " + message
        if outcome in ("ECF8Error", "identical") and cli[0] not in ("ECF8Error", "identical"):
            outcome = "cli:" + cli[0]
    return outcome, message[:400]


def _original_tensors(state) -> dict[str, bytes]:
    if "tensors" not in state:
        n, text, header, data = parse(state["original"])
        state["tensors"] = {k: (tuple(m["shape"]), data[slice(*m["data_offsets"])])
                            for k, m in header.items() if k != "__metadata__"}
    return state["tensors"]


def _load_gpu_standin(path: Path) -> dict:
    """What ``compressed.safe_open(path, device="cuda")`` checks tensor by tensor, with the GPU
    decoder and upload replaced by their CPU equivalents (this machine has no GPU): every check of
    the compressed-checkpoint layer still runs.  (``load_file`` on a GPU reads ahead through
    pinned staging buffers, which need CuPy; its checks are those of ``tests/test_read_ahead.py``.)"""
    from ecf8 import api, compressed_stream

    decode, upload = api.decode, getattr(compressed_stream, "upload_array", None)
    api.decode = lambda blob, device="cpu", **kw: decode(blob, "cpu", **kw)
    compressed_stream.upload_array = lambda x, device: x
    try:
        with compressed.safe_open(path, device="cuda") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    finally:
        api.decode = decode
        if upload is not None:
            compressed_stream.upload_array = upload


def check_load(state, path: Path, verified: str) -> tuple[str, str] | None:
    """``ecf8.load_file`` on the same input, on the CPU and (stand-in) GPU path: ECF8Error, or
    exactly the original tensors (None when that holds)."""
    if not hasattr(compressed, "load_file"):
        return None
    for where, load in (("", compressed.load_file), (" (GPU path)", _load_gpu_standin)):
        problem = _check_loaded(state, load, path, verified, where)
        if problem:
            return problem
    return None


def _check_loaded(state, load, path, verified, where):
    r, loaded = _call(load, path)
    if r.startswith("other"):
        return r, f"load_file{where}: {loaded}"
    if r == "ECF8Error":
        return ("verify-missed", f"verify ok, load_file{where} refused: {loaded}") if verified == "ok" else None
    want = _original_tensors(state)
    if set(loaded) != set(want):
        return "DIFFERENT", f"load_file{where} gave tensors {sorted(set(loaded) ^ set(want))[:3]} more/less"
    for name, x in loaded.items():
        shape, raw = want[name]
        if tuple(x.shape) != shape or np.ascontiguousarray(x).tobytes() != raw:
            return "DIFFERENT", f"load_file{where}: tensor {name!r} differs ({x.dtype} {x.shape})" + \
                ("" if verified == "ok" else "; verify refused")
    return None


def classify(state, v, vmsg, d, dmsg, restored, left):
    if v.startswith("other"):
        return v, f"verify: {vmsg}"
    if d.startswith("other"):
        return d, f"decompress: {dmsg}"
    if d == "ok":
        if restored == state["original"]:
            return "identical", f"verify {'ok' if v == 'ok' else 'refused: ' + vmsg}"
        size = "missing" if restored is None else f"{len(restored)} bytes of {len(state['original'])}"
        return "DIFFERENT", f"decompress ok, restored file differs ({size}); verify " + \
            ("ok" if v == "ok" else "refused: " + vmsg)
    if left:
        return "left-files", f"decompress refused ({dmsg}) but left {left}"
    if v == "ok":
        return "verify-missed", f"verify ok, decompress refused: {dmsg}"
    return "ECF8Error", f"verify: {vmsg} | decompress: {dmsg}"


def run_cli(state, path: Path) -> tuple[str, str]:
    """The same through the ecf8 command (python -c ... main()): info (must not fail other than
    with one clean error, and must fail on a truncated or extended file), verify and decompress,
    one subprocess per command."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-c", "import sys; from ecf8.cli import main; sys.exit(main(sys.argv[1:]))"]
    out = state["workdir"] / "cli.safetensors"
    res = []
    for args in (["info", str(path)], ["verify", "--quiet", str(path)],
                 ["decompress", "--quiet", str(path), "-o", str(out)]):
        try:
            p = subprocess.run(cmd + args, capture_output=True, text=True, timeout=60, env=env)
        except subprocess.TimeoutExpired:
            return "hang", f"ecf8 {args[0]} ran past 60 s"
        res.append(p)
    (i, v, d) = res
    restored = out.read_bytes() if out.exists() else None
    left = [x for x in _clean(state["workdir"]) if not (d.returncode == 0 and x == out.name)]
    for p, name in ((i, "info"), (v, "verify"), (d, "decompress")):
        lines = p.stderr.strip().splitlines()
        if "Traceback" in p.stderr or p.returncode not in (0, 1) or (p.returncode == 1 and not lines):
            return "other:cli", f"ecf8 {name}: exit {p.returncode}, {len(lines)} stderr lines: " + \
                (lines[-1] if lines else "")
    if i.returncode == 0 and state.get("kind") in ("truncate", "extend"):
        return "info-missed", "ecf8 info exit 0 on a truncated or extended file"
    if d.returncode == 0:
        if restored == state["original"]:
            return "identical", f"verify exit {v.returncode}"
        return "DIFFERENT", f"decompress exit 0, restored differs; verify exit {v.returncode}"
    if left:
        return "left-files", f"ecf8 decompress exit 1 but left {left}"
    if v.returncode == 0:
        return "verify-missed", "ecf8 verify exit 0, decompress exit 1: " + d.stderr.strip()
    return "ECF8Error", d.stderr.strip()


def summary(results) -> str:
    import collections

    c = collections.Counter()
    for outcome, message in results.values():
        if "[cli: " in message:
            c[message.split("[cli: ")[1].split(": ")[0]] += 1
    if not c:
        return ""
    return "\nCLI sample (ecf8 verify + ecf8 decompress): " + ", ".join(f"{k}: {v}" for k, v in c.most_common())
