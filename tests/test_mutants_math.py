"""Tests that fail when the numbers are wrong (issue 16): each pins a value the other tests only bound or share.

Each test names the planted bug it was checked against (a one-line edit that left the rest of the suite green).
"""
import json
import math
from pathlib import Path

import mpmath
import numpy as np
import pytest
import torch
from torch import nn

import loran.autograd as la
from loran import ACTIVATIONS, LoranConfig, get_loran_model, load_loran, loran_layers
from loran.official import import_official_adapter
from loran.pipeline.spectrum import update_spectrum
from loran.pipeline.tables import T80, T975, paired_difference, t80, t975
from loran.variants import Path as LayerPath, choose_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def eager(monkeypatch):
    monkeypatch.setattr(la, "COMPILE", "never")


class FixedMask(nn.Module):
    """A stand-in for the adapter's dropout with a known mask (not nn.Dropout, so the layer cannot fold it away)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


class Proj(nn.Module):
    def __init__(self, d_in=10, d_out=7):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.q_proj(x)


SINTER = {"amp": 0.5, "omega": 30.0}
F64 = {  # independent float64 formulas, "base" start (f(z) - f(0))
    "sinter": lambda z: z + 0.5 * z * torch.sin(30 * z),
    "identity": lambda z: z,
    "sigmoid": lambda z: torch.sigmoid(z) - 0.5,
}


def _proj_model(activation: str, memory_efficient: bool, dropout: float = 0.0, seed: int = 1):
    kwargs = SINTER if activation == "sinter" else {}
    model = get_loran_model(Proj(), LoranConfig(r=3, lora_alpha=9, target_modules=["q_proj"], lora_dropout=dropout,
                                                memory_efficient=memory_efficient, activation=activation,
                                                activation_kwargs=kwargs))
    gen = torch.Generator().manual_seed(seed)
    for _, layer in loran_layers(model):
        layer.lora_B["default"].weight.data = torch.randn(layer.lora_B["default"].weight.shape, generator=gen) * 0.5
    return model


# ----------------------------------------------------------------------------------------------------------------
# 1. The un-folded path applies the update to dropout(x), not to x (the base layer sees x).


@pytest.mark.parametrize("activation", sorted(F64))
@pytest.mark.parametrize("memory_efficient", [True, False])
def test_update_sees_dropout_x_and_base_sees_x(eager, activation, memory_efficient):
    """Planted: `x = module.lora_dropout[...](x)` dropped from LoranVariant.forward -> fails (both paths)."""
    model = _proj_model(activation, memory_efficient).train()
    layer = model.base_model.model.q_proj
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float32)
    mask = (torch.rand(4, 10, generator=torch.Generator().manual_seed(3)) > 0.5).float() * 2.0
    layer.lora_dropout["default"] = FixedMask(mask)
    assert choose_path(layer, x).path is not LayerPath.FOLDED  # the update must take the un-folded path here
    y = model(x).double()
    W0, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    expected = x.double() @ W0.T + b + 3.0 * (x.double() * mask) @ F64[activation](B @ A).T
    torch.testing.assert_close(y, expected.detach(), rtol=1e-5, atol=1e-5)


def test_real_dropout_changes_the_update_in_training_only(eager):
    """With nn.Dropout(0.5) in train mode the output differs from eval mode; the base layer alone never does."""
    model = _proj_model("sinter", True, dropout=0.5)
    x = torch.randn(6, 10, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y_eval = model.eval()(x)
        torch.manual_seed(0)
        y_train = model.train()(x)
        with model.disable_adapter():
            torch.testing.assert_close(model(x), model.base_model.model.q_proj.base_layer(x))
    assert not torch.allclose(y_train, y_eval, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# 2. Official import: f applied as is (start="official"), for every convertible activation.


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


# ----------------------------------------------------------------------------------------------------------------
# 3. Student t quantiles: every tabulated df against an independent computation.


def _t_quantile(df: int, p: float = 0.975) -> float:
    """Inverse of the t CDF, F(t) = 1 - I_{df/(df+t^2)}(df/2, 1/2) / 2, by mpmath root finding."""
    cdf = lambda t: 1 - mpmath.betainc(df / 2, 0.5, 0, df / (df + t * t), regularized=True) / 2  # noqa: E731
    return float(mpmath.findroot(lambda t: cdf(t) - p, 1.0 if p < 0.9 else 2.0 if df > 2 else 5.0))


@pytest.mark.parametrize("df", sorted(T975))
def test_every_tabulated_t_quantile_is_right_to_three_decimals(df):
    """Planted: T975[4] = 2.576 (or any other entry) -> fails; only df = 2 was checked before."""
    assert abs(T975[df] - _t_quantile(df)) < 6e-4, (df, T975[df], _t_quantile(df))


@pytest.mark.parametrize("df", sorted(T80))
def test_every_tabulated_power_quantile_is_right_to_three_decimals(df):
    assert sorted(T80) == sorted(T975)
    assert abs(T80[df] - _t_quantile(df, 0.80)) < 6e-4, (df, T80[df], _t_quantile(df, 0.80))


def test_the_minimal_detectable_effect_of_a_paired_t_test():
    """(t_.975 + t_.80) x SE of the paired differences, every df looked up at n - 1 (5 seeds: df 4; 40: beyond 30)."""
    for n in (2, 3, 5, 12, 40):
        values, base = {s: 0.5 + 0.01 * (s % 3) + 0.002 * s for s in range(n)}, {s: 0.5 for s in range(n)}
        d = np.array([values[s] - base[s] for s in range(n)])
        df, se = n - 1, d.std(ddof=1) / math.sqrt(n)
        expected = ((1.96 + 0.8416) if df > 30 else (_t_quantile(df) + _t_quantile(df, 0.80))) * se
        assert paired_difference(values, base)["mde"] == pytest.approx(expected, rel=2e-3), n
    assert t80(31) == 0.842 and t80(30) == T80[30] and t80(11) == T80[11] and t80(22) == T80[20]


def test_t975_uses_the_nearest_tabulated_df_at_or_below():
    assert t975(4) == T975[4] and t975(22) == T975[20] and t975(29) == T975[25] and t975(30) == T975[30]
    assert t975(31) == 1.96 and t975(1) == T975[1]


def test_paired_interval_with_five_seeds_uses_df_4():
    values, base = {s: 0.5 + 0.01 * s * s for s in range(5)}, {s: 0.5 for s in range(5)}
    d = np.array([values[s] - base[s] for s in range(5)])
    half = _t_quantile(4) * d.std(ddof=1) / math.sqrt(5)
    out = paired_difference(values, base)
    assert out["pairs"] == 5 and out["delta"] == pytest.approx(d.mean())
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((d.mean() - half, d.mean() + half), abs=2e-5)


# ----------------------------------------------------------------------------------------------------------------
# 8. The update spectrum: the share of energy beyond rank r from the exact singular values.


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(16, 12) for _ in range(3)])

    def forward(self, x):
        return x


def test_energy_beyond_r_is_the_exact_tail_share():
    """Planted: energy[r + 1:] in update_spectrum -> fails (it was only bounded below)."""
    r = 3
    model = get_loran_model(Stack(), LoranConfig(r=r, lora_alpha=6, target_modules=["0", "1", "2"],
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
    model = get_loran_model(Stack(), LoranConfig(r=2, target_modules=["0", "1", "2"]))  # B = 0
    spec = update_spectrum(model)
    assert spec["energy_beyond_r"] == 0.0 and spec["numerical_rank"] == 0 and set(spec["singular_values"]) == {0.0}


# ----------------------------------------------------------------------------------------------------------------
# Table 2 end to end in-process (mutation testing: the script runs in a subprocess that mutmut cannot see).


@pytest.fixture
def grid(tmp_path, write_fake_record):
    """QLoRA and three LoRAN rows on accuracy: better (significant), worse (significant), a tie; one-seed
    identity; two-seed sigmoid; tanh has rouge1 but QLoRA has none."""
    runs = tmp_path / "runs"
    acc = {"qlora-none": [0.80, 0.82, 0.81], "loran-sinter": [0.85, 0.86, 0.87], "loran-relu": [0.70, 0.71, 0.73],
           "loran-tanh": [0.79, 0.84, 0.80], "loran-identity": [0.9], "loran-sigmoid": [0.83, 0.84]}
    for row, values in acc.items():
        adapter, activation = row.split("-")
        for seed, value in enumerate(values):
            extra = {"rouge1": 0.25} if row == "loran-tanh" else {}
            write_fake_record(runs, adapter, activation, "bbc_news", seed, {"accuracy": value, **extra})
    return runs


def _entry(table, row, metric):
    return next(e for e in table if e["row"] == row and e["metric"] == metric)


def test_table_entries_in_full(grid):
    from loran.pipeline.tables import build, load_records, load_rows

    table = build(load_records(grid), load_rows(REPO / "configs" / "row"))
    assert [(e["row"], e["metric"]) for e in table][:5] == [("qlora-none", m) for m in
                                                            ("rouge1", "rouge2", "rougeL", "accuracy")] + [
        ("loran-sigmoid", "rouge1")]
    assert len(table) == 8 * 4  # every row of configs/row, with or without records
    missing = _entry(table, "loran-sinter", "rouge2")
    assert missing == {"row": "loran-sinter", "label": "LoRAN (Sinter)", "metric": "rouge2", "paper": "",
                       "mean": None, "std": None, "n": 0, "delta": None, "ci_low": None, "ci_high": None,
                       "mde": None, "pairs": 0, "significant": None, "seeds": []}
    base = _entry(table, "qlora-none", "accuracy")
    assert base["delta"] is None and base["pairs"] == 0 and base["seeds"] == [0, 1, 2]  # no difference to itself
    two = _entry(table, "loran-sigmoid", "accuracy")  # two seeds: a std and a paired interval with df = 1
    assert two["std"] == pytest.approx(0.00707107, rel=1e-5) and two["pairs"] == 2
    assert two["ci_high"] - two["delta"] == pytest.approx(12.706 * 0.01 / 2, rel=1e-4)  # sd(d) = 0.01 / sqrt(2)
    assert _entry(table, "loran-tanh", "rouge1")["delta"] is None  # no QLoRA values to pair with
    assert _entry(table, "loran-tanh", "rouge1")["mean"] == pytest.approx(0.25)
    worse = _entry(table, "loran-relu", "accuracy")
    assert worse["significant"] is True and worse["ci_high"] < 0
    assert _entry(table, "loran-tanh", "accuracy")["significant"] is False


EXPECTED_MD = """\
# Grid

