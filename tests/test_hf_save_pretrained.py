"""save_pretrained of a model loaded from an ecf8 folder writes an ecf8 folder (Transformers,
Diffusers, a Diffusers pipeline, ecf8.torch.from_pretrained), reloaded bit-identical; a save that
bypasses it, or asks for what ecf8 cannot write, is refused before a broken folder appears.  Also:
the quantizers registered on import (no enable call), loading options given as quantization_config,
and ecf8.torch.from_pretrained choosing the model class from the config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ecf8 import compressed, model_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def registered():
    import ecf8.torch

    ecf8.torch.enable()


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False, dtype="bfloat16")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(plain folder, ecf8 folder) of a tiny BF16 Llama."""
    tmp = tmp_path_factory.mktemp("llama")
    _llama().save_pretrained(tmp / "plain")
    compressed.compress_path(tmp / "plain", tmp / "ecf8", jobs=1)
    return tmp / "plain", tmp / "ecf8"


def _is_ecf8(path: Path) -> bool:
    try:
        compressed.inspect_file(path)
    except Exception:
        return False
    return True


IDS = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(5))


# --- Transformers -----------------------------------------------------------------------------------

def test_save_pretrained_writes_the_ecf8_folder_again(llama, tmp_path):
    plain, folder = llama
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    model.save_pretrained(tmp_path / "saved")
    saved = tmp_path / "saved"
    assert _is_ecf8(saved / "model.safetensors")
    assert (saved / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert model_config.is_marked(json.loads((saved / "config.json").read_text()))
    again = transformers.AutoModelForCausalLM.from_pretrained(saved)
    assert torch.equal(again(IDS).logits, model(IDS).logits)
    compressed.decompress_path(saved, tmp_path / "back")      # what a plain save writes
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()
    assert (tmp_path / "back" / "config.json").read_bytes() == (plain / "config.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "saved"]      # no work folder left


def test_save_pretrained_sharded_into_a_folder_with_other_files(llama, tmp_path):
    _, folder = llama
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "tokenizer.json").write_text("{}")
    (saved / "model-00001-of-00009.safetensors").write_bytes(b"stale shard of an earlier save")
    model.save_pretrained(saved, max_shard_size="200KB")
    shards = sorted(saved.glob("model-*.safetensors"))
    assert len(shards) > 1 and all(_is_ecf8(s) for s in shards)
    assert (saved / "tokenizer.json").read_text() == "{}"
    assert not (saved / "model-00001-of-00009.safetensors").exists()
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    again = transformers.AutoModelForCausalLM.from_pretrained(saved)
    assert torch.equal(again(IDS).logits, model(IDS).logits)


def test_a_save_that_bypasses_ecf8_is_refused(llama, tmp_path):
    from ecf8.errors import UnsupportedError

    model = transformers.AutoModelForCausalLM.from_pretrained(llama[1])
    with pytest.raises(UnsupportedError, match="ecf8 folder"):
        transformers.PreTrainedModel.save_pretrained(model, tmp_path / "bypass")
    assert not list((tmp_path / "bypass").glob("*.safetensors"))


@pytest.mark.parametrize("option", [{"push_to_hub": True}, {"distributed_checkpoint": True}])
def test_save_options_ecf8_cannot_honour_are_refused_first(llama, tmp_path, option):
    from ecf8.errors import UnsupportedError

    model = transformers.AutoModelForCausalLM.from_pretrained(llama[1])
    with pytest.raises(UnsupportedError, match=next(iter(option))):
        model.save_pretrained(tmp_path / "saved", **option)
    assert list(tmp_path.iterdir()) == []


def test_saved_model_pickles_with_its_save(llama, tmp_path):
    import copy

    model = transformers.AutoModelForCausalLM.from_pretrained(llama[1])
    twin = copy.deepcopy(model)
    assert twin.save_pretrained.model is twin
    twin.save_pretrained(tmp_path / "saved")
    assert _is_ecf8(tmp_path / "saved" / "model.safetensors")


def test_ecf8_torch_from_pretrained_model_saves_an_ecf8_folder(llama, tmp_path):
    import ecf8.torch

    plain, folder = llama
    model = ecf8.torch.from_pretrained(folder, device="cpu", compress=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model.config, "quantization_config", None) is None
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    ref = transformers.AutoModelForCausalLM.from_pretrained(plain)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert torch.equal(again(IDS).logits, ref(IDS).logits)


def test_ecf8_torch_from_pretrained_takes_the_config_architecture(tmp_path):
    import ecf8.torch
    from ecf8.errors import UnsupportedError

    cfg = transformers.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(1)
    bert = transformers.BertModel(cfg).to(torch.bfloat16).eval()
    bert.save_pretrained(tmp_path / "plain")
    compressed.compress_path(tmp_path / "plain", tmp_path / "ecf8", jobs=1)
    model = ecf8.torch.from_pretrained(tmp_path / "ecf8", device="cpu")
    assert type(model) is transformers.BertModel
    ids = torch.randint(0, 200, (1, 7))
    assert torch.equal(model(ids).last_hidden_state, bert(ids).last_hidden_state)
    again = ecf8.torch.from_pretrained(tmp_path / "ecf8", device="cpu", model_class=transformers.BertModel)
    assert torch.equal(again(ids).last_hidden_state, bert(ids).last_hidden_state)
    config = json.loads((tmp_path / "ecf8" / "config.json").read_text())
    config["architectures"] = ["NoSuchModel"]
    (tmp_path / "ecf8" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedError, match="model_class"):
        ecf8.torch.from_pretrained(tmp_path / "ecf8", device="cpu")


# --- quantization_config= -------------------------------------------------------------------------

def test_quantization_config_argument_sets_the_loading_options(llama, tmp_path):
    from ecf8.torch import is_compressed
    from ecf8.torch.transformers_quantizer import ECF8Config

    plain, folder = llama
    got = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=ECF8Config(compress=True))
    assert sum(is_compressed(m) for m in got.modules()) == 2 * 7 + 1
    few = transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=ECF8Config(compress=True, min_numel=300 * 128))
    assert [n for n, m in few.named_modules() if is_compressed(m)] == ["lm_head"]
    ref = transformers.AutoModelForCausalLM.from_pretrained(plain)
    assert torch.equal(got(IDS).logits, ref(IDS).logits) and torch.equal(few(IDS).logits, ref(IDS).logits)


