"""loran/layers.py and loran/layers_bnb.py: the LoRAN layers PEFT builds (LoranLinear, LoranConv1D, LoranLinear4bit):
their fan_in_fan_out handling, the folded forward and its arguments, get_delta_weight, the 4-bit merge."""
import json

import pytest
import torch
from torch import nn

from loran import LoranConfig, get_loran_model
from loran.variants import Path as LayerPath, choose_path

from test_variants import SINTER, Proj, _proj_model


def test_conv1d_flags_and_warning_text():
    import warnings

    from transformers.pytorch_utils import Conv1D

    class GPT2ish(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = Conv1D(6, 4)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_loran_model(GPT2ish(), LoranConfig(r=2, target_modules=["c_attn"]))
    assert "fan_in_fan_out=False but the target is Conv1D; setting fan_in_fan_out=True." in [
        str(w.message) for w in caught]
    layer = model.base_model.model.c_attn
    assert layer.is_target_conv_1d_layer is True and layer.fan_in_fan_out is True


def test_fan_in_fan_out_on_nn_linear_warns_in_full_and_is_saved_false(tmp_path):
    """fan_in_fan_out=True on an nn.Linear target: the warning word for word, and the config (as saved with the
    adapter) says false, not null. Mutants: the message replaced, the flag set to None."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_loran_model(Proj(), LoranConfig(r=2, target_modules=["q_proj"], fan_in_fan_out=True))
    assert "fan_in_fan_out=True but the target is nn.Linear; setting fan_in_fan_out=False." in [
        str(w.message) for w in caught]
    assert model.base_model.model.q_proj.fan_in_fan_out is False
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is False


def test_forward_takes_the_folded_path_when_it_can(eager, monkeypatch):
    import loran.layers as ll

    calls = []
    real = ll.loran_linear
    monkeypatch.setattr(ll, "loran_linear", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    model = _proj_model("sinter", True).train()
    model(torch.randn(2, 10))
    assert len(calls) == 1 and calls[0] is not None  # one call, with the base weight folded in


def test_extra_positional_arguments_are_refused_as_by_the_base_layer():
    """nn.Linear takes no positional argument besides x: the adapted layer passes extras on to it (which refuses them)
    on both paths, rather than folding the update and ignoring them. Mutants: the extras dropped before the fold
    check or before PEFT's forward."""
    model = _proj_model("sinter", True).eval()
    layer = model.base_model.model.q_proj
    x = torch.randn(2, 10)
    assert choose_path(layer, x).path is LayerPath.FOLDED
    with pytest.raises(TypeError):
        layer(x, 5)
    with pytest.raises(TypeError):
        layer.base_layer(x, 5)


def test_get_delta_weight_has_the_adapter_dtype_and_plain_lora_keeps_its_own():
    """Mutants: get_delta_weight not cast to the adapter's dtype (.to(None): float32 from a bf16 adapter), and a
    plain LoRA adapter's delta asked for with adapter None. References: s f(B A) in bf16, and PEFT's s B A."""
    from peft import LoraConfig

    from loran.activations import Activation

    model = get_loran_model(Proj(), LoranConfig(r=3, lora_alpha=9, target_modules=["q_proj"], activation="sinter",
                                                activation_kwargs=SINTER))
    model.add_adapter("plain", LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"]))
    layer = model.base_model.model.q_proj
    gen = torch.Generator().manual_seed(42)
    for lin in layer.lora_B.values():
        lin.weight.data = torch.randn(lin.weight.shape, generator=gen) * 0.5
    A, B = layer.lora_A["plain"].weight, layer.lora_B["plain"].weight
    torch.testing.assert_close(layer.get_delta_weight("plain"), 3.0 * B @ A)
    layer.lora_A["default"].to(torch.bfloat16)
    layer.lora_B["default"].to(torch.bfloat16)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    delta = layer.get_delta_weight("default")
    assert delta.dtype == torch.bfloat16
    expected = 3.0 * Activation("sinter", SINTER).f(B.float() @ A.float())
    assert torch.equal(delta, expected.bfloat16())


@pytest.mark.parametrize("how", ["positional", "keyword"])
def test_nf4_merge_passes_its_arguments_to_pefts_merge(how):
    """Mutants: LoranLinear4bit.merge calling super().merge without *args, or without **kwargs (adapter_names lost:
    every active adapter merged)."""
    from test_loran_peft import SINTER as SINTER_KW, _quantise

    base = Proj(16, 16)
    base.q_proj, base.is_loaded_in_4bit = _quantise(base.q_proj, "nf4"), True
    config = dict(r=2, lora_alpha=4, target_modules=["q_proj"], **SINTER_KW)
    model = get_loran_model(base, LoranConfig(**config))
    model.add_adapter("b", LoranConfig(**config))
    layer = model.base_model.model.q_proj
    layer.set_adapter(["default", "b"])
    with pytest.warns(UserWarning, match="rounding errors"):
        if how == "positional":
            layer.merge(False, ["b"])
        else:
            layer.merge(adapter_names=["b"])
    assert layer.merged_adapters == ["b"]
