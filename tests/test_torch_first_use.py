"""What a new user of ecf8.torch meets: a compressed model saves small with torch.save whatever the
pickle protocol, and compress_module / load_model say so when they hold nothing compressed."""

import copy
import io
import pickle
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import ecf8.torch  # noqa: E402


def _model(real_weights, kind: str) -> torch.nn.Module:
    """Linears holding the bundled real MiniLM weights: 'e4m3' (six FP8 linears), 'bf16' (four),
    'fp16' (the BF16 weights as float16)."""
    arrays = real_weights["e4m3" if kind == "e4m3" else "bf16"]
    layers = []
    for x in arrays.values():
        t = torch.from_numpy(np.array(x).view(np.uint8 if kind == "e4m3" else np.uint16))
        t = t.view(torch.float8_e4m3fn if kind == "e4m3" else torch.bfloat16)
        linear = torch.nn.Linear(x.shape[1], x.shape[0], bias=False, device="meta")
        linear.weight = torch.nn.Parameter(t.to(torch.float16) if kind == "fp16" else t, requires_grad=False)
        layers.append(linear)
    return torch.nn.Sequential(*layers)


def _saved(obj, protocol: int | None) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **({} if protocol is None else {"pickle_protocol": protocol}))
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["e4m3", "bf16", "fp16"])
def test_a_compressed_model_saves_small_whatever_the_protocol(real_weights, kind):
    """torch.save's default pickle protocol (2) stored each frame as a latin-1 string, UTF-8 coded:
    about 1.5 bytes per byte, larger than the uncompressed model."""
    model = _model(real_weights, kind)
    plain = {p: len(_saved(model, p)) for p in (None, 2, 4, 5)}
    stats = ecf8.torch.compress_module(model)
    assert stats.weights == len(model) and stats.compressed_bytes < stats.original_bytes
    for protocol, before in plain.items():
        blob = _saved(model, protocol)
        overhead = len(blob) - stats.compressed_bytes
        assert len(blob) < before, (protocol, len(blob), before)
        assert 0 < overhead < 16_384 + 512 * len(model), (protocol, overhead)
        back = torch.load(io.BytesIO(blob), weights_only=False)
        assert all(ecf8.torch.is_compressed(m) for m in back)
        for a, b in zip(model, back):
            assert torch.equal(a.weight.view(torch.uint8), b.weight.view(torch.uint8))


def test_pickle_and_deepcopy_still_give_the_same_compressed_weights(real_weights):
    model = _model(real_weights, "bf16")
    ecf8.torch.compress_module(model)
    x = torch.randn(3, 384, dtype=torch.bfloat16)
    y = model(x)
    for copied in (pickle.loads(pickle.dumps(model)), pickle.loads(pickle.dumps(model, protocol=2)),
                   copy.deepcopy(model)):
        assert all(ecf8.torch.is_compressed(m) for m in copied)
        assert torch.equal(copied(x).view(torch.uint8), y.view(torch.uint8))


def test_compressing_nothing_says_why(real_weights):
    fp32 = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    with pytest.warns(UserWarning, match=r"no weight held compressed.*2 weights are torch.float32.*bfloat16"):
        stats = ecf8.torch.compress_module(fp32)
    assert stats.weights == 0 and stats.original_bytes == 0
    small = torch.nn.Linear(16, 16).to(torch.bfloat16)
    with pytest.warns(UserWarning, match=r"fewer than min_numel=4096"):
        ecf8.torch.compress_module(small)
    embedding = torch.nn.Embedding(1000, 64).to(torch.bfloat16)
    with pytest.warns(UserWarning, match=r"embeddings=True"):
        ecf8.torch.compress_module(embedding)
    with pytest.warns(UserWarning, match=r"no weight held compressed"):
        ecf8.torch.compress_module(torch.nn.ReLU())
    model = _model(real_weights, "bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # something compressed: nothing to say
        assert ecf8.torch.compress_module(model).weights == 4


def test_load_model_on_the_cpu_says_it_decoded_everything(real_weights, tmp_path):
    model = _model(real_weights, "bf16")
    ecf8.torch.save_file(model.state_dict(), tmp_path / "m.safetensors")

    def meta():
        with torch.device("meta"):
            return torch.nn.Sequential(*[torch.nn.Linear(384, 384, bias=False, dtype=torch.bfloat16)
                                         for _ in range(4)])

    m = meta()
    with pytest.warns(UserWarning, match=r"decoded.*ordinary parameters.*compress=True"):
        stats = ecf8.torch.load_model(m, tmp_path / "m.safetensors", device="cpu")
    assert stats.weights == 0 and not any(ecf8.torch.is_compressed(x) for x in m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = ecf8.torch.load_model(meta(), tmp_path / "m.safetensors", device="cpu", compress=False)
        assert stats.weights == 0
        stats = ecf8.torch.load_model(meta(), tmp_path / "m.safetensors", device="cpu", compress=True)
        assert stats.weights == 4
    fp32 = {f"{i}.weight": torch.randn(384, 384) for i in range(2)}
    ecf8.torch.save_file(fp32, tmp_path / "f.safetensors")
    with torch.device("meta"):
        m32 = torch.nn.Sequential(*[torch.nn.Linear(384, 384, bias=False) for _ in range(2)])
    with pytest.warns(UserWarning, match=r"no weight held compressed: 2 weights are F32, which ecf8 does not code"):
        ecf8.torch.load_model(m32, tmp_path / "f.safetensors", device="cpu", compress=True)
