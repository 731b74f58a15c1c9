"""Property tests of the checkpoint round trip.

Hypothesis builds safetensors files byte by byte, so the layout is ours to choose: any mix of
dtypes (ECF8-coded, other known ones, sub-byte and unknown strings), shapes incl. zero-size and
0-d, unicode names, with or without ``__metadata__``, JSON spacing and key order, fields
safetensors ignores, header padding with any JSON whitespace, and data sections with gaps,
trailing bytes, shared / overlapping / out-of-order ranges.

The property: ``compress_file`` (any chunk size and table count) then ``decompress_file`` restores
the input byte for byte, the compressed file opens with ``safetensors.safe_open``, verifies, and
``ecf8.compressed.safe_open`` gives every tensor's original bytes, shape and metadata -- or compress
refuses with an ``ECF8Error`` and leaves nothing behind (no output, no temp file).  A refusal is
allowed only for files that the ``safetensors`` parser (the reference) rejects for their layout; a
file it accepts must round-trip.  Unknown dtype strings are judged on a twin file in which they
are replaced by ``U8``: they must pass through unchanged whatever the string.

The same holds for ``ecf8.save_file`` / ``load_file`` on dicts of arrays, with ``safetensors``'s
own ``save`` judging names and metadata, and for model folders (``compress_path`` /
``decompress_path``: shards in subfolders, indexes, other files, file modes).

Default ("ci") profile: small tensors, jobs=1, a few seconds.  HYPOTHESIS_PROFILE=thorough runs
2000 cases per test.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
from hypothesis import event, given, note
from hypothesis import strategies as st
from safetensors import safe_open

import ecf8
from ecf8 import compressed
from ecf8.errors import ECF8Error

CODED = ["F8_E4M3", "F8_E5M2", "BF16", "F16"]
CODED_NP = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
            "BF16": ml_dtypes.bfloat16, "F16": np.float16}
# dtype string -> bits per element, for dtypes the safetensors parser knows
KNOWN_BITS = {"F32": 32, "F64": 64, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8, "U16": 16,
              "U32": 32, "U64": 64, "BOOL": 8, "C64": 64, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
              "F8_E5M2FNUZ": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
              "F8_E4M3": 8, "F8_E5M2": 8, "BF16": 16, "F16": 16}
UNKNOWN = ["X_FUTURE", "F8_E3M4", "Q4_K", "f32", ""]
# Element bytes NumPy can materialise through safe_open(framework="numpy").
NUMPY_OK = {"F32", "F64", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL", "F16", "C64"}
META_KEY = "ecf8"


# ---------------------------------------------------------------------------------------------
# Building safetensors files


@dataclass
class Spec:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    seed: int
    fill: str           # weights | random | const | specials


@dataclass
class Layout:
    place_order: list[int]      # data-section order of the tensors (indices into specs)
    gaps: list[int]             # bytes before each placed tensor
    alias: list[int]            # per placed tensor: -1, or index of an earlier placed tensor ...
    alias_shift: list[int]      # ... whose range it starts inside (shift bytes into it)
    trailing: int
    gap_random: bool


@dataclass
class HeaderStyle:
    compact: bool
    ensure_ascii: bool
    key_orders: list[tuple[str, str, str]]
    metadata: dict | None
    metadata_first: bool
    padding: str                # JSON whitespace after the header object ...
    leading: str                # ... and before it
    extra_field: bool = False   # entries carry a field safetensors ignores


def tensor_bytes(spec: Spec) -> bytes:
    rng = np.random.default_rng(spec.seed)
    n = spec.nbytes
    if spec.fill == "weights" and spec.dtype in CODED_NP:
        count = n // np.dtype(CODED_NP[spec.dtype]).itemsize
        w = rng.standard_normal(count).astype(np.float32)
        w *= 16 if spec.dtype.startswith("F8") else 0.02
        return w.astype(CODED_NP[spec.dtype]).tobytes()
    if spec.fill == "const":
        return bytes([spec.seed % 256]) * n
    if spec.fill == "specials":     # NaN/Inf/-0/subnormal-heavy bit patterns
        pool = np.array([0x00, 0x80, 0x7F, 0xFF, 0x7C, 0xFC, 0x01, 0x81], np.uint8)
        return pool[rng.integers(0, pool.size, n)].tobytes()
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes()


def build_file(specs: list[Spec], layout: Layout, style: HeaderStyle,
               dtype_override: dict[int, str] | None = None) -> bytes:
    """The safetensors bytes of specs laid out as `layout`, header written as `style`.

    dtype_override replaces some entries' dtype by U8 [nbytes] (the twin used to judge layouts of
    files with unknown dtype strings)."""
    rng = np.random.default_rng(len(specs) + layout.trailing)
    ranges: list[tuple[int, int] | None] = [None] * len(specs)
    placed: list[int] = []
    data = bytearray()
    for slot, i in enumerate(layout.place_order):
        spec = specs[i]
        target = layout.alias[slot]
        if 0 <= target < len(placed):
            a0, b0 = ranges[placed[target]]
            start = a0 + (layout.alias_shift[slot] % max(b0 - a0, 1) if b0 > a0 else 0)
            end = start + spec.nbytes
            if end > len(data):
                data += tensor_bytes(spec)[len(data) - start:]
        else:
            gap = layout.gaps[slot]
            data += (rng.integers(0, 256, gap, dtype=np.uint8).tobytes() if layout.gap_random
                     else bytes(gap))
            start = len(data)
            data += tensor_bytes(spec)
            end = len(data)
        ranges[i] = (start, end)
        placed.append(i)
    data += bytes(layout.trailing)

    header_items = []
    for i, spec in enumerate(specs):
        dtype, shape = spec.dtype, list(spec.shape)
        if dtype_override and i in dtype_override:
            dtype, shape = dtype_override[i], [spec.nbytes]
        fields = {"dtype": dtype, "shape": shape, "data_offsets": list(ranges[i])}
        entry = {k: fields[k] for k in style.key_orders[i % len(style.key_orders)]}
        if style.extra_field and i % 2:
            entry["comment"] = {"why": [1, None, "é"]}
        header_items.append((spec.name, entry))
    header = dict(header_items)
    if style.metadata is not None:
        meta = {"__metadata__": style.metadata}
        header = {**meta, **header} if style.metadata_first else {**header, **meta}
    seps = (",", ":") if style.compact else (", ", ": ")
    text = json.dumps(header, separators=seps, ensure_ascii=style.ensure_ascii).encode()
    text = style.leading.encode() + text + style.padding.encode()
    return struct.pack("<Q", len(text)) + text + bytes(data)


def safetensors_accepts(blob: bytes, where: Path) -> bool:
    """The reference: does the safetensors parser (Rust) open this file?"""
    where.write_bytes(blob)
    try:
        with safe_open(str(where), framework="numpy") as f:
            f.keys()
        return True
    except Exception:
        return False
    finally:
        where.unlink()


# ---------------------------------------------------------------------------------------------
# Strategies

names = st.text(st.characters(exclude_categories=["Cs"]), min_size=0, max_size=10).filter(
    lambda s: s != "__metadata__")
dtypes = st.one_of(st.sampled_from(CODED), st.sampled_from(CODED),
                   st.sampled_from(sorted(KNOWN_BITS)), st.sampled_from(UNKNOWN))


@st.composite
def shapes(draw) -> tuple[int, ...]:
    kind = draw(st.sampled_from(["small", "small", "scalar", "zero", "long", "deep"]))
    if kind == "scalar":
        return ()
    if kind == "zero":
        dims = draw(st.lists(st.integers(0, 5), min_size=1, max_size=4))
        dims[draw(st.integers(0, len(dims) - 1))] = 0
        return tuple(dims)
    if kind == "long":       # long enough that the ECF8 coder is used
        return (draw(st.integers(512, 3000)),)
    if kind == "deep":       # more dims than an ECF8 frame holds
        return tuple(draw(st.lists(st.integers(1, 2), min_size=9, max_size=10)))
    return tuple(draw(st.lists(st.integers(1, 24), min_size=1, max_size=3)))


@st.composite
def specs_(draw, max_tensors: int = 5) -> list[Spec]:
    tensor_names = draw(st.lists(names, min_size=0, max_size=max_tensors, unique=True))
    out = []
    for name in tensor_names:
        dtype = draw(dtypes)
        shape = draw(shapes())
        count = math.prod(shape)
        if dtype in KNOWN_BITS:
            nbytes = -(-count * KNOWN_BITS[dtype] // 8)
        else:                        # unknown element size: any whole number of bytes per element
            nbytes = count * draw(st.sampled_from([1, 2, 4, 3]))
        out.append(Spec(name, dtype, shape, nbytes, draw(st.integers(0, 2**32 - 1)),
                        draw(st.sampled_from(["weights", "weights", "random", "const", "specials"]))))
    return out


@st.composite
def layouts(draw, n: int) -> Layout:
    order = list(range(n))
    if draw(st.booleans()):
        order = draw(st.permutations(order))
    irregular = draw(st.booleans())
    gaps = [draw(st.sampled_from([0, 0, 0, 1, 3, 8, 17])) if irregular else 0 for _ in range(n)]
    alias = [draw(st.integers(-6, max(i - 1, -1))) if irregular else -1 for i in range(n)]
    shift = [draw(st.integers(0, 64)) for _ in range(n)]
    trailing = draw(st.sampled_from([0, 0, 0, 1, 7, 64, 4096])) if irregular else 0
    return Layout(order, gaps, alias, shift, trailing, draw(st.booleans()))


metadata_values = st.dictionaries(
    st.text(st.characters(exclude_categories=["Cs"]), max_size=8).filter(lambda k: k != META_KEY),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=20), max_size=4)


@st.composite
def header_styles(draw, n: int) -> HeaderStyle:
    orders = st.permutations(["dtype", "shape", "data_offsets"]).map(tuple)
    return HeaderStyle(
        compact=draw(st.booleans()), ensure_ascii=draw(st.booleans()),
        key_orders=draw(st.lists(orders, min_size=1, max_size=max(n, 1))),
        metadata=draw(st.one_of(st.none(), metadata_values)),
        metadata_first=draw(st.booleans()),
        padding=draw(st.one_of(st.sampled_from(["", "", " ", " " * 5, " " * 7, " " * 64]),
                               st.text(" \t\n\r", max_size=9))),
        leading=draw(st.one_of(st.just(""), st.text(" \t\n\r", max_size=3))),
        extra_field=draw(st.integers(0, 7)) == 0)


@st.composite
def safetensors_files(draw):
    specs = draw(specs_())
    layout = draw(layouts(len(specs)))
    style = draw(header_styles(len(specs)))
    return specs, layout, style


# ---------------------------------------------------------------------------------------------
# The round-trip property


def check_opens(path: Path) -> None:
    """The compressed file opens with safetensors; every tensor NumPy can hold can be read."""
    with safe_open(str(path), framework="numpy") as f:
        for k in f.keys():
            if f.get_slice(k).get_dtype() in NUMPY_OK:
                f.get_tensor(k)


def check_tensors(packed: Path, blob: bytes) -> None:
    """Every tensor read from the compressed file (ecf8.compressed.safe_open) has the original's bytes,
    dtype and shape; metadata as the original's.  Dtypes NumPy cannot hold may be refused."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    with compressed.safe_open(packed) as f:
        assert set(f.keys()) == set(header) - {"__metadata__"}
        assert (f.metadata() or {}) == (header.get("__metadata__") or {})
        for name in f.keys():
            a, b = header[name]["data_offsets"]
            try:
                x = f.get_tensor(name)
            except ECF8Error:
                assert header[name]["dtype"] not in NUMPY_OK | set(CODED), name
                continue
            assert tuple(x.shape) == tuple(header[name]["shape"]), name
            assert np.ascontiguousarray(x).tobytes() == data[a:b], f"tensor {name!r} differs"


