"""loran/official.py: importing official PEFT-LoRAN ("MLORA") adapters, on checkpoints the tests write in that format;
f applied as the official code does, what the import reads, converts and refuses."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from loran import LoranConfig, load_loran
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


# Official import: f applied as is (start="official"), for every convertible activation.
class TwoProj(nn.Module):
    """Module paths as in LlamaForCausalLM, one layer: model.layers.0.self_attn.{q,v}_proj (v non-square)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([nn.Module()])
        attn = self.model.layers[0].self_attn = nn.Module()
        attn.q_proj = nn.Linear(12, 12, bias=False)
        attn.v_proj = nn.Linear(12, 6, bias=False)

    def forward(self, x):
        attn = self.model.layers[0].self_attn
        return torch.cat([attn.q_proj(x), attn.v_proj(x)], -1)


# Official activation name -> f as the official code applies it (no centring), float64.
OFFICIAL_F = {
    "Sin": lambda z, c: z + c.get("mlora_af_sin_A", 5e-4) * z * torch.sin(c.get("mlora_af_sin_omega", 1e3) * z),
    "Sigmoid": lambda z, c: torch.sigmoid(z),
    "Tanh": lambda z, c: torch.tanh(z),
    "Relu": lambda z, c: torch.relu(z),
    "Silu": lambda z, c: z * torch.sigmoid(z),
    "Identity": lambda z, c: z,
    "Swish": lambda z, c: z * torch.sigmoid(25 * z),
    "Cos": lambda z, c: z + z * torch.cos(1e4 * z),
    "Gaussian": lambda z, c: 0.5 * z * torch.exp(-z * z),
}


def _official_weights(r: int, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, d_out in (("q_proj", 12), ("v_proj", 6)):
        key = f"base_model.model.model.layers.0.self_attn.{name}"
        state[f"{key}.mlora_A"] = torch.randn(r, 12, generator=gen) * 0.4
        state[f"{key}.mlora_B"] = torch.randn(d_out, r, generator=gen) * 0.4
    return state


def _write_official(folder, cfg, state):
    import json

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    torch.save(state, folder / "adapter_model.bin")
    return folder


CASES = [(af, False) for af in sorted(OFFICIAL_F)] + [("Sin", True), (None, True)]


@pytest.mark.parametrize("af,defaults", CASES, ids=[f"{a}-{'defaults' if d else 'explicit'}" for a, d in CASES])
def test_official_import_applies_f_as_the_official_code(tmp_path, af, defaults):
    """Planted: start="base" in convert_official_config -> fails for Sigmoid (f(0) = 0.5). The defaults cases
    leave out what the official code defaults (mlora_af Sigmoid, amp 5e-4, omega 1e3, alpha 8, dropout 0)."""
    r = 4
    cfg = {"peft_type": "MLORA", "r": [r, 12], "target_modules": ["q_proj", "v_proj"]}
    if af is not None:
        cfg["mlora_af"] = af
    if not defaults:
        cfg.update(mlora_alpha=12, mlora_dropout=0.1, mlora_af_sin_A=0.5, mlora_af_sin_omega=30.0)
    af = af or "Sigmoid"
    state = _official_weights(r)
    config = import_official_adapter(_write_official(tmp_path / "official", cfg, state), tmp_path / "loran")
    assert config.start == "official"
    assert config.lora_dropout == (0.0 if defaults else 0.1)
    # float64 throughout: Cos's f(z) = z + z cos(1e4 z) is only good to ~1e-4 in float32.
    model = load_loran(TwoProj(), tmp_path / "loran").double().eval()
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    s = cfg.get("mlora_alpha", 8) / r
    base = TwoProj()
    outs = []
    for name in ("q_proj", "v_proj"):
        key = f"base_model.model.model.layers.0.self_attn.{name}"
        Z = state[f"{key}.mlora_B"].double() @ state[f"{key}.mlora_A"].double()
        W0 = getattr(base.model.layers[0].self_attn, name).weight.double()
        outs.append(x @ W0.T + s * x @ OFFICIAL_F[af](Z, cfg).T)
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.cat(outs, -1), rtol=1e-9, atol=1e-9)


