"""loran/variants.py: LoranVariant (the un-folded forward, merge, refusals), choose_path's table (when the update is
folded into W0 and which update function and dtype an adapter takes), base_folds and base_weight."""
import pytest
import torch
from peft import LoraConfig
from torch import nn

from loran import LoranConfig, get_loran_model, loran_layers
from loran.variants import UPDATES, Path, choose_path
from loran.variants import Path as LayerPath


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


def _layer(activation="sinter", **kwargs):
    if activation == "sigmoid official":  # f(0) = 0.5: not centred, no residual split
        activation, kwargs = "sigmoid", {**kwargs, "start": "official"}
    config = LoranConfig(r=3, lora_alpha=9, target_modules=["q_proj"], activation=activation,
                         activation_kwargs=SINTER if activation == "sinter" else {}, **kwargs)
    model = get_loran_model(Proj(), config).eval()
    return model, model.base_model.model.q_proj


X = torch.randn(2, 10)


def test_the_table_names_every_path_and_each_adapter_path_has_its_function():
    rows = choose_path.__doc__.split("path\n", 1)[1]
    assert all(f" {path.name}\n" in rows for path in Path)
    assert set(UPDATES) == {Path.LORA, Path.LORA_CAST, Path.RESIDUAL, Path.DENSE, Path.REFERENCE}


@pytest.mark.parametrize("case, expected", [
    ("plain", Path.FOLDED), ("disabled", Path.BASE_ONLY), ("merged", Path.BASE_ONLY), ("none active", Path.BASE_ONLY),
    ("extra args", Path.UNFOLDED), ("bf16 x", Path.UNFOLDED), ("autocast", Path.UNFOLDED),
    ("dropout", Path.UNFOLDED), ("not memory-efficient", Path.UNFOLDED), ("plain LoRA beside", Path.UNFOLDED),
    ("identity", Path.UNFOLDED), ("sinter amp 0", Path.UNFOLDED), ("hooked base", Path.UNFOLDED),
])
def test_each_layer_row_picks_its_path(case, expected):
    model, layer = _layer(activation="identity" if case == "identity" else "sinter",
                          lora_dropout=0.3 if case == "dropout" else 0.0,
                          memory_efficient=case != "not memory-efficient")
    x, extra = (X.bfloat16() if case == "bf16 x" else X), case == "extra args"
    if case == "disabled":
        layer.enable_adapters(False)
    elif case == "merged":
        model.merge_adapter()
    elif case == "none active":
        layer.set_adapter("absent")
    elif case == "dropout":
        layer.train()
    elif case == "plain LoRA beside":
        model.add_adapter("plain", LoraConfig(r=2, target_modules=["q_proj"]))
        model.base_model.set_adapter(["default", "plain"])
    elif case == "sinter amp 0":
        layer.loran_activation["default"] = LoranConfig(activation_kwargs={"amp": 0.0}).build_activation()
    elif case == "hooked base":
        layer.base_layer.register_forward_hook(lambda m, i, out: out)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        plan = choose_path(layer, x, extra_args=extra)
    assert plan.path is expected
    assert (plan.weight_fn is not None, len(plan.adapters)) == ((True, 1) if expected is Path.FOLDED else (False, 0))


@pytest.mark.parametrize("activation, memory_efficient, policy, x_dtype, autocast, expected, dtype", [
    ("identity", True, "float32", torch.float32, False, Path.LORA, None),
    ("identity", True, "float32", torch.bfloat16, False, Path.LORA_CAST, None),
    ("identity", True, "float32", torch.float32, True, Path.LORA_CAST, None),
    ("identity", True, "autocast", torch.float32, True, Path.LORA, torch.bfloat16),
    ("sinter", True, "float32", torch.float32, True, Path.RESIDUAL, None),
    ("sinter", True, "autocast", torch.float32, True, Path.RESIDUAL, torch.bfloat16),
    ("sigmoid official", True, "float32", torch.float32, True, Path.DENSE, None),
    ("sigmoid official", True, "autocast", torch.float32, True, Path.DENSE, torch.bfloat16),
    ("sinter", False, "autocast", torch.float32, False, Path.REFERENCE, None),
    ("sinter", False, "autocast", torch.float32, True, Path.REFERENCE, torch.bfloat16),
])
def test_each_adapter_row_picks_its_path_and_dtype(activation, memory_efficient, policy, x_dtype, autocast, expected,
                                                    dtype):
    _, layer = _layer(activation, memory_efficient=memory_efficient, update_dtype=policy)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        plan = choose_path(layer, X.to(x_dtype), "default")
    assert (plan.path, plan.dtype) == (expected, dtype)


