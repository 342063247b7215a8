"""The layer's path table (loran.variants.choose_path), row by row, and the version check of loran/compat.py."""
import warnings

import pytest
import torch
from peft import LoraConfig

from loran import LoranConfig, compat, get_loran_model
from loran.variants import UPDATES, Path, choose_path
from test_compiled_kernels import Proj  # one Linear named q_proj, 10 -> 7

SINTER = {"amp": 0.5, "omega": 30.0}


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


def test_the_version_check_warns_outside_the_tested_ranges(monkeypatch):
    assert compat.release("0.50.2") == (0, 50, 2) and compat.release("0.21.0.dev0") == (0, 21, 0)
    assert compat.untested({"peft": "0.21.0", "bitsandbytes": "0.50.2"}) == []
    assert compat.untested({"peft": "1.3.0"}) == []
    old, new = compat.untested({"peft": "0.20.1", "bitsandbytes": "0.51.0"})
    assert "peft written for 0.21.0 or later; 0.20.1 is installed" in old
    assert "bitsandbytes written for 0.50.0 up to before 0.51.0; 0.51.0 is installed" in new
    monkeypatch.setattr(compat.peft, "__version__", "0.20.0")
    with pytest.warns(UserWarning, match="private APIs of peft .* 0.20.0 is installed"):
        compat._check_versions()
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat._check_versions()  # the installed versions are in range