def test_ecf8_config_on_a_plain_folder_says_what_to_do(llama):
    from ecf8.errors import UnsupportedError
    from ecf8.torch.transformers_quantizer import ECF8Config

    with pytest.raises(UnsupportedError, match="compress_module"):
        transformers.AutoModelForCausalLM.from_pretrained(llama[0], quantization_config=ECF8Config())


# --- registration on import -------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["ecf8-first", "transformers-first"])
def test_import_ecf8_torch_registers_without_enable(llama, order):
    first, second = "import ecf8.torch", "import transformers"
    if order != "ecf8-first":
        first, second = second, first
    code = (f"import sys\n{first}\n"
            "assert 'transformers.quantizers' not in sys.modules or 'ecf8.torch' in sys.modules\n"
            f"{second}\n"
            f"m = transformers.AutoModelForCausalLM.from_pretrained({str(llama[1])!r})\n"
            "print(type(m.hf_quantizer).__name__)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code], capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["ECF8Quantizer"]


def test_import_ecf8_torch_imports_neither_library():
    code = ("import sys, ecf8.torch\n"
            "print(sorted(m for m in ('transformers', 'diffusers') if m in sys.modules))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"


# --- Diffusers ------------------------------------------------------------------------------------

def _dit_pipeline(diffusers, tmp_path: Path, head_dim: int) -> None:
    """A tiny BF16 DiT pipeline (DiT, VAE, scheduler), saved plain to tmp_path/plain and compressed to
    tmp_path/ecf8."""
    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=head_dim, in_channels=4,
                                          out_channels=4, num_layers=2, sample_size=8, patch_size=2,
                                          num_embeds_ada_norm=1000)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), block_out_channels=(32,),
                                  latent_channels=4, norm_num_groups=32, sample_size=16)
    pipe = diffusers.DiTPipeline(transformer=dit, vae=vae, scheduler=diffusers.DDIMScheduler(),
                                 id2label={0: "a", 1: "b"}).to(torch.bfloat16)
    pipe.save_pretrained(tmp_path / "plain")
    compressed.compress_path(tmp_path / "plain", tmp_path / "ecf8", jobs=1)


