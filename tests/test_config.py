"""loran/config.py: LoranConfig rejects bad values with a message naming the field and what is allowed."""
import math
import re

import pytest

from loran import ACTIVATIONS, LoranConfig

UNKNOWN = "no_such_activation"  # not a registered name, whatever the registry holds


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"activation": UNKNOWN},
         re.escape(f"activation={UNKNOWN!r} is unknown; allowed values: {sorted(ACTIVATIONS)}")),
        ({"r": 0}, r"r=0 must be a positive integer"),
        ({"r": -4}, r"r=-4 must be a positive integer"),
        ({"r": 2.5}, r"r=2.5 must be a positive integer"),
        ({"lora_alpha": 0}, r"lora_alpha=0 must be a finite number > 0"),
        ({"lora_alpha": math.inf}, r"lora_alpha=inf must be a finite number > 0"),
        ({"lora_dropout": 1.0}, r"lora_dropout=1.0 must be a number in \[0, 1\)"),
        ({"lora_dropout": "0.1"}, r"lora_dropout='0.1' must be a number in \[0, 1\)"),
        ({"activation_kwargs": {"amp": math.nan}}, r"activation_kwargs.amp=nan must be finite and >= 0"),
        ({"activation_kwargs": {"amp": math.inf}}, r"activation_kwargs.amp=inf must be finite and >= 0"),
        ({"activation_kwargs": {"omega": -1.0}}, r"activation_kwargs.omega=-1.0 must be finite and >= 0"),
        ({"activation_kwargs": {"amp": "big"}}, r"activation_kwargs.amp='big' must be a number"),
        ({"activation_kwargs": {"beta": 2.0}}, r"\['beta'\] are not parameters of activation 'sinter'; allowed: \['amp', 'omega'\]"),
        ({"activation": "tanh", "activation_kwargs": {"amp": 1.0}}, r"allowed: none"),
        ({"start": "zero"}, r"start='zero' is unknown; allowed values: \['base', 'official'\]"),
        ({"use_dora": True}, r"use_dora cannot be combined with LoRAN"),
        ({"memory_efficient": "yes"}, r"memory_efficient='yes' must be true or false"),
    ],
)
def test_bad_values_are_rejected_with_field_and_allowed_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoranConfig(target_modules=["q_proj"], **kwargs)


def test_defaults_are_the_released_sinter_settings_and_are_written_out():
    cfg = LoranConfig(target_modules=["q_proj"])
    assert cfg.activation == "sinter" and cfg.activation_kwargs == {"amp": 5e-5, "omega": 1e4}
    assert cfg.start == "base" and cfg.memory_efficient
    assert cfg.to_dict()["peft_type"] == "LORAN"


# activation_kwargs that is not a mapping.
def test_activation_kwargs_must_be_a_mapping():
    message = ("activation_kwargs='amp=1.0' must be a mapping of the activation's parameters, such as "
               '{"amp": 5e-5, "omega": 1e4}')
    with pytest.raises(ValueError, match=re.escape(message)):
        LoranConfig(target_modules=["q_proj"], activation_kwargs="amp=1.0")
    with pytest.raises(ValueError, match=r"activation_kwargs=\[\('amp', 1.0\)\] must be a mapping"):
        LoranConfig(target_modules=["q_proj"], activation_kwargs=[("amp", 1.0)])
    assert LoranConfig(target_modules=["q_proj"], activation_kwargs=None).activation_kwargs == {"amp": 5e-5,
                                                                                                 "omega": 1e4}