def check_round_trip(blob: bytes, must_succeed: bool, **options) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        f, g, h = tmp / "in.safetensors", tmp / "out.safetensors", tmp / "back.safetensors"
        f.write_bytes(blob)
        try:
            compressed.compress_file(f, g, jobs=1, progress=False, **options)
        except ECF8Error as e:
            note(f"refused: {e}")
            event("refused")
            assert not must_succeed, f"refused a file safetensors accepts: {e}"
            assert sorted(os.listdir(tmp)) == ["in.safetensors"], "refusal left files behind"
            return
        assert sorted(os.listdir(tmp)) == ["in.safetensors", "out.safetensors"]
        check_opens(g)
        assert compressed.verify_file(g, progress=False) >= 0
        compressed.decompress_file(g, h, progress=False)
        assert sorted(os.listdir(tmp)) == ["back.safetensors", "in.safetensors", "out.safetensors"]
        restored = h.read_bytes()
        assert len(restored) == len(blob), f"restored {len(restored)} bytes of {len(blob)}"
        assert restored == blob, "restored file differs"
        check_tensors(g, blob)
        event("round trip")


coding_options = st.fixed_dictionaries({"chunk_size": st.sampled_from([512, 4096, 32768]),
                                        "max_tables": st.integers(1, 8)})


