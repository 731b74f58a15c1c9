"""Model folders: subfolders kept, every other file copied, a bad index or shard refused before
anything is written, the output folder complete or absent."""

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import ecf8
from ecf8 import compressed
from ecf8.cli import main
from ecf8.safetensors_io import write_safetensors
from checkpoint_helpers import weights


def _model(root, shards=("text/model.safetensors", "vision/model.safetensors"), index=True):
    """A model folder: shards (maybe in subfolders) named by an index, plus config/tokenizer files."""
    root.mkdir()
    weight_map = {}
    for k, shard in enumerate(shards):
        tensors = {f"m{k}.weight": weights(4096, ml_dtypes.bfloat16, k).reshape(64, 64),
                   f"m{k}.scale": np.float32([k + 0.5])}
        (root / shard).parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(tensors, root / shard, {"format": "pt"})
        weight_map.update({name: shard for name in tensors})
    if index:
        (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (root / "config.json").write_text('{"model_type": "demo"}')
    (root / "generation_config.json").write_text("{}")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.json").write_text('{"vocab": {}}')
    return root


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_model_folder_round_trips_with_subfolders_and_other_files(tmp_path):
    src = _model(tmp_path / "model")
    assert main(["compress", str(src), "-o", str(tmp_path / "c"), "--quiet"]) == 0
    packed = _tree(tmp_path / "c")
    assert set(packed) == set(_tree(src))        # text/ and vision/ kept apart, config & co copied
    assert packed["config.json"] == (src / "config.json").read_bytes()
    assert ecf8.load_file(tmp_path / "c" / "vision" / "model.safetensors")["m1.scale"][0] == 1.5
    assert main(["decompress", str(tmp_path / "c"), "-o", str(tmp_path / "r"), "--quiet"]) == 0
    assert _tree(tmp_path / "r") == _tree(src)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("bad", ["../outside.safetensors", "/abs/model.safetensors", "missing.safetensors"])
def test_a_bad_index_writes_nothing(tmp_path, bad):
    src = _model(tmp_path / "model")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["extra"] = bad
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "outside.safetensors").write_bytes((src / "text" / "model.safetensors").read_bytes())
    with pytest.raises(ecf8.UnsupportedError, match="outside the model folder|missing"):
        compressed.compress_path(src, tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "outside.safetensors"]


def test_a_bad_shard_writes_nothing(tmp_path):
    src = _model(tmp_path / "model", index=False)
    (src / "vision" / "model.safetensors").write_bytes(b"\x10" + bytes(7) + b"{}")
    with pytest.raises(ecf8.ECF8Error, match="vision/model.safetensors"):
        compressed.compress_path(src, tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_failure_midway_leaves_no_folder(tmp_path, monkeypatch):
    src = _model(tmp_path / "model")
    real = compressed.compress_file
    calls = []

    def failing(a, b, **kwargs):
        calls.append(a)
        if len(calls) == 2:
            raise OSError("disk full")
        real(a, b, **kwargs)
    monkeypatch.setattr(compressed, "compress_file", failing)
    with pytest.raises(OSError):
        compressed.compress_path(src, tmp_path / "c", jobs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_an_existing_output_folder_is_not_overwritten(tmp_path):
    src = _model(tmp_path / "model")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("mine")
    with pytest.raises(ecf8.UnsupportedError, match="already exists"):
        compressed.compress_path(src, tmp_path / "c")
    assert _tree(tmp_path / "c") == {"keep.txt": b"mine"}


def test_a_linked_subfolder_is_refused_not_skipped(tmp_path):
    src = _model(tmp_path / "model")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "vocab.txt").write_text("a b c")
    (src / "extra").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(ecf8.UnsupportedError, match="link to a folder"):
        compressed.compress_path(src, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_dangling_links_are_refused_and_empty_folders_kept(tmp_path):
    src = _model(tmp_path / "model")
    (src / "broken.json").symlink_to(tmp_path / "nowhere.json")
    with pytest.raises(ecf8.UnsupportedError, match="broken.json"):
        compressed.compress_path(src, tmp_path / "c")
    assert not (tmp_path / "c").exists()
    (src / "broken.json").unlink()
    (src / "empty" / "deeper").mkdir(parents=True)
    compressed.compress_path(src, tmp_path / "c")
    compressed.decompress_path(tmp_path / "c", tmp_path / "r")
    assert (tmp_path / "r" / "empty" / "deeper").is_dir() and _tree(tmp_path / "r") == _tree(src)


@pytest.mark.parametrize("folder", [True, False])
def test_compress_reads_each_input_header_once_and_no_output_again(tmp_path, monkeypatch, capsys, folder):
    """`ecf8 compress` reads an input's header once (for the progress total, the checks and the
    compression), and learns the codecs it chose without reopening its outputs."""
    from ecf8 import cli

    src = _model(tmp_path / "model")
    if not folder:
        src = src / "text" / "model.safetensors"
    reads, inspected = [], []
    real_read, real_inspect = compressed.read_layout, compressed.inspect_file

    def read(path, *args, **kwargs):
        reads.append(Path(path))
        return real_read(path, *args, **kwargs)
    for module in (cli, compressed):
        monkeypatch.setattr(module, "read_layout", read)
    monkeypatch.setattr(compressed, "inspect_file", lambda p: inspected.append(p) or real_inspect(p))
    assert main(["compress", str(src), "-o", str(tmp_path / "out"), "-j", "1"]) == 0
    inputs = [src / "text/model.safetensors", src / "vision/model.safetensors"] if folder else [src]
    read_inputs = [r for r in reads if r.is_relative_to(tmp_path / "model")]   # (not the outputs'
    assert sorted(read_inputs) == sorted(inputs) and inspected == []             # check before renaming)
    assert "saved" in capsys.readouterr().out
