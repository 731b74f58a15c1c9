"""Edits to a compressed model's weights take effect exactly as on the uncompressed model, or fail
loudly: never vanish.  Each edit is made on a compressed model and on its uncompressed twin, and
both must then compute the same bits (and hold the same weights)."""

import copy
import io
import pickle

import pytest

torch = pytest.importorskip("torch")
import ecf8  # noqa: E402
import ecf8.torch  # noqa: E402

from test_torch_modules import same, tied_model  # noqa: E402

DIM = 96


def twins(dtype=torch.bfloat16, device="cpu"):
    """(compressed model, uncompressed twin, input): three linears, the first two bias-free."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(DIM, DIM, bias=False), torch.nn.Linear(DIM, DIM, bias=False),
                                torch.nn.Linear(DIM, DIM))
    model = model.to(dtype).to(device).requires_grad_(False)
    twin = copy.deepcopy(model)
    stats = ecf8.torch.compress_module(model, min_numel=1024)
    assert stats.weights == 3
    x = torch.randn(4, DIM, generator=torch.Generator().manual_seed(1)).to(device)
    return model, twin, x.to(dtype) if dtype.itemsize == 2 else x.to(torch.bfloat16)


def run(model, x):
    if model[0].weight.dtype.itemsize == 1:          # FP8 weights: compare the weights themselves
        return torch.cat([m.weight.to(torch.bfloat16) for m in model])
    return model(x)


def no_grad_add(m):
    with torch.no_grad():
        m[1].weight.add_(0.25)


def set_rows(m):
    with torch.no_grad():
        m[1].weight[3:7] = 2.0


def view_writes(m):
    m[0].weight.data.t()[5].fill_(-1.0)
    m[0].weight.view(-1)[:50].zero_()


def plus_equals(m):                                 # what PEFT's merge does
    m[1].weight.data += torch.full((DIM, DIM), 0.5, dtype=m[1].weight.dtype, device=m[1].weight.device)


def safe_merge(m):                                  # what PEFT's merge(safe_merge=True) does
    w = m[1].weight.data.clone()
    w += torch.full((DIM, DIM), 0.5, dtype=w.dtype, device=w.device)
    m[1].weight.data = w


def out_argument(m):
    w = m[2].weight
    torch.mul(w, 3, out=w)


def state_dict_copy(m):                             # the old "own_state[name].copy_(param)" idiom
    m.state_dict()["1.weight"].copy_(torch.ones(DIM, DIM))


def kept_reference(m):
    w = m[0].weight
    w.data.mul_(2)
    m[0](torch.zeros(1, DIM, dtype=w.dtype, device=w.device))        # a forward in between
    w.data.add_(1)                                  # the same tensor keeps taking edits


def inference_mode_write(m):
    with torch.inference_mode():
        m[1].weight.sub_(1)


EDITS = {
    "data.add_": lambda m: m[0].weight.data.add_(1.0),
    "add_ under no_grad": no_grad_add,
    "copy_": lambda m: m[2].weight.data.copy_(torch.eye(DIM)),
    "setitem": set_rows,
    "views": view_writes,
    "data +=": plus_equals,
    "data = merged copy": safe_merge,
    "out=": out_argument,
    "state_dict()[k].copy_": state_dict_copy,
    "kept reference": kept_reference,
    "inference_mode": inference_mode_write,
    "nn.init.normal_": lambda m: torch.nn.init.normal_(m[0].weight),
    "nn.init.kaiming_uniform_": lambda m: torch.nn.init.kaiming_uniform_(m[1].weight, a=5 ** 0.5),
    "nn.init.trunc_normal_": lambda m: torch.nn.init.trunc_normal_(m[2].weight, std=0.02),
    "nn.init.zeros_": lambda m: torch.nn.init.zeros_(m[1].weight),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn], ids=str)
@pytest.mark.parametrize("edit", list(EDITS), ids=list(EDITS))
def test_edit_takes_effect_bit_exactly(edit, dtype):
    model, twin, x = twins(dtype)
    torch.manual_seed(7)
    try:
        EDITS[edit](twin)
    except NotImplementedError:                     # (float8 arithmetic on the CPU)
        pytest.skip(f"PyTorch cannot do this edit on {dtype} tensors")
    torch.manual_seed(7)
    EDITS[edit](model)
    assert all(ecf8.torch.is_compressed(m) for m in model)
    for name, value in twin.state_dict().items():
        assert same(model.state_dict()[name], value), name
    assert same(run(model, x), run(twin, x))
    assert not same(run(copy.deepcopy(twin).requires_grad_(False), x), run(twins(dtype)[1], x))  # it changed


def test_edits_survive_pickling_and_decompression():
    model, twin, x = twins()
    plus_equals(model)
    plus_equals(twin)
    clone = pickle.loads(pickle.dumps(model))
    assert same(clone(x), twin(x))
    ecf8.torch.decompress_module(model)
    assert same(model(x), twin(x))


def test_weight_is_one_tensor_while_referenced():
    model, _, _ = twins()
    w = model[0].weight
    assert model[0].weight is w
    assert model.state_dict()["0.weight"].data_ptr() == w.data_ptr()


def test_load_state_dict_updates_a_referenced_copy():
    model, twin, x = twins()
    w = model[1].weight
    new = {k: v + 1 for k, v in twin.state_dict().items()}
    model.load_state_dict(new)
    twin.load_state_dict(new)
    assert same(w, twin[1].weight)                  # as a Parameter would be updated in place
    w.data.mul_(3)
    twin[1].weight.data.mul_(3)
    assert same(model(x), twin(x))


def test_copies_of_a_weight_are_ordinary_tensors():
    model, _, _ = twins()
    w = model[0].weight
    assert type(w * 2) is torch.Tensor and type(w.clone()) is torch.Tensor
    assert type(w.float()) is torch.Tensor
    before = model[0].weight.clone()
    w.clone().add_(5)                               # a copy's copy: the weight is not involved
    assert same(model[0].weight, before)
    f = io.BytesIO()
    torch.save(model.state_dict(), f)
    f.seek(0)
    loaded = torch.load(f)                          # weights_only: ordinary tensors
    assert type(loaded["0.weight"]) is torch.Tensor and same(loaded["0.weight"], before)
    assert type(copy.deepcopy(w)) is torch.Tensor
    half = twins(torch.float16)[0][0].weight
    with pytest.raises(ValueError, match="read-only"):
        half.numpy()[0, 0] = 1                      # (memory writes PyTorch does not see)


def test_data_of_another_shape_or_dtype_is_refused():
    model, twin, x = twins()
    with pytest.raises(ecf8.ECF8Error, match="decompress_module"):
        model[0].weight.data = torch.zeros(DIM, DIM)                   # float32
    with pytest.raises(ecf8.ECF8Error, match="decompress_module"):
        model[0].weight.data = torch.zeros(2, 2, dtype=torch.bfloat16)
    assert same(model(x), twin(x))


def test_assigning_a_parameter_replaces_the_weight_as_on_any_module():
    model, twin, x = twins()
    new = torch.nn.Parameter(torch.randn(DIM, DIM, dtype=torch.float32))
    model[0].weight = new
    twin[0].weight = new
    assert model[0].weight is new and not ecf8.torch.is_compressed(model[0])
    assert ecf8.torch.is_compressed(model[1])
    model[1].weight = model[1].weight               # its own weight back (PEFT does this): no change
    assert ecf8.torch.is_compressed(model[1])
    with pytest.raises(TypeError, match="Parameter"):
        model[2].weight = torch.zeros(DIM, DIM)     # as PyTorch refuses a plain tensor
    assert same(model[1:](x), twin[1:](x))


def test_tied_weight_edit_reaches_both_holders():
    model, ids = tied_model()
    twin = copy.deepcopy(model)
    ecf8.torch.compress_module(model, embeddings=True)
    model.head.weight.data.mul_(-1)
    twin.head.weight.data.mul_(-1)
    assert same(model(ids), twin(ids)) and same(model.embed.weight, twin.embed.weight)


# --- load_state_dict(assign=True) ---------------------------------------------------------------

def test_load_state_dict_assign_keeps_the_given_tensors_as_pytorch_does():
    """assign=True gives the module the state dict's own tensors (an FP32 one stays FP32); the
    compressed weight is replaced, not rounded to its old dtype."""
    model, twin, x = twins()
    torch.manual_seed(3)
    new = {k: torch.randn(v.shape) for k, v in twin.state_dict().items()}          # float32
    model.load_state_dict(new, assign=True)
    twin.load_state_dict(new, assign=True)
    for name, value in twin.named_parameters():
        mine = dict(model.named_parameters())[name]
        assert mine.dtype == torch.float32 and same(mine, value)
        assert mine.data_ptr() == new[name].data_ptr()                # the tensor itself, as PyTorch
    assert not any(ecf8.torch.is_compressed(m) for m in model)
    x = x.float()
    assert same(model(x), twin(x))


def test_load_state_dict_assign_with_tied_weights_matches_pytorch():
    model, ids = tied_model()
    twin = copy.deepcopy(model)
    ecf8.torch.compress_module(model, embeddings=True)
    floats: dict = {}                               # one float32 tensor per stored matrix: tied
    sd = {k: floats.setdefault(v.data_ptr(), v.float()) for k, v in twin.state_dict().items()}
    assert sd["head.weight"] is sd["embed.weight"]
    model.load_state_dict(sd, assign=True)
    twin.load_state_dict(sd, assign=True)
    assert (model.head.weight is model.embed.weight) == (twin.head.weight is twin.embed.weight)
    assert model.head.weight.data_ptr() == model.embed.weight.data_ptr()
    assert model.head.weight.dtype == torch.float32
    assert same(model(ids), twin(ids))


# --- GPU ----------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("edit", ["data.add_", "data +=", "data = merged copy", "nn.init.zeros_", "views",
                                  "kept reference"])
def test_cuda_edit_takes_effect_bit_exactly(edit):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA build of PyTorch and a GPU")
    model, twin, x = twins(device="cuda")
    EDITS[edit](twin)
    EDITS[edit](model)
    assert same(model(x), twin(x))
    assert all(same(model.state_dict()[k], v) for k, v in twin.state_dict().items())
