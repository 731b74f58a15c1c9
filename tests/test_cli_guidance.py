"""What a new user meets in the ecf8 command: outputs that would replace the input or land somewhere
unexpected, messages that agree with each other and point to the right command, a quiet exit when
the reader of a pipe leaves, info as JSON and with folder totals, analyze's wording."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import ecf8
from ecf8 import compressed, encoder
from ecf8.safetensors_io import write_safetensors
from ecf8.cli import main
from helpers import weights_like, child_env

ROOT = Path(__file__).resolve().parents[1]


def _model(path: Path, seed: int = 0) -> Path:
    write_safetensors({"w": weights_like(64 * 64, ml_dtypes.bfloat16, seed).reshape(64, 64),
                       "h": weights_like(32 * 32, np.float16, seed).reshape(32, 32),
                       "ids": np.arange(300, dtype=np.int64)}, path)
    return path


def _error(capsys, *needles) -> str:
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("ecf8: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    return err


# --- outputs -------------------------------------------------------------------------------------

def test_an_output_that_is_the_input_is_refused_even_with_force(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = _model(tmp_path / "x.safetensors")
    before = src.read_bytes()
    os.link(src, tmp_path / "hard.safetensors")
    np.save(tmp_path / "w.npy", weights_like(4096, np.float16))
    (tmp_path / "w.ecf8").write_bytes(encoder.encode(weights_like(4096, np.float16)))
    for argv in (["compress", "-f", "x.safetensors", "-o", "x.safetensors"],
                 ["compress", "-f", "x.safetensors", "-o", "./sub/../x.safetensors"],
                 ["compress", "-f", "x.safetensors", "-o", "hard.safetensors"],
                 ["encode", "-f", "w.npy", "-o", "w.npy"],
                 ["decode", "-f", "w.ecf8", "-o", "w.ecf8"]):
        (tmp_path / "sub").mkdir(exist_ok=True)
        assert main(argv) == 1, argv
        _error(capsys, "is the input", "never writes over its input")
    assert src.read_bytes() == before
    compressed.compress_file(src, tmp_path / "c.safetensors", jobs=1, progress=False)
    assert main(["decompress", "-f", "c.safetensors", "-o", "c.safetensors"]) == 1
    _error(capsys, "is the input")


def test_an_output_naming_a_file_for_a_folder_is_refused(tmp_path, capsys, monkeypatch):
    """`compress FOLDER -o out.safetensors` made a folder named out.safetensors without a word."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    _model(tmp_path / "m" / "model.safetensors")
    for command in ("compress", "decompress"):
        assert main([command, "m", "-o", "out.safetensors"]) == 1
        _error(capsys, "m is a folder", "out.safetensors names one file", "as in out")
    assert sorted(os.listdir(tmp_path)) == ["m"]
    assert main(["compress", "-q", "m", "-o", "out"]) == 0


def test_an_output_naming_a_folder_for_a_file_is_refused(tmp_path, capsys, monkeypatch):
    """`-o newdir/` wrote a file named newdir; `-o existing_dir` said only 'is a directory'."""
    monkeypatch.chdir(tmp_path)
    _model(tmp_path / "x.safetensors")
    assert main(["compress", "x.safetensors", "-o", "newdir/"]) == 1
    _error(capsys, "newdir/ names a folder", "newdir/x.safetensors", "must exist")
    assert sorted(os.listdir(tmp_path)) == ["x.safetensors"]
    (tmp_path / "out").mkdir()
    assert main(["compress", "x.safetensors", "-o", "out"]) == 1
    _error(capsys, "out is a folder", "out/x.safetensors")
    assert main(["compress", "-q", "x.safetensors", "-o", "out/"]) == 1     # into it: give the name
    capsys.readouterr()
    assert main(["compress", "-q", "x.safetensors", "-o", "out/x.safetensors"]) == 0
    assert os.listdir(tmp_path / "out") == ["x.safetensors"]