Values in percent: mean +- std (n seeds). Second line: difference to QLoRA paired by seed, [95% t interval]; \
* = the interval excludes 0; MDE = minimal detectable effect at 80% power of that paired t test, (t.975 + t.80) x SE \
(0 when a row equals QLoRA on every seed: no seed-to-seed noise is seen then). `-` = no successful run for that cell.

| row | rouge1 | rouge2 | rougeL | accuracy | paper |
|---|---|---|---|---|---|
| QLoRA | - | - | - | 81.00 +- 1.00 (3) | - / - / - / 80.1 |
| LoRAN (Sigmoid) | - | - | - | 83.50 +- 0.71 (2) | - / - / - / - |
| vs QLoRA |  |  |  | +2.50 [-3.85, +8.85], MDE 7.04 | |
| LoRAN (ReLU) | - | - | - | 71.33 +- 1.53 (3) | - / - / - / - |
| vs QLoRA |  |  |  | -9.67 [-13.46, -5.87]*, MDE 4.73 | |
| LoRAN (Tanh) | 25.00 +- 0.00 (3) | - | - | 81.00 +- 2.65 (3) | - / - / - / - |
| vs QLoRA |  |  |  | +0.00 [-4.30, +4.30], MDE 5.36 | |
| LoRAN (Sinter) | - | - | - | 86.00 +- 1.00 (3) | - / - / - / - |
| vs QLoRA |  |  |  | +5.00 [+2.52, +7.48]*, MDE 3.10 | |
| LoRAN (identity = LoRA control) | - | - | - | 90.00 (1) | - / - / - / - |
| LoRAN (Sigmoid, official start) | - | - | - | - | - / - / - / - |
| LoRAN (ReLU, official start) | - | - | - | - | - / - / - / - |
"""


def test_markdown_and_csv_in_full(grid, tmp_path):
    """The whole rendered table, checked by hand: percent, signs, intervals, stars, dashes, the paper column."""
    from loran.pipeline.tables import build, load_records, load_rows, read_paper, to_markdown, write_csv

    paper = tmp_path / "paper.csv"
    paper.write_text("# test\nrow,label,rouge1,rouge2,rougeL,accuracy\nqlora-none,QLoRA,,,, 80.1 \n")
    table = build(load_records(grid), load_rows(REPO / "configs" / "row"), read_paper(paper))
    assert to_markdown(table, "Grid") == EXPECTED_MD
    write_csv(table, tmp_path / "t.csv")
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0] == "row,label,metric,mean,std,n,delta,ci_low,ci_high,mde,pairs,significant,paper"
    assert lines[1] == "qlora-none,QLoRA,rouge1,,,0,,,,,0,,"
    assert lines[4].startswith("qlora-none,QLoRA,accuracy,0.81") and lines[4].endswith(",3,,,,,0,,80.1")
    relu = next(x for x in lines if x.startswith("loran-relu,LoRAN (ReLU),accuracy,"))
    fields = relu.split(",")
    assert (fields[5], fields[10], fields[11], fields[12]) == ("3", "3", "True", "")
    assert [float(v) for v in fields[6:10]] == pytest.approx([-0.0966667, -0.1346, -0.0587, 0.0473], abs=1e-4)
    assert len(lines) == 1 + 8 * 4


# ----------------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------------
# Metrics and spectrum details.


def test_labels_longest_first_regardless_of_case_and_duplicates_refused():
    from loran.pipeline.metrics import parse_label

    # Reverse alphabetical order would try "tech" before "Tech Support" ('t' > 'T'); longest first does not.
    assert parse_label("tech support news", ["tech", "Tech Support"]) == "Tech Support"
    with pytest.raises(ValueError, match=r"^labels must differ case-insensitively, got \['Tech', 'tech'\]$"):
        parse_label("x", ["Tech", "tech"])


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


# ----------------------------------------------------------------------------------------------------------------
# Activations: the defaults of the functions themselves, and f' in the compute dtype.


def test_activation_function_defaults_are_the_official_settings():
    from loran.activations import Activation, activation_params

    assert activation_params("sinter") == {"amp": 5e-5, "omega": 1e4}
    assert activation_params("swish") == {"beta": 25.0} and activation_params("cos") == {"omega": 1e4}
    z = torch.linspace(-0.3, 0.3, 41, dtype=torch.float64)
    expected = {"sinter": (z + 5e-5 * z * torch.sin(1e4 * z), 1 + 5e-5 * torch.sin(1e4 * z) + 0.5 * z * torch.cos(1e4 * z)),
                "swish": (z * torch.sigmoid(25 * z), torch.sigmoid(25 * z) * (1 + 25 * z * (1 - torch.sigmoid(25 * z)))),
                "cos": (z + z * torch.cos(1e4 * z), 1 + torch.cos(1e4 * z) - 1e4 * z * torch.sin(1e4 * z))}
    for name, (f, df) in expected.items():
        act = Activation(name)  # no parameters given: the functions' own defaults
        torch.testing.assert_close(act.f(z), f, rtol=1e-12, atol=1e-12, msg=name)
        torch.testing.assert_close(act.df(z), df, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_derivative_has_the_compute_dtype(name, dtype):
    from loran.activations import Activation

    z = torch.tensor([-0.5, 0.0, 0.25], dtype=dtype)
    for start in ("base", "official"):
        assert Activation(name, start=start).df(z).dtype == dtype
    assert Activation("relu").df(z).tolist() == [0.0, 1.0, 1.0]  # "base": the right derivative at 0
    assert Activation("relu", start="official").df(z).tolist() == [0.0, 0.0, 1.0]


def test_zero_parameters_are_allowed():
    from loran.activations import Activation

    z = torch.tensor([0.3, -0.2])
    torch.testing.assert_close(Activation("sinter", {"amp": 0.0, "omega": 0.0}).f(z), z)
    torch.testing.assert_close(Activation("swish", {"beta": 0.0}).f(z), z / 2)


def test_identical_to_the_baseline_is_not_significant():
    """LoRAN-identity can equal QLoRA exactly (same numbers): a zero-width interval at 0 excludes nothing."""
    out = paired_difference({0: 0.5, 1: 0.7, 2: 0.6}, {0: 0.5, 1: 0.7, 2: 0.6})
    assert (out["delta"], out["ci_low"], out["ci_high"], out["significant"]) == (0.0, 0.0, 0.0, False)
    assert paired_difference({0: 0.4, 1: 0.4}, {0: 0.5, 1: 0.5})["significant"] is True  # below, zero spread


# ----------------------------------------------------------------------------------------------------------------
# The fused kernels' Python (what torch.compile traces), run eagerly against the eager kernels: every flag.
# (Mutation testing cannot reach them through torch.compile; test_compiled_kernels runs them compiled.)


@pytest.mark.parametrize("base", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("write", [False, True])
@pytest.mark.parametrize("separate", [False, True])
def test_fused_kernels_equal_the_eager_kernels(base, accumulate, write, separate):
    from loran.activations import Activation

    pw = Activation("sinter", SINTER).pointwise
    gen = torch.Generator().manual_seed(21)
    B, A = torch.randn(5, 2, generator=gen), torch.randn(2, 4, generator=gen)
    W0 = torch.randn(5, 4, generator=gen) if base else None
    start, G0 = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    outs = []
    for weight_kernel, grad_kernel in ((la._weight_kernel, la._grad_kernel),
                                       (la._fused_weight_kernel, la._fused_grad_kernel)):
        out_w = start.clone()
        weight_kernel(out_w, B, A, W0, 2.5, pw.f, accumulate)
        out_g, G = start.clone(), G0.clone()
        grad_z = torch.zeros(5, 4) if separate else None
        grad_kernel(out_g if write else None, grad_z, G, B, A, W0, 2.5, pw.f, pw.df, accumulate)
        outs.append([out_w, out_g, G, grad_z if separate else G])
    for got, ref in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    # and against the formulas
    z = B @ A
    expected_w = (start if accumulate else (W0 if base else 0)) + 2.5 * pw.f(z)
    torch.testing.assert_close(outs[1][0], expected_w)
    torch.testing.assert_close(outs[1][3], G0 * 2.5 * pw.df(z))
    torch.testing.assert_close(outs[1][1], expected_w if write else start)


# ----------------------------------------------------------------------------------------------------------------
# Layer details PEFT relies on.


def test_loran_is_not_convertible_to_lora_and_unmerge_keeps_the_dtype():
    from loran.variants import LoranVariant

    assert LoranVariant().supports_lora_conversion() is False  # f(BA) is not a rank-r product
    model = get_loran_model(Proj().to(torch.bfloat16), LoranConfig(r=3, lora_alpha=9, target_modules=["q_proj"],
                                                                   activation="sinter", activation_kwargs=SINTER))
    layer = model.base_model.model.q_proj
    layer.lora_B["default"].weight.data.normal_(0, 0.5)
    W = layer.base_layer.weight.data.clone()
    model.merge_adapter()
    assert layer.base_layer.weight.dtype == torch.bfloat16 and not torch.equal(layer.base_layer.weight, W)
    model.unmerge_adapter()
    assert layer.base_layer.weight.dtype == torch.bfloat16
    torch.testing.assert_close(layer.base_layer.weight.float(), W.float(), rtol=0.02, atol=0.02)


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


# ----------------------------------------------------------------------------------------------------------------
# When the layer may fold the update into W0 (one matmul) and when it must leave the base layer to itself.


def _nf4(compute_dtype=torch.float32):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    lin = nn.Linear(8, 6)
    q = bnb.nn.Linear4bit(8, 6, compute_dtype=compute_dtype, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q.to("cpu")


def test_nf4_fold_leaves_bitsandbytes_cpu_repacking_alone():
    from loran.variants import base_folds

    x, xg = torch.randn(2, 8), torch.randn(2, 8, requires_grad=True)
    q = _nf4()
    q.support_avx512bf16_for_cpu = True  # bnb would repack to bf16 on an eval-mode forward without grad
    assert base_folds(q.eval(), x) is False
    assert base_folds(q.eval(), xg) is True
    assert base_folds(q.train(), x) is True
    del q.support_avx512bf16_for_cpu  # an older bnb without the attribute: no repacking
    assert base_folds(q.eval(), x) is True
    q.support_avx512bf16_for_cpu = False
    q.weight.quant_state.packing_format_for_cpu = True  # already repacked by bnb: not a plain NF4 weight
    assert base_folds(q.train(), xg) is False


def test_nf4_fold_sets_the_compute_type_as_bitsandbytes_does():
    from loran.variants import base_folds

    q = _nf4(compute_dtype=None)
    q.support_avx512bf16_for_cpu = False
    assert not q.compute_type_is_set
    assert base_folds(q, torch.randn(2, 8)) is True
    assert q.compute_type_is_set is True and q.compute_dtype == torch.float32


class Plus(nn.Linear):
    """An nn.Linear subclass with its own forward: the layer cannot fold it."""

    def forward(self, x):
        return super().forward(x) + 1.0


@pytest.mark.parametrize("how", ["forward_hook", "pre_hook", "subclass", "instance_forward"])
def test_base_layers_with_changed_forward_are_not_folded(eager, how):
    torch.manual_seed(0)
    model_cls = Proj
    base = model_cls()
    if how == "subclass":
        plus = Plus(10, 7)
        plus.load_state_dict(base.q_proj.state_dict())
        base.q_proj = plus
    elif how == "forward_hook":
        base.q_proj.register_forward_hook(lambda m, i, out: out + 1.0)
    elif how == "pre_hook":
        base.q_proj.register_forward_pre_hook(lambda m, i: (i[0] + 1.0,))
    else:
        plain = base.q_proj.forward
        base.q_proj.forward = lambda x: plain(x) + 1.0
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected_base = base.q_proj(x)
    model = get_loran_model(base, LoranConfig(r=3, lora_alpha=9, target_modules=["q_proj"], activation="sinter",
                                              activation_kwargs=SINTER))
    layer = model.base_model.model.q_proj
    layer.lora_B["default"].weight.data.normal_(0, 0.5)
    assert choose_path(layer, x).path is not LayerPath.FOLDED
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    update = 3.0 * x.double() @ F64["sinter"](B @ A).T
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), expected_base.double() + update, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation,memory_efficient", [("identity", True), ("sinter", False), ("sinter", True)])
def test_unfolded_update_returns_the_base_dtype(eager, activation, memory_efficient):
    """A bf16 base with active dropout: the output stays bf16 (PEFT keeps the adapter in float32)."""
    torch.manual_seed(0)
    model = get_loran_model(Proj().to(torch.bfloat16), LoranConfig(
        r=3, lora_alpha=9, target_modules=["q_proj"], lora_dropout=0.3, memory_efficient=memory_efficient,
        activation=activation, activation_kwargs=SINTER if activation == "sinter" else {})).train()
    layer = model.base_model.model.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32
    y = model(torch.randn(2, 10, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_nf4_base_without_bias_folds(eager):
    from loran.variants import base_folds, base_weight

    q = _nf4()
    q.bias = None
    q.support_avx512bf16_for_cpu = False
    x = torch.randn(3, 8)
    assert base_folds(q, x)
    weight_fn, bias = base_weight(q, x)
    assert bias is None
    with torch.no_grad():
        torch.testing.assert_close(x @ weight_fn(torch.float32).weight.T, q(x), rtol=1e-5, atol=1e-5)


def test_full_dropout_zeroes_the_update_and_autocast_is_not_folded(eager):
    model = _proj_model("sinter", True).train()
    layer = model.base_model.model.q_proj
    x = torch.randn(3, 10)
    layer.lora_dropout["default"] = nn.Dropout(1.0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), layer.base_layer(x))
    layer.lora_dropout["default"] = nn.Identity()
    assert choose_path(layer, x).path is LayerPath.FOLDED
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert choose_path(layer, x).path is not LayerPath.FOLDED  # PEFT's path computes the base in bf16 there


def test_forward_takes_the_folded_path_when_it_can(eager, monkeypatch):
    import loran.layers as ll

    calls = []
    real = ll.loran_linear
    monkeypatch.setattr(ll, "loran_linear", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    model = _proj_model("sinter", True).train()
    model(torch.randn(2, 10))
    assert len(calls) == 1 and calls[0] is not None  # one call, with the base weight folded in


def test_conv1d_with_a_hook_is_not_folded(eager):
    from transformers.pytorch_utils import Conv1D

    class GPT2ish(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.c_attn = Conv1D(6, 4)

    base = GPT2ish()
    base.c_attn.register_forward_hook(lambda m, i, out: out + 1.0)
    model = get_loran_model(base, LoranConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    x = torch.randn(2, 4)
    layer = model.base_model.model.c_attn
    assert choose_path(layer, x).path is not LayerPath.FOLDED
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x))  # B = 0: the hooked base output


# ----------------------------------------------------------------------------------------------------------------
# The memory-saving backward: partly frozen adapters, and a low-precision result.


@pytest.mark.parametrize("trainable", [("A", "B"), ("B", "A"), ("AB", ""), ("", "AB"), ("A", ""), ("", "")])
def test_backward_with_partly_frozen_adapters(eager, trainable):
    from loran.activations import Activation
    from loran.autograd import Adapter, DenseWeight, loran_linear, reference_update

    gen = torch.Generator().manual_seed(31)
    W = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    acts = [Activation("sinter", SINTER), Activation("tanh")]
    raw = [(torch.randn(3, 5, generator=gen, dtype=torch.float64) * 0.5,
            torch.randn(6, 3, generator=gen, dtype=torch.float64) * 0.5) for _ in range(2)]
    x0 = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    g = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    runs = []
    for fast in (True, False):
        ads = [Adapter(A.clone().requires_grad_("A" in t), B.clone().requires_grad_("B" in t), 1.5 + i, act)
               for i, ((A, B), act, t) in enumerate(zip(raw, acts, trainable))]
        x = x0.clone().requires_grad_()
        if fast:
            y = loran_linear(x, lambda dt: DenseWeight(W, False), None, ads, chunk_rows=2, block_rows=4)
        else:
            y = x @ W.T + sum(reference_update(x, a.A, a.B, a.scaling, a.act) for a in ads)
        y.backward(g)
        runs.append([x.grad] + [t.grad for a in ads for t in (a.A, a.B)])
    for got, ref in zip(*runs):
        assert (got is None) == (ref is None)
        if ref is not None:
            torch.testing.assert_close(got, ref)


def test_update_backward_with_a_bf16_result(eager):
    from loran.activations import Activation
    from loran.autograd import loran_update, reference_update

    act = Activation("sinter", SINTER)
    gen = torch.Generator().manual_seed(32)
    x0, A0, B0 = torch.randn(4, 6, generator=gen), torch.randn(3, 6, generator=gen) * 0.5, torch.randn(5, 3, generator=gen) * 0.5
    result = torch.randn(4, 5, generator=gen).bfloat16()
    g = torch.randn(4, 5, generator=gen).bfloat16()
    grads = []
    for fast in (True, False):
        x, A, B = x0.clone().requires_grad_(), A0.clone().requires_grad_(), B0.clone().requires_grad_()
        r = result.clone().requires_grad_()
        y = loran_update(x, A, B, 2.0, act, result=r) if fast else r + reference_update(x, A, B, 2.0, act).bfloat16()
        assert y.dtype == torch.bfloat16
        y.backward(g)
        grads.append([x.grad, A.grad, B.grad, r.grad])
    for got, ref in zip(*grads):
        torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------------------------------------------
# Mutants of the second run (autograd, layers): each test names the mutant it kills.


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


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float64])
def test_reference_update_in_a_given_dtype(dtype):
    """Mutants: reference_update's `dtype is None` test inverted, `/ scaling`, and x, A, B, act or dtype not passed on
    in its dtype branch (the path of update_dtype=autocast with memory_efficient=False). Independent reference: the
    same products written out in that dtype (dtype None: float32, compared with float64)."""
    from loran.activations import Activation

    act = Activation("sinter", SINTER)
    gen = torch.Generator().manual_seed(41)
    x, A, B = torch.randn(4, 6, generator=gen), torch.randn(3, 6, generator=gen) * 0.5, torch.randn(5, 3, generator=gen)
    y = la.reference_update(x, A, B, 2.5, act, dtype=dtype)
    z = (B.double() @ A.double())
    exact = 2.5 * x.double() @ (z + 0.5 * z * torch.sin(30 * z)).T
    if dtype is None:
        assert y.dtype == torch.float32
        torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-5)
    else:
        assert y.dtype == dtype
        zd = B.to(dtype) @ A.to(dtype)
        assert torch.equal(y, (x.to(dtype) @ (zd + 0.5 * zd * torch.sin(30 * zd)).T) * 2.5)
        torch.testing.assert_close(y.double(), exact, rtol=0.05, atol=0.05 * exact.abs().max().item())


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


def test_uncovered_layer_message_in_full_and_naming_the_base_of_a_tuner_layer():
    """Mutants: the text of uncovered_message, and refuse_uncovered naming a wrapping tuner layer's own type instead
    of its base layer's (`isinstance(target, BaseTunerLayer) and False`)."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel
    from peft.tuners.lora.layer import Embedding as LoraEmbedding

    config = LoranConfig(r=2, target_modules=["emb"], activation="sinter", activation_kwargs=SINTER)
    wrapped = LoraEmbedding(nn.Embedding(10, 16), "x", config=LoraConfig(r=2), r=2, lora_alpha=4)
    with pytest.raises(ValueError) as err:
        LoraModel._create_new_module(config, "x", wrapped, target_name="emb")
    assert str(err.value) == (
        "target module 'emb' is a torch.nn.modules.sparse.Embedding: LoRAN covers torch.nn.Linear, transformers "
        "Conv1D, bitsandbytes Linear4bit and Linear8bitLt only (PEFT would build a plain LoRA layer there). Remove it "
        "from target_modules, or adapt it with a separate peft.LoraConfig adapter")


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float64])
def test_delta_weight_dtype(dtype):
    """Mutants: _up never widening (`or True`: bf16 factors stay bf16), delta_weight's `dtype is None` test inverted,
    and B, A or B A not passed on in its dtype branch. Reference: f(B A) written out in float32 / bf16 / float64
    (bf16 factors, except float32 ones for float64, so that every cast matters)."""
    from loran.activations import Activation

    act = Activation("sinter", SINTER)
    gen = torch.Generator().manual_seed(43)
    low = torch.float32 if dtype == torch.float64 else torch.bfloat16
    A, B = (torch.randn(3, 6, generator=gen) * 0.5).to(low), torch.randn(5, 3, generator=gen).to(low)
    x = torch.randn(4, 6, generator=gen).to(low)  # reference_update casts x as well
    got = la.delta_weight(A, B, act, dtype)
    wide = torch.float32 if dtype is None else dtype
    z = B.to(wide) @ A.to(wide)
    assert got.dtype == wide
    assert torch.equal(got, z + 0.5 * z * torch.sin(30 * z))
    y = la.reference_update(x, A, B, 2.0, act, dtype)
    assert torch.equal(y, (x.to(wide) @ got.T) * 2.0)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("needs", ["xAB", "x", "A", "B", "AB"])
