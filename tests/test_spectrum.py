"""The update spectrum: LoRA's update has rank r exactly; a clearly non-linear LoRAN update goes beyond it."""
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