# The un-folded path applies the update to dropout(x), not to x (the base layer sees x).
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


# tanh, sigmoid: slope f'(0) = 1 and 1/4 (RESIDUAL's c-part); the official start's Sigmoid is not centred (DENSE)
@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "sigmoid official"])
@pytest.mark.parametrize("memory_efficient", [True, False])
def test_autocast_policy_computes_a_non_linear_update_in_the_autocast_dtype(eager, memory_efficient, activation):
    """update_dtype="autocast" under bf16 autocast: B A, f(B A) and the products in bf16, as autocast computes LoRA's
    matmuls; "float32" computes them in float32. So the two differ, and both are within bf16's precision of the
    float64 math. Mutant: the autocast dtype not passed on (the "autocast" policy computing in float32)."""
    outs = {}
    for policy in ("float32", "autocast"):
        name, start = activation.split()[0], "official" if activation.endswith("official") else "base"
        model = get_loran_model(Proj(16, 12), LoranConfig(
            r=4, lora_alpha=8, target_modules=["q_proj"], activation=name, memory_efficient=memory_efficient,
            update_dtype=policy, start=start))
        layer = model.base_model.model.q_proj
        layer.lora_B["default"].weight.data = torch.randn(12, 4, generator=torch.Generator().manual_seed(6)) * 0.5
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(7))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outs[policy] = model(x).float()
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    W0, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    f64 = {"sigmoid official": torch.sigmoid}.get(activation) or F64.get(activation, torch.tanh)
    exact = x.double() @ (W0 + 2.0 * f64(B @ A)).T + b
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


