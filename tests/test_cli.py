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