@given(safetensors_files(), coding_options)
def test_compress_decompress_is_byte_identical(case, options):
    specs, layout, style = case
    blob = build_file(specs, layout, style)
    unknown = {i: "U8" for i, s in enumerate(specs) if s.dtype not in KNOWN_BITS}
    twin = build_file(specs, layout, style, unknown) if unknown else blob
    with tempfile.TemporaryDirectory() as tmp:
        valid = safetensors_accepts(twin, Path(tmp) / "twin.safetensors")
    note(f"{len(blob)} bytes, layout judged valid by safetensors: {valid}; header "
         f"{blob[8:8 + min(400, len(blob) - 8)]!r}")
    check_round_trip(blob, must_succeed=valid, **options)


@given(st.lists(st.tuples(st.sampled_from(CODED), st.integers(0, 2**32 - 1)), min_size=1, max_size=3),
       st.sampled_from([0, 1, 4096]))
def test_plain_checkpoints_round_trip(tensors, trailing):
    """Contiguous, ordered checkpoints of coded dtypes (the common case), with trailing bytes."""
    specs = [Spec(f"layer{i}.weight", dt, (700,), 700 * (2 if dt in ("BF16", "F16") else 1), seed,
                  "weights") for i, (dt, seed) in enumerate(tensors)]
    layout = Layout(list(range(len(specs))), [0] * len(specs), [-1] * len(specs), [0] * len(specs),
                    trailing, False)
    style = HeaderStyle(True, True, [("dtype", "shape", "data_offsets")], {"format": "pt"}, True, "", "")
    blob = build_file(specs, layout, style)
    check_round_trip(blob, must_succeed=trailing == 0)


