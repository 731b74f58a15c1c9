"""Model folders as Transformers reads them: a sharded folder is read through its index, so
safetensors files the index does not name (a consolidated copy beside the shards, as some releases
ship) are left alone instead of making the folder unreadable."""

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
import ecf8  # noqa: E402
import ecf8.compressed  # noqa: E402
import ecf8.torch  # noqa: E402

from test_torch_modules import same  # noqa: E402


def tiny_llama():
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()


@pytest.fixture(scope="module")
def sharded_with_consolidated(tmp_path_factory):
    """(model, plain folder, ecf8 folder): shards + index, and beside them a consolidated copy of
    every tensor (same names) and an unrelated safetensors file the index does not name."""
    model = tiny_llama()
    plain = tmp_path_factory.mktemp("plain")
    model.save_pretrained(plain, max_shard_size="40KB")
    index = json.loads((plain / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              plain / "consolidated.safetensors")
    save_file({"something.else": torch.zeros(3)}, plain / "extra.safetensors")
    folder = tmp_path_factory.mktemp("ecf8") / "model"
    ecf8.compressed.compress_path(plain, folder, jobs=1)
    assert (folder / "consolidated.safetensors").is_file()
    return model, plain, folder


def test_transformers_reads_such_a_folder(sharded_with_consolidated):
    model, plain, _ = sharded_with_consolidated
    loaded = transformers.AutoModelForCausalLM.from_pretrained(plain, dtype=torch.bfloat16)
    assert all(same(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("how", ["from_pretrained", "load_model"])
def test_ecf8_follows_the_index(sharded_with_consolidated, how):
    model, plain, folder = sharded_with_consolidated
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(1))
    if how == "from_pretrained":                   # the model Transformers builds from this folder
        model = transformers.AutoModelForCausalLM.from_pretrained(plain, dtype=torch.bfloat16).eval()
        loaded = ecf8.torch.from_pretrained(folder, device="cpu", compress=True, min_numel=1024)
    else:
        from accelerate import init_empty_weights

        with init_empty_weights():
            loaded = transformers.LlamaForCausalLM(model.config).to(torch.bfloat16)
        ecf8.torch.load_model(loaded, folder, device="cpu", compress=True, min_numel=1024)
    assert any(ecf8.torch.is_compressed(m) for m in loaded.modules())
    with torch.no_grad():
        assert same(loaded(ids).logits, model(ids).logits)


def test_an_index_naming_a_missing_shard_is_refused(sharded_with_consolidated, tmp_path):
    _, _, folder = sharded_with_consolidated
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(ecf8.ECF8Error, match="missing"):
        ecf8.torch.from_pretrained(broken, device="cpu")


def test_a_folder_without_an_index_reads_every_file(tmp_path):
    model = tiny_llama()
    ecf8.torch.save_file({k: v for k, v in model.state_dict().items() if "layers.1." in k}, tmp_path / "b.safetensors")
    ecf8.torch.save_file({k: v for k, v in model.state_dict().items() if "layers.1." not in k}, tmp_path / "a.safetensors")
    (tmp_path / "config.json").write_text(model.config.to_json_string())
    with pytest.warns(UserWarning, match=r"^ecf8 loading: on the CPU.*compress=True") as caught:
        loaded = ecf8.torch.from_pretrained(tmp_path, device="cpu")      # names no function not called
    assert not any("load_model" in str(w.message) for w in caught)
    assert all(same(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
