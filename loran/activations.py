"""Element-wise activations f applied to the low-rank update B A, with their derivatives.

LoRAN computes ``s * x @ f(B A)^T``. The memory-saving backward (``loran.autograd``) needs f' explicitly,
so every activation is a pair ``(f, df)`` of plain functions of a float32 tensor and keyword parameters.
Adding an activation is one entry in ``ACTIVATIONS``; the entry also declares where f is the identity
(``Spec.linear``, ``Spec.identity_when``), which the layer computes as LoRA.

Residual split (``Activation.split``): a centred f (f(0) = 0: every f in the "base" start, those with f(0) = 0 in
"official") is f(z) = c z + g(z) with c = f'(0) (the right derivative in "base"); the layer computes c z as LoRA's
low-rank product and only g(B A) densely (loran/variants.py, Path.RESIDUAL). An entry may declare g and g' in closed
form (``Spec.residual``: exact in float32, e.g. Sinter's amp z sin(omega z)); otherwise g(z) = f(z) - f(0) - c z is
evaluated in float64 (in float32, f(z) - c z would cancel: tanh(z) - z ~ z^3/3 at |z| ~ 1e-3).

Start-up behaviour (``Activation(name, params, start=...)``, the config's ``start``):
- ``"official"``: f exactly as in the official PEFT-LoRAN code. With LoRA's init (B = 0) Sigmoid changes the
  model at step 0 (f(0) = 0.5) and ReLU never trains (f'(0) = 0, so every gradient is exactly zero).
- ``"base"`` (the default): the centred f(x) - f(0), and at exactly x = 0 the right derivative f'(0+).
  Every activation then starts at the base model and trains (ReLU's subgradient at 0 is taken as 1).
  For activations with f(0) = 0 and a continuous f' (sinter, tanh, silu, ...) both modes are identical.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
from torch import Tensor

START_MODES = ("base", "official")


def sinter(x: Tensor, amp: float = 5e-5, omega: float = 1e4) -> Tensor:
    """Sinter: f(x) = x + amp * x * sin(omega * x). Defaults are the released adapters' settings."""
    return x + amp * x * torch.sin(omega * x)


def d_sinter(x: Tensor, amp: float = 5e-5, omega: float = 1e4) -> Tensor:
    """f'(x) = 1 + amp * sin(omega x) + amp * omega * x * cos(omega x)."""
    wx = omega * x
    return 1 + amp * torch.sin(wx) + amp * omega * x * torch.cos(wx)


def sinter_residual(x: Tensor, amp: float = 5e-5, omega: float = 1e4) -> Tensor:
    """g(x) = f(x) - x = amp * x * sin(omega * x), Sinter's part beyond its slope f'(0) = 1."""
    return amp * x * torch.sin(omega * x)


def d_sinter_residual(x: Tensor, amp: float = 5e-5, omega: float = 1e4) -> Tensor:
    """g'(x) = amp * sin(omega x) + amp * omega * x * cos(omega x)."""
    wx = omega * x
    return amp * torch.sin(wx) + amp * omega * x * torch.cos(wx)


def identity(x: Tensor) -> Tensor:
    """f(x) = x: LoRAN with the identity is LoRA."""
    return x


def d_identity(x: Tensor) -> Tensor:
    """f'(x) = 1."""
    return torch.ones_like(x)


def sigmoid(x: Tensor) -> Tensor:
    """f(x) = 1 / (1 + exp(-x)); f(0) = 0.5."""
    return torch.sigmoid(x)


def d_sigmoid(x: Tensor) -> Tensor:
    """f'(x) = sigmoid(x) (1 - sigmoid(x))."""
    s = torch.sigmoid(x)
    return s * (1 - s)


def tanh(x: Tensor) -> Tensor:
    """f(x) = tanh(x)."""
    return torch.tanh(x)


def d_tanh(x: Tensor) -> Tensor:
    """f'(x) = 1 - tanh(x)^2."""
    return 1 - torch.tanh(x) ** 2


def relu(x: Tensor) -> Tensor:
    """f(x) = max(x, 0)."""
    return torch.relu(x)


def d_relu(x: Tensor) -> Tensor:
    """f'(x) = 1 for x > 0 else 0 (torch's convention at 0)."""
    return (x > 0).to(x.dtype)


def silu(x: Tensor) -> Tensor:
    """f(x) = x * sigmoid(x)."""
    return torch.nn.functional.silu(x)


def d_silu(x: Tensor) -> Tensor:
    """f'(x) = sigmoid(x) (1 + x (1 - sigmoid(x)))."""
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def swish(x: Tensor, beta: float = 25.0) -> Tensor:
    """f(x) = x * sigmoid(beta * x); the official code fixes beta = 25."""
    return x * torch.sigmoid(beta * x)


def d_swish(x: Tensor, beta: float = 25.0) -> Tensor:
    """f'(x) = sigmoid(bx) + b x sigmoid(bx) (1 - sigmoid(bx))."""
    s = torch.sigmoid(beta * x)
    return s + beta * x * s * (1 - s)


