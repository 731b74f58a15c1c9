"""ecf8 model folders through Transformers' and Diffusers' own from_pretrained (their quantizer
registries), and the config.json quantization_config that folder compress writes and decompress
takes back.  Outputs are compared bit for bit with the uncompressed folder loaded the same way."""

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

DATA = Path(__file__).resolve().parent.parent / "ecf8" / "data"


@pytest.fixture(scope="module", autouse=True)
def registered():
    import ecf8.torch

    ecf8.torch.enable()


def _compress(plain: Path, tmp: Path) -> Path:
    out = tmp / "ecf8"
    compressed.compress_path(plain, out, jobs=1)
    return out


# --- config.json ----------------------------------------------------------------------------------

def _folder(tmp: Path, config: bytes) -> Path:
    import numpy as np

    src = tmp / "plain"
    src.mkdir()
    from ecf8.safetensors_io import write_safetensors

    write_safetensors({"w": np.arange(64, dtype=np.float16).reshape(8, 8)}, src / "model.safetensors")
    (src / "config.json").write_bytes(config)
    return src


ODD = b'{"model_type":  "llama",\n"hidden_size":128, "x": NaN,"rope": {"a": 1.50}}'


def test_compress_marks_config_and_decompress_restores_its_bytes(tmp_path):
    src = _folder(tmp_path, ODD)
    out = _compress(src, tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "ecf8"
    assert cfg["hidden_size"] == 128
    compressed.decompress_path(out, tmp_path / "back")
    assert (tmp_path / "back" / "config.json").read_bytes() == ODD
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


def test_decompress_keeps_edits_made_to_a_compressed_config(tmp_path):
    out = _compress(_folder(tmp_path, ODD), tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    cfg["hidden_size"] = 256
    (out / "config.json").write_text(json.dumps(cfg))
    compressed.decompress_path(out, tmp_path / "back")
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back["hidden_size"] == 256 and "quantization_config" not in back


@pytest.mark.parametrize("config", [b'{"quantization_config": {"quant_method": "fp8"}}', b"not json",
                                    b"[1, 2]", b'{"a": "\xff"}'])
def test_config_ecf8_cannot_mark_is_copied_unchanged(tmp_path, config):
    out = _compress(_folder(tmp_path, config), tmp_path)
    assert (out / "config.json").read_bytes() == config
    compressed.decompress_path(out, tmp_path / "back")
    assert (tmp_path / "back" / "config.json").read_bytes() == config


def test_only_configs_beside_safetensors_are_marked(tmp_path):
    src = _folder(tmp_path, b'{"a": 1}')
    (src / "scheduler").mkdir()
    (src / "scheduler" / "config.json").write_bytes(b'{"b": 2}')
    out = _compress(src, tmp_path)
    assert (out / "scheduler" / "config.json").read_bytes() == b'{"b": 2}'
    assert model_config.is_marked(json.loads((out / "config.json").read_bytes()))


# --- Transformers ---------------------------------------------------------------------------------

def _save(model, tmp: Path) -> Path:
    plain = tmp / "plain"
    model.save_pretrained(plain)
    return plain


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False, dtype="bfloat16")
    return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)


def _qwen3():
    cfg = transformers.Qwen3Config(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                   max_position_embeddings=64, tie_word_embeddings=True, dtype="bfloat16")
    return transformers.Qwen3ForCausalLM(cfg).to(torch.bfloat16)


@pytest.mark.parametrize("make", [_llama, _qwen3], ids=["llama", "qwen3"])
def test_causal_lm_loads_bit_identical(tmp_path, make):
    torch.manual_seed(0)
    plain = _save(make().eval(), tmp_path)
    folder = _compress(plain, tmp_path)
    ids = torch.randint(0, 300, (2, 9))
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        ref = cls.from_pretrained(plain)
        got = cls.from_pretrained(folder)
        assert got.config.quantization_config.quant_method == "ecf8"
        out_ref, out = ref(ids), got(ids)
        key = "logits" if "logits" in out_ref else "last_hidden_state"
        assert out[key].dtype == torch.bfloat16
        assert torch.equal(out[key], out_ref[key])


