"""torch checkpoints: ecf8.torch.save_file / load_file, and load_model into a model built on the
meta device (straight into compressed storage on a GPU)."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import ecf8  # noqa: E402
import ecf8.torch  # noqa: E402
from ecf8.safetensors_io import read_header  # noqa: E402

from test_torch_modules import TiedLM, same  # noqa: E402


def mixed_tensors(device="cpu"):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 96, generator=g)
    return {
        "e4m3": (w * 16).to(torch.float8_e4m3fn).to(device),
        "e5m2": (w * 4).to(torch.float8_e5m2).to(device),
        "bf16": w.to(torch.bfloat16).to(device),
        "f16": w.half().T.to(device),                           # non-contiguous in
        "f32": w.to(device),
        "i64": torch.arange(10, dtype=torch.int64, device=device),
        "mask": (w > 0).to(device),
        "scalar": torch.tensor(2.5, device=device),
        "empty": torch.zeros(0, 3, dtype=torch.bfloat16, device=device),
    }


def test_save_file_load_file_roundtrip(tmp_path):
    tensors = mixed_tensors()
    path = tmp_path / "t.safetensors"
    ecf8.torch.save_file(tensors, path, metadata={"who": "me"})
    assert {r.name: r.codec for r in ecf8.compressed.inspect_file(path)}["e4m3"] == "ecf8"
    back = ecf8.torch.load_file(path)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert same(back[name], t.contiguous()), name
    with pytest.raises(ecf8.ECF8Error, match="meta"):
        ecf8.torch.save_file({"w": torch.empty(3, device="meta")}, tmp_path / "m.safetensors")
    with pytest.raises(ecf8.ECF8Error, match="torch.Tensor"):
        ecf8.torch.save_file({"w": np.zeros(3)}, tmp_path / "n.safetensors")
    with pytest.raises(ecf8.ECF8Error, match="float8_e4m3fnuz"):
        ecf8.torch.save_file({"w": torch.zeros(3, dtype=torch.float8_e4m3fnuz)}, tmp_path / "u.safetensors")
    assert not any(tmp_path.glob("[mnu].safetensors"))
    with pytest.raises(ecf8.ECF8Error, match="cpu or cuda"):
        ecf8.torch.load_file(path, device="meta")


def saved_tied(tmp_path, drop_head=True):
    """A tied model's checkpoint written the way Transformers does: the tied head left out."""
    torch.manual_seed(0)
    model = TiedLM().to(torch.bfloat16).requires_grad_(False)
    sd = model.state_dict()
    if drop_head:
        sd.pop("head.weight")
    path = tmp_path / "tied.safetensors"
    ecf8.torch.save_file(sd, path)
    return model, path


def meta_tied():
    with torch.device("meta"):
        return TiedLM().to(torch.bfloat16).requires_grad_(False)


def test_load_model_cpu_into_meta_model(tmp_path):
    model, path = saved_tied(tmp_path)
    ids = torch.randint(0, 512, (2, 12))
    empty = meta_tied()
    with pytest.warns(UserWarning, match="compress=True"):     # the CPU decodes at load, and says so
        stats = ecf8.torch.load_model(empty, path, device="cpu")
    assert stats.weights == 0
    assert not any(p.is_meta for p in empty.parameters())
    assert empty.head.weight is empty.embed.weight             # still tied
    assert same(empty(ids), model(ids))
    ecf8.torch.compress_module(empty, embeddings=True)         # and JIT on the CPU from there
    assert same(empty(ids), model(ids))


def test_load_model_cpu_compress_holds_the_weights_compressed(tmp_path):
    model, path = saved_tied(tmp_path)
    ids = torch.randint(0, 512, (2, 12))
    empty = meta_tied()
    stats = ecf8.torch.load_model(empty, path, device="cpu", compress=True, embeddings=True)
    assert stats.weights == 4 and stats.modules == 5                 # the tied head counted once
    assert ecf8.torch.is_compressed(empty.head) and empty.head.__dict__["_ecf8"] is empty.embed.__dict__["_ecf8"]
    assert stats.compressed_bytes < stats.original_bytes
    assert same(empty(ids), model(ids))
    assert all(same(v, model.state_dict()[k]) for k, v in empty.state_dict().items())


def test_load_model_checks_everything_before_changing(tmp_path):
    _, path = saved_tied(tmp_path)
    wrong = meta_tied()
    with torch.device("meta"):
        wrong.blocks[1] = torch.nn.Linear(128, 64, dtype=torch.bfloat16)
    kept = [id(p) for p in wrong.parameters()]
    with pytest.raises(ecf8.ECF8Error, match="blocks.1.weight.*shape"):
        ecf8.torch.load_model(wrong, path, device="cpu")
    assert [id(p) for p in wrong.parameters()] == kept and all(p.is_meta for p in wrong.parameters())
    extra = meta_tied()
    with torch.device("meta"):
        extra.more = torch.nn.Linear(4, 4)
    with pytest.raises(ecf8.ECF8Error, match="'more.weight' is not in the checkpoint"):
        ecf8.torch.load_model(extra, path, device="cpu")
    fewer = meta_tied()
    del fewer.blocks[2]
    with pytest.raises(ecf8.ECF8Error, match="model lacks"):
        ecf8.torch.load_model(fewer, path, device="cpu")
    with pytest.raises(ecf8.ECF8Error, match="meta"):
        ecf8.torch.load_model(fewer, path, device="meta")