# Official import: what else it reads and refuses (mutation testing found these unchecked).
def _official_cfg(**extra):
    return {"peft_type": "MLORA", "r": [4, 12], "mlora_af": "Sin", "target_modules": ["q_proj", "v_proj"], **extra}


def test_official_import_reads_safetensors_first_and_keeps_config_fields(tmp_path):
    from safetensors.torch import save_file

    src = _write_official(tmp_path / "official", _official_cfg(task_type="CAUSAL_LM", fan_in_fan_out=True,
                                                               base_model_name_or_path="meta-llama/Llama-2-7b-hf"),
                          {k: torch.zeros_like(v) for k, v in _official_weights(4).items()})  # .bin: all zero
    save_file(_official_weights(4), src / "adapter_model.safetensors")  # the weights that must win
    dst = tmp_path / "deep/er/loran"  # parents are created
    config = import_official_adapter(src, dst)
    assert (config.task_type, config.base_model_name_or_path) == ("CAUSAL_LM", "meta-llama/Llama-2-7b-hf")
    assert config.fan_in_fan_out is True
    from safetensors.torch import load_file

    got = load_file(dst / "adapter_model.safetensors")
    assert len(got) == 4 and all(v.abs().sum() > 0 for v in got.values())
    config = import_official_adapter(src, dst)  # into an existing folder: overwritten, no error
    plain = import_official_adapter(_write_official(tmp_path / "o2", _official_cfg(), _official_weights(4)),
                                    tmp_path / "l2")
    assert plain.fan_in_fan_out is False and plain.task_type is None and plain.base_model_name_or_path is None


def test_official_import_refuses_pickles_that_are_not_plain_tensors(tmp_path):
    import pickle

    state = {**_official_weights(4), "note": Path("not a tensor")}
    src = tmp_path / "official"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps(_official_cfg()))
    torch.save(state, src / "adapter_model.bin")
    with pytest.raises(pickle.UnpicklingError):  # weights_only=True: no arbitrary objects from a download
        import_official_adapter(src, tmp_path / "out")


@pytest.mark.parametrize("extra, message", [
    ({"base_model.model.model.layers.0.self_attn.q_proj.mlora_b_1": torch.ones(12, 1)}, "mlora_b_1: P/b/embedding"),
    ({"base_model.model.model.layers.0.self_attn.q_proj.mlora_P_1": torch.zeros(4, 4)}, "mlora_P_1: P/b/embedding"),
    ({"base_model.model.model.layers.0.self_attn.q_proj.weight": torch.ones(12, 12)},
     r"^base_model.model.model.layers.0.self_attn.q_proj.weight: not an MLoRA A/B weight; cannot be converted$"),
    ({"base_model.model.model.layers.0.self_attn.q_proj.mlora_A": torch.ones(3, 12)},
     r"^base_model.model.model.layers.0.self_attn.q_proj.mlora_A has shape \(3, 12\); expected rank 4 on dim 0$"),
])
def test_official_weights_refused_with_the_key_and_reason(extra, message):
    from loran.official import OfficialAdapterError, convert_official_weights

    with pytest.raises(OfficialAdapterError, match=message):
        convert_official_weights({**_official_weights(4), **extra}, 4)


def test_official_weights_errors_and_zero_bias_first():
    from loran.official import OfficialAdapterError, convert_official_config, convert_official_weights

    with pytest.raises(OfficialAdapterError, match=r"^no mlora_A / mlora_B weights found$"):
        convert_official_weights({}, 4)
    zero_bias_first = {"base_model.model.model.layers.0.self_attn.q_proj.mlora_b_1": torch.zeros(12, 1),
                       **_official_weights(4)}
    assert len(convert_official_weights(zero_bias_first, 4)) == 4  # the zero bias is skipped, not the rest
    with pytest.raises(OfficialAdapterError, match=r"^peft_type='LORA'; an official LoRAN adapter has \"MLORA\"$"):
        convert_official_config({**_official_cfg(), "peft_type": "LORA"})
    with pytest.raises(OfficialAdapterError, match=r"r=\[4, 12, 12\]: only r = \[r0, d\] \(no P or b layers, as in the "
                                                   r"released adapters\) can be converted; more entries mean extra "
                                                   r"P_i/b_i layers, which LoRAN here does not implement$"):
        convert_official_config({**_official_cfg(), "r": [4, 12, 12]})