def test_the_dense_path_computes_a_non_centred_update_and_its_gradients(eager):
    """The DENSE row (memory-efficient, f not centred: the official start's Sigmoid, f(0) = 0.5) against float64
    math: output, and the gradients of x, A and B (``autograd.loran_update`` recomputes f(B A) in backward)."""
    model, layer = _layer("sigmoid official", memory_efficient=True)
    gen = torch.Generator().manual_seed(4)
    layer.lora_B["default"].weight.data = torch.randn(layer.lora_B["default"].weight.shape, generator=gen)
    mask = (torch.rand(4, 10, generator=gen) > 0.5).float() * 2.0
    layer.lora_dropout["default"] = FixedMask(mask)  # not folded: the update takes the adapter rows
    x = torch.randn(4, 10, generator=gen, requires_grad=True)
    assert choose_path(layer, x).path is Path.UNFOLDED
    assert choose_path(layer, x * mask, "default").path is Path.DENSE
    w = torch.randn(4, 7, generator=gen)
    (model(x) * w).sum().backward()

    x64 = x.detach().double().requires_grad_()
    A64 = layer.lora_A["default"].weight.detach().double().requires_grad_()
    B64 = layer.lora_B["default"].weight.detach().double().requires_grad_()
    W0, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    y64 = x64 @ W0.T + b + 3.0 * (x64 * mask.double()) @ torch.sigmoid(B64 @ A64).T
    (y64 * w.double()).sum().backward()
    torch.testing.assert_close(model(x).double(), y64.detach(), rtol=1e-5, atol=1e-5)
    for got, want in ((x.grad, x64.grad), (layer.lora_A["default"].weight.grad, A64.grad),
                      (layer.lora_B["default"].weight.grad, B64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_the_residual_path_under_the_autocast_policy_adds_its_two_bf16_parts(eager):
    """RESIDUAL under update_dtype="autocast" and bf16 autocast: the update is LoRA's c-part as PEFT's modules compute
    it under autocast (bf16) plus residual_update in bf16, summed, then added in the result's dtype; with Sigmoid's
    slope c = 1/4. Mutants: the dtype not passed to residual_update, the c-part scaled by s / c."""
    from loran.autograd import residual_update

    _, layer = _layer("sigmoid", memory_efficient=True, update_dtype="autocast")
    layer.lora_B["default"].weight.data = torch.randn(7, 3, generator=torch.Generator().manual_seed(8)) * 8
    x = torch.randn(5, 10, generator=torch.Generator().manual_seed(9))
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    act = layer.loran_activation["default"]
    assert act.split.slope == 0.25
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert choose_path(layer, x, "default").path is Path.RESIDUAL
        result = layer.base_layer(x)
        got = UPDATES[Path.RESIDUAL](layer, "default", x, result, torch.bfloat16)
        c_part = layer.lora_B["default"](layer.lora_A["default"](x)) * (3.0 * 0.25)
        g_part = residual_update(x, A, B, 3.0, act, dtype=torch.bfloat16)
        g_part_float32 = residual_update(x, A, B, 3.0, act)
    assert c_part.dtype == g_part.dtype == torch.bfloat16
    assert torch.equal(got, result + (c_part + g_part).to(result.dtype))
    assert not torch.equal(got, result + (c_part + g_part_float32).to(result.dtype))  # the dtype shows here
    assert not torch.equal(got, result + (c_part * 16 + g_part).to(result.dtype))  # and the slope


def test_an_int8_base_is_not_folded():
    """LLM.int8() quantises x as well as W: folding the update into a dequantised W0 would not compute what the int8
    base computes, so an int8 base takes the un-folded path even in eval mode without grad."""
    bnb = pytest.importorskip("bitsandbytes")
    from loran.compat import is_8bit
    from loran.variants import base_folds

    torch.manual_seed(0)
    base = bnb.nn.Linear8bitLt(10, 7, has_fp16_weights=False)
    base.weight = bnb.nn.Int8Params(torch.randn(7, 10), requires_grad=False, has_fp16_weights=False)
    base = base.to("cpu").eval()
    x = torch.randn(3, 10)
    assert is_8bit(base) and not is_8bit(nn.Linear(10, 7))
    with torch.no_grad():
        assert not base_folds(base, x)
        assert base_folds(nn.Linear(10, 7).requires_grad_(False), x)


def test_a_folded_nf4_base_quantised_from_bf16_is_read_in_the_compute_dtype_in_backward(eager):
    """An NF4 weight quantised from bf16 (its quant_state says bf16), float32 x: the folded layer reads W0 straight
    into float32 in forward and backward, as bitsandbytes' own matmul does. dL/dx against float64 math on the float32
    dequantisation (a bf16 read would be off by bf16's rounding, ~4e-3)."""
    import bitsandbytes as bnb

    from loran.compat import dequantized_4bit

    torch.manual_seed(0)
    proj = Proj(8, 6)
    q = bnb.nn.Linear4bit(8, 6, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(proj.q_proj.weight.data.to(torch.bfloat16), requires_grad=False, quant_type="nf4")
    q.bias = nn.Parameter(proj.q_proj.bias.data.clone(), requires_grad=False)
    proj.q_proj = q.to("cpu")
    proj.q_proj.support_avx512bf16_for_cpu = False
    assert proj.q_proj.weight.quant_state.dtype == torch.bfloat16
    model = get_loran_model(proj, LoranConfig(r=3, lora_alpha=9, target_modules=["q_proj"], activation="sinter",
                                              activation_kwargs=SINTER)).eval()
    layer = model.base_model.model.q_proj
    layer.lora_B["default"].weight.data = torch.randn(6, 3, generator=torch.Generator().manual_seed(3)) * 0.5
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(4), requires_grad=True)
    assert choose_path(layer, x).path is Path.FOLDED
    grad_y = torch.randn(4, 6, generator=torch.Generator().manual_seed(5))
    model(x).backward(grad_y)
    W0 = dequantized_4bit(proj.q_proj.weight, torch.float32).double()
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    expected = grad_y.double() @ (W0 + 3.0 * F64["sinter"](B @ A))
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-5, atol=1e-5)