def damage(path):
    """Flip a byte in the middle of the last compressed tensor of a file."""
    header, base = read_header(path)
    packed = [v["data_offsets"] for k, v in header.items() if k != "__metadata__" and v["dtype"] == "U8"]
    a, b = max(packed)                                        # the last compressed tensor read
    data = bytearray(path.read_bytes())
    data[base + (a + b) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("shards", [False, True])
def test_damaged_file_leaves_the_model_as_it_was(tmp_path, shards):
    _, path = saved_tied(tmp_path)
    if shards:                                   # two files, read by two threads
        path = write_shards(tmp_path, ecf8.torch.load_file(path))
        damage(path / "model-00001-of-00002.safetensors")
    else:
        damage(path)
    empty = meta_tied()
    kept = [id(p) for p in empty.parameters()]
    with pytest.raises(ecf8.CorruptDataError):
        ecf8.torch.load_model(empty, path, device="cpu")
    assert [id(p) for p in empty.parameters()] == kept and all(p.is_meta for p in empty.parameters())


def write_shards(tmp_path, sd):
    folder = tmp_path / "shards"
    folder.mkdir()
    names = list(sd)
    half = len(names) // 2
    ecf8.torch.save_file({k: sd[k] for k in names[:half]}, folder / "model-00001-of-00002.safetensors")
    ecf8.torch.save_file({k: sd[k] for k in names[half:]}, folder / "model-00002-of-00002.safetensors")
    weight_map = {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(names)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("threads", [1, 4])
def test_load_model_shard_folder(tmp_path, threads):
    model, _ = saved_tied(tmp_path)
    folder = write_shards(tmp_path, model.state_dict())
    empty = meta_tied()
    ecf8.torch.load_model(empty, folder, device="cpu", threads=threads, compress=False)
    ids = torch.randint(0, 512, (2, 12))
    assert same(empty(ids), model(ids))


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    """device="cuda" where PyTorch sees no GPU: ECF8Error, not torch's bare AssertionError."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    ecf8.torch.save_file({"w": torch.ones(4, dtype=torch.bfloat16)}, tmp_path / "t.safetensors")
    blob = ecf8.encode(np.ones(4, np.float16))
    calls = [lambda: ecf8.torch.load_file(tmp_path / "t.safetensors", device="cuda"),
             lambda: ecf8.torch.decode(blob, device="cuda"),
             lambda: ecf8.torch.load_model(TiedLM(), tmp_path / "t.safetensors", device="cuda")]
    for call in calls:
        with pytest.raises(ecf8.ECF8Error, match="CUDA build of PyTorch"):
            call()


# --- GPU ----------------------------------------------------------------------------------------

def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA build of PyTorch and a GPU")


@pytest.mark.gpu
def test_cuda_save_file_load_file(tmp_path):
    _cuda()
    tensors = mixed_tensors("cuda")
    ecf8.torch.save_file(tensors, tmp_path / "t.safetensors")
    back = ecf8.torch.load_file(tmp_path / "t.safetensors", device="cuda")
    for name, t in tensors.items():
        assert back[name].is_cuda and same(back[name], t.contiguous()), name


@pytest.mark.gpu
def test_cuda_load_model_stays_compressed(tmp_path):
    _cuda()
    model, path = saved_tied(tmp_path)
    ids = torch.randint(0, 512, (2, 12))
    model.cuda()
    expected = model(ids.cuda())
    empty = meta_tied()
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    stats = ecf8.torch.load_model(empty, path, device="cuda", embeddings=True)
    torch.cuda.synchronize()
    assert stats.weights == 4 and stats.modules == 5
    held = torch.cuda.memory_allocated() - start            # frames come from torch's allocator
    assert stats.compressed_bytes <= held < stats.original_bytes + 2 * 128 * 4 + (1 << 20)
    assert ecf8.torch.is_compressed(empty.head) and empty.head.__dict__["_ecf8"] is empty.embed.__dict__["_ecf8"]
    assert same(empty(ids.cuda()), expected)
    assert all(same(v, model.state_dict()[k]) for k, v in empty.state_dict().items())


@pytest.mark.gpu
def test_cuda_load_model_compress_false_decodes(tmp_path):
    _cuda()
    model, path = saved_tied(tmp_path)
    ids = torch.randint(0, 512, (2, 12), device="cuda")
    expected = model.cuda()(ids)
    empty = meta_tied()
    stats = ecf8.torch.load_model(empty, path, device="cuda", compress=False)
    assert stats.weights == 0 and not any(ecf8.torch.is_compressed(m) for m in empty.modules())
    assert all(p.is_cuda for p in empty.parameters()) and same(empty(ids), expected)


@pytest.mark.gpu
def test_cuda_load_model_shards_in_threads(tmp_path):
    _cuda()
    model, _ = saved_tied(tmp_path)
    folder = write_shards(tmp_path, model.state_dict())
    ids = torch.randint(0, 512, (2, 12), device="cuda")
    expected = model.cuda()(ids)
    empty = meta_tied()
    stats = ecf8.torch.load_model(empty, folder, device="cuda", threads=2)
    assert stats.weights == 3 and same(empty(ids), expected)


def test_numpy_entry_points_point_torch_users_to_ecf8_torch():
    t = torch.zeros(8, dtype=torch.bfloat16)
    with pytest.raises(ecf8.UnsupportedError, match="ecf8.torch"):
        ecf8.encode(t)


def test_numpy_save_file_points_torch_users_to_ecf8_torch(tmp_path):
    with pytest.raises(ecf8.UnsupportedError, match="tensor 'w'.*ecf8.torch"):
        ecf8.save_file({"w": torch.zeros(8, dtype=torch.bfloat16)}, tmp_path / "w.safetensors")
    assert list(tmp_path.iterdir()) == []
