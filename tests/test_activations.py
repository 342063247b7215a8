"""loran/activations.py: each f and f' at its own default parameters (the official settings), f' as the derivative of f,
in the compute dtype, and the parameter checks."""
import math

import pytest
import torch

from loran import ACTIVATIONS


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


@pytest.mark.parametrize("name", sorted(n for n, spec in ACTIVATIONS.items() if spec.residual is not None))
def test_each_residual_pair_is_f_minus_its_slope_and_its_derivative_at_the_default_parameters(name):
    """A registered residual (g, g') with no parameters given: g = f - f'(0) z and g' its autograd derivative, each
    with its own defaults. Mutants: a default changed in g or g' alone."""
    spec = ACTIVATIONS[name]
    g, dg = spec.residual
    z = torch.linspace(-0.9, 0.9, 37, dtype=torch.float64)
    z = torch.cat([z, z * 1e-3, z * 1e-5]).requires_grad_()
    slope = float(spec.df(torch.zeros((), dtype=torch.float64)))
    torch.testing.assert_close(g(z.detach()), spec.f(z.detach()) - slope * z.detach(), rtol=1e-12, atol=1e-15)
    (grad,) = torch.autograd.grad(g(z).sum(), z)
    torch.testing.assert_close(dg(z.detach()), grad, rtol=1e-9, atol=1e-9)


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


def _softsign(x: torch.Tensor) -> torch.Tensor:
    return x / (1 + x.abs())


def _d_softsign(x: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + x.abs()) ** 2


def test_adding_an_activation_is_its_registry_entry_and_one_yaml(tmp_path, monkeypatch):
    """Where a change goes (README): a new activation is its (f, f') entry in loran.activations.ACTIVATIONS plus
    configs/activation/<name>.yaml, nothing else. Done here for softsign, f(z) = z / (1 + |z|): composed and checked
    as train.py does, named in the cell, and the layer computes W0 x + s x f(B A)^T with that f and its gradients."""
    import shutil

    from conftest import CONFIGS, cfg_of
    from loran import LoranConfig, activations, get_loran_model
    from loran.pipeline.checks import build_peft_config, check_config
    from test_variants import Proj

    monkeypatch.setitem(activations.ACTIVATIONS, "softsign", activations.Spec(_softsign, _d_softsign))
    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS, configs)
    (configs / "activation" / "softsign.yaml").write_text("name: softsign\nparams: {}\nstart: base\n")

    cfg = cfg_of("adapter=loran", "activation=softsign", results=tmp_path / "results", configs=configs)
    check_config(cfg)
    assert cfg.cell.startswith("bbc_news.smollm2_135m.loran-softsign.seed0.")
    built = build_peft_config(cfg)
    assert (built.activation, built.activation_kwargs, built.start) == ("softsign", {}, "base")

    config = LoranConfig(r=3, lora_alpha=9, target_modules=["q_proj"], activation=built.activation,
                         activation_kwargs=built.activation_kwargs, start=built.start)
    model = get_loran_model(Proj(), config)
    layer = model.base_model.model.q_proj
    layer.lora_B["default"].weight.data = torch.randn(layer.lora_B["default"].weight.shape,
                                                      generator=torch.Generator().manual_seed(3))
    x = torch.randn(5, 10, generator=torch.Generator().manual_seed(4))
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    A64, B64 = A.detach().double().requires_grad_(), B.detach().double().requires_grad_()
    expected = layer.base_layer(x).double() + 3.0 * x.double() @ _softsign(B64 @ A64).T
    out = model(x)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(A.grad.double(), A64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(B.grad.double(), B64.grad, rtol=1e-4, atol=1e-6)