def test_lowrank_update_values_and_gradients(x_dtype, dtype, needs):
    """lowrank_update = s (x A^T) B^T in `dtype`, autograd keeping x in its own dtype: output and every gradient
    against plain autograd on copies widened to `dtype` (s = 2.5, so a dropped or inverted s shows; leading dims
    (2, 3) and r < d_in, d_out, so a wrong reshape or transpose does too)."""
    gen = torch.Generator().manual_seed(44)
    x0 = torch.randn(2, 3, 6, generator=gen).to(x_dtype)
    A0, B0 = torch.randn(2, 6, generator=gen), torch.randn(5, 2, generator=gen)
    g = torch.randn(2, 3, 5, generator=gen, dtype=dtype)
    x, A, B = (t.clone().requires_grad_(n in needs) for t, n in ((x0, "x"), (A0, "A"), (B0, "B")))
    y = la.lowrank_update(x, A, B, 2.5, dtype)
    assert y.dtype == dtype and y.shape == (2, 3, 5)
    rx, rA, rB = (t.to(dtype).requires_grad_(n in needs) for t, n in ((x0, "x"), (A0, "A"), (B0, "B")))
    ref = ((rx @ rA.T) @ rB.T) * 2.5
    torch.testing.assert_close(y, ref)
    (y * g).sum().backward()
    (ref * g).sum().backward()
    for got, want, like in ((x.grad, rx.grad, x0), (A.grad, rA.grad, A0), (B.grad, rB.grad, B0)):
        assert (got is None) == (want is None)
        if want is not None:
            assert got.dtype == like.dtype and got.shape == like.shape
            torch.testing.assert_close(got, want.to(like.dtype))


