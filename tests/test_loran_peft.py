"""LoRAN inside PEFT: quantised and Conv1D layers, save/load, several adapters, disable/delete, merging."""
import json
import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from loran import LoranConfig, get_loran_model, load_loran, loran_layers, merge_to_full_precision
from loran.activations import Activation

SINTER = {"activation": "sinter", "activation_kwargs": {"amp": 0.5, "omega": 30.0}}
TARGETS = ["q_proj", "v_proj"]


class Toy(nn.Module):
    """Square q_proj (16 -> 16) and non-square v_proj (16 -> 8), as in a GQA attention block."""

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.v_proj = nn.Linear(16, 8)

    def forward(self, x):
        return torch.cat([self.q_proj(x), self.v_proj(x)], dim=-1)


def _quantise(lin: nn.Linear, kind: str) -> nn.Module:
    if kind == "nf4":
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=True)
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
        # No in-place repacking to bf16 on AVX512-BF16 CPUs (see loran.pipeline.base_models.keep_4bit_weights_packed): keeps comparisons exact.
        q.support_avx512bf16_for_cpu = False
    else:
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q.to("cpu")


def make_toy(kind: str = "fp32", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = Toy()
    if kind != "fp32":
        model.q_proj, model.v_proj = _quantise(model.q_proj, kind), _quantise(model.v_proj, kind)
        # PEFT's own LoRA dispatches to its bnb layers only when the model says it is quantised.
        setattr(model, "is_loaded_in_4bit" if kind == "nf4" else "is_loaded_in_8bit", True)
    return model


def randomise_B(model, seed=1, std=0.5):
    gen = torch.Generator().manual_seed(seed)
    for _, layer in loran_layers(model):
        for lin in layer.lora_B.values():
            lin.weight.data = torch.randn(lin.weight.shape, generator=gen) * std


def adapter_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}


X = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(42))


@pytest.mark.parametrize("kind", ["fp32", "nf4", "int8"])
def test_layer_types_are_replaced(kind):
    model = get_loran_model(make_toy(kind), LoranConfig(r=4, lora_alpha=8, target_modules=TARGETS, **SINTER))
    names = {type(m).__name__ for _, m in loran_layers(model)}
    assert names == {{"fp32": "LoranLinear", "nf4": "LoranLinear4bit", "int8": "LoranLinear8bitLt"}[kind]}


@pytest.mark.parametrize("kind", ["fp32", "nf4", "int8"])
def test_identity_equals_peft_lora_exactly(kind):
    lora = get_peft_model(make_toy(kind), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    loran = get_loran_model(make_toy(kind), LoranConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                        activation="identity"))
    randomise_B(loran)
    lora.load_state_dict(adapter_state(loran), strict=False)
    assert torch.equal(lora(X), loran(X))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantised_forward_is_base_plus_update(kind):
    """On a quantised base: output = (quantised base output) + s * x @ f(BA)^T, f non-linear."""
    base = make_toy(kind)
    with torch.no_grad():
        y_base = base(X)
    model = get_loran_model(base, LoranConfig(r=4, lora_alpha=8, target_modules=TARGETS, **SINTER))
    randomise_B(model)
    act = Activation("sinter", SINTER["activation_kwargs"])
    updates = []
    for name in TARGETS:
        layer = model.get_submodule(f"base_model.model.{name}")
        A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        updates.append(2.0 * X.double() @ act.f(B @ A).T)
    expected = y_base.double() + torch.cat(updates, dim=-1)
    torch.testing.assert_close(model(X).double(), expected, rtol=1e-5, atol=1e-5)