def test_diffusers_pipeline_loads_and_saves_as_ecf8(tmp_path):
    """A DiT pipeline (DiT, VAE, scheduler): every model component's folder compressed, the
    pipeline's images identical; its save_pretrained writes ecf8 components that load again."""
    diffusers = pytest.importorskip("diffusers")
    _dit_pipeline(diffusers, tmp_path, head_dim=32)
    for part in ("transformer", "vae"):
        assert model_config.is_marked(json.loads((tmp_path / "ecf8" / part / "config.json").read_text()))

    def images(folder):
        p = diffusers.DiTPipeline.from_pretrained(folder, dtype=torch.bfloat16)
        out = p(class_labels=[1], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np").images
        return p, out

    _, ref = images(tmp_path / "plain")
    got, out = images(tmp_path / "ecf8")
    assert (out == ref).all()
    got.save_pretrained(tmp_path / "saved")
    for part, name in (("transformer", "diffusion_pytorch_model.safetensors"),
                       ("vae", "diffusion_pytorch_model.safetensors")):
        assert (tmp_path / "saved" / part / name).read_bytes() == (tmp_path / "ecf8" / part / name).read_bytes()
    _, again = images(tmp_path / "saved")
    assert (again == ref).all()


def test_diffusers_save_that_bypasses_ecf8_is_refused(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from ecf8.errors import UnsupportedError

    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4,
                                          out_channels=4, num_layers=2, sample_size=8, patch_size=2,
                                          num_embeds_ada_norm=10).to(torch.bfloat16)
    dit.save_pretrained(tmp_path / "plain")
    compressed.compress_path(tmp_path / "plain", tmp_path / "ecf8", jobs=1)
    got = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "ecf8")
    with pytest.raises(UnsupportedError, match="ecf8 folder"):
        diffusers.ModelMixin.save_pretrained(got, tmp_path / "bypass")
    assert not list((tmp_path / "bypass").glob("*.safetensors"))
    with pytest.raises(UnsupportedError, match="safe_serialization"):
        got.save_pretrained(tmp_path / "bin", safe_serialization=False)


def test_adapters_of_an_ecf8_model_save_as_plain_adapters(llama, tmp_path):
    """Transformers' own PEFT integration: save_pretrained writes the adapter only, unchanged."""
    peft = pytest.importorskip("peft", minversion="0.22")      # what Transformers 5 asks for
    from ecf8.torch import is_compressed
    from ecf8.torch.transformers_quantizer import ECF8Config

    model = transformers.AutoModelForCausalLM.from_pretrained(llama[1], quantization_config=ECF8Config(compress=True))
    model.add_adapter(peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    assert is_compressed(model.model.layers[0].self_attn.k_proj)
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
    assert not _is_ecf8(tmp_path / "adapter" / "adapter_model.safetensors")


def test_a_rank_that_does_not_save_goes_through(llama, tmp_path):
    """is_main_process=False (the other ranks of a distributed save): the library writes no weights."""
    model = transformers.AutoModelForCausalLM.from_pretrained(llama[1])
    model.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not list((tmp_path / "rank1").glob("*.safetensors"))


# --- GPU ------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_save_pretrained_of_a_model_held_compressed_on_the_gpu(llama, tmp_path):
    from ecf8.torch import is_compressed

    plain, folder = llama
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cuda")
    assert sum(is_compressed(m) for m in model.modules()) == 2 * 7 + 1
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", device_map="cuda")
    ids = IDS.to("cuda")
    assert torch.equal(again(ids).logits, model(ids).logits)


@pytest.mark.gpu
def test_diffusers_pipeline_on_the_gpu_saves_as_ecf8(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from ecf8.torch import is_compressed

    _dit_pipeline(diffusers, tmp_path, head_dim=64)

    def images(folder):
        p = diffusers.DiTPipeline.from_pretrained(folder, dtype=torch.bfloat16).to("cuda")
        out = p(class_labels=[1], num_inference_steps=2, generator=torch.Generator("cuda").manual_seed(0),
                output_type="np").images
        return p, out

    _, ref = images(tmp_path / "plain")
    got = diffusers.DiTPipeline.from_pretrained(tmp_path / "ecf8", dtype=torch.bfloat16, device_map="cuda")
    assert any(is_compressed(m) for m in got.transformer.modules())
    out = got(class_labels=[1], num_inference_steps=2, generator=torch.Generator("cuda").manual_seed(0),
              output_type="np").images
    assert (out == ref).all()
    got.save_pretrained(tmp_path / "saved")
    name = "diffusion_pytorch_model.safetensors"
    assert (tmp_path / "saved" / "transformer" / name).read_bytes() == (tmp_path / "ecf8" / "transformer" / name).read_bytes()