def cos(x: Tensor, omega: float = 1e4) -> Tensor:
    """f(x) = x + x * cos(omega * x); the official code fixes omega = 1e4 (note f'(0) = 2)."""
    return x + x * torch.cos(omega * x)


def d_cos(x: Tensor, omega: float = 1e4) -> Tensor:
    """f'(x) = 1 + cos(omega x) - omega x sin(omega x)."""
    wx = omega * x
    return 1 + torch.cos(wx) - omega * x * torch.sin(wx)


def gaussian(x: Tensor) -> Tensor:
    """f(x) = 0.5 * x * exp(-x^2)."""
    return 0.5 * x * torch.exp(-x * x)


def d_gaussian(x: Tensor) -> Tensor:
    """f'(x) = 0.5 exp(-x^2) (1 - 2 x^2)."""
    return 0.5 * torch.exp(-x * x) * (1 - 2 * x * x)


def sine(x: Tensor, omega: float = 200.0, g: float = 1.0) -> Tensor:
    """Sine-activated low rank (Ji et al., ICLR 2025, arXiv 2403.19243): f(x) = sin(omega x) / g, with g = sqrt(d_in)
    in the paper (set per model in configs/activation/sine.yaml). f(0) = 0: it starts at the base model."""
    return torch.sin(omega * x) / g


def d_sine(x: Tensor, omega: float = 200.0, g: float = 1.0) -> Tensor:
    """f'(x) = omega cos(omega x) / g."""
    return omega * torch.cos(omega * x) / g


def never(params: dict) -> bool:
    """No parameter values make f the identity."""
    return False


class Spec(NamedTuple):
    """f, its derivative f' (same keyword parameters), whether f is the identity whatever its parameters (`linear`:
    then f(BA) = BA factorises), and at which parameter values it is the identity (`identity_when(params)`, every
    parameter given), so that f(z) = z and f'(z) = 1 exactly. `residual`: (g, g') in closed form with
    f(z) = f'(0) z + g(z) where f(0) = 0 (None: g = f - f(0) - f'(0) z, evaluated in float64)."""

    f: Callable[..., Tensor]
    df: Callable[..., Tensor]
    linear: bool = False
    identity_when: Callable[[dict], bool] = never
    residual: tuple[Callable[..., Tensor], Callable[..., Tensor]] | None = None


# name -> Spec. Parameters are the keyword arguments of f.
ACTIVATIONS: dict[str, Spec] = {
    "sinter": Spec(sinter, d_sinter, identity_when=lambda params: params["amp"] == 0 or params["omega"] == 0,
                   residual=(sinter_residual, d_sinter_residual)),
    "identity": Spec(identity, d_identity, linear=True),
    "sigmoid": Spec(sigmoid, d_sigmoid),
    "tanh": Spec(tanh, d_tanh),
    "relu": Spec(relu, d_relu),
    "silu": Spec(silu, d_silu),
    "swish": Spec(swish, d_swish),
    "cos": Spec(cos, d_cos),
    "gaussian": Spec(gaussian, d_gaussian),
    "sine": Spec(sine, d_sine),
}

# Parameters that must be finite and >= 0 (or > 0: divisors) wherever an activation has them.
NON_NEGATIVE_PARAMS = ("amp", "omega", "beta")
POSITIVE_PARAMS = ("g",)


def activation_params(name: str) -> dict[str, float]:
    """The parameters activation `name` takes, with their defaults."""
    f = ACTIVATIONS[name].f
    return {p.name: p.default for p in list(inspect.signature(f).parameters.values())[1:]}


class Pointwise(NamedTuple):
    """An activation's f and f' with parameters, start mode and f(0) bound: plain functions of one tensor."""

    f: Callable[[Tensor], Tensor]
    df: Callable[[Tensor], Tensor]
    offset: float


class Split(NamedTuple):
    """A centred f as f(z) = slope z + g(z), slope = f'(0) (right derivative in "base"): g and g' = f' - slope as
    plain functions of one tensor, returned in its dtype."""

    slope: float
    g: Callable[[Tensor], Tensor]
    dg: Callable[[Tensor], Tensor]


