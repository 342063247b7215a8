"""The update's precision policy (adapter.peft.update_dtype), one for every row of Table 2.

Under CPU bf16 autocast as in float32, every row whose f is the identity (the QLoRA row, LoRAN-identity, Sinter with
amp = 0) computes the same numbers bit for bit, in each policy; "float32" computes the update in float32 and
"autocast" as PEFT's LoRA does under autocast; the QLoRA row (now a LoranConfig) computes on the CPU in float32 what
the old peft.LoraConfig row did, training included (why its records could be re-homed)."""
import copy
from contextlib import nullcontext

import pytest
import torch
from peft import LoraConfig, get_peft_model

from loran import LoranConfig
from loran.activations import ACTIVATIONS, POSITIVE_PARAMS, START_MODES, Activation, activation_params
from loran.pipeline.checks import ConfigError
from loran.config import UPDATE_DTYPES
from loran.pipeline.run import build_peft_config
from conftest import cfg_of
from test_loran_peft import X, make_toy

IDENTITY_ROWS = {"qlora": ["row=qlora"], "identity": ["row=loran_identity"],
                 "sinter_amp0": ["row=loran_sinter", "activation.params.amp=0.0"]}


def row_config(overrides, policy=None, **replace):
    """The adapter config a Table 2 row builds (composed from configs/, as train.py does), for the toy's targets."""
    extra = [] if policy is None else [f"adapter.peft.update_dtype={policy}"]
    cfg = cfg_of(*overrides, *extra)
    config = build_peft_config(cfg)
    config.task_type = None  # the toy is not a causal LM
    for key, value in replace.items():
        setattr(config, key, value)
    return config


def adapted(config, kind: str):
    """The toy (fp32 or NF4 q_proj 16->16 and v_proj 16->8) with the same A (seeded init) and B for every config."""
    model = get_peft_model(make_toy(kind, seed=0), copy.deepcopy(config))
    gen = torch.Generator().manual_seed(1)
    for name, p in sorted(model.named_parameters()):
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.5
    return model.train()


def run(model, autocast: bool) -> list[torch.Tensor]:
    """Output, dL/dx and the adapter gradients of one forward + backward, with the same dropout masks."""
    x = X.clone().requires_grad_()
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext():
        y = model(x)
    y.float().square().sum().backward()
    return [y.detach(), x.grad] + [p.grad for _, p in sorted(model.named_parameters()) if p.requires_grad]


