"""loran/model.py, the adapter library's loading: a saved adapter whose config and weights do not belong together (or
that clashes with an adapter already loaded) is refused, naming the file or the adapter."""
import json
import re
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from loran import LoranConfig, get_loran_model, load_loran

from test_loran_peft import SINTER, TARGETS, X, make_toy, randomise_B


TANH = {"activation": "tanh"}


def saved(folder, activation=SINTER, targets=TARGETS, seed=1):
    """Save a LoRAN adapter with random B (so that it moves the outputs) into `folder`; its outputs on X."""
    model = get_loran_model(make_toy(), LoranConfig(r=4, lora_alpha=8, target_modules=targets, **activation))
    randomise_B(model, seed=seed)
    model.save_pretrained(folder)
    return model(X).detach()


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# load_adapter over an existing adapter of another activation.
def test_load_adapter_over_an_adapter_of_another_activation_is_refused(tmp_path):
    saved(tmp_path / "sinter", SINTER)
    saved(tmp_path / "tanh", TANH, seed=2)
    model = load_loran(make_toy(), tmp_path / "sinter")
    before = model(X).detach()
    message = (r"adapter 'default' already exists as LoRAN activation='sinter' \{'amp': 0.5, 'omega': 30.0\} "
               r"start='base', but .*tanh holds an adapter saved as LoRAN activation='tanh' \{\} start='base'.*"
               r"Load it under a new adapter_name, or delete_adapter\('default'\) first")
    with pytest.raises(ValueError, match=message):
        model.load_adapter(tmp_path / "tanh", adapter_name="default")
    assert model.peft_config["default"].activation == "sinter" and torch.equal(model(X), before)  # untouched


def test_an_adapter_of_another_activation_loads_under_a_new_name_or_after_deleting(tmp_path):
    saved(tmp_path / "sinter", SINTER)
    y_tanh = saved(tmp_path / "tanh", TANH, seed=2)
    model = load_loran(make_toy(), tmp_path / "sinter")
    model.load_adapter(tmp_path / "tanh", adapter_name="tanh")
    model.set_adapter("tanh")
    assert torch.equal(model(X), y_tanh)
    model.delete_adapter("default")
    model.load_adapter(tmp_path / "tanh", adapter_name="tanh")  # the same activation again: PEFT reloads the weights
    assert torch.equal(model(X), y_tanh)


@pytest.mark.parametrize("existing", ["plain LoRA", "LoRAN"])
def test_plain_lora_and_loran_weights_never_load_into_each_others_adapter(tmp_path, existing):
    get_peft_model(make_toy(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)).save_pretrained(tmp_path / "lora")
    saved(tmp_path / "loran", SINTER)
    if existing == "LoRAN":
        model, other, words = load_loran(make_toy(), tmp_path / "loran"), tmp_path / "lora", "saved as LORA"
    else:
        model, other, words = PeftModel.from_pretrained(make_toy(), tmp_path / "lora"), tmp_path / "loran", "LoRAN"
    with pytest.raises(ValueError, match=rf"adapter 'default' already exists as .*{words}.*new adapter_name"):
        model.load_adapter(other, adapter_name="default")


# No weights file.
def test_a_folder_without_weights_names_the_folder_and_the_file(tmp_path):
    saved(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(tmp_path))} has no adapter_model.safetensors"):
        load_loran(make_toy(), tmp_path)


# A truncated adapter_config.json.
def test_a_truncated_config_is_named_as_not_valid_json(tmp_path):
    saved(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(path.read_text()[:60])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is not valid JSON"):
        load_loran(make_toy(), tmp_path)


# target_modules that no longer match the weights.
@pytest.mark.parametrize("targets, message", [
    (["q_proj"], r"adapted but no weights saved: none; weights saved for modules not adapted: \['v_proj'\]"),
    (["q_proj", "v_proj"], r"adapted but no weights saved: \['v_proj'\]; weights saved for modules not adapted: none"),
])
def test_weights_that_do_not_match_target_modules_are_refused(tmp_path, targets, message):
    saved(tmp_path, targets=["q_proj", "v_proj"] if targets == ["q_proj"] else ["q_proj"])
    edit_config(tmp_path, target_modules=targets)
    with pytest.raises(ValueError, match=rf"target_modules={re.escape(repr(targets))} adapt: {message}"):
        load_loran(make_toy(), tmp_path)
    with pytest.raises(ValueError, match=message):  # stock PEFT's entry point, after `import loran`, too
        PeftModel.from_pretrained(make_toy(), tmp_path)


def test_a_mismatched_adapter_loaded_next_to_another_is_refused_and_removed(tmp_path):
    y = saved(tmp_path / "good")
    saved(tmp_path / "bad", targets=["q_proj", "v_proj"])
    edit_config(tmp_path / "bad", target_modules=["q_proj"])
    model = load_loran(make_toy(), tmp_path / "good")
    with pytest.raises(ValueError, match=r"weights saved for modules not adapted: \['v_proj'\]"):
        model.load_adapter(tmp_path / "bad", adapter_name="bad")
    assert "bad" not in model.peft_config and torch.equal(model(X), y)


def test_a_matching_adapter_still_loads_bit_identically(tmp_path):
    y = saved(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert torch.equal(load_loran(make_toy(), tmp_path / "b")(X), y)


def test_the_version_warning_points_at_the_line_that_registered_loran(monkeypatch):
    """compat.check_versions warns with stacklevel 3: at the caller of register_with_peft, not inside loran (not in
    the mutation tests' selection: mutmut's trampolines add stack frames)."""
    import peft

    from loran import compat
    from loran.model import register_with_peft

    monkeypatch.setattr(peft, "__version__", "0.20.0")
    monkeypatch.setattr(compat, "_checked", False)
    with pytest.warns(UserWarning, match="peft written for 0.21.0 or later; 0.20.0 is installed") as caught:
        register_with_peft()
    assert [w.filename for w in caught] == [__file__]
