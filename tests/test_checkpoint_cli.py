"""ecf8 info / verify: every input checked, every problem reported with its file and tensor, exit 1
on any; compressed folders accepted (issue 9, class 7)."""

import ml_dtypes
import numpy as np

from ecf8 import store
from ecf8.checkpoint import write_safetensors
from ecf8.cli import main
from checkpoint_helpers import header_of, patch, weights


def _packed(path, seed=0):
    plain = path.with_suffix(".plain")
    write_safetensors({"a": weights(4096, ml_dtypes.bfloat16, seed), "s": np.float32([1, 2, 3, 4]),
                       "t": np.float32([5, 6, 7, 8])}, plain)
    store.compress_file(plain, path, jobs=1)
    plain.unlink()
    return path


def _flip(path, name):
    header, start = header_of(path)
    a, _ = header[name]["data_offsets"]
    patch(path, start + a + 1, bytes([path.read_bytes()[start + a + 1] ^ 0x04]))


def test_info_refuses_a_file_it_cannot_account_for(tmp_path, capsys):
    path = _packed(tmp_path / "c.safetensors")
    path.write_bytes(path.read_bytes()[:-10])
    assert main(["info", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and str(path) in err


def test_verify_checks_every_input_and_reports_every_problem(tmp_path, capsys):
    good, bad, cut = (_packed(tmp_path / f"{n}.safetensors", k) for k, n in enumerate("abc"))
    _flip(bad, "s")
    _flip(bad, "t")
    cut.write_bytes(cut.read_bytes()[:100])
    assert main(["verify", str(good), str(bad), str(cut), "--quiet"]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"{good}: ok (3 tensors)"]
    lines = err.splitlines()
    assert len(lines) == 3 and all(line.startswith("ecf8: error: ") for line in lines)
    assert f"{bad}: tensor 's'" in lines[0] and f"{bad}: tensor 't'" in lines[1] and str(cut) in lines[2]


def test_info_and_verify_take_a_compressed_folder(tmp_path, capsys):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    for shard in ("one.safetensors", "sub/two.safetensors"):
        write_safetensors({"w": weights(4096, ml_dtypes.bfloat16)}, src / shard)
    (src / "config.json").write_text("{}")
    assert main(["compress", str(src), "-o", str(tmp_path / "c"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "one.safetensors" in out and "sub/two.safetensors" in out
    assert main(["verify", str(tmp_path / "c"), "--quiet"]) == 0
    assert capsys.readouterr().out.count("ok (1 tensors)") == 2
