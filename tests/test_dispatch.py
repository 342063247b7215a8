"""loran/dispatch.py: a target module LoRAN does not cover is refused with a message naming it (PEFT would build a
plain LoRA layer there)."""
import pytest
from torch import nn

from loran import LoranConfig

from test_variants import SINTER


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