class _NotAWeight:
    """An object torch.load must refuse under weights_only=True (not on its allowlist)."""


def test_official_weights_saved_on_a_gpu_load_on_the_cpu(tmp_path, monkeypatch):
    """An official adapter_model.bin saved from CUDA tensors (its storages tagged "cuda:0") reads on a CPU-only machine,
    into CPU tensors, on any machine. The tags are written as a CUDA save writes them. Mutants: map_location="cpu"
    dropped (on a CPU-only machine torch.load raises; on a GPU machine the tensors land on the GPU)."""
    import torch.serialization as ts

    from loran.official import _read_weights

    state = {"m.mlora_A": torch.randn(2, 3, generator=torch.Generator().manual_seed(3))}
    with monkeypatch.context() as m:
        m.setattr(ts, "location_tag", lambda storage: "cuda:0")
        torch.save(state, tmp_path / "adapter_model.bin")
    assert b"cuda:0" in (tmp_path / "adapter_model.bin").read_bytes()
    got = _read_weights(tmp_path)
    assert set(got) == set(state) and got["m.mlora_A"].device.type == "cpu"
    torch.testing.assert_close(got["m.mlora_A"], state["m.mlora_A"], rtol=0, atol=0)


def test_official_weights_are_read_weights_only_whatever_the_environment(tmp_path, monkeypatch):
    """adapter_model.bin is a pickle from elsewhere: it is read with weights_only=True even where the environment
    (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1) turns torch.load's default off. Mutants: weights_only=True dropped or None."""
    import pickle

    from loran.official import _read_weights

    torch.save({"m.mlora_A": torch.zeros(2, 3), "extra": _NotAWeight()}, tmp_path / "adapter_model.bin")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(pickle.UnpicklingError):
        _read_weights(tmp_path)


def test_weights_are_matched_to_their_whole_module_path():
    """The module of "<prefix>.<module>.lora_A.weight" is everything between PEFT's prefix and the last ".lora_":
    a module whose own name contains ".lora_" is still recognised, and a regex target_modules (matched against the
    whole module path) sees the path without the prefix. Mutants: split at the first ".lora_", prefix not removed."""
    from loran.official import OfficialAdapterError, check_weights_are_targeted

    w = torch.zeros(2, 3)
    config = LoranConfig(r=2, target_modules=["lora_gate"])
    check_weights_are_targeted(config, {"base_model.model.encoder.lora_gate.lora_A.weight": w,
                                        "base_model.model.encoder.lora_gate.lora_B.weight": w})
    config = LoranConfig(r=2, target_modules=r"model\.layers\.\d+\.self_attn\.q_proj")
    check_weights_are_targeted(config, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": w})
    with pytest.raises(OfficialAdapterError, match="module 'model.layers.0.self_attn.k_proj' is not targeted"):
        check_weights_are_targeted(config, {"base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": w})


def test_official_layers_pattern_decides_which_layers_are_adapted():
    """The official code (PEFT 0.4) finds a layer's index after one of "layers", "h", "block", "blocks", "layer" (or
    after the config's own layers_pattern); current PEFT without a pattern takes the first numbered segment instead.
    In "model.stack.<i>.layers.<j>.q_proj" the two differ. Mutants: the converted layers_pattern dropped, or the
    config's own pattern ignored."""
    from peft.tuners.tuners_utils import check_target_module_exists

    from loran.official import convert_official_config

    def targeted(cfg, i, j):
        return bool(check_target_module_exists(convert_official_config(cfg), f"model.stack.{i}.layers.{j}.q_proj"))

    cfg = {"peft_type": "MLORA", "r": [4, 12], "target_modules": ["q_proj"], "layers_to_transform": [1]}
    assert targeted(cfg, 0, 1) and not targeted(cfg, 1, 0)
    cfg["layers_pattern"] = "stack"
    assert targeted(cfg, 1, 0) and not targeted(cfg, 0, 1)
