"""loran/compat.py: the version check against the tested ranges of peft and bitsandbytes."""
import warnings

import pytest

from loran import compat


def test_the_version_check_warns_outside_the_tested_ranges(monkeypatch):
    assert compat.release("0.50.2") == (0, 50, 2) and compat.release("0.21.0.dev0") == (0, 21, 0)
    assert compat.untested({"peft": "0.21.0", "bitsandbytes": "0.50.2"}) == []
    assert compat.untested({"peft": "1.3.0"}) == []
    old, new = compat.untested({"peft": "0.20.1", "bitsandbytes": "0.51.0"})
    assert "peft written for 0.21.0 or later; 0.20.1 is installed" in old
    assert "bitsandbytes written for 0.50.0 up to before 0.51.0; 0.51.0 is installed" in new
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
