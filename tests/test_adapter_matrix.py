"""The adapter matrix, as PEFT tests its own tuners: small custom models (an MLP, a GPT-2 style Conv1D block, mixed
layer types) crossed with activations, each case through forward, save/load, merge/unmerge, disable, delete, several
adapters, mixed batches and training. Every check compares numbers with an independent float64 reference: the base
model called with W0 + sum_a s_a f_a(B_a A_a) in place of each adapted weight (torch.func.functional_call), and the
identity activation with PEFT's own LoRA, exactly."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from loran import LoranConfig, get_loran_model, load_loran, loran_layers


class MLP(nn.Module):
    targets = ["lin1", "lin2"]

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(16, 24), nn.Linear(24, 8)

    def forward(self, x):
        return self.lin2(torch.tanh(self.lin1(x)))


class GPT2ish(nn.Module):
    """transformers Conv1D layers, weights stored (d_in, d_out)."""

    targets = ["c_attn", "c_proj"]

    def __init__(self):
        super().__init__()
        self.c_attn, self.c_proj = Conv1D(24, 16), Conv1D(16, 24)

    def forward(self, x):
        return self.c_proj(torch.tanh(self.c_attn(x)))


class Mixed(nn.Module):
    """nn.Linear and Conv1D adapted side by side, next to an untargeted Conv1d."""

    targets = ["lin", "c_fc"]

    def __init__(self):
        super().__init__()
        self.lin, self.c_fc, self.conv = nn.Linear(16, 16), Conv1D(8, 16), nn.Conv1d(8, 8, 1)

    def forward(self, x):
        return self.conv(self.c_fc(torch.relu(self.lin(x))).transpose(-1, -2)).transpose(-1, -2)


MODELS = {"mlp": MLP, "conv1d": GPT2ish, "mixed": Mixed}
ACTIVATIONS = {
    "identity": {"activation": "identity"},
    "sinter": {"activation": "sinter", "activation_kwargs": {"amp": 0.5, "omega": 30.0}},
    "sigmoid-official": {"activation": "sigmoid", "start": "official"},
    "relu": {"activation": "relu"},
    "tanh": {"activation": "tanh"},
}
CASES = [(m, a) for m in MODELS for a in ACTIVATIONS]
# Each case's f written out here, by the (activation, start) its config names: "base" centres f (f(z) - f(0)), so
# ReLU and tanh are themselves; the official Sigmoid keeps f(0) = 0.5. The reference never uses the layer's own f.
F = {("identity", "base"): lambda z: z, ("sinter", "base"): lambda z: z + 0.5 * z * torch.sin(30.0 * z),
     ("sigmoid", "official"): torch.sigmoid, ("relu", "base"): torch.relu, ("tanh", "base"): torch.tanh}
X = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(7))


def base(model_name):
    torch.manual_seed(0)
    return MODELS[model_name]()


def config(model_name, act, r=4, **kw):
    return LoranConfig(r=r, lora_alpha=2 * r, target_modules=MODELS[model_name].targets, **ACTIVATIONS[act], **kw)


def build(model_name, act, adapters=("default",), seed=1):
    """A LoRAN model with `adapters` (all of `act`), each with random B (so the update is not zero)."""
    model = get_loran_model(base(model_name), config(model_name, act))
    for i, name in enumerate(adapters[1:]):
        model.add_adapter(name, config(model_name, act, r=2 + 2 * i))
    gen = torch.Generator().manual_seed(seed)
    for _, layer in loran_layers(model):
        for lin in layer.lora_B.values():
            lin.weight.data = torch.randn(lin.weight.shape, generator=gen) * 0.3
    return model


def factors(model, adapters, requires_grad=False):
    """{(layer name, adapter): (A, B)} in float64, as leaves."""
    return {(name.removeprefix("base_model.model."), a): tuple(
        layer.__getattr__(f"lora_{w}")[a].weight.detach().double().requires_grad_(requires_grad) for w in "AB")
        for name, layer in loran_layers(model) for a in adapters}


def reference(model_name, model, x, adapters, params=None):
    """The base model in float64 with each adapted weight replaced by W0 + sum_a s_a f_a(B_a A_a)."""
    params = params or factors(model, adapters)
    ref = base(model_name).double()
    weights = {}
    for name, layer in loran_layers(model):
        name = name.removeprefix("base_model.model.")
        W = ref.get_submodule(name).weight
        for a in adapters:
            A, B = params[(name, a)]
            spec = model.peft_config[a]
            delta = layer.scaling[a] * F[(spec.activation, spec.start)](B @ A)
            W = W + (delta.T if layer.fan_in_fan_out else delta)
        weights[f"{name}.weight"] = W
    return torch.func.functional_call(ref, weights, (x.double(),))


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("model_name, act", CASES)
def test_forward(model_name, act):
    model = build(model_name, act)
    y = model(X)
    close(y, reference(model_name, model, X, ["default"]))
    assert (y - base(model_name)(X)).abs().max() > 1e-2  # the update is not negligible
    if act == "identity":  # LoRAN with the identity is PEFT's LoRA, bit for bit
        lora = get_peft_model(base(model_name), LoraConfig(r=4, lora_alpha=8, target_modules=MODELS[model_name].targets))
        lora.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" in k}, strict=False)
        assert torch.equal(lora(X), y)


@pytest.mark.parametrize("model_name, act", CASES)
def test_save_load(tmp_path, model_name, act):
    model = build(model_name, act, adapters=("default", "other"))
    y = model(X)
    model.save_pretrained(tmp_path)
    loaded = load_loran(base(model_name), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    assert torch.equal(loaded(X), y)
    model.set_adapter("other")
    loaded.set_adapter("other")
    assert torch.equal(loaded(X), model(X))


@pytest.mark.parametrize("model_name, act", CASES)
def test_merge_unmerge_unload(model_name, act):
    model = build(model_name, act)
    y = model(X).detach()
    model.merge_adapter()
    close(model(X), y)
    model.unmerge_adapter()
    close(model(X), y, 1e-6)
    close(model.merge_and_unload()(X), y)


@pytest.mark.parametrize("model_name, act", CASES)
def test_disable_and_delete(model_name, act):
    model = build(model_name, act, adapters=("default", "other"))
    with model.disable_adapter():
        assert torch.equal(model(X), base(model_name)(X))
    y = model(X)
    model.delete_adapter("other")
    assert all("other" not in layer.lora_A and "other" not in layer.loran_activation for _, layer in loran_layers(model))
    assert torch.equal(model(X), y)


@pytest.mark.parametrize("model_name, act", CASES)
def test_several_adapters_active_at_once(model_name, act):
    model = build(model_name, act, adapters=("default", "other"))
    model.base_model.set_adapter(["default", "other"])
    close(model(X), reference(model_name, model, X, ["default", "other"]))


@pytest.mark.parametrize("model_name, act", CASES)
def test_mixed_batch(model_name, act):
    model = build(model_name, act, adapters=("default", "other")).eval()  # PEFT allows mixed batches in eval only
    names = ["default", "other", "__base__", "other"]
    y = model(X, adapter_names=names)
    for i, name in enumerate(names):
        adapters = [] if name == "__base__" else [name]
        close(y[i], reference(model_name, model, X[i:i + 1], adapters)[0])


@pytest.mark.parametrize("model_name, act", CASES)
def test_training_gradients(model_name, act):
    """dL/dA and dL/dB of the (fused, memory-efficient) forward against autograd through the float64 reference."""
    model = build(model_name, act)
    model(X).square().mean().backward()
    params = factors(model, ["default"], requires_grad=True)
    reference(model_name, model, X, ["default"], params).square().mean().backward()
    for name, layer in loran_layers(model):
        A, B = params[(name.removeprefix("base_model.model."), "default")]
        close(layer.lora_A["default"].weight.grad, A.grad)
        close(layer.lora_B["default"].weight.grad, B.grad)
        assert B.grad.abs().max() > 0  # every activation trains (ReLU and Sigmoid included)
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = model(X).square().mean().item()
    optimiser.step()
    assert model(X).square().mean().item() < before
