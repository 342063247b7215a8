"""loran/__init__.py: importing the library defines things and changes no global state of other libraries.

Each check runs in a fresh interpreter, since this test process has long built LoranConfigs."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, os, sys
import torch, peft
from omegaconf import OmegaConf
from peft.tuners.lora import LoraModel
from peft import PeftModel
before = {"limit": torch._dynamo.config.recompile_limit}
methods = {"add_weighted_adapter": LoraModel, "_check_new_adapter_config": LoraModel, "load_adapter": PeftModel}
import loran, loran.pipeline.cells, loran.pipeline.run, loran.pipeline.schema
from hydra.core.config_store import ConfigStore
import loran.autograd as la
out = {
    "wrapped_on_import": [n for n, owner in methods.items() if getattr(getattr(owner, n), "_loran", False)],
    "resolver_on_import": OmegaConf.has_resolver("loran.config_hash"),
    "schema_on_import": "train_schema.yaml" in ConfigStore.instance().repo,
    "limit_changed": torch._dynamo.config.recompile_limit != before["limit"],
    "type_registered": "LORAN" in peft.PEFT_TYPE_TO_CONFIG_MAPPING,
}
os.environ["LORAN_COMPILE"] = "never"             # set after import: still obeyed
out["compile_env_read_late"] = la.KERNELS.use_compiled(2**20) is False
os.environ["LORAN_COMPILE"] = "auto"
out["compile_auto_large"] = la.KERNELS.use_compiled(2**20)
loran.LoranConfig(r=2, target_modules=["q_proj"])
out["wrapped_after_config"] = sorted(n for n, owner in methods.items() if getattr(getattr(owner, n), "_loran", False))
loran.pipeline.cells.register_resolver()
out["resolver_after_register"] = OmegaConf.has_resolver("loran.config_hash")
out["schema_after_register"] = "train_schema.yaml" in ConfigStore.instance().repo
print(json.dumps(out))
"""


def test_import_changes_no_global_state_and_the_first_config_wraps_peft():
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["wrapped_on_import"] == []              # no PEFT method patched by `import loran`
    assert out["resolver_on_import"] is False          # no OmegaConf resolver registered by importing the pipeline
    assert out["schema_on_import"] is False            # nor the config schema in Hydra's ConfigStore
    assert out["limit_changed"] is False               # dynamo's recompile limit untouched until a first compile
    assert out["type_registered"] is True              # the one registry entry, as PEFT registers its own methods
    assert out["compile_env_read_late"] is True and out["compile_auto_large"] is True
    assert out["wrapped_after_config"] == ["_check_new_adapter_config", "add_weighted_adapter", "load_adapter"]
    assert out["resolver_after_register"] is True and out["schema_after_register"] is True