def test_causal_lm_loads_when_transformers_passes_no_model(tmp_path, monkeypatch):
    """Transformers releases before update_weight_conversions(weight_conversions, model) call it
    with the conversions alone: the model being loaded is used, and the logits stay identical."""
    from ecf8.torch.transformers_quantizer import ECF8Quantizer

    torch.manual_seed(0)
    plain = _save(_llama().eval(), tmp_path)
    folder = _compress(plain, tmp_path)
    update = ECF8Quantizer.update_weight_conversions
    calls = []
    monkeypatch.setattr(ECF8Quantizer, "update_weight_conversions",
                        lambda self, conversions, model=None: calls.append(1) or update(self, conversions))
    ids = torch.randint(0, 300, (2, 9))
    got = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert calls
    assert torch.equal(got(ids).logits, transformers.AutoModelForCausalLM.from_pretrained(plain)(ids).logits)


def _bert(layers=2, hidden=64, heads=4, inter=128, vocab=200):
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=heads, intermediate_size=inter, max_position_embeddings=64,
                                  dtype="bfloat16")
    return transformers.BertModel(cfg).to(torch.bfloat16)


def test_bert_loads_under_its_auto_classes(tmp_path):
    torch.manual_seed(1)
    plain = _save(_bert().eval(), tmp_path)
    folder = _compress(plain, tmp_path)
    ids = torch.randint(0, 200, (2, 7))
    ref = transformers.AutoModel.from_pretrained(plain)
    got = transformers.AutoModel.from_pretrained(folder)
    assert type(got).__name__ == "BertModel"
    assert torch.equal(got(ids).last_hidden_state, ref(ids).last_hidden_state)
    # a head class: the base-model prefix is added by Transformers' renaming, the head is new
    torch.manual_seed(2)
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(plain, num_labels=3)
    torch.manual_seed(2)
    got = transformers.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)
    assert torch.equal(got.bert.pooler.dense.weight, ref.bert.pooler.dense.weight)
    assert torch.equal(got(ids).logits, ref(ids).logits)


def test_minilm_bert_with_real_layer0_weights(tmp_path):
    """all-MiniLM-L6-v2's shape (6 layers, hidden 384, 12 heads, 1536 intermediate; vocabulary cut
    to 1000); layer 0's attention weights are the real BF16 ones bundled in ecf8/data, the rest
    random."""
    from safetensors.torch import load_file

    torch.manual_seed(3)
    model = _bert(layers=6, hidden=384, heads=12, inter=1536, vocab=1000).eval()
    real = load_file(DATA / "minilm-layer0-bf16.safetensors")
    state = model.state_dict()
    hits = 0
    for name, w in real.items():
        key = name.removeprefix("bert.").removeprefix("model.")
        if key in state:
            state[key].copy_(w)
            hits += 1
    assert hits == len(real) == 4
    plain = _save(model, tmp_path)
    folder = _compress(plain, tmp_path)
    ids = torch.randint(0, 1000, (1, 16))
    ref = transformers.AutoModel.from_pretrained(plain)
    got = transformers.AutoModel.from_pretrained(folder)
    assert torch.equal(got.encoder.layer[0].attention.self.query.weight, real[next(iter(
        k for k in real if k.endswith("query.weight")))])
    assert torch.equal(got(ids).last_hidden_state, ref(ids).last_hidden_state)


def test_without_ecf8_transformers_names_it(tmp_path):
    torch.manual_seed(0)
    folder = _compress(_save(_bert().eval(), tmp_path), tmp_path)
    code = ("import transformers\n"
            f"transformers.AutoModel.from_pretrained({str(folder)!r})\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode != 0
    assert "Unknown quantization type, got ecf8" in run.stderr


# --- Diffusers ------------------------------------------------------------------------------------

def _dit():
    diffusers = pytest.importorskip("diffusers")
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4,
                                           out_channels=4, num_layers=2, sample_size=8, patch_size=2,
                                           num_embeds_ada_norm=10).to(torch.bfloat16)


