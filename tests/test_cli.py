"""The ecf8 command on .npy files: round trip, info, clean one-line errors, atomic output."""

import numpy as np

from ecf8.cli import main
from helpers import DTYPES, bits, weights_like


def test_encode_decode_info(tmp_path, capsys):
    x = weights_like(40_000, DTYPES[2]).reshape(200, 200)
    np.save(tmp_path / "w.npy", x)                         # saved as raw 'V2' by NumPy
    assert main(["encode", str(tmp_path / "w.npy"), "-o", str(tmp_path / "w.ecf8"), "--dtype", "bf16"]) == 0
    assert main(["info", str(tmp_path / "w.ecf8")]) == 0
    assert "BF16 (200, 200)" in capsys.readouterr().out
    assert main(["decode", str(tmp_path / "w.ecf8"), "-o", str(tmp_path / "out.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), bits(x))


def test_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "junk.ecf8").write_bytes(b"not a frame")
    np.save(tmp_path / "raw.npy", np.zeros(4, np.uint8))
    for argv in (["info", str(tmp_path / "junk.ecf8")], ["info", str(tmp_path / "missing")],
                 ["encode", str(tmp_path / "raw.npy"), "-o", str(tmp_path / "x.ecf8")]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("ecf8: error:") and err.count("\n") == 1
    assert not (tmp_path / "x.ecf8").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


# --- conventions shared by every command ---------------------------------------------

import argparse
import os
import subprocess
import sys

import ml_dtypes
import pytest

import ecf8
from ecf8 import cli, progress
from ecf8.safetensors_io import write_safetensors


def _checkpoint(path, fp8=True, seed=0):
    tensors = {"w": np.random.default_rng(seed).standard_normal((64, 64)).astype(np.float32),
               "ids": np.arange(500, dtype=np.int64)}
    if fp8:
        tensors["layer.0.weight"] = weights_like(128 * 128, ml_dtypes.float8_e4m3fn).reshape(128, 128)
    write_safetensors(tensors, path)
    return path


def test_version_and_python_dash_m(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"ecf8 {ecf8.__version__}"
    out = subprocess.run([sys.executable, "-m", "ecf8", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"ecf8 {ecf8.__version__}"
    out = subprocess.run([sys.executable, "-m", "ecf8", "info", "/nonexistent.ecf8"], capture_output=True,
                         text=True)
    assert out.returncode == 1 and out.stderr.startswith("ecf8: error:")


def test_every_argument_has_help():
    parser = cli._parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"compress", "decompress", "info", "verify", "analyze", "bench", "encode", "decode"} <= set(sub.choices)
    for name, p in sub.choices.items():
        assert p.description, name
        for action in p._actions:
            assert action.help, f"ecf8 {name} {action.option_strings or action.dest} has no help"
        assert "-q" in p._option_string_actions, f"ecf8 {name} has no -q"


def test_commands_that_write_refuse_to_overwrite_without_force(tmp_path, capsys):
    src = _checkpoint(tmp_path / "m.safetensors")
    np.save(tmp_path / "w.npy", weights_like(4096, ml_dtypes.float8_e4m3fn).view(np.uint8))
    assert main(["compress", str(src), "-o", str(tmp_path / "c.safetensors"), "-j", "1"]) == 0
    assert main(["encode", str(tmp_path / "w.npy"), "--dtype", "e4m3", "-o", str(tmp_path / "w.ecf8")]) == 0
    runs = [["compress", str(src), "-o", str(tmp_path / "c.safetensors"), "-j", "1"],
            ["decompress", str(tmp_path / "c.safetensors"), "-o", str(tmp_path / "r.safetensors")],
            ["encode", str(tmp_path / "w.npy"), "--dtype", "e4m3", "-o", str(tmp_path / "w.ecf8")],
            ["decode", str(tmp_path / "w.ecf8"), "-o", str(tmp_path / "w2.npy")]]
    if _has_matplotlib():
        runs.append(["analyze", str(src), "--plot", str(tmp_path / "p.png")])
    for argv in runs:
        out = tmp_path / argv[argv.index("-o") + 1 if "-o" in argv else -1]
        out.write_bytes(b"precious")
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("ecf8: error:") and "exists" in err and "--force" in err and str(out) in err
        assert out.read_bytes() == b"precious"
        assert main(argv + ["-f"]) == 0, argv
        assert out.read_bytes() != b"precious"
    assert main(["decompress", str(tmp_path / "c.safetensors"), "-o", str(tmp_path / "r.safetensors"),
                 "-f"]) == 0
    assert (tmp_path / "r.safetensors").read_bytes() == src.read_bytes()


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_jobs_validated(tmp_path, capsys):
    src = _checkpoint(tmp_path / "m.safetensors")
    for bad in ("-1", "two", "1.5"):
        with pytest.raises(SystemExit) as e:
            main(["compress", str(src), "-o", str(tmp_path / "c.safetensors"), "--jobs", bad])
        assert e.value.code == 2 and "--jobs" in capsys.readouterr().err
    assert cli._jobs("0") == (os.cpu_count() or 1) and cli._jobs("3") == 3
    assert not (tmp_path / "c.safetensors").exists()
    assert main(["compress", str(src), "-o", str(tmp_path / "c.safetensors"), "--jobs", "0"]) == 0


def test_compress_reports_sizes_and_when_only_zstd_acted(tmp_path, capsys):
    fp8 = _checkpoint(tmp_path / "fp8.safetensors")
    assert main(["compress", str(fp8), "-o", str(tmp_path / "a.safetensors"), "-j", "1"]) == 0
    out = capsys.readouterr().out
    before, after = fp8.stat().st_size, (tmp_path / "a.safetensors").stat().st_size
    assert f"{before:,} -> {after:,} file bytes ({1 - after / before:.1%} saved)" in out
    assert "nothing was entropy-coded" not in out
    f32 = _checkpoint(tmp_path / "f32.safetensors", fp8=False)
    sizes = {}
    for level in ("1", "19"):
        dst = tmp_path / f"b{level}.safetensors"
        assert main(["compress", str(f32), "-o", str(dst), "-j", "1", "--zstd-level", level]) == 0
        out = capsys.readouterr().out
        assert "nothing was entropy-coded" in out and f"only zstandard (level {level}) acted" in out
        sizes[level] = dst.stat().st_size
    assert sizes["1"] != sizes["19"]          # the level reaches the compressor
    with pytest.raises(SystemExit):
        main(["compress", str(f32), "-o", str(tmp_path / "x"), "--zstd-level", "23"])


def test_quiet_prints_nothing_but_results_and_errors(tmp_path, capsys):
    src = _checkpoint(tmp_path / "m.safetensors")
    np.save(tmp_path / "w.npy", weights_like(4096, ml_dtypes.bfloat16).view(np.uint16))
    for argv in (["compress", str(src), "-o", str(tmp_path / "c.safetensors"), "-j", "1"],
                 ["decompress", str(tmp_path / "c.safetensors"), "-o", str(tmp_path / "r.safetensors")],
                 ["encode", str(tmp_path / "w.npy"), "--dtype", "bf16", "-o", str(tmp_path / "w.ecf8")],
                 ["decode", str(tmp_path / "w.ecf8"), "-o", str(tmp_path / "w2.npy")]):
        assert main(argv + ["-q"]) == 0
        assert capsys.readouterr() == ("", ""), argv
    assert (tmp_path / "r.safetensors").read_bytes() == src.read_bytes()
    assert main(["verify", "-q", str(tmp_path / "c.safetensors"), str(tmp_path / "w.ecf8")]) == 0
    assert capsys.readouterr() == (f"{tmp_path / 'c.safetensors'}: ok (3 tensors)\n"
                                   f"{tmp_path / 'w.ecf8'}: ok (1 frame)\n", "")


def test_one_progress_bar_over_a_multi_file_job(tmp_path, monkeypatch):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):
        _checkpoint(shards / f"model-{i}.safetensors", seed=i)
    bars = []
    real_init = progress.Bar.__init__

    def spy(self, total, label, enabled=None):
        real_init(self, total, label, True if enabled is None else enabled)
        bars.append((total, label, self.enabled))

    monkeypatch.setattr(progress.Bar, "__init__", spy)
    assert main(["compress", str(shards), "-o", str(tmp_path / "out"), "-j", "1"]) == 0
    shown = [b for b in bars if b[2]]
    data = sum(e.array.nbytes for f in sorted(shards.iterdir()) for e in cli.iter_tensors(f))
    assert shown == [(data, "compress", True)]           # one bar, the whole job's bytes
    bars.clear()
    assert main(["verify", *map(str, sorted((tmp_path / "out").iterdir()))]) == 0
    assert [b[0] for b in bars if b[2]] == [data]


def test_progress_bar_counts_every_file_of_a_job(capsys):
    with progress.job(300, "job", enabled=True) as bar:
        for size in (100, 200):
            p = progress._Progress(size, "file", None)
            p.advance(size, "tensor")
            p.close()
        assert bar._bar.n == 300
    assert "job" in capsys.readouterr().err
    p = progress._Progress(50, "alone", False)          # outside a job: its own (disabled) bar
    p.advance(50)
    assert p._bar._bar.n == 0 and not p._bar.enabled


def test_messages_name_the_file_and_tensor(tmp_path, capsys):
    np.save(tmp_path / "f.npy", np.zeros(8, np.float32))
    assert main(["encode", str(tmp_path / "f.npy"), "-o", str(tmp_path / "f.ecf8")]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "f.npy") in err and "float32" in err
    (tmp_path / "j.ecf8").write_bytes(b"ECF8" + bytes(60))
    assert main(["decode", str(tmp_path / "j.ecf8"), "-o", str(tmp_path / "j.npy")]) == 1
    assert str(tmp_path / "j.ecf8") in capsys.readouterr().err
    np.savez(tmp_path / "z.npz", a=np.zeros(8, np.float16))
    for wrong in (tmp_path / "j.ecf8", tmp_path / "z.npz"):      # not a .npy: one line naming it
        assert main(["encode", str(wrong), "-o", str(tmp_path / "w.ecf8")]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(wrong) in err and "allow_pickle" not in err
        assert not (tmp_path / "w.ecf8").exists()
    src = _checkpoint(tmp_path / "m.safetensors")
    raw = bytearray(src.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    raw[8 : 8 + n] = raw[8 : 8 + n].replace(b'"dtype":"I64"', b'"dtype":"X64"')
    (tmp_path / "bad.safetensors").write_bytes(raw)
    assert main(["analyze", str(tmp_path / "bad.safetensors")]) == 0     # any dtype, as compress
    assert "X64" in capsys.readouterr().out
    assert main(["analyze", str(tmp_path / "bad.safetensors"), "--tensor", "nosuch"]) == 1
    err = capsys.readouterr().err
    assert "bad.safetensors" in err and "nosuch" in err


def test_no_temporary_file_name_leaks(tmp_path, capsys):
    src = _checkpoint(tmp_path / "m.safetensors")
    np.save(tmp_path / "w.npy", weights_like(64, ml_dtypes.bfloat16).view(np.uint16))
    for argv in (["compress", str(src), "-o", str(tmp_path / "no" / "c.safetensors")],
                 ["encode", str(tmp_path / "w.npy"), "--dtype", "bf16", "-o", str(tmp_path / "no" / "w.ecf8")]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert str(tmp_path / "no") in err and ".tmp" not in err
    assert list(tmp_path.glob("**/*.tmp")) == []
    e = FileNotFoundError(2, "No such file or directory", "/data/.model.safetensors.k2j_x9q.tmp")
    assert cli._message(e) == "/data/model.safetensors: no such file"
    e = ecf8.ECF8Error("/d/.x.safetensors.plain.tmp: tensor 'a' is bad")
    assert cli._message(e) == "/d/x.safetensors: tensor 'a' is bad"


def test_coding_options_validated_before_any_work(tmp_path, capsys):
    src = _checkpoint(tmp_path / "m.safetensors")
    for opt, bad in (("--chunk-size", "1000"), ("--chunk-size", "256"), ("--chunk-size", str(1 << 21)),
                     ("--max-tables", "0"), ("--max-tables", "9")):
        for cmd in ("compress", "analyze", "bench"):
            argv = [cmd, str(src), opt, bad] + (["-o", str(tmp_path / "c.safetensors")] if cmd == "compress" else [])
            with pytest.raises(SystemExit) as e:
                main(argv)
            assert e.value.code == 2 and opt in capsys.readouterr().err
    assert not (tmp_path / "c.safetensors").exists()
    assert main(["compress", str(src), "-o", str(tmp_path / "c.safetensors"), "--chunk-size", "512",
                 "--max-tables", "8", "-q"]) == 0


def _plain(path, seed=0):
    from ecf8.safetensors_io import write_safetensors

    write_safetensors({"w": weights_like(5000, DTYPES[2], seed=seed).reshape(50, 100)}, path)


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ecf8: error: "), err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def test_newcomer_rough_edges(tmp_path, capsys, monkeypatch):
    """What a new user hit: an output folder inside the input folder, -f on an existing folder,
    missing files in info/verify, compress's sizes, a doubled error prefix."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m" / "sub").mkdir(parents=True)
    _plain(tmp_path / "m" / "sub" / "a.safetensors")
    assert main(["compress", "-q", "m", "-o", "m/out"]) == 1
    _one_error_line(capsys, "inside the input folder")
    assert not (tmp_path / "m" / "out").exists()
    assert main(["compress", "-q", "m", "-o", "mc"]) == 0
    assert main(["compress", "-q", "-f", "m", "-o", "mc"]) == 1
    _one_error_line(capsys, "remove it first")
    for cmd in ("info", "verify"):
        assert main([cmd, "nope.safetensors"]) == 1
        _one_error_line(capsys, "nope.safetensors: no such file")
    assert main(["decode", "nope.ecf8", "-o", "nope.npy"]) == 1
    _one_error_line(capsys, "nope.ecf8: no such file")
    np.save(tmp_path / "a.npy", np.zeros(4, np.uint8))
    (tmp_path / "j.json").write_text('{"a": 1}')
    for name, what in (("a.npy", "`ecf8 encode`"), ("j.json", "JSON")):
        assert main(["compress", name, "-o", "out.safetensors"]) == 1
        _one_error_line(capsys, f"{name}: not a safetensors file", what)
    _plain(tmp_path / "x.safetensors")
    before = (tmp_path / "x.safetensors").stat().st_size
    assert main(["compress", "x.safetensors", "-o", "y.safetensors"]) == 0
    assert capsys.readouterr().out.startswith(f"x.safetensors: {before:,} -> ")
    blob = bytearray((tmp_path / "y.safetensors").read_bytes())
    blob[-200] ^= 1                                    # inside the coded tensor's frame
    (tmp_path / "y.safetensors").write_bytes(bytes(blob))
    assert main(["verify", "y.safetensors"]) == 1
    err = capsys.readouterr().err
    assert err.count("tensor 'w'") == err.count("\n") >= 1


def test_jobs_default_is_all_cores():
    """argparse runs type= only on string defaults: the default must become the core count."""
    import os

    from ecf8.cli import _parser

    args = _parser().parse_args(["compress", "in.safetensors", "-o", "out.safetensors"])
    assert args.jobs == (os.cpu_count() or 1)


def test_ctrl_c_during_start_up_is_one_line_and_130():
    """A Ctrl-C while the command is still importing NumPy and the codec (stood in for by a
    KeyboardInterrupt raised at the import of numpy) prints one line and exits 130."""
    import subprocess
    import sys

    code = ("import sys, importlib.abc\n"
            "class Interrupt(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name == 'numpy':\n"
            "            raise KeyboardInterrupt\n"
            "sys.meta_path.insert(0, Interrupt())\n"
            "from ecf8.__main__ import main\n"
            "main()\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 130
    assert run.stderr.strip() == "ecf8: interrupted"