class _MatmulShapes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the output shape of every mm / addmm / addmm_ (under a dispatch mode the kernels run eagerly)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("sizes, chunk, block", [((1, 2), 1, 2), ((3, 2), 3, 3), ((None, None), 2, 4)])
def test_update_works_in_the_row_chunks_and_blocks_it_is_given(monkeypatch, sizes, chunk, block):
    """The memory bound: W (6 x 5) is formed `chunk` rows at a time (B[rows] A: (chunk, 5)) and used `block` rows
    at a time (x W[block]^T: (4, block)); block_rows is at least chunk_rows; the defaults come from CHUNK_ELEMENTS
    and BLOCK_ELEMENTS (patched to 10 and 20: 2 and 4 rows of d_in = 5). Mutants: chunk_rows / block_rows not passed
    on (loran_update, _LoranLinear), _sizes and _blocks. The values are checked against reference_update too."""
    from loran.activations import Activation

    monkeypatch.setattr(la, "CHUNK_ELEMENTS", 10)
    monkeypatch.setattr(la, "BLOCK_ELEMENTS", 20)
    act = Activation("sinter", SINTER)
    gen = torch.Generator().manual_seed(45)
    x0, A0, B0 = torch.randn(4, 5, generator=gen), torch.randn(3, 5, generator=gen), torch.randn(6, 3, generator=gen)
    g = torch.randn(4, 6, generator=gen)
    x, A, B = (t.clone().requires_grad_() for t in (x0, A0, B0))
    with _MatmulShapes() as fwd:
        y = la.loran_update(x, A, B, 2.0, act, chunk_rows=sizes[0], block_rows=sizes[1])
    with _MatmulShapes() as bwd:
        y.backward(g)
    blocks = [range(i, min(i + block, 6)) for i in range(0, 6, block)]
    chunks = [[min(chunk, len(b) - j) for j in range(0, len(b), chunk)] for b in blocks]
    assert fwd.shapes == [s for b, c in zip(blocks, chunks) for s in [(n, 5) for n in c] + [(4, len(b))]]
    expected_bwd = []
    for i, (b, c) in enumerate(zip(blocks, chunks)):  # G, Z per chunk, dL/dx (+)=, dL/dB[block], dL/dA +=
        expected_bwd += [(len(b), 5)] + [(n, 5) for n in c] + [(4, 5), (len(b), 3), (3, 5)]
    assert bwd.shapes == expected_bwd, (bwd.shapes, expected_bwd)
    rx, rA, rB = (t.clone().requires_grad_() for t in (x0, A0, B0))
    ref = la.reference_update(rx, rA, rB, 2.0, act)
    ref.backward(g)
    torch.testing.assert_close(y, ref)
    for got, want in ((x.grad, rx.grad), (A.grad, rA.grad), (B.grad, rB.grad)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("with_base", [True, False])
def test_every_buffer_lives_on_the_input_device(monkeypatch, with_base):
    """On the meta device (which needs no GPU), forward and backward with several row blocks: a buffer allocated
    without device=x.device lands on the CPU and the meta ops refuse it. Mutants: `device=x.device` dropped from
    the torch.empty of W blocks (forward, backward) or of the output. Autocast cannot be set for meta: switched off."""
    import contextlib

    from loran.activations import Activation

    monkeypatch.setattr(la, "_no_autocast", lambda device_type: contextlib.nullcontext())
    act = Activation("sinter", SINTER)
    x, A, B = (torch.empty(*shape, device="meta", requires_grad=True) for shape in ((4, 5), (3, 5), (6, 3)))
    W = torch.empty(6, 5, device="meta")
    weight_fn = (lambda dt: la.DenseWeight(W, False)) if with_base else None
    y = la.loran_linear(x, weight_fn, None, [la.Adapter(A, B, 2.0, act)], chunk_rows=1, block_rows=2)
    assert y.device.type == "meta" and y.shape == (4, 6)
    y.backward(torch.empty(4, 6, device="meta"))
    assert all(t.grad.device.type == "meta" and t.grad.shape == t.shape for t in (x, A, B))


def test_three_adapters_forward_and_backward(eager):
    """loran_linear with three adapters (sinter, tanh, identity) on a base weight with a bias: output and every
    gradient against plain autograd. Mutant: the adapters' A walked with step 3 (`ab[0::3]`, as many as with 1 or 2
    adapters, one pair short with 3)."""
    from loran.activations import Activation
    from loran.autograd import Adapter, DenseWeight, loran_linear, reference_update

    gen = torch.Generator().manual_seed(46)
    W, b = torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    acts = [Activation("sinter", SINTER), Activation("tanh"), Activation("identity")]
    raw = [(torch.randn(2, 5, generator=gen, dtype=torch.float64), torch.randn(6, 2, generator=gen, dtype=torch.float64))
           for _ in acts]
    x0, g = torch.randn(4, 5, generator=gen, dtype=torch.float64), torch.randn(4, 6, generator=gen, dtype=torch.float64)
    runs = []
    for fast in (True, False):
        ads = [Adapter(A.clone().requires_grad_(), B.clone().requires_grad_(), 0.5 + i, act)
               for i, ((A, B), act) in enumerate(zip(raw, acts))]
        x = x0.clone().requires_grad_()
        if fast:
            y = loran_linear(x, lambda dt: DenseWeight(W, False), b, ads)
        else:
            y = x @ W.T + b + sum(reference_update(x, a.A, a.B, a.scaling, a.act) for a in ads)
        y.backward(g)
        runs.append([y.detach(), x.grad] + [t.grad for a in ads for t in (a.A, a.B)])
    for got, ref in zip(*runs):
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("compiled", [False, True])
def test_default_sizes_of_the_compiled_and_the_eager_kernels(compiled):
    """_sizes' defaults (module docstring): eager chunks of CHUNK_ELEMENTS (2**16) elements, a fused kernel takes
    COMPILED_CHUNK_ELEMENTS (2**22), blocks of BLOCK_ELEMENTS (2**22), a block never below a chunk. Mutant: the
    compiled chunk size never chosen (`compiled and False`), which the matmul-shape test cannot see (no compile
    under a dispatch mode)."""
    d_in = 1000
    chunk = (2**22 if compiled else 2**16) // d_in
    assert la._sizes((None, None), d_in, compiled) == (chunk, 2**22 // d_in)
    assert la._sizes((7, None), d_in, compiled) == (7, 2**22 // d_in)
    assert la._sizes((None, 3), d_in, compiled) == (chunk, chunk)


@pytest.mark.parametrize("with_result", [False, True])
@pytest.mark.parametrize("dt, bias_dt", [(torch.float64, torch.float32), (torch.float32, torch.float64)])
def test_result_and_a_bias_of_another_dtype_are_both_added(eager, with_result, dt, bias_dt):
    """loran_linear(result=r, bias=b) = r + x (W0 + s f(B A))^T + b, with b in another dtype than x, W0, A, B and r
    (the bias is cast to the compute dtype). Mutants: the bias replacing the result (`acc is None or True`),
    subtracted, or not cast (with or without a result)."""
    from loran.activations import Activation
    from loran.autograd import Adapter, DenseWeight, loran_linear

    act = Activation("sinter", SINTER)
    gen = torch.Generator().manual_seed(47)
    x, W = torch.randn(4, 5, generator=gen, dtype=torch.float64), torch.randn(6, 5, generator=gen, dtype=torch.float64)
    A, B = torch.randn(2, 5, generator=gen, dtype=torch.float64), torch.randn(6, 2, generator=gen, dtype=torch.float64)
    b, r = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(4, 6, generator=gen, dtype=torch.float64)
    z = B @ A
    expected = x @ (W + 1.5 * (z + 0.5 * z * torch.sin(30 * z))).T + b + (r if with_result else 0)
    y = loran_linear(x.to(dt), lambda d: DenseWeight(W.to(d), False), b.to(bias_dt), [Adapter(A.to(dt), B.to(dt), 1.5, act)],
                     result=r.to(dt) if with_result else None)
    assert y.dtype == dt
    torch.testing.assert_close(y, expected.to(dt), rtol=1e-5, atol=1e-5)


def test_the_variant_refuses_lora_bias_with_its_message():
    """LoranConfig refuses lora_bias=True; LoranVariant.init is the backstop for a config changed afterwards.
    Mutants: its message replaced or re-cased."""
    from loran.variants import LoranVariant

    model = get_loran_model(Proj(), LoranConfig(r=2, target_modules=["q_proj"]))
    config = LoranConfig(r=2, target_modules=["q_proj"])
    config.lora_bias = True
    with pytest.raises(ValueError) as err:
        LoranVariant.init(model.base_model.model.q_proj, "other", config)
    assert str(err.value) == "lora_bias=True is not supported by LoRAN; set lora_bias=False"


def test_loran_linear_without_adapters_is_refused_with_its_message():
    """Mutants: the message of loran_linear's refusal replaced or re-cased."""
    with pytest.raises(ValueError) as err:
        la.loran_linear(torch.zeros(2, 3), None, None, [])
    assert str(err.value) == "loran_linear needs at least one adapter"


def test_loran_linear_output_dtype(eager):
    """Docstring of loran_linear: the output has x's dtype when W0 is given, result's when result is given (bf16 x,
    float32 compute). Mutants: the final cast dropped, made unconditional or inverted."""
    from loran.activations import Activation
    from loran.autograd import Adapter, DenseWeight, loran_linear

    gen = torch.Generator().manual_seed(48)
    x, W = torch.randn(4, 5, generator=gen).bfloat16(), torch.randn(6, 5, generator=gen)
    A, B, r = torch.randn(2, 5, generator=gen), torch.randn(6, 2, generator=gen), torch.randn(4, 6, generator=gen)
    ads = [Adapter(A, B, 1.5, Activation("sinter", SINTER))]
    y = loran_linear(x, lambda dt: DenseWeight(W, False), None, ads)
    z = B @ A
    full = x.float() @ (W + 1.5 * (z + 0.5 * z * torch.sin(30 * z))).T
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, full.bfloat16())
    y = loran_linear(x, lambda dt: DenseWeight(W, False), None, ads, result=r)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, r + full)


def test_load_rows_reads_every_yaml_file_in_the_order_it_gives(tmp_path):
    """Eight rows whose `order` is a permutation unrelated to their file names (and to the folder's listing order),
    and a file that is not YAML. Mutants: no files found (glob pattern changed), not sorted by `order`, errors."""
    from loran.pipeline.tables import load_rows

    orders = [5, 2, 7, 0, 3, 6, 1, 4]
    for i, order in enumerate(orders):
        (tmp_path / f"r{i}.yaml").write_text(f"row:\n  name: row{i}\n  label: 'Row {i}'\n  order: {order}\n")
    (tmp_path / "notes.txt").write_text("row:\n  name: not-a-row\n  label: x\n  order: -1\n")
    expected = [(f"row{i}", f"Row {i}") for i in sorted(range(len(orders)), key=lambda i: orders[i])]
    assert load_rows(tmp_path) == expected


def test_row_key_prefers_the_rows_own_name():
    """A record's row is its `row` choice when it has one (rows whose name is not "<adapter>-<activation>", e.g.
    "loran-relu-official"); only older records fall back to the pair. Mutant: the `row` key misspelt."""
    from loran.pipeline.tables import row_key

    assert row_key({"choices": {"row": "loran-relu-official", "adapter": "loran", "activation": "relu"}}) \
        == "loran-relu-official"
    assert row_key({"choices": {"adapter": "loran", "activation": "relu"}}) == "loran-relu"


def _identity_record(cell, identity):
    return {"cell": cell, "identity": identity}


def test_one_config_check_messages_in_full():
    """The two MixedConfigs messages, word for word: the records without identity, and every differing key
    ("; "-separated, absent keys shown as "<absent>") with every record (", "-separated). Mutants: text replaced
    or re-cased, the separators changed, the record list dropped, the <absent> marker changed."""
    from loran.pipeline.tables import MixedConfigs, check_one_config

    with pytest.raises(MixedConfigs) as err:
        check_one_config([{"cell": "c1"}, _identity_record("c2", {"a": 1})], "r / m")
    assert str(err.value) == ("r / m: records ['c1'] carry no config identity (written before cells were hashed), so "
                              "they cannot be shown to share a config; run scripts/migrate_records.py")
    records = [_identity_record("c2", {"lr": 0.1, "opt": {"name": "adam"}, "x": 1}),
               _identity_record("c1", {"lr": 0.2, "opt": {"name": "sgd"}})]
    with pytest.raises(MixedConfigs) as err:
        check_one_config(records, "r / m")
    assert str(err.value) == (
        'r / m would pool records whose configs differ in more than the seed (lr: 0.1 vs 0.2; opt.name: "adam" vs '
        '"sgd"; x: "<absent>" vs 1); records: c1, c2. Give each configuration its own experiment_name, or move the '
        "extra records out of the folder.")


def test_one_config_check_tells_absent_from_null_and_ignores_key_order():
    """A key set to null in one config and absent from the other is a difference (the two can mean different
    defaults); the same dicts inside a list, with their keys in another order, are not. Mutants: the absent marker
    replaced by None (null == absent), json.dumps without sort_keys (key order counts)."""
    from loran.pipeline.tables import MixedConfigs, check_one_config

    with pytest.raises(MixedConfigs, match=r'x: "<absent>" vs null'):
        check_one_config([_identity_record("c1", {"a": 1, "x": None}), _identity_record("c2", {"a": 1})], "r / m")
    check_one_config([_identity_record("c1", {"sched": [{"step": 1, "gamma": 0.5}]}),
                      _identity_record("c2", {"sched": [{"gamma": 0.5, "step": 1}]})], "r / m")


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


def test_kernel_dispatch_with_a_stand_in_compiler(monkeypatch, caplog, request):
    """The torch.compile machinery (_Kernels) with torch.compile replaced by a recorder, so that it runs in
    milliseconds (under mutmut a real compile fails after minutes, and tests/test_compiled_kernels.py checks a real
    one): which modes and sizes compile, the options and kernels given to torch.compile, compiled once, kernel 0 for
    the weight and 1 for the gradient, eager kernels when not compiling, and a failed compile: one warning with the
    error's type and first line, eager from then on. Mutants of use_compiled, _get, _call, weight and grad."""
    import functools
    import logging

    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    def fake_compile(fn=None, **opts):
        calls.append((fn, opts))
        return lambda *args: calls.append(("compiled", fn, args))

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(la, "_weight_kernel", lambda *args: calls.append(("eager weight", args)))
    monkeypatch.setattr(la, "_grad_kernel", lambda *args: calls.append(("eager grad", args)))
    dynamo = torch._dynamo.config  # a config module: monkeypatch's undo would delete the setting, so restore by hand
    request.addfinalizer(functools.partial(setattr, dynamo, "recompile_limit", dynamo.recompile_limit))
    dynamo.recompile_limit = 8

    K = la._Kernels()
    assert K.compiled is None and K.failed is False
    # Which calls compile.
    n = la.COMPILE_MIN_ELEMENTS
    for mode in ("never", "0", "false", "off", "NEVER", "Off"):
        monkeypatch.setattr(la, "COMPILE", mode)
        assert not K.use_compiled(10 * n), mode
    for mode in ("always", "1", "true", "on", "ALWAYS", "On"):
        monkeypatch.setattr(la, "COMPILE", mode)
        assert K.use_compiled(1), mode
    monkeypatch.setattr(la, "COMPILE", "auto")
    assert not K.use_compiled(n - 1) and K.use_compiled(n) and K.use_compiled(n + 1)

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(la, "COMPILE", "always")
    with Passthrough():
        assert not K.use_compiled(n)
    assert not calls  # deciding compiles nothing
    # The weight and the gradient kernels: compiled once, with their options, each called with its own args.
    K.weight(True, "w1")
    assert calls[:2] == [(la._fused_weight_kernel, dict(dynamic=True, fullgraph=True)),
                         (la._fused_grad_kernel, dict(dynamic=True, fullgraph=True))]
    assert calls[2:] == [("compiled", la._fused_weight_kernel, ("w1",))]
    assert dynamo.recompile_limit == la._Kernels.RECOMPILE_LIMIT == 64
    del calls[:]
    K.grad(True, "g1", "g2")
    K.weight(True, "w2")
    K.weight(False, "w3")
    K.grad(False, "g3")
    assert calls == [("compiled", la._fused_grad_kernel, ("g1", "g2")), ("compiled", la._fused_weight_kernel, ("w2",)),
                     ("eager weight", ("w3",)), ("eager grad", ("g3",))]
    assert K.failed is False
    # A raised limit is kept.
    dynamo.recompile_limit = 100
    la._Kernels()._get()
    assert dynamo.recompile_limit == 100

    # A compile that fails: one warning (type, first line of the message), the eager kernel, eager from then on.
    for message, shown in (("no C++ compiler\nsecond line", "RuntimeError: no C++ compiler"), ("", "RuntimeError: ")):
        K = la._Kernels()
        attempts = []

        def broken(*args):
            attempts.append(args)
            raise RuntimeError(message)

        K.compiled = (broken, broken)
        del calls[:]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="loran.autograd"):
            K.weight(True, "w1")
            K.grad(True, "g1")
            K.weight(True, "w2")
        assert attempts == [("w1",)] and K.failed is True
        assert calls == [("eager weight", ("w1",)), ("eager grad", ("g1",)), ("eager weight", ("w2",))]
        assert [r.getMessage() for r in caplog.records] == [
            f"LoRAN: torch.compile of the element-wise work failed ({shown}); using eager ops"]
        assert not K.use_compiled(10 * n)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_each_derivative_is_the_derivative_of_its_function_at_the_default_parameters(name):
    """An activation given no parameters (activation_kwargs {}) uses f's and f''s own defaults, each its own: they must
    describe one function, i.e. df with its defaults is the derivative (by autograd, float64) of f with its defaults.
    Mutants: a default (omega, g, amp, beta) changed in f or in df alone."""
    spec = ACTIVATIONS[name]
    z = torch.linspace(-0.9, 0.9, 37, dtype=torch.float64)  # no exact 0 (ReLU's kink)
    z = torch.cat([z, z * 1e-3, z * 1e-5]).requires_grad_()
    (grad,) = torch.autograd.grad(spec.f(z).sum(), z)
    torch.testing.assert_close(spec.df(z.detach()), grad, rtol=1e-9, atol=1e-9)


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


