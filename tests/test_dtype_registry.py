"""The dtype registry: format.DTYPES is the one list of coded dtypes; every other table derives from
it, and both CUDA kernels instantiate exactly its entries."""

import re
from pathlib import Path

import numpy as np

from ecf8 import format as fmt
from ecf8 import names

CUDA = Path(__file__).resolve().parents[1] / "cuda"


def instantiated(source: str, kernel: str) -> set[str]:
    """Template arguments "bytes, E, M" of every explicit instantiation of `kernel` in a .cu file
    (``template __global__ void kernel<...>`` lines and the ECF8_CODE_INST macro's uses)."""
    text = (CUDA / source).read_text()
    args = set(re.findall(rf"template __global__ void {kernel}<(\d+), (\d+), (\d+)>\(", text))
    if kernel == "ecf8_code":
        uses = re.findall(r"ECF8_CODE_INST\((\d+), (\d+), (\d+), (true|false)\)", text)
        assert {w for *_, w in uses} == {"true", "false"}
        for b, e, m, _ in uses:
            assert (b, e, m, "true") in uses and (b, e, m, "false") in uses
        args = {(b, e, m) for b, e, m, _ in uses}
    return {", ".join(a) for a in args}


def test_kernel_instantiations_agree_with_the_registry():
    want = {spec.kernel_args for spec in fmt.DTYPES.values()}
    assert instantiated("ecf8_decode.cu", "ecf8_decode") == want
    assert instantiated("ecf8_encode.cu", "ecf8_hist") == want
    assert instantiated("ecf8_encode.cu", "ecf8_code") == want


def test_registry_entries_are_consistent():
    assert sorted(fmt.DTYPES) == list(range(1, len(fmt.DTYPES) + 1))
    for code, spec in fmt.DTYPES.items():
        assert spec.code == code and spec.bits == 8 * spec.dtype.itemsize
        assert 1 + spec.exp_bits + spec.man_bits == spec.bits
        assert np.dtype(spec.uint).itemsize == spec.dtype.itemsize
        assert fmt.spec_for_name(spec.name) is spec and fmt.spec_for_dtype(spec.dtype) is spec
        assert names.dtype_spec(spec.short) is spec and names.short_name(spec) == spec.short
    assert fmt.CODED_NAMES == {s.name for s in fmt.DTYPES.values()}
    assert len({s.short for s in fmt.DTYPES.values()}) == len({s.dlpack for s in fmt.DTYPES.values()}) == 4


def test_derived_tables_follow_the_registry():
    from ecf8.safetensors_io import DTYPE_NAMES
    from ecf8.decoder_cuda import DLPACK_CODES, KERNEL_NAMES
    from ecf8.compressed_reader import CODED

    assert set(CODED) == fmt.CODED_NAMES
    assert all(DTYPE_NAMES[s.name] == s.dtype for s in fmt.DTYPES.values())
    assert KERNEL_NAMES == {c: f"ecf8_decode<{s.kernel_args}>" for c, s in fmt.DTYPES.items()}
    assert DLPACK_CODES == {s.dtype.name: s.dlpack for s in fmt.DTYPES.values()}
