"""Bad input: every truncation and bit flip, hostile headers and unsupported input raise ECF8Error."""

import struct
import zlib

import numpy as np
import pytest

import ecf8
from ecf8 import format as fmt
from helpers import DTYPES, garbage_payload, weights_like


@pytest.fixture(scope="module", params=["coded", "stored"])
def blob(request):
    if request.param == "coded":
        x = weights_like(1100, DTYPES[0]).reshape(11, 100)
        b = ecf8.encode(x, chunk_size=512, max_tables=2, allow_stored=False)
        assert ecf8.info(b).chunks == 3
    else:
        u = np.random.default_rng(0).integers(0, 65536, 300).astype(np.uint16)
        b = ecf8.encode(u.view(DTYPES[2]))
        assert ecf8.info(b).stored
    return b


def test_every_truncation(blob):
    for cut in range(len(blob)):
        with pytest.raises(ecf8.ECF8Error):
            ecf8.decode(blob[:cut])
    with pytest.raises(ecf8.ECF8Error):
        ecf8.decode(blob + b"\0")


def test_every_single_bit_flip(blob):
    reference = ecf8.decode(blob)
    data = bytearray(blob)
    for i in range(len(data) * 8):
        data[i // 8] ^= 1 << (i % 8)
        with pytest.raises(ecf8.ECF8Error):
            ecf8.decode(data)
        data[i // 8] ^= 1 << (i % 8)
    np.testing.assert_array_equal(ecf8.decode(bytes(data)).view(np.uint8), reference.view(np.uint8))


def _reheader(blob: bytes, **fields) -> bytes:
    """Rewrite header fields and fix the header checksum, as a hostile encoder would."""
    frame = fmt.parse(memoryview(blob))
    names = ["magic", "version", "dtype", "mode", "ndim", "chunk_log2", "ntables", "rsv", "words", "n"]
    values = dict(zip(names, fmt.HEADER.unpack_from(blob)))
    values.update(fields)
    head = bytearray(blob[: frame.payload_offset])
    fmt.HEADER.pack_into(head, 0, *[values[k] for k in names])
    if "shape" in values:
        head[24 : 24 + 8 * len(values["shape"])] = np.array(values["shape"], "<u8").tobytes()
    struct.pack_into("<I", head, len(head) - 4, zlib.crc32(head[:-4]))
    return bytes(head) + blob[frame.payload_offset :]


def test_absurd_sizes_rejected_before_allocation():
    x = weights_like(1100, DTYPES[0]).reshape(11, 100)
    blob = ecf8.encode(x, chunk_size=512, allow_stored=False)
    huge = _reheader(blob, n=1 << 40, shape=[1 << 40, 1])
    for bad in (huge, _reheader(blob, n=(1 << 41), shape=[1 << 41, 1]),
                _reheader(blob, words=0xFFFFFFFF), _reheader(blob, n=1099, shape=[11, 100])):
        with pytest.raises(ecf8.CorruptDataError):
            ecf8.decode(bad)
        with pytest.raises(ecf8.CorruptDataError):
            ecf8.info(bad)


@pytest.mark.parametrize("field,value", [("version", 0), ("version", 3), ("dtype", 9), ("mode", 2), ("ndim", 9),
                                         ("chunk_log2", 8), ("chunk_log2", 21), ("ntables", 0),
                                         ("ntables", 9), ("rsv", 1)])
def test_invalid_header_fields(field, value):
    blob = ecf8.encode(weights_like(1100, DTYPES[0]).reshape(11, 100), chunk_size=512,
                       allow_stored=False)
    with pytest.raises(ecf8.ECF8Error):
        ecf8.decode(_reheader(blob, **{field: value}))


def _splice(head_of: bytes, payload_of: bytes) -> bytes:
    """The header of one frame with the payload (and payload checksum) of another."""
    cut = fmt.parse(memoryview(head_of)).payload_offset
    assert cut == fmt.parse(memoryview(payload_of)).payload_offset
    return head_of[:cut] + payload_of[cut:]


def test_header_of_one_frame_with_payload_of_another():
    """Both checksums authentic on their own: v2 binds the payload checksum to the header."""
    bits = np.random.default_rng(1).integers(0, 65536, 100).astype(np.uint16)
    a = ecf8.encode(bits.view(DTYPES[2]))           # BF16, stored
    b = ecf8.encode(bits[::-1].copy().view(DTYPES[3]))   # FP16, stored, same layout
    c = ecf8.encode(weights_like(2048, DTYPES[0]), chunk_size=512, allow_stored=False)
    d = ecf8.encode(weights_like(2048, DTYPES[0], seed=5), chunk_size=512, allow_stored=False)
    for head_of, payload_of in ((a, b), (b, a), (c, d)):
        if len(head_of) != len(payload_of):
            continue
        with pytest.raises(ecf8.CorruptDataError, match="payload checksum"):
            ecf8.decode(_splice(head_of, payload_of))


def test_version_1_payload_checksum_is_unseeded():
    """A v1 frame (payload CRC not seeded) decodes; the same bytes labelled v2 do not."""
    x = weights_like(3000, DTYPES[0])
    v2 = ecf8.encode(x, chunk_size=512, allow_stored=False)
    frame = fmt.parse(memoryview(v2))
    v1 = bytearray(_reheader(v2, version=1))
    struct.pack_into("<I", v1, len(v1) - 4, zlib.crc32(bytes(v1[frame.payload_offset : -4])))
    np.testing.assert_array_equal(ecf8.decode(bytes(v1)).view(np.uint8), x.view(np.uint8))
    relabelled = _reheader(bytes(v1), version=2)
    with pytest.raises(ecf8.CorruptDataError, match="payload checksum"):
        ecf8.decode(relabelled)


@pytest.mark.parametrize("shape", [[0, 1 << 63], [1 << 41, 0], [1 << 21, 1 << 20, 0], [0, (1 << 64) - 1]])
def test_empty_frame_with_absurd_extents(shape):
    """0 elements, but extents no array library can hold: CorruptDataError, not ValueError."""
    head = fmt.build_header(fmt.DTYPES[3], fmt.MODE_STORED, tuple(shape), 0, None, None, None, 0)
    pad = bytes(fmt.align16(len(head)) - len(head))
    bad = head + pad + struct.pack("<I", zlib.crc32(pad, fmt.header_crc(head)))
    ok = fmt.build_header(fmt.DTYPES[3], fmt.MODE_STORED, (0, 1 << 40), 0, None, None, None, 0)
    pad = bytes(fmt.align16(len(ok)) - len(ok))
    assert ecf8.decode(ok + pad + struct.pack("<I", zlib.crc32(pad, fmt.header_crc(ok)))).shape == (0, 1 << 40)
    with pytest.raises(ecf8.CorruptDataError):
        ecf8.decode(bad)
    with pytest.raises(ecf8.CorruptDataError):
        ecf8.info(bad)


def test_encoder_refuses_shapes_the_format_cannot_hold():
    with pytest.raises(ecf8.UnsupportedError):
        ecf8.encode(np.zeros((1,) * 9, DTYPES[0]))
    with pytest.raises(ecf8.UnsupportedError):
        ecf8.encode(np.zeros((1 << 41, 0), DTYPES[0]))


def test_invalid_code_table_and_chunk_index():
    blob = bytearray(ecf8.encode(weights_like(1100, DTYPES[0]), chunk_size=512, max_tables=1,
                                 allow_stored=False))
    frame = fmt.parse(memoryview(bytes(blob)))
    tables_at = 24 + 8 * len(frame.shape)
    cases = []
    over_kraft = bytearray(blob)
    over_kraft[tables_at : tables_at + 128] = bytes([0x11]) * 128          # 256 codes of 1 bit
    cases.append(over_kraft)
    bad_table_id = bytearray(blob)
    bad_table_id[tables_at + 128] = 1                                       # only table 0 exists
    cases.append(bad_table_id)
    decreasing = bytearray(blob)
    idx_at = tables_at + 128 + frame.nchunks
    struct.pack_into("<I", decreasing, idx_at + 4, frame.exp_words + 1)    # past the stream
    cases.append(decreasing)
    for case in cases:
        end = frame.payload_offset - 4
        struct.pack_into("<I", case, end, zlib.crc32(bytes(case[:end])))
        with pytest.raises(ecf8.CorruptDataError):
            ecf8.decode(bytes(case))


def test_verify_off_decodes_garbage_payload_without_crashing():
    """Checksums off: a garbage payload gives garbage elements, never a crash or hang."""
    x = weights_like(50_000, DTYPES[0])
    blob = garbage_payload(ecf8.encode(x, chunk_size=1024))
    with pytest.raises(ecf8.CorruptDataError):
        ecf8.decode(blob)
    y = ecf8.decode(blob, verify=False)
    assert y.shape == x.shape and y.dtype == x.dtype


def test_not_a_frame():
    for junk in (b"", b"ECF", b"PK\x03\x04" + bytes(100), bytes(1000)):
        with pytest.raises(ecf8.CorruptDataError):
            ecf8.decode(junk)


def test_any_buffer_layout():
    """A frame handed over as a strided or multi-dimensional buffer decodes like its bytes."""
    x = weights_like(3000, DTYPES[0])
    blob = ecf8.encode(x)
    spread = bytearray(2 * len(blob))
    spread[::2] = blob
    for view in (memoryview(spread)[::2], memoryview(blob).cast("B", (1, len(blob))),
                 np.frombuffer(spread, np.uint8)[::2]):
        np.testing.assert_array_equal(ecf8.decode(view).view(np.uint8), x.view(np.uint8))
        assert ecf8.info(view).numel == x.size


def test_unsupported_inputs():
    with pytest.raises(ecf8.UnsupportedError, match="float8_e4m3fn"):
        ecf8.encode(np.zeros(10, np.float32))
    with pytest.raises(ecf8.UnsupportedError):
        ecf8.decode(np.zeros(10, np.float32))
    with pytest.raises(ecf8.UnsupportedError):
        ecf8.decode(12345)
    with pytest.raises(ecf8.UnsupportedError):
        ecf8.decode(ecf8.encode(weights_like(10, DTYPES[0])), device="tpu")
    assert issubclass(ecf8.CorruptDataError, ecf8.ECF8Error)
    assert issubclass(ecf8.UnsupportedError, ecf8.ECF8Error)