def test_conv1d_fan_in_fan_out():
    torch.manual_seed(0)

    class GPT2ish(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = Conv1D(24, 16)  # weight (16, 24): stored (d_in, d_out)

        def forward(self, x):
            return self.c_attn(x)

    base = GPT2ish()
    W, b = base.c_attn.weight.detach().double(), base.c_attn.bias.detach().double()
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        model = get_loran_model(base, LoranConfig(r=4, lora_alpha=8, target_modules=["c_attn"], **SINTER))
    randomise_B(model)
    layer = model.get_submodule("base_model.model.c_attn")
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    assert A.shape == (4, 16) and B.shape == (24, 4)
    act = Activation("sinter", SINTER["activation_kwargs"])
    expected = X.double() @ W + b + 2.0 * X.double() @ act.f(B @ A).T
    torch.testing.assert_close(model(X).double(), expected, rtol=1e-5, atol=1e-5)
    y = model(X)
    model.merge_adapter()
    torch.testing.assert_close(model(X), y, rtol=1e-5, atol=1e-5)


def test_merge_unmerge_and_unload_match_unmerged_outputs():
    model = get_loran_model(make_toy(), LoranConfig(r=4, lora_alpha=8, target_modules=TARGETS, **SINTER))
    randomise_B(model)
    y = model(X).detach()
    with model.disable_adapter():
        y_base = model(X).detach()
    assert (y - y_base).abs().max() > 0.1
    model.merge_adapter()
    torch.testing.assert_close(model(X), y, rtol=1e-5, atol=1e-5)  # not the transposed update
    model.unmerge_adapter()
    torch.testing.assert_close(model(X), y, rtol=1e-6, atol=1e-6)
    merged = model.merge_and_unload()
    assert isinstance(merged.q_proj, nn.Linear) and not loran_layers(merged)
    torch.testing.assert_close(merged(X), y, rtol=1e-5, atol=1e-5)


def test_merging_into_nf4_requantises_and_full_precision_merge_does_not():
    def fresh():
        model = get_loran_model(make_toy("nf4"), LoranConfig(r=4, lora_alpha=8, target_modules=TARGETS, **SINTER))
        randomise_B(model, std=0.05)
        return model

    model = fresh()
    y = model(X).detach()
    with pytest.warns(UserWarning, match="rounding errors"):
        model.merge_adapter()
    requant_gap = (model(X) - y).abs().max().item()
    full = merge_to_full_precision(fresh())
    assert isinstance(full.q_proj, nn.Linear) and full.q_proj.weight.dtype == torch.float32
    full_gap = (full(X) - y).abs().max().item()
    assert full_gap < 1e-5 < requant_gap


def test_save_load_round_trip_is_bit_identical(tmp_path):
    model = get_loran_model(make_toy(), LoranConfig(r=4, lora_alpha=8, target_modules=TARGETS, **SINTER))
    randomise_B(model)
    y = model(X)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORAN" and saved["activation_kwargs"] == {"amp": 0.5, "omega": 30.0}
    loaded = load_loran(make_toy(), tmp_path)
    assert torch.equal(loaded(X), y)
    # With `import loran`, stock PeftModel.from_pretrained reads it as LoRAN too.
    stock = PeftModel.from_pretrained(make_toy(), tmp_path)
    assert isinstance(stock.peft_config["default"], LoranConfig)
    assert torch.equal(stock(X), y)


def test_stock_peft_without_loran_refuses_instead_of_loading_lora(tmp_path):
    model = get_loran_model(make_toy(), LoranConfig(r=4, lora_alpha=8, target_modules=TARGETS, **SINTER))
    model.save_pretrained(tmp_path)
    script = (
        "import sys, torch\n"
        "from peft import PeftModel\n"
        "assert 'loran' not in sys.modules\n"
        f"PeftModel.from_pretrained(torch.nn.Linear(2, 2), {str(tmp_path)!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "KeyError: 'LORAN'" in proc.stderr


def test_load_loran_refuses_a_plain_lora_folder(tmp_path):
    get_peft_model(make_toy(), LoraConfig(r=4, target_modules=TARGETS)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not LoRAN"):
        load_loran(make_toy(), tmp_path)


def test_several_adapters_side_by_side_save_load_disable_delete(tmp_path):
    model = get_loran_model(make_toy(), LoranConfig(r=4, lora_alpha=8, target_modules=TARGETS, **SINTER))
    model.add_adapter("other", LoranConfig(r=2, lora_alpha=4, target_modules=TARGETS, activation="tanh"))
    randomise_B(model)
    y_default = model(X).detach()
    model.set_adapter("other")
    y_other = model(X).detach()
    assert (y_default - y_other).abs().max() > 0.1
    # "other" alone on a fresh model gives the same output.
    solo = get_loran_model(make_toy(), LoranConfig(r=2, lora_alpha=4, target_modules=TARGETS, activation="tanh"))
    solo.load_state_dict({k.replace(".other.", ".default."): v for k, v in adapter_state(model).items()
                          if ".other." in k}, strict=False)
    assert torch.equal(solo(X), y_other)

    model.save_pretrained(tmp_path)
    loaded = load_loran(make_toy(), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    assert torch.equal(loaded(X), y_default)
    loaded.set_adapter("other")
    assert torch.equal(loaded(X), y_other)
    with loaded.disable_adapter():
        assert torch.equal(loaded(X), make_toy()(X))

    loaded.delete_adapter("other")
    for _, layer in loran_layers(loaded):
        assert "other" not in layer.lora_A and "other" not in layer.loran_activation
    loaded.set_adapter("default")
    assert torch.equal(loaded(X), y_default)


def test_only_adapter_weights_train_and_are_saved(tmp_path):
    model = get_loran_model(make_toy("nf4"), LoranConfig(r=4, lora_alpha=8, target_modules=TARGETS, **SINTER))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert sorted(keys) == sorted(n.replace(".default", "") for n in trainable)


def test_fan_in_fan_out_on_nn_linear_is_reset_so_merging_is_not_transposed():
    with pytest.warns(UserWarning, match="fan_in_fan_out=True but the target is nn.Linear"):
        model = get_loran_model(make_toy(), LoranConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                        fan_in_fan_out=True, **SINTER))
    randomise_B(model)
    y = model(X).detach()
    model.merge_adapter()
    torch.testing.assert_close(model(X), y, rtol=1e-5, atol=1e-5)
