"""loran/pipeline/spectrum.py, the update spectrum: LoRA's update has rank r exactly; a clearly non-linear LoRAN update
goes beyond it, by the exact share of energy beyond rank r; the middle layer and its update matrix."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from loran import LoranConfig, get_loran_model, loran_layers
from loran.pipeline.spectrum import update_spectrum


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(32, 32) for _ in range(3)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _randomise_B(model):
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=torch.Generator().manual_seed(1))


def test_identity_loran_has_rank_r_like_lora():
    """The spectrum is computed in float64: the identity control must show rank r, not float32 roundoff."""
    loran = get_loran_model(Stack(), LoranConfig(r=4, lora_alpha=8, target_modules=["0", "1", "2"],
                                                 activation="identity"))
    _randomise_B(loran)
    spec = update_spectrum(loran)
    assert spec["numerical_rank"] == 4 and spec["energy_beyond_r"] < 1e-20


def test_lora_update_has_rank_r_and_loran_sinter_lifts_it():
    lora = get_peft_model(Stack(), LoraConfig(r=4, lora_alpha=8, target_modules=["0", "1", "2"]))
    _randomise_B(lora)
    spec = update_spectrum(lora)
    assert spec["module"].endswith("layers.1") and spec["r"] == 4
    assert spec["numerical_rank"] == 4 and spec["energy_beyond_r"] < 1e-20

    loran = get_loran_model(Stack(), LoranConfig(r=4, lora_alpha=8, target_modules=["0", "1", "2"],
                                                 activation="sinter", activation_kwargs={"amp": 0.5, "omega": 3.0}))
    _randomise_B(loran)
    spec = update_spectrum(loran)
    assert spec["numerical_rank"] == 32 and spec["energy_beyond_r"] > 1e-3
    # And the singular values are those of s f(BA) computed by hand.
    layer = dict(loran_layers(loran))[spec["module"]]
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    Z = B @ A
    expected = torch.linalg.svdvals(2.0 * (Z + 0.5 * Z * torch.sin(3.0 * Z)))
    torch.testing.assert_close(torch.tensor(spec["singular_values"], dtype=torch.float64), expected)


# The update spectrum: the share of energy beyond rank r from the exact singular values.
class NonSquareStack(nn.Module):
    """Three 16 -> 12 layers (so d_out < d_in); forward is not used."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(16, 12) for _ in range(3)])

    def forward(self, x):
        return x


def test_energy_beyond_r_is_the_exact_tail_share():
    """Planted: energy[r + 1:] in update_spectrum -> fails (it was only bounded below)."""
    r = 3
    model = get_loran_model(NonSquareStack(), LoranConfig(r=r, lora_alpha=6, target_modules=["0", "1", "2"],
                                                 activation="sinter", activation_kwargs={"amp": 0.5, "omega": 3.0}))
    gen = torch.Generator().manual_seed(1)
    for _, layer in loran_layers(model):
        layer.lora_B["default"].weight.data = torch.randn(12, r, generator=gen)
    spec = update_spectrum(model)
    layer = model.base_model.model.layers[1]
    assert spec["module"].endswith("layers.1") and spec["r"] == r
    A, B = layer.lora_A["default"].weight.detach().double(), layer.lora_B["default"].weight.detach().double()
    Z = B @ A
    sv = torch.linalg.svdvals(2.0 * (Z + 0.5 * Z * torch.sin(3.0 * Z)))
    energy = sv.square()
    assert spec["energy_beyond_r"] == pytest.approx((energy[r:].sum() / energy.sum()).item(), rel=1e-9)
    assert spec["energy_beyond_r"] > (energy[r + 1:].sum() / energy.sum()).item() * 1.01  # the test can tell
    assert spec["numerical_rank"] == int((sv > sv[0] * 1e-10).sum()) == 12


def test_spectrum_of_a_zero_update_is_zero():
    model = get_loran_model(NonSquareStack(), LoranConfig(r=2, target_modules=["0", "1", "2"]))  # B = 0
    spec = update_spectrum(model)
    assert spec["energy_beyond_r"] == 0.0 and spec["numerical_rank"] == 0 and set(spec["singular_values"]) == {0.0}


class Five(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(6, 6) for _ in range(5)])


def test_middle_layer_of_five_and_default_adapter():
    from loran.pipeline.spectrum import middle_layer, update_matrix

    model = get_loran_model(Five(), LoranConfig(r=2, lora_alpha=4, target_modules=[str(i) for i in range(5)],
                                                activation="tanh"))
    name, layer = middle_layer(model)
    assert name.endswith("layers.2")
    layer.lora_B["default"].weight.data.fill_(0.5)
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    torch.testing.assert_close(update_matrix(layer), 2.0 * torch.tanh(B @ A).detach())