def test_folder_outputs_and_force_say_one_thing(tmp_path, capsys, monkeypatch):
    """Without -f the message said 'use -f', with -f 'never replaced, even with -f'."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    _model(tmp_path / "m" / "a.safetensors")
    assert main(["compress", "-q", "m", "-o", "mc"]) == 0
    first = [_error(capsys, "never replaced, even with -f", "remove it first")
             for argv in (["compress", "m", "-o", "mc"], ["compress", "-f", "m", "-o", "mc"])
             if main(argv) == 1]
    assert len(first) == 2 and first[0] == first[1] and "use -f" not in first[0]
    (tmp_path / "empty").mkdir()                  # an empty folder is no output to replace
    assert main(["compress", "-q", "m", "-o", "empty"]) == 0
    assert os.listdir(tmp_path / "empty") == ["a.safetensors"]
    assert "never" in ecf8.cli._parser()._subparsers._group_actions[0].choices["compress"].format_help()


def test_device_errors_list_every_valid_device(tmp_path, capsys):
    src = _model(tmp_path / "x.safetensors")
    assert main(["compress", str(src), "-o", str(tmp_path / "c.safetensors"), "--device", "tpu"]) == 1
    _error(capsys, "--device must be cpu, cuda or cuda:N, not 'tpu'")
    with pytest.raises(ecf8.UnsupportedError, match="'cpu'"):      # the library says it too
        compressed.compress_file(src, tmp_path / "c.safetensors", jobs=1, progress=False, device="tpu")
    assert not (tmp_path / "c.safetensors").exists()


# --- messages that point to the right command --------------------------------------------------

def test_plain_files_point_to_the_right_command(tmp_path, capsys):
    src = _model(tmp_path / "x.safetensors")
    for cmd in ("info", "verify"):
        assert main([cmd, str(src)]) == 1
        _error(capsys, f"{src}: a plain safetensors file", "`ecf8 compress`", "`ecf8 analyze`")
    assert main(["decompress", str(src), "-o", str(tmp_path / "r.safetensors")]) == 1
    _error(capsys, f"{src}: a plain safetensors file", "`ecf8 compress`")
    assert not (tmp_path / "r.safetensors").exists()
    compressed.compress_file(src, tmp_path / "c.safetensors", jobs=1, progress=False)
    assert main(["decode", str(tmp_path / "c.safetensors"), "-o", str(tmp_path / "x.npy")]) == 1
    _error(capsys, "not an ECF8 frame", "`ecf8 decompress`")
    assert main(["decode", str(src), "-o", str(tmp_path / "x.npy")]) == 1
    _error(capsys, "`ecf8 decompress`")
    assert not (tmp_path / "x.npy").exists()


def test_a_broken_compressed_file_is_not_called_plain(tmp_path, capsys):
    src = _model(tmp_path / "x.safetensors")
    compressed.compress_file(src, tmp_path / "c.safetensors", jobs=1, progress=False)
    raw = bytearray((tmp_path / "c.safetensors").read_bytes())
    at = raw.index(b"ecf8.safetensors")
    raw[at] ^= 0x20                                  # an unknown format in the ecf8 metadata
    (tmp_path / "c.safetensors").write_bytes(bytes(raw))
    for cmd in ("info", "verify"):
        assert main([cmd, str(tmp_path / "c.safetensors")]) == 1
        err = capsys.readouterr().err
        assert "plain" not in err and "c.safetensors" in err


# --- a reader that leaves ----------------------------------------------------------------------

@pytest.mark.skipif(not hasattr(signal, "SIGPIPE"), reason="POSIX pipes")
@pytest.mark.parametrize("cmd", ["info", "verify", "analyze"])
def test_a_closed_pipe_ends_quietly_with_the_sigpipe_status(tmp_path, cmd):
    """`ecf8 info ... | head`: no 'Broken pipe' line, and the status of a command SIGPIPE ended.
    (Each command prints well over a pipe's 64 KiB, so it must still be writing when the reader goes.)"""
    if cmd == "analyze":
        many = {f"t{i}": weights_like(16, np.float16, i) for i in range(1000)}
        args = [str(write_safetensors(many, tmp_path / "many.safetensors") or tmp_path / "many.safetensors")]
    else:
        (tmp_path / "m").mkdir()
        for i in range(3):
            compressed.compress_file(_model(tmp_path / f"{i}.safetensors", i), tmp_path / "m" / f"{i}.safetensors",
                                jobs=1, progress=False)
        args = [str(tmp_path / "m")] * 1000
    proc = subprocess.Popen([sys.executable, "-m", "ecf8", cmd, "-q", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=child_env())
    proc.stdout.readline()
    proc.stdout.close()                             # the reader leaves after one line, as head does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 128 + signal.SIGPIPE
    assert err == ""


# --- info ------------------------------------------------------------------------------------

def test_info_of_a_folder_prints_its_total_and_json_says_the_same(tmp_path, capsys):
    (tmp_path / "m" / "sub").mkdir(parents=True)
    sizes = []
    for rel in ("a.safetensors", "sub/b.safetensors"):
        plain = _model(tmp_path / rel.replace("/", "_"), seed=len(sizes))
        compressed.compress_file(plain, tmp_path / "m" / rel, jobs=1, progress=False)
        sizes.append(sum(r.stored_bytes for r in compressed.inspect_file(tmp_path / "m" / rel)))
    frame = tmp_path / "w.ecf8"
    frame.write_bytes(encoder.encode(weights_like(4096, np.float16)))
    orig = 2 * (64 * 64 * 2 + 32 * 32 * 2 + 300 * 8)
    assert main(["info", str(tmp_path / "m"), str(frame)]) == 0
    lines = capsys.readouterr().out.splitlines()
    total = next(line for line in lines if line.startswith(f"{tmp_path / 'm'}:"))
    assert total == (f"{tmp_path / 'm'}: 2 files, 6 tensors, {orig:,} -> {sum(sizes):,} tensor bytes "
                     f"({1 - sum(sizes) / orig:.1%} saved)")
    assert lines[-1].startswith(f"{frame}: F16 (4096,)")
    assert main(["info", "--json", str(tmp_path / "m"), str(frame)]) == 0
    doc = json.loads(capsys.readouterr().out)
    folder, f = doc["inputs"]
    assert doc["errors"] == [] and folder["kind"] == "folder" and f["kind"] == "frame"
    assert folder["total"] == {"files": 2, "tensors": 6, "original_bytes": orig, "stored_bytes": sum(sizes),
                               "saving": 1 - sum(sizes) / orig}
    assert [x["path"] for x in folder["files"]] == [str(tmp_path / "m" / "a.safetensors"),
                                                    str(tmp_path / "m" / "sub" / "b.safetensors")]
    w = next(t for t in folder["files"][0]["tensors"] if t["name"] == "w")
    assert w == {"name": "w", "dtype": "BF16", "shape": [64, 64], "codec": "ecf8", "original_bytes": 8192,
                 "stored_bytes": w["stored_bytes"]} and w["stored_bytes"] < 8192
    assert f["original_bytes"] == 8192 and f["stored_bytes"] == frame.stat().st_size


def test_info_json_lists_errors_and_fails(tmp_path, capsys):
    src = _model(tmp_path / "x.safetensors")
    compressed.compress_file(src, tmp_path / "c.safetensors", jobs=1, progress=False)
    assert main(["info", "--json", str(tmp_path / "c.safetensors"), str(src), str(tmp_path / "nope")]) == 1
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert [x["path"] for x in doc["inputs"]] == [str(tmp_path / "c.safetensors")]
    assert len(doc["errors"]) == 2 and err.count("ecf8: error:") == 2
    assert "plain safetensors" in doc["errors"][0] and "nope" in doc["errors"][1]


# --- -q everywhere --------------------------------------------------------------------------------

def test_quiet_leaves_only_results(tmp_path, capsys):
    src = _model(tmp_path / "x.safetensors")
    np.save(tmp_path / "w.npy", weights_like(4096, np.float16))
    for argv in (["compress", str(src), "-o", str(tmp_path / "c.safetensors")],
                 ["decompress", str(tmp_path / "c.safetensors"), "-o", str(tmp_path / "d.safetensors")],
                 ["encode", str(tmp_path / "w.npy"), "-o", str(tmp_path / "w.ecf8")],
                 ["decode", str(tmp_path / "w.ecf8"), "-o", str(tmp_path / "w2.npy")]):
        assert main([argv[0], "-q", *argv[1:]]) == 0
        assert capsys.readouterr() == ("", ""), argv
    assert main(["analyze", "-q", str(tmp_path / "c.safetensors")]) == 0    # a compressed input
    out, err = capsys.readouterr()
    assert err == "" and "note:" not in out and out.startswith("tensor ")
    assert main(["analyze", str(tmp_path / "c.safetensors")]) == 0
    assert capsys.readouterr().out.startswith("note: ")


def test_every_command_takes_quiet_and_then_prints_only_its_results(tmp_path, capsys):
    """Every subcommand the parser has, so that a new one without -q fails here."""
    src = _model(tmp_path / "x.safetensors")
    compressed.compress_file(src, tmp_path / "c.safetensors", jobs=1, progress=False)
    np.save(tmp_path / "w.npy", weights_like(4096, np.float16))
    (tmp_path / "w.ecf8").write_bytes(encoder.encode(weights_like(4096, np.float16)))
    args = {"compress": [str(src), "-o", str(tmp_path / "c2.safetensors")],
            "decompress": [str(tmp_path / "c.safetensors"), "-o", str(tmp_path / "d.safetensors")],
            "encode": [str(tmp_path / "w.npy"), "-o", str(tmp_path / "w2.ecf8")],
            "decode": [str(tmp_path / "w.ecf8"), "-o", str(tmp_path / "w2.npy")],
            "info": [str(tmp_path / "c.safetensors")], "verify": [str(tmp_path / "c.safetensors")],
            "analyze": [str(src)], "bench": [str(src), "--tensor", "w"]}
    commands = ecf8.cli._parser()._subparsers._group_actions[0].choices
    assert set(commands) == set(args)
    for name in commands:
        assert main([name, "-q", *args[name]]) == 0, name
        out, err = capsys.readouterr()
        assert err == "", (name, err)
        assert (out == "") == (name in ("compress", "decompress", "encode", "decode")), (name, out)


# --- analyze's wording -------------------------------------------------------------------------

def test_analyze_says_what_its_bounds_assume_and_holds_to_it(tmp_path, capsys):
    """achieved below 'ecf8 bound' (several code tables on a tensor whose scale changes along it)
    is explained in the table; with one table it never happens."""
    rng = np.random.default_rng(0)
    mixed = np.concatenate([rng.standard_normal(1 << 16) * 1e-3, rng.standard_normal(1 << 16) * 10])
    write_safetensors({"mixed": mixed.astype(ml_dtypes.bfloat16), "zeros": np.zeros(1000, ml_dtypes.bfloat16)},
                      tmp_path / "a.safetensors")
    rows = {}
    for tables in (1, 4):
        assert main(["analyze", "--json", "--max-tables", str(tables), str(tmp_path / "a.safetensors")]) == 0
        rows[tables] = {t["name"]: t for t in json.loads(capsys.readouterr().out)["tensors"]}
    one, four = rows[1]["mixed"], rows[4]["mixed"]
    assert one["achieved_bits_per_weight"] >= one["ecf8_bound_bits_per_weight"] >= one["order0_bound_bits_per_weight"]
    assert four["achieved_bits_per_weight"] < four["ecf8_bound_bits_per_weight"]
    assert main(["analyze", str(tmp_path / "a.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "least one code for the whole tensor can spend" in out and "--max-tables 1" in out
    assert "-0.000" not in out and " 0.000 " in out                 # the all-zero tensor: 0, not -0
    assert main(["analyze", str(tmp_path / "a.safetensors"), "--tensor", "mixed"]) == 0
    assert "one code for the whole tensor" in capsys.readouterr().out
    assert rows[4]["zeros"]["exponent_entropy_bits"] == 0.0
    assert str(rows[4]["zeros"]["exponent_entropy_bits"]) == "0.0"


def test_ordinals():
    from ecf8.analyze_cli import ordinal

    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 101, 111, 112)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "101st", "111th", "112th"]


def test_plot_axis_names_every_nth_in_english(tmp_path):
    pytest.importorskip("matplotlib")
    from ecf8.analysis import analyze_tensor
    from ecf8.analyze_cli import figure

    options = {"chunk_size": 32768, "max_tables": 4}
    reports = [analyze_tensor(f"t{i}", weights_like(512, np.float16, i), "F16", options) for i in range(70)]
    fig = figure(reports)
    assert "every 2nd named" in fig.axes[0].get_xlabel()
