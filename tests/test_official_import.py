"""Importing official PEFT-LoRAN ("MLORA") adapters, on checkpoints the tests write in that format."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from loran import load_loran
from loran.official import OfficialAdapterError, import_official_adapter

REPO = Path(__file__).resolve().parents[1]


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 16, bias=False)
        self.v_proj = nn.Linear(16, 8, bias=False)  # non-square, as in GQA


class Llamaish(nn.Module):
    """Module paths as in LlamaForCausalLM: model.layers.N.self_attn.{q,v}_proj."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([nn.Module() for _ in range(2)])
        for layer in self.model.layers:
            layer.self_attn = Attention()

    def forward(self, x):
        return torch.cat([torch.cat([l.self_attn.q_proj(x), l.self_attn.v_proj(x)], -1) for l in self.model.layers], -1)


def official_config(**overrides):
    cfg = {"peft_type": "MLORA", "r": [4, 16], "mlora_alpha": 16, "mlora_dropout": 0.2,
           "mlora_af": "Sin", "mlora_af_sin_A": 0.5, "mlora_af_sin_omega": 30.0, "mlora_use_P": False,
           "mlora_use_b": False, "target_modules": ["q_proj", "v_proj"], "fan_in_fan_out": False, "bias": "none"}
    cfg.update(overrides)
    return cfg


def official_weights(r=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(2):
        for name, d_out in (("q_proj", 16), ("v_proj", 8)):
            key = f"base_model.model.model.layers.{i}.self_attn.{name}"
            state[f"{key}.mlora_A"] = torch.randn(r, 16, generator=gen) * 0.3
            state[f"{key}.mlora_B"] = torch.randn(d_out, r, generator=gen) * 0.3
    return state


def write_official(folder: Path, cfg=None, state=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(cfg or official_config()))
    torch.save(state if state is not None else official_weights(), folder / "adapter_model.bin")
    return folder


def official_forward(base: Llamaish, state, cfg, x):
    """By hand, as the official code computes it: W0 x + (alpha / r0) * x @ f(B A)^T, f = Sinter."""
    amp, omega, s = cfg["mlora_af_sin_A"], cfg["mlora_af_sin_omega"], cfg["mlora_alpha"] / cfg["r"][0]
    outs = []
    x = x.double()
    for i, layer in enumerate(base.model.layers):
        for name in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{i}.self_attn.{name}"
            Z = state[f"{key}.mlora_B"].double() @ state[f"{key}.mlora_A"].double()
            fZ = Z + amp * Z * torch.sin(omega * Z)
            W0 = getattr(layer.self_attn, name).weight.double()
            outs.append(x @ W0.T + s * x @ fZ.T)
    return torch.cat(outs, -1)


def test_imported_adapter_reproduces_the_official_forward(tmp_path):
    src = write_official(tmp_path / "official")
    config = import_official_adapter(src, tmp_path / "loran")
    assert (config.r, config.lora_alpha, config.lora_dropout, config.activation) == (4, 16, 0.2, "sinter")
    assert config.activation_kwargs == {"amp": 0.5, "omega": 30.0}
    model = load_loran(Llamaish(), tmp_path / "loran").eval()  # eval: dropout off, as at inference
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(5))
    expected = official_forward(Llamaish(), official_weights(), official_config(), x)
    torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_script_converts_and_reports(tmp_path):
    src = write_official(tmp_path / "official")
    proc = subprocess.run([sys.executable, str(REPO / "scripts/import_official_adapter.py"), str(src),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "activation=sinter" in proc.stdout and (tmp_path / "out/adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    "cfg, state, message",
    [
        (official_config(r=[4, 16, 16], mlora_use_P=True), None, "P_i/b_i"),
        (official_config(mlora_af="Softplus"), None, "no equivalent"),
        (official_config(peft_type="LORA"), None, "MLORA"),
        (None, {**official_weights(), "base_model.model.model.layers.0.self_attn.q_proj.mlora_P_1": torch.ones(4, 16)},
         "P/b/embedding"),
    ],
)
def test_refuses_what_it_cannot_convert(tmp_path, cfg, state, message):
    src = write_official(tmp_path / "official", cfg, state)
    with pytest.raises(OfficialAdapterError, match=message):
        import_official_adapter(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_all_zero_bias_is_dropped(tmp_path):
    state = {**official_weights(), "base_model.model.model.layers.0.self_attn.q_proj.mlora_b_1": torch.zeros(16, 1)}
    src = write_official(tmp_path / "official", state=state)
    import_official_adapter(src, tmp_path / "out")
    from safetensors.torch import load_file

    assert len(load_file(tmp_path / "out/adapter_model.safetensors")) == 8


def by_hand(base: Llamaish, state, f, s, x):
    """W0 x + s * x @ f(B A)^T on the modules that have weights in `state`; W0 x alone elsewhere."""
    outs = []
    for i, layer in enumerate(base.model.layers):
        for name in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{i}.self_attn.{name}"
            y = x.double() @ getattr(layer.self_attn, name).weight.double().T
            if f"{key}.mlora_A" in state:
                Z = state[f"{key}.mlora_B"].double() @ state[f"{key}.mlora_A"].double()
                y = y + s * x.double() @ f(Z).T
            outs.append(y)
    return torch.cat(outs, -1)


@pytest.mark.parametrize("pattern", ["layers", None])  # None: the official code's default list of layer names
def test_layers_to_transform_adapts_only_those_layers(tmp_path, pattern):
    cfg = official_config(layers_to_transform=[1], layers_pattern=pattern, mlora_af="Sigmoid")
    state = {k: v for k, v in official_weights().items() if ".layers.1." in k}
    import_official_adapter(write_official(tmp_path / "official", cfg, state), tmp_path / "loran")
    model = load_loran(Llamaish(), tmp_path / "loran").eval()
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(5))
    expected = by_hand(Llamaish(), state, torch.sigmoid, 16 / 4, x)
    torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_weights_outside_the_configured_layers_are_refused(tmp_path):
    src = write_official(tmp_path / "official", official_config(layers_to_transform=[1], layers_pattern="layers"))
    with pytest.raises(OfficialAdapterError, match="layers.0.self_attn.q_proj.*not targeted"):
        import_official_adapter(src, tmp_path / "out")