def _dit_folders(tmp_path: Path) -> tuple[Path, Path]:
    """(plain folder, ecf8 folder) of one seeded DiT."""
    torch.manual_seed(0)
    plain = tmp_path / "plain"
    _dit().eval().save_pretrained(plain)
    return plain, _compress(plain, tmp_path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, None], ids=["bf16", "default-dtype"])
def test_diffusers_dit_loads_bit_identical(tmp_path, dtype):
    diffusers = pytest.importorskip("diffusers")

    plain, folder = _dit_folders(tmp_path)
    cls = diffusers.DiTTransformer2DModel
    ref = cls.from_pretrained(plain, torch_dtype=dtype)
    got = cls.from_pretrained(folder, torch_dtype=dtype)
    x = torch.randn(1, 4, 8, 8, dtype=dtype or torch.float32)
    args = dict(timestep=torch.tensor([3]), class_labels=torch.tensor([1]))
    assert torch.equal(got(x, **args).sample, ref(x, **args).sample)


# --- a fresh process: ecf8's quantizer modules imported first --------------------------------------

_FIRST_IMPORT = r'''
import sys
{first}
import torch
plain, folder, which = sys.argv[1:4]
if which == "transformers":
    import transformers
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    ref = transformers.AutoModelForCausalLM.from_pretrained(plain)(ids).logits
    for options in ({{}}, {{"quantization_config": Config(compress=True)}}):
        got = transformers.AutoModelForCausalLM.from_pretrained(folder, **options)
        assert torch.equal(got(ids).logits, ref), options
else:
    import diffusers
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    args = dict(timestep=torch.tensor([3]), class_labels=torch.tensor([1]))
    cls = diffusers.DiTTransformer2DModel
    assert torch.equal(cls.from_pretrained(folder)(x, **args).sample, cls.from_pretrained(plain)(x, **args).sample)
print("loaded")
'''


@pytest.mark.parametrize("first", [
    "from ecf8.torch.transformers_quantizer import ECF8Config as Config",
    "import ecf8.torch\nConfig = ecf8.torch.transformers_quantizer.ECF8Config",
    "import ecf8.torch.diffusers_quantizer",
], ids=["transformers-from-import", "transformers-attribute", "diffusers-import"])
def test_quantizer_module_imported_first_still_registers(tmp_path, first):
    """Importing ecf8's quantizer module before anything else imported the library's registry
    from within that import, whose registration then found the module half-imported: a warning,
    nothing registered, and every ecf8 folder failed to load in that process.  The README's
    ``ecf8.torch.transformers_quantizer.ECF8Config`` failed in a fresh process (no attribute)."""
    which = "diffusers" if "diffusers" in first else "transformers"
    if which == "diffusers":
        plain, folder = _dit_folders(tmp_path)
    else:
        torch.manual_seed(0)
        plain = _save(_llama().eval(), tmp_path)
        folder = _compress(plain, tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, "-c", _FIRST_IMPORT.format(first=first), str(plain), str(folder), which],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("loaded")
    assert "could not register" not in run.stderr


def test_ecf8_from_pretrained_of_a_diffusers_folder_names_the_way(tmp_path):
    """ecf8.torch.from_pretrained reads Transformers configs; a Diffusers folder gave Transformers'
    bare ValueError (no model_type) instead of an ECF8Error saying what loads it."""
    from ecf8.errors import UnsupportedError
    from ecf8.torch import from_pretrained

    _, folder = _dit_folders(tmp_path)
    with pytest.raises(UnsupportedError, match="not a Transformers model folder.*Diffusers' own from_pretrained"):
        from_pretrained(folder, device="cpu", compress=True)


# --- GPU: weights held compressed -----------------------------------------------------------------