def test_chunk_rows_for_is_the_most_rows_within_the_element_budget():
    """chunk_rows_for(d_in, elements): the most rows of a d_in-wide matrix that fit in `elements` elements, at least one
    (a row wider than the budget still makes a chunk of one). Mutants: the minimum of 2 rows, d_in counted as >= 2."""
    for d_in in (1, 2, 3, 7, 64, 1000):
        for elements in (1, 2, 5, 64, 999, 4096):
            rows = la.chunk_rows_for(d_in, elements)
            assert rows >= 1 and (rows == 1 or rows * d_in <= elements) and (rows + 1) * d_in > elements, \
                (d_in, elements, rows)
    assert la.chunk_rows_for(0, 8) == 8  # a zero-width matrix: as wide as one element


def test_identity_adapter_in_bf16_computes_its_update_in_float32():
    """update_dtype="float32" (the default) with a bf16 adapter and bf16 input, no autocast: the identity's update
    s (x A^T) B^T is computed in float32 and rounded to bf16 once. With a zero base layer the output is that update,
    so it is the float64 value rounded to bf16 (up to ties). Mutants: PEFT's bf16 LoRA taken instead (B's dtype
    compared the wrong way), or lowrank_update given no dtype (computes in bf16)."""
    model = get_loran_model(Proj(16, 12), LoranConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                      activation="identity"))
    layer = model.base_model.model.q_proj
    nn.init.zeros_(layer.base_layer.weight)
    nn.init.zeros_(layer.base_layer.bias)
    gen = torch.Generator().manual_seed(5)
    layer.lora_B["default"].weight.data = torch.randn(12, 4, generator=gen)
    model = model.to(torch.bfloat16).eval()
    assert layer.lora_A["default"].weight.dtype == torch.bfloat16
    x = torch.randn(64, 16, generator=gen).bfloat16()
    with torch.no_grad():
        y = model(x)
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    exact = (x.double() @ A.T @ B.T * 2.0).bfloat16()
    assert y.dtype == torch.bfloat16
    assert (y == exact).float().mean() > 0.99, (y == exact).float().mean()


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_autocast_policy_computes_a_non_linear_update_in_the_autocast_dtype(eager, memory_efficient):
    """update_dtype="autocast" under bf16 autocast: B A, f(B A) and the products in bf16, as autocast computes LoRA's
    matmuls; "float32" computes them in float32. So the two differ, and both are within bf16's precision of the
    float64 math. Mutant: the autocast dtype not passed on (the "autocast" policy computing in float32)."""
    outs = {}
    for policy in ("float32", "autocast"):
        model = get_loran_model(Proj(16, 12), LoranConfig(
            r=4, lora_alpha=8, target_modules=["q_proj"], activation="tanh", memory_efficient=memory_efficient,
            update_dtype=policy))
        layer = model.base_model.model.q_proj
        layer.lora_B["default"].weight.data = torch.randn(12, 4, generator=torch.Generator().manual_seed(6)) * 0.5
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(7))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outs[policy] = model(x).float()
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    W0, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    exact = x.double() @ (W0 + 2.0 * torch.tanh(B @ A)).T + b
    for policy, y in outs.items():
        torch.testing.assert_close(y.double(), exact, rtol=0.03, atol=0.03, msg=policy)
    assert not torch.equal(outs["float32"], outs["autocast"])