def assert_equal(got: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype and torch.equal(g, r), (g - r).abs().max()


@pytest.mark.parametrize("kind", ["fp32", "nf4"])
@pytest.mark.parametrize("autocast", [True, False], ids=["bf16-autocast", "float32"])
@pytest.mark.parametrize("policy", UPDATE_DTYPES)
def test_rows_whose_f_is_the_identity_equal_qlora_bit_for_bit(policy, autocast, kind):
    runs = {name: run(adapted(row_config(overrides, policy), kind), autocast)
            for name, overrides in IDENTITY_ROWS.items()}
    if kind == "fp32":  # (bitsandbytes' 4-bit layer keeps its float32 compute dtype under CPU autocast)
        assert runs["qlora"][0].dtype == (torch.bfloat16 if autocast else torch.float32)
    assert runs["qlora"][-1].abs().sum() > 0  # dropout active, gradients flowing
    for name in ("identity", "sinter_amp0"):
        assert_equal(runs[name], runs["qlora"])


def _bf16_spacing(y: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |y| (one rounding step)."""
    return torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(y.float().abs().clamp_min(1e-30))))


def test_float32_policy_sinter_differs_from_qlora_by_roundings_and_its_own_effect():
    """Issue 12's measurement: under bf16 autocast the Sinter row differed from QLoRA by up to 0.125 (precision, not
    f). With the update in float32 for both rows, Sinter moves an output by at most the two bf16 roundings (of the
    update and of the sum) plus its own effect in float32."""
    sinter, qlora = row_config(["row=loran_sinter"]), row_config(["row=qlora"])
    assert sinter.activation_kwargs == {"amp": 5e-5, "omega": 1e4}
    y_s, y_q = (run(adapted(c, "fp32"), autocast=True)[0] for c in (sinter, qlora))
    f_s, f_q = (run(adapted(c, "fp32"), autocast=False)[0] for c in (sinter, qlora))
    own = (f_s - f_q).abs().max()
    assert 0 < own < 1e-3
    assert ((y_s.float() - y_q.float()).abs() <= 2 * _bf16_spacing(y_q) + own).all()


def test_float32_policy_computes_the_update_in_float32_and_adds_it_in_the_output_dtype():
    model = adapted(row_config(["row=qlora"]), "fp32").eval()
    layer = model.base_model.model.q_proj
    x = X.clone()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        base = layer.base_layer(x)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    update = (x @ A.T @ B.T) * layer.scaling["default"]
    assert base.dtype == y.dtype == torch.bfloat16
    assert torch.equal(y, base + update.bfloat16())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # what bf16 would have given: not this
        low = base + (layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"])
    assert not torch.equal(y, low)


@pytest.mark.parametrize("kind", ["fp32", "nf4"])
def test_autocast_policy_is_pefts_lora_under_autocast(kind):
    """update_dtype=autocast reproduces PEFT's own LoRA (the precision of the released, bf16 QLoRA) bit for bit."""
    qlora = row_config(["row=qlora"], "autocast")
    plain = LoraConfig(r=qlora.r, lora_alpha=qlora.lora_alpha, lora_dropout=qlora.lora_dropout,
                       target_modules=sorted(qlora.target_modules))
    assert_equal(run(adapted(qlora, kind), True), run(adapted(plain, kind), True))


@pytest.mark.parametrize("kind", ["fp32", "nf4"])
def test_qlora_row_trains_exactly_as_the_old_peft_lora_row_in_float32(kind):
    """What the CPU float32 table2_mini records ran: the old row (peft.LoraConfig with qlora.yaml's sizes) and the new
    one (LoranConfig, identity, update_dtype=float32) give bit-identical outputs, gradients and weights over three
    AdamW steps with dropout."""
    new = row_config(["row=qlora"])
    old = LoraConfig(r=new.r, lora_alpha=new.lora_alpha, lora_dropout=new.lora_dropout,
                     target_modules=sorted(new.target_modules))
    results = []
    for config in (old, new):
        model = adapted(config, kind)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        history = []
        for _ in range(3):
            history += run(model, autocast=False)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        results.append(history + [p.detach().clone() for _, p in sorted(model.named_parameters()) if p.requires_grad])
    assert_equal(results[1], results[0])


def test_the_policy_is_validated_naming_the_field_and_the_allowed_values():
    with pytest.raises(ValueError, match=r"update_dtype='bfloat16' is unknown; allowed values: \['float32', 'autocast'\]"):
        LoranConfig(r=4, target_modules=["q_proj"], update_dtype="bfloat16")
    with pytest.raises(ConfigError, match=r"update_dtype='bf16'.*\['float32', 'autocast'\]"):
        row_config(["row=qlora"], "bf16")


def test_the_policy_is_one_setting_for_every_row_and_part_of_the_cell():
    rows = {row: cfg_of(f"row={row}") for row in ("qlora", "loran_sinter", "loran_relu")}
    autocast = cfg_of("row=qlora", "adapter.peft.update_dtype=autocast")
    assert {cfg.adapter.peft.update_dtype for cfg in rows.values()} == {"float32"}
    assert autocast.cell != rows["qlora"].cell
    assert all(build_peft_config(cfg).update_dtype == "float32" for cfg in rows.values())


@pytest.mark.parametrize("name, params, expected", [
    ("identity", {}, True), ("sinter", {"amp": 0.0}, True), ("sinter", {"amp": 0.0, "omega": 5.0}, True),
    ("sinter", {}, False), ("sinter", {"amp": 1e-12}, False), ("tanh", {}, False), ("relu", {}, False),
    ("cos", {"omega": 0.0}, False), ("silu", {}, False), ("swish", {}, False)])
def test_which_activations_count_as_the_identity(name, params, expected):
    assert Activation(name, params).identity is expected


# The values on which an activation must leave z and f'(z) = 1 unchanged, bit for bit, to count as the identity:
# 0 and +-m 2^k for 8 mantissas m in [1, 2) and every k in [-100, 30], in float32 and float64 (|B A| of a trained
# adapter lies far inside; beyond 2^30, omega z overflows for Sinter's omega in float32). The layer probed these
# until the registry declared it (Spec.linear, Spec.identity_when); the probe stays here as the reference.
PROBE = torch.cat([torch.zeros(1), *(sign * torch.linspace(1, 2, 9)[:-1] * 2.0**k
                                     for k in range(-100, 31) for sign in (1, -1))]).double()


def identity_on_probe(act: Activation) -> bool:
    """f(z) == z and f'(z) == 1 bit for bit on PROBE in float32 and float64."""
    for dtype in (torch.float32, torch.float64):
        z = PROBE.to(dtype)
        if not (torch.equal(act.f(z), z) and torch.equal(act.df(z), torch.ones_like(z))):
            return False
    return True


def parameter_grid(name: str) -> list[dict]:
    """Every combination of 0, 1e-12, 0.5, 30 and the default for each parameter (divisors: not 0)."""
    grid = [{}]
    for key, default in activation_params(name).items():
        values = [v for v in (0.0, 1e-12, 0.5, 30.0, default) if v > 0 or key not in POSITIVE_PARAMS]
        grid = [{**params, key: value} for params in grid for value in values]
    return grid


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_the_declared_identity_agrees_with_the_probe(name):
    """Each registry entry's declaration picks the activations the probe picked, at every parameter combination of
    the grid and in both start modes (so which adapters compute as LoRA, bit for bit, is unchanged). Where they part,
    off the grid: the probe also took Sinter with 0 < amp (1 + omega 2^31) < about 1e-16 for the identity (its
    perturbation below float64's resolution on PROBE), and not amp = 0 with omega > about 1e29 (omega z overflowing
    to inf in float32, sin(inf) = nan)."""
    for params in parameter_grid(name):
        for start in START_MODES:
            act = Activation(name, params, start)
            assert act.identity is identity_on_probe(act), (params, start)


def test_bf16_effect_figures_of_the_readme():
    """loran.bench.precision on a small layer: under "float32" Sinter's f changes every element of B A, a few bf16
    outputs (by one step) and nearly every gradient; under "autocast" bf16 rounds f(B A) back to B A everywhere."""
    from loran.bench.precision import sinter_under_bf16

    f32, low = (sinter_under_bf16(policy, d_in=128, d_out=96, r=8, tokens=64) for policy in ("float32", "autocast"))
    assert f32["update_changed"] > 0.99 and 0 < f32["output_changed"] < 0.05 and f32["grad_B_changed"] > 0.9
    assert f32["output_max_diff"] <= f32["output_ulp"]
    assert low["update_changed"] == 0 and low["f_output_changed"] == 0