# ---------------------------------------------------------------------------------------------
# save_file / load_file


ARRAY_DTYPES = [ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, ml_dtypes.bfloat16, np.float16,
                np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                np.uint32, np.uint64, np.bool_]


@st.composite
def arrays(draw) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(ARRAY_DTYPES)))
    shape = draw(shapes())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    raw = rng.integers(0, 256, math.prod(shape) * dtype.itemsize, dtype=np.uint8)
    if dtype == np.bool_:
        raw &= 1
    x = raw.view(dtype).reshape(shape)
    if x.ndim >= 2 and draw(st.booleans()):
        x = x.T                      # not C-contiguous
    return x


any_metadata = st.one_of(
    st.none(), metadata_values,
    st.dictionaries(st.text(max_size=4), st.one_of(st.integers(), st.none(), st.lists(st.text())),
                    min_size=1, max_size=2))
array_names = st.one_of(names, st.just("__metadata__"), st.just(""))


def safetensors_save_accepts(tensors: dict, metadata) -> bool:
    """Would safetensors write (and read back) these names and metadata?"""
    stand_in = {k: np.zeros(v.shape, np.uint8) for k, v in tensors.items()}
    extra = "stand-in" + "-" * max(map(len, tensors), default=0)  # safetensors cannot read back
    stand_in[extra] = np.zeros(1, np.uint8)                          # a file with no tensors
    try:
        loaded = safetensors.numpy.load(safetensors.numpy.save(stand_in, metadata=metadata))
    except Exception:
        return False
    return set(loaded) == set(stand_in)


@given(st.dictionaries(array_names, arrays(), max_size=4), any_metadata)
def test_save_file_load_file(tensors, metadata):
    valid = safetensors_save_accepts(tensors, metadata)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / "m.safetensors"
        try:
            ecf8.save_file(tensors, path, metadata)
        except ECF8Error as e:
            note(f"refused: {e}")
            assert not valid, f"refused names/metadata safetensors accepts: {e}"
            assert os.listdir(tmp) == [], "refusal left files behind"
            return
        assert valid, "accepted names or metadata that safetensors rejects"
        assert os.listdir(tmp) == ["m.safetensors"]
        check_opens(path)
        with safe_open(str(path), framework="numpy") as f:
            assert {k: v for k, v in (f.metadata() or {}).items() if k != META_KEY} == (metadata or {})
        loaded = ecf8.load_file(path)
        assert set(loaded) == set(tensors)
        for name, x in tensors.items():
            y = loaded[name]
            assert y.dtype == x.dtype and y.shape == x.shape, name
            assert np.ascontiguousarray(y).tobytes() == np.ascontiguousarray(x).tobytes(), name


# ---------------------------------------------------------------------------------------------
# Model folders: compress_path / decompress_path


