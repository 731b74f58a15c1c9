"""PEFT adapters on a compressed base model: LoRA wraps the compressed linears, the forward with
adapters is bit-identical to the uncompressed base with the same adapters, training the adapters
gives the same gradients and steps (the base stays compressed and frozen), adapters switch, and
merging (merge_and_unload, merge/unmerge) gives the same weights as on the uncompressed base.
Skipped without peft/transformers."""

import copy

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
import ecf8  # noqa: E402
import ecf8.torch  # noqa: E402

from test_torch_modules import same  # noqa: E402

TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


def llama(device="cpu"):
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(torch.bfloat16).to(device).eval()


def lora(model, name="default", seed=1, r=4):
    """LoRA with random A and B (init_lora_weights=False), the same for the same seed."""
    config = peft.LoraConfig(r=r, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    torch.manual_seed(seed)
    if isinstance(model, peft.PeftModel):
        model.add_adapter(name, config)
        return model
    return peft.get_peft_model(model, config, adapter_name=name)


def bases(device="cpu"):
    """(compressed base, uncompressed twin, input ids)."""
    base = llama(device)
    twin = copy.deepcopy(base)
    stats = ecf8.torch.compress_module(base, min_numel=1024)
    assert stats.weights == 2 * 7 + 1                       # the head too
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(2)).to(device)
    return base, twin, ids


def compressed_linears(model):
    return [n for n, m in model.named_modules() if ecf8.torch.is_compressed(m)]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_wraps_compressed_linears_and_computes_the_same_bits():
    base, twin, ids = bases()
    model, reference = lora(base), lora(twin)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.Linear)]
    assert len(wrapped) == 2 * len(TARGETS)
    assert all(ecf8.torch.is_compressed(m.base_layer) for n, m in model.named_modules()
               if isinstance(m, peft.tuners.lora.Linear))
    assert same(logits(model, ids), logits(reference, ids))
    assert not same(logits(model, ids), logits(twins_without_adapters(), ids))   # adapters act


def twins_without_adapters():
    return llama()


def train(model, ids, steps=3):
    """A few AdamW steps on the adapters; returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    model.train()
    for _ in range(steps):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.detach())
    return losses


def test_training_adapters_on_a_compressed_base_matches_the_uncompressed_base():
    base, twin, ids = bases()
    model, reference = lora(base), lora(twin)
    frozen = {k: v.clone() for k, v in base.state_dict().items() if "lora_" not in k}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    got, expected = train(model, ids), train(reference, ids)
    assert all(same(a, b) for a, b in zip(got, expected))
    assert got[-1] < got[0]
    mine = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        if p.requires_grad:
            assert same(mine[name], p), name
    assert compressed_linears(model) and all(
        same(v, frozen[k]) for k, v in base.state_dict().items() if k in frozen)


def test_gradient_checkpointing_with_a_compressed_base():
    base, twin, ids = bases()
    for m in (base, twin):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.enable_input_require_grads()
    model, reference = lora(base), lora(twin)
    assert all(same(a, b) for a, b in zip(train(model, ids, 2), train(reference, ids, 2)))


def test_switching_adapters():
    base, twin, ids = bases()
    model, reference = lora(lora(base), "second", seed=5), lora(lora(twin), "second", seed=5)
    for name in ("second", "default", "second"):
        model.set_adapter(name)
        reference.set_adapter(name)
        assert same(logits(model, ids), logits(reference, ids))
    with model.disable_adapter(), reference.disable_adapter():
        assert same(logits(model, ids), logits(reference, ids))


@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_and_unload_gives_the_merged_model(safe_merge):
    base, twin, ids = bases()
    model, reference = lora(base), lora(twin)
    expected_sd = reference.merge_and_unload(safe_merge=safe_merge).state_dict()
    merged = model.merge_and_unload(safe_merge=safe_merge)
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in merged.modules())
    assert len(compressed_linears(merged)) == 2 * 7 + 1          # still compressed, re-encoded
    got_sd = merged.state_dict()
    assert list(got_sd) == list(expected_sd)
    assert all(same(got_sd[k], v) for k, v in expected_sd.items())
    assert same(logits(merged, ids), logits(twin, ids))


def test_merge_then_unmerge_adapter():
    base, twin, ids = bases()
    model, reference = lora(base), lora(twin)
    model.merge_adapter()
    reference.merge_adapter()
    assert same(logits(model, ids), logits(reference, ids))
    model.unmerge_adapter()
    reference.unmerge_adapter()
    assert same(logits(model, ids), logits(reference, ids))


# --- GPU ----------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_lora_training_and_merge_on_a_compressed_base():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA build of PyTorch and a GPU")
    base, twin, ids = bases("cuda")
    model, reference = lora(base), lora(twin)
    assert same(logits(model, ids), logits(reference, ids))
    assert all(same(a, b) for a, b in zip(train(model, ids), train(reference, ids)))
    merged, expected = model.merge_and_unload(), reference.merge_and_unload()
    assert len(compressed_linears(merged)) == 2 * 7 + 1
    assert same(logits(merged, ids), logits(expected, ids))