@pytest.mark.parametrize("case", ["input not cast", "A and B in two dtypes"])
def test_identity_adapter_whose_operands_differ_in_dtype_computes_in_float32(case):
    """The identity's update goes to PEFT's own LoRA matmuls only when x, A, B and the compute dtype all agree;
    otherwise it is computed in float32 from the operands as they are. Two ways they can differ: PEFT's
    disable_input_dtype_casting (a bf16 x reaches float32 A, B), or an adapter whose A and B were given different
    dtypes. With a zero bf16 base layer the output is the update: the float64 value rounded to bf16 (up to ties).
    Mutants: x's or A's dtype compared the wrong way (PEFT's matmuls given mixed dtypes)."""
    from peft.helpers import disable_input_dtype_casting

    base = Proj(16, 12)
    nn.init.zeros_(base.q_proj.weight)
    nn.init.zeros_(base.q_proj.bias)
    model = get_loran_model(base.to(torch.bfloat16), LoranConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                  activation="identity")).eval()
    layer = model.base_model.model.q_proj
    gen = torch.Generator().manual_seed(5)
    layer.lora_B["default"].weight.data = torch.randn(12, 4, generator=gen)
    if case == "A and B in two dtypes":
        layer.lora_A["default"].weight.data = layer.lora_A["default"].weight.data.bfloat16()
    assert layer.lora_B["default"].weight.dtype == torch.float32
    x = torch.randn(64, 16, generator=gen).bfloat16()
    with torch.no_grad(), disable_input_dtype_casting(model, case == "input not cast"):
        y = model(x)
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    exact = (x.double() @ A.T @ B.T * 2.0).bfloat16()
    assert y.dtype == torch.bfloat16
    assert (y == exact).float().mean() > 0.99, (y == exact).float().mean()