FOLDERS = ["", "text/", "vision/", "sub dir/ü/"]
OTHER_FILES = ["config.json", "tokenizer.json", "generation_config.json", ".gitattributes",
               "README.md", "vision/preprocessor_config.json", "extra/blob.bin", "empty"]
MODES = [0o644, 0o600, 0o640, 0o444]


@st.composite
def model_folders(draw):
    """{relative path: (bytes, mode)} of a model folder, and whether safetensors accepts all of it."""
    files: dict[str, tuple[bytes, int]] = {}
    valid = True
    shards: dict[str, list[str]] = {}
    for i in range(draw(st.integers(1, 3))):
        folder = draw(st.sampled_from(FOLDERS))
        stem = draw(st.sampled_from(["model", f"model-0000{i + 1}-of-00003", "diffusion_pytorch_model", "ä"]))
        rel = folder + stem + ".safetensors"
        if rel in files:
            continue
        specs = [Spec(f"{stem}.{j}.{name}", dt, shape, -(-math.prod(shape) * KNOWN_BITS[dt] // 8),
                      draw(st.integers(0, 2**32 - 1)), "weights")
                 for j, (name, dt, shape) in enumerate(draw(st.lists(st.tuples(
                     st.sampled_from(["weight", "bias", "scale"]),
                     st.sampled_from(CODED + ["F32", "I64", "BOOL"]),
                     st.sampled_from([(600,), (4, 4), (), (0,)])), min_size=1, max_size=3)))]
        n = len(specs)
        broken = draw(st.integers(0, 9)) == 0              # trailing bytes: safetensors refuses
        layout = Layout(list(range(n)), [0] * n, [-1] * n, [0] * n, 3 if broken else 0, False)
        style = HeaderStyle(True, True, [("dtype", "shape", "data_offsets")], None, False, "", "")
        files[rel] = (build_file(specs, layout, style), draw(st.sampled_from(MODES)))
        valid &= not broken
        shards.setdefault(folder, []).extend((s.name, rel[len(folder):]) for s in specs)
    for rel in draw(st.lists(st.sampled_from(OTHER_FILES), unique=True, max_size=4)):
        files.setdefault(rel, (draw(st.binary(max_size=40)), draw(st.sampled_from(MODES))))
    for folder, entries in shards.items():
        kind = draw(st.sampled_from(["none", "none", "ok", "ok", "missing", "escape"]))
        if kind == "none":
            continue
        weight_map = dict(entries)
        if kind == "missing":
            weight_map["ghost"] = "model-00009-of-00009.safetensors"
        elif kind == "escape":
            weight_map["ghost"] = "../" * (folder.count("/") + 1) + "elsewhere.safetensors"
        valid &= kind == "ok"
        index = json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}, indent=2)
        files[folder + "model.safetensors.index.json"] = (index.encode(), 0o644)
    return files, valid


def tree(root: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mode & 0o777)
            for p in sorted(root.rglob("*")) if p.is_file()}


@given(model_folders())
def test_model_folder_round_trip(case):
    files, valid = case
    note(f"files: {sorted(files)}, safetensors accepts all: {valid}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src, dst, back = tmp / "model", tmp / "packed", tmp / "restored"
        if files.get("elsewhere.safetensors") is None:
            (tmp / "elsewhere.safetensors").write_bytes(b"")      # what an escaping index names
        for rel, (data, mode) in files.items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes(data)
            os.chmod(src / rel, mode)
        before = sorted(os.listdir(tmp))
        try:
            compressed.compress_path(src, dst, jobs=1, progress=False)
        except ECF8Error as e:
            note(f"refused: {e}")
            event("refused")
            assert not valid, f"refused a model folder safetensors accepts: {e}"
            assert sorted(os.listdir(tmp)) == before, "refusal left files behind"
            return
        assert valid, "compressed a folder with a file safetensors refuses or a bad index"
        packed = tree(dst)
        assert set(packed) == set(files), "the compressed folder lacks or adds files"
        for rel in packed:
            if rel.endswith(".safetensors"):
                check_opens(dst / rel)
        compressed.decompress_path(dst, back, progress=False)
        restored = tree(back)
        assert set(restored) == set(files)
        for rel, (data, mode) in files.items():
            assert restored[rel][0] == data, f"{rel} differs"
            assert restored[rel][1] == mode, f"{rel}: mode {restored[rel][1]:o}, was {mode:o}"
        event("round trip")