@functools.cache
def _pointwise(name: str, params: tuple[tuple[str, float], ...], start: str) -> Pointwise:
    """Built once per (name, params, start): f(0) and f'(0+) are evaluated here, so a call does no host sync and
    torch.compile can trace it, and equal activations share the same function objects (no recompiles)."""
    spec, kwargs, base_mode = ACTIVATIONS[name], dict(params), start == "base"
    offset = float(spec.f(torch.zeros((), dtype=torch.float64), **kwargs)) if base_mode else 0.0

    def f(z: Tensor) -> Tensor:
        out = spec.f(z, **kwargs)
        return out - offset if offset else out

    # f'(0+) per compute dtype, fixed now (a dict filled on first use would trip torch.compile's guards).
    right = {dt: float(spec.df(torch.full((), torch.finfo(dt).tiny, dtype=dt), **kwargs))
             for dt in (torch.float32, torch.float64)}

    def df(z: Tensor) -> Tensor:
        if not base_mode:
            return spec.df(z, **kwargs)
        # f' evaluated at z itself (not at z with zeros replaced), so that f and f' share their intermediates
        # (sin(omega z) in Sinter) when torch.compile fuses them.
        at_zero = right[z.dtype] if z.dtype in right else spec.df(torch.full_like(z, torch.finfo(z.dtype).tiny),
                                                                    **kwargs)
        return torch.where(z == 0, at_zero, spec.df(z, **kwargs))

    return Pointwise(f, df, offset)


@functools.cache
def _split(name: str, params: tuple[tuple[str, float], ...], start: str) -> Split | None:
    """f = c z + g(z) for a centred f (None when f(0) != 0 in the "official" start), built once per activation."""
    spec, kwargs, pw = ACTIVATIONS[name], dict(params), _pointwise(name, params, start)
    zero = torch.zeros((), dtype=torch.float64)
    if float(spec.f(zero, **kwargs)) != 0 and start != "base":
        return None
    # c: the slope of f at 0 as the "base" / "official" f' has it there (ReLU: 1 / 0)
    slope = float(pw.df(zero))
    if spec.residual is not None and slope == float(spec.df(zero, **kwargs)):
        res, d_res = spec.residual
        return Split(slope, lambda z: res(z, **kwargs), lambda z: d_res(z, **kwargs))

    def g(z: Tensor) -> Tensor:
        wide = z.double()
        return (pw.f(wide) - slope * wide).to(z.dtype)

    def dg(z: Tensor) -> Tensor:
        return (pw.df(z.double()) - slope).to(z.dtype)

    return Split(slope, g, dg)


@functools.cache
def _identity(name: str, params: tuple[tuple[str, float], ...]) -> bool:
    spec = ACTIVATIONS[name]
    return spec.linear or spec.identity_when({**activation_params(name), **dict(params)})


@dataclass(frozen=True)
class Activation:
    """An activation with its parameters bound: ``f(z)`` and ``df(z)`` on float32 tensors."""

    name: str
    params: dict = field(default_factory=dict)
    start: str = "base"

    def __post_init__(self) -> None:
        validate_activation(self.name, self.params, self.start)

    @property
    def linear(self) -> bool:
        """True when f(B A) = B A whatever the parameters (the activation `identity`; ``identity`` also covers
        parameter values that make f the identity)."""
        return ACTIVATIONS[self.name].linear

    @property
    def identity(self) -> bool:
        """True when f is the identity at these parameters, as its registry entry declares (always for `identity`,
        Sinter with amp = 0 or omega = 0): the layer then computes the update as LoRA's (x A^T) B^T, bit for bit."""
        return _identity(self.name, tuple(sorted(self.params.items())))

    @property
    def pointwise(self) -> Pointwise:
        """(f, f', f(0)) as plain functions, shared by every equal activation (what the fused kernels call)."""
        return _pointwise(self.name, tuple(sorted(self.params.items())), self.start)

    @property
    def split(self) -> Split | None:
        """f = c z + g(z) (``Split``) when f is centred, f(0) = 0 (always in "base" mode); None otherwise."""
        return _split(self.name, tuple(sorted(self.params.items())), self.start)

    @property
    def offset(self) -> float:
        """f(0), subtracted in the "base" start mode (0 in "official" mode)."""
        return self.pointwise.offset

    def f(self, z: Tensor) -> Tensor:
        """The activation, element-wise (centred in "base" mode)."""
        return self.pointwise.f(z)

    def df(self, z: Tensor) -> Tensor:
        """The derivative, element-wise; in "base" mode the right derivative at exactly 0 (ReLU's is 1)."""
        return self.pointwise.df(z)


def validate_activation(name: str, params: dict, start: str) -> None:
    """Raise ValueError naming the field and the allowed values for a bad activation setting."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r} is unknown; allowed values: {sorted(ACTIVATIONS)}")
    allowed = activation_params(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(
            f"activation_kwargs {unknown} are not parameters of activation {name!r}; "
            f"allowed: {sorted(allowed) or 'none'}"
        )
    for key, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"activation_kwargs.{key}={value!r} must be a number")
        if key in NON_NEGATIVE_PARAMS and not (value >= 0 and value != float("inf")):
            raise ValueError(f"activation_kwargs.{key}={value!r} must be finite and >= 0")
        if key in POSITIVE_PARAMS and not (value > 0 and value != float("inf")):
            raise ValueError(f"activation_kwargs.{key}={value!r} must be finite and > 0")
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"activation_kwargs.{key}={value!r} must be finite")
    if start not in START_MODES:
        raise ValueError(f"start={start!r} is unknown; allowed values: {list(START_MODES)}")