@pytest.mark.parametrize("activation", ["tanh", "identity"])
def test_unfolded_update_is_rounded_to_the_result_dtype_before_it_is_added(activation):
    """LoranVariant.forward un-folded (memory_efficient=False; the identity takes PEFT's own LoRA matmuls) on a bf16
    base with float32 adapters (PEFT casts x to float32 for them, after the base layer ran in bf16): the float32 update
    is cast to the result's dtype, then added, so each output is bf16(r + bf16(u)), r the base layer's bf16 output
    and u the update (float64 here; u's float32 rounding moves a result only at a tie). Mutants: the update added in
    float32 and rounded once by PEFT's final cast, bf16(r + u), which differs on many elements."""
    base = Proj(16, 12).to(torch.bfloat16)
    model = get_loran_model(base, LoranConfig(r=4, lora_alpha=8, target_modules=["q_proj"], activation=activation,
                                              memory_efficient=False)).eval()
    layer = model.base_model.model.q_proj
    layer.lora_B["default"].weight.data = torch.randn(12, 4, generator=torch.Generator().manual_seed(8)) * 0.5
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(9)).bfloat16()
    with torch.no_grad():
        y, r = model(x), layer.base_layer(x)
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    u = 2.0 * x.double() @ (torch.tanh(B @ A) if activation == "tanh" else B @ A).T
    expected = (r.double() + u.bfloat16().double()).bfloat16()
    assert y.dtype == torch.bfloat16
    assert (y == expected).float().mean() > 0.99, (y == expected).float().mean()
    single = (r.double() + u).bfloat16()
    assert (single != expected).float().mean() > 0.02  # the two roundings are told apart on this data


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


