"""loran/compat.py: the version check against the tested ranges of peft and bitsandbytes."""
import json
import warnings

import pytest
import torch

from loran import compat


def test_the_version_check_warns_outside_the_tested_ranges(monkeypatch):
    assert compat.release("0.50.2") == (0, 50, 2) and compat.release("0.21.0.dev0") == (0, 21, 0)
    assert compat.untested({"peft": "0.21.0", "bitsandbytes": "0.50.2"}) == []
    assert compat.untested({"peft": "1.3.0"}) == []
    old, new = compat.untested({"peft": "0.20.1", "bitsandbytes": "0.51.0"})
    assert "peft written for 0.21.0 or later; 0.20.1 is installed" in old
    assert "bitsandbytes written for 0.50.0 up to before 0.51.0; 0.51.0 is installed" in new
    assert old == ("LoRAN uses private APIs of peft written for 0.21.0 or later; 0.20.1 is installed. Check "
                   "loran/compat.py if its layers misbehave")
    assert compat.release("unknown") == () and compat.untested({"peft": "unknown"})  # no number: below every range
    monkeypatch.setattr(compat.peft, "__version__", "0.20.0")
    monkeypatch.setattr(compat, "_checked", False)
    with pytest.warns(UserWarning, match="private APIs of peft .* 0.20.0 is installed"):
        compat.check_versions()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.check_versions()  # once per process: the second call says nothing
    monkeypatch.undo()
    monkeypatch.setattr(compat, "_checked", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.check_versions()  # the installed versions are in range


def test_the_saved_peft_type_is_read_from_the_adapter_folder(tmp_path):
    """What LoranModel.from_pretrained dispatches on: the peft_type in the folder's adapter_config.json."""
    from loran import LoranConfig

    LoranConfig(r=2, target_modules=["q_proj"]).save_pretrained(tmp_path / "loran")
    saved = json.loads((tmp_path / "loran" / "adapter_config.json").read_text())["peft_type"]
    assert compat.saved_peft_type(str(tmp_path / "loran"), {}) == saved == "LORAN"
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    assert compat.saved_peft_type(str(tmp_path / "ia3"), {}) == "IA3"


def test_an_int8_weight_dequantises_to_its_row_wise_absmax_rounding():
    """LLM.int8() stores q = round(127 W / absmax_row) and absmax_row (SCB, float16): dequantised, q x SCB / 127, which
    is W to within one quantisation step of its row."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    W = torch.randn(8, 16)
    layer = bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(W.clone(), requires_grad=False, has_fp16_weights=False)
    layer = layer.to("cpu")
    assert layer.weight.dtype == torch.int8
    got = compat.dequantized_8bit(layer).float()
    scb = layer.weight.SCB.float()[:, None]
    torch.testing.assert_close(got, layer.weight.float() * scb / 127, rtol=1e-3, atol=1e-6)
    assert ((got - W).abs() <= scb / 127).all()


def test_hub_kwargs_are_the_ones_hf_hub_download_takes():
    """What LoranModel.from_pretrained passes on to the download of an adapter (PEFT's own split of the kwargs)."""
    from peft import PeftModel

    kwargs = {"revision": "main", "subfolder": "adapters", "torch_device": "cpu", "is_trainable": True}
    assert compat.hub_kwargs(PeftModel, kwargs) == {"revision": "main", "subfolder": "adapters"}


def test_the_version_check_covers_bitsandbytes_only_when_installed(monkeypatch):
    """bitsandbytes' version is checked when it is installed and left out when not (where the warning points:
    tests/test_model.py, outside the mutation tests, whose trampolines add stack frames)."""
    bnb = pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(bnb, "__version__", "0.49.0")
    monkeypatch.setattr(compat, "_checked", False)
    with pytest.warns(UserWarning, match="bitsandbytes written for 0.50.0 up to before 0.51.0; 0.49.0"):
        compat.check_versions()
    monkeypatch.setattr(compat, "bnb", None)  # not installed: peft alone is checked, in range
    monkeypatch.setattr(compat, "_checked", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.check_versions()


def test_the_saved_peft_type_lookup_gets_the_hub_arguments(monkeypatch):
    """A hub adapter's type is read at the revision and subfolder asked for: the hub kwargs reach PEFT's lookup."""
    from peft import PeftConfig

    seen = {}
    monkeypatch.setattr(PeftConfig, "_get_peft_type", classmethod(lambda cls, model_id, **kw: seen.update(kw) or "X"))
    assert compat.saved_peft_type("user/adapter", {"revision": "v2", "subfolder": "a"}) == "X"
    assert seen == {"revision": "v2", "subfolder": "a"}
