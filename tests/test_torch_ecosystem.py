"""The just-in-time path on real model code: a Transformers decoder-only LLM with tied embeddings
(generate gives identical tokens) and a Diffusers DiT (identical outputs), both loaded from ecf8
checkpoints into models built without weights.  Skipped when transformers/diffusers are absent."""

import shutil

import pytest

torch = pytest.importorskip("torch")
import ecf8  # noqa: E402
import ecf8.compressed  # noqa: E402
import ecf8.torch  # noqa: E402

from test_torch_modules import same  # noqa: E402


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=160,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=True, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    plain = tmp_path_factory.mktemp("plain")
    model.save_pretrained(plain)
    folder = tmp_path_factory.mktemp("ecf8")
    ecf8.compressed.compress_path(plain / "model.safetensors", folder / "model.safetensors", jobs=1)
    for name in ("config.json", "generation_config.json"):
        if (plain / name).exists():
            shutil.copy(plain / name, folder / name)
    return model, folder


def greedy(model, ids):
    return model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)


def test_transformers_tied_llm_generates_identical_tokens(llama_folder):
    model, folder = llama_folder
    ids = torch.randint(0, 320, (2, 6), generator=torch.Generator().manual_seed(1))
    expected = greedy(model, ids)
    loaded = ecf8.torch.from_pretrained(folder, device="cpu", compress=False)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(greedy(loaded, ids), expected)
    stats = ecf8.torch.compress_module(loaded, embeddings=True, min_numel=1024)
    assert stats.weights == 1 + 2 * 7 and stats.modules == stats.weights + 1     # tied head
    assert ecf8.torch.is_compressed(loaded.lm_head)
    assert torch.equal(greedy(loaded, ids), expected)


def dit_config():
    return dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, num_layers=2,
                sample_size=8, patch_size=2, norm_num_groups=32)


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(**dit_config()).to(torch.bfloat16).eval()
    path = tmp_path_factory.mktemp("dit") / "dit.safetensors"
    ecf8.torch.save_file(model.state_dict(), path)
    g = torch.Generator().manual_seed(2)
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g).to(torch.bfloat16),
                  timestep=torch.tensor([3, 500]), class_labels=torch.tensor([1, 7]))
    return model, path, inputs


def empty_dit():
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights():
        return diffusers.DiTTransformer2DModel(**dit_config()).to(torch.bfloat16).eval()


def test_diffusers_dit_identical(dit):
    model, path, inputs = dit
    with torch.no_grad():
        expected = model(**inputs).sample
        loaded = empty_dit()
        ecf8.torch.load_model(loaded, path, device="cpu", compress=False)
        stats = ecf8.torch.compress_module(loaded, min_numel=1024)
        assert stats.weights >= 8
        assert same(loaded(**inputs).sample, expected)


# --- GPU ----------------------------------------------------------------------------------------

def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA build of PyTorch and a GPU")


@pytest.mark.gpu
def test_cuda_transformers_from_pretrained_just_in_time(llama_folder):
    _cuda()
    model, folder = llama_folder
    reference = model.cuda()
    ids = torch.randint(0, 320, (2, 6), generator=torch.Generator().manual_seed(1)).cuda()
    expected = greedy(reference, ids)
    loaded = ecf8.torch.from_pretrained(folder, device="cuda", embeddings=True, min_numel=1024)
    assert ecf8.torch.is_compressed(loaded.lm_head)
    assert loaded.lm_head.__dict__["_ecf8"] is loaded.model.embed_tokens.__dict__["_ecf8"]
    assert torch.equal(greedy(loaded, ids), expected)
    model.cpu()


@pytest.mark.gpu
def test_cuda_diffusers_dit_just_in_time(dit):
    _cuda()
    model, path, inputs = dit
    inputs = {k: v.cuda() for k, v in inputs.items()}
    with torch.no_grad():
        expected = model.cuda()(**inputs).sample
        loaded = empty_dit()
        stats = ecf8.torch.load_model(loaded, path, device="cuda", min_numel=1024)
        assert stats.weights >= 8
        assert same(loaded(**inputs).sample, expected)
    model.cpu()