@pytest.mark.parametrize("which", ["lora_A", "lora_B"])
def test_an_adapter_factor_in_another_dtype_than_x_is_not_folded(eager, which):
    """The update is folded into W0 only when x and both of A and B share one dtype; with either factor in another one
    (here float64 in a float32 layer) the layer takes the un-folded path, and computes s f(B A) x right. Mutant: the
    fold refused only when both factors differ from x."""
    model = _proj_model("sinter", True).eval()
    layer = model.base_model.model.q_proj
    x = torch.randn(5, 10, generator=torch.Generator().manual_seed(12))
    assert choose_path(layer, x).path is LayerPath.FOLDED
    getattr(layer, which)["default"].weight.data = getattr(layer, which)["default"].weight.data.double()
    assert choose_path(layer, x).path is not LayerPath.FOLDED
    with torch.no_grad():
        y = model(x)
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    W0, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    torch.testing.assert_close(y.double(), x.double() @ (W0 + 3.0 * F64["sinter"](B @ A)).T + b, rtol=1e-5, atol=1e-5)


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


def test_sines_divisor_g_must_be_finite_and_positive():
    """g divides sine's f (f = sin(omega x) / g): 0, negative, infinite and nan are refused with a message naming the
    field; any finite positive value, also below 1, is accepted. Mutants: the bound loosened to >= 0 (or the test
    made an `or`), moved to > 1, the message replaced."""
    from loran.activations import Activation

    for g in (0, 0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError) as err:
            Activation("sine", {"g": g})
        assert str(err.value) == f"activation_kwargs.g={g!r} must be finite and > 0"
    for g in (1e-3, 0.5, 1, 24.0):
        z = torch.linspace(-1, 1, 5, dtype=torch.float64)
        torch.testing.assert_close(Activation("sine", {"g": g, "omega": 3.0}).f(z), torch.sin(3.0 * z) / g)


def test_paper_values_are_read_as_written_in_a_csv_with_windows_line_ends(tmp_path):
    """read_paper returns each paper value as written, also from a CSV saved with \\r\\n line ends whose quoted cell
    holds a line break (a value with a note under it): the csv module needs the file opened with newline="" for that.
    Mutants: the file opened with universal newlines (the cell's \\r\\n read as \\n)."""
    from loran.pipeline.tables import read_paper

    path = tmp_path / "paper.csv"
    path.write_bytes(b'# transcribed from Table 2\r\nrow,rouge1,rouge2,rougeL,accuracy\r\n'
                     b'loran-sinter,51.2,,30.1,"88.4\r\n(dev)"\r\n')
    paper = read_paper(path)
    assert paper[("loran-sinter", "rouge1")] == "51.2" and paper[("loran-sinter", "rouge2")] == ""
    assert paper[("loran-sinter", "accuracy")] == "88.4\r\n(dev)"


def test_write_csv_leaves_a_missing_value_empty(tmp_path):
    """write_csv writes a value that is None or absent from an entry as an empty field (never 0, never an error), and
    a present 0 as 0. Mutant: absent values looked up with e[k] (KeyError)."""
    import csv

    from loran.pipeline.tables import write_csv

    write_csv([{"row": "r", "label": "R", "metric": "accuracy", "mean": 0.0, "std": None}], tmp_path / "t.csv")
    with open(tmp_path / "t.csv", newline="") as f:
        (line,) = list(csv.DictReader(f))
    assert line["mean"] == "0.0" and line["std"] == "" and line["delta"] == "" and line["paper"] == ""