@pytest.mark.gpu
def test_causal_lm_on_gpu_is_held_compressed(tmp_path):
    from ecf8.torch import is_compressed

    torch.manual_seed(0)
    plain = _save(_llama().eval(), tmp_path)
    folder = _compress(plain, tmp_path)
    ids = torch.randint(0, 300, (2, 9), device="cuda")
    ref = transformers.AutoModelForCausalLM.from_pretrained(plain, device_map="cuda")
    got = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cuda")
    compressed = [m for m in got.modules() if is_compressed(m)]
    assert len(compressed) == 2 * 7 + 1            # q k v o gate up down per layer, and lm_head
    assert not is_compressed(got.model.embed_tokens)
    assert all(p.device.type == "cuda" for p in got.parameters())
    assert torch.equal(got(ids).logits, ref(ids).logits)


def _assert_dit_held_and_identical(diffusers, plain: Path, folder: Path, device: str) -> None:
    """The DiT of `folder` loads on `device` with compressed weights and computes the same bits as
    the plain folder's."""
    from ecf8.torch import is_compressed

    cls = diffusers.DiTTransformer2DModel
    place = {"device_map": device} if device != "cpu" else {}
    ref = cls.from_pretrained(plain, torch_dtype=torch.bfloat16, **place)
    got = cls.from_pretrained(folder, torch_dtype=torch.bfloat16, **place)
    assert any(is_compressed(m) for m in got.modules())
    x = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16, device=device)
    args = dict(timestep=torch.tensor([3], device=device), class_labels=torch.tensor([1], device=device))
    assert torch.equal(got(x, **args).sample, ref(x, **args).sample)


@pytest.mark.gpu
def test_diffusers_dit_on_gpu_is_held_compressed(tmp_path):
    diffusers = pytest.importorskip("diffusers")

    plain, folder = _dit_folders(tmp_path)
    _assert_dit_held_and_identical(diffusers, plain, folder, "cuda")


def _hold_compressed(folder: Path) -> None:
    """Ask for compressed weights on the CPU too (a loading option of the folder's config)."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["compress"] = True
    (folder / "config.json").write_text(json.dumps(cfg))


def test_causal_lm_held_compressed_on_the_cpu(tmp_path):
    from ecf8.torch import is_compressed

    torch.manual_seed(0)
    plain = _save(_llama().eval(), tmp_path)
    folder = _compress(plain, tmp_path)
    _hold_compressed(folder)
    ids = torch.randint(0, 300, (2, 9))
    ref = transformers.AutoModelForCausalLM.from_pretrained(plain)
    got = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert sum(is_compressed(m) for m in got.modules()) == 2 * 7 + 1
    assert torch.equal(got(ids).logits, ref(ids).logits)


def test_diffusers_dit_held_compressed_on_the_cpu(tmp_path):
    diffusers = pytest.importorskip("diffusers")

    plain, folder = _dit_folders(tmp_path)
    _hold_compressed(folder)
    _assert_dit_held_and_identical(diffusers, plain, folder, "cpu")


def test_a_module_with_a_tensor_missing_from_the_checkpoint_is_not_held_compressed(tmp_path):
    """Transformers initializes the tensors a checkpoint lacks, module by module; a module whose
    weight is held compressed is marked initialized (its init would re-encode the weight), so one
    with a missing bias keeps an ordinary weight and gets its bias initialized."""
    from safetensors.torch import load_file, save_file

    from ecf8.torch import is_compressed

    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attention_bias=True, tie_word_embeddings=False, dtype="bfloat16")
    torch.manual_seed(0)
    plain = _save(transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval(), tmp_path)
    tensors = load_file(plain / "model.safetensors")
    del tensors["model.layers.0.self_attn.q_proj.bias"]
    save_file(tensors, plain / "model.safetensors", metadata={"format": "pt"})
    folder = _compress(plain, tmp_path)
    _hold_compressed(folder)
    ref = transformers.AutoModelForCausalLM.from_pretrained(plain)
    got = transformers.AutoModelForCausalLM.from_pretrained(folder)
    attn = got.model.layers[0].self_attn
    assert not is_compressed(attn.q_proj) and is_compressed(attn.k_proj)
    assert torch.equal(attn.q_proj.bias, ref.model.layers[0].self_attn.q_proj.bias)
    ids = torch.randint(0, 300, (2, 9))
    assert torch.equal(got(ids).logits, ref(ids).logits)
