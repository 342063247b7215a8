"""Building, loading and merging LoRAN models (thin wrappers over PEFT's own functions)."""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import torch
from peft import PEFT_TYPE_TO_CONFIG_MAPPING, PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from torch import nn

from loran.autograd import widened
from loran.compat import (
    NEW_ADAPTER_CHECK, check_versions, dequantized_4bit, dequantized_8bit, fix_4bit_quant_state, hub_kwargs, is_4bit, is_8bit,
    saved_peft_type, targets_module,
)
from loran.config import ON_NEW_CONFIG, PEFT_TYPE, LoranConfig
from loran.dispatch import COVERED, LORAN_LAYERS, uncovered_message
from loran.variants import LoranVariant

# add_weighted_adapter combinations that work on the layers' actual updates (get_delta_weight) and refactor the
# result by SVD; the others combine the factors A and B, which is LoRA's update only when f is linear.
SVD_COMBINATIONS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")


def register_with_peft() -> None:
    """Make two LoraModel methods and ``PeftModel.load_adapter`` aware of LoRAN; for adapters that are not LoRAN they
    behave exactly as PEFT's own. Idempotent. Every LoranConfig calls it when built (``loran.config.ON_NEW_CONFIG``),
    and the first call checks the PEFT and bitsandbytes versions against those loran.compat was
    written for. Call it yourself only before ``PeftModel.load_adapter`` of a LoRAN adapter into a model that holds no
    LoRAN adapter yet, in a process that has built no LoranConfig."""
    check_versions()
    for owner, name, wrapper in ((LoraModel, NEW_ADAPTER_CHECK, _checks_targets),
                                 (LoraModel, "add_weighted_adapter", _weighted),
                                 (PeftModel, "load_adapter", _loads_matching)):
        method = getattr(owner, name)
        if not getattr(method, "_loran", False):
            wrapped = functools.wraps(method)(wrapper(method))
            wrapped._loran = True
            setattr(owner, name, wrapped)


ON_NEW_CONFIG.append(register_with_peft)


def _checks_targets(check):
    """Before PEFT injects a LoranConfig adapter (get_peft_model, add_adapter, load_adapter), refuse targets on which
    it would silently run plain LoRA, naming them: a layer type LoRAN does not cover, or a PEFT LoRA layer that a
    plain LoraConfig built first (PEFT would add the adapter to that layer, which has no LoRAN forward)."""

    def checked(self, config, *args, **kwargs):
        check(self, config, *args, **kwargs)
        if isinstance(config, LoranConfig) and config.target_modules is not None:
            refuse_uncovered_targets(self.model, config)

    return checked


def refuse_uncovered_targets(model: nn.Module, config: LoranConfig) -> None:
    """ValueError naming the first module `config` targets that a LoRAN layer cannot adapt."""
    inside_adapters = []
    for key, module in model.named_modules():
        if not key or any(key.startswith(prefix) for prefix in inside_adapters):
            continue
        if isinstance(module, BaseTunerLayer):
            inside_adapters.append(key + ".")
        if not targets_module(config, key):
            continue
        if isinstance(module, BaseTunerLayer) and not isinstance(module, LORAN_LAYERS):
            kind = type(module)
            raise ValueError(
                f"target module {key!r} is already a {kind.__module__}.{kind.__qualname__}, the plain LoRA layer of "
                "an adapter added before, which has no LoRAN forward: the LoRAN adapter would run as plain LoRA "
                "there. Build the model with the LoRAN adapter first (get_loran_model or load_loran), then add plain "
                "LoRA adapters next to it")
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if not isinstance(base, tuple(COVERED)):
            raise ValueError(uncovered_message(key, base))


def _weighted(add_weighted_adapter):
    """PEFT's add_weighted_adapter, made correct for LoRAN adapters with a non-linear f or refused.

    The sum of updates w_i s_i f_i(B_i A_i) is in general of full rank and not of the form f(B A): it is only
    reproduced by the SVD combinations, which factor the layers' actual updates (``get_delta_weight``) into the new
    adapter's B A, and only if that adapter applies no f. So the new adapter gets the identity activation (scaling
    1): it is the best rank-`svd_rank` approximation of the combined update (exact with svd_rank = min(d_out, d_in)).
    The other combinations mix the factors A and B themselves and are refused."""

    def combined(self, adapters, weights, adapter_name, combination_type="svd", *args, **kwargs):
        configs = [self.peft_config.get(name) for name in adapters]
        non_linear = [name for name, c in zip(adapters, configs)
                      if isinstance(c, LoranConfig) and not c.build_activation().linear]
        if not non_linear or adapter_name in self.peft_config:
            return add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, *args, **kwargs)
        if combination_type not in SVD_COMBINATIONS or len(adapters) < 2:  # PEFT turns one adapter into "linear"
            raise ValueError(
                f"combination_type={combination_type!r} with {len(adapters)} adapter(s) cannot combine LoRAN adapters "
                f"with a non-linear activation ({non_linear}): it mixes the factors A and B, but the update is "
                f"s f(B A). allowed: {list(SVD_COMBINATIONS)} with two or more adapters")
        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, *args, **kwargs)
        config = self.peft_config[adapter_name]
        if isinstance(config, LoranConfig):  # the SVD factors B A are the update itself: no f on top
            config = dataclasses.replace(config, activation="identity", activation_kwargs={})
            self.peft_config[adapter_name] = config
            for _, layer in loran_layers(self.model):
                if adapter_name in layer.loran_activation:
                    layer.loran_activation[adapter_name] = config.build_activation()

    return combined


def _loads_matching(load_adapter):
    """PEFT's load_adapter, refusing weights that would run as another update than the one they were trained as.

    Into an existing adapter PEFT loads only the weights and keeps that adapter's config: a saved adapter of another
    activation (or plain LoRA into LoRAN and back) would silently compute f_old(B_new A_new). And a LoRAN adapter whose
    weights do not cover the modules its config adapted (or cover others) would run those modules as the base model,
    with only PEFT's warning; such an adapter, if new, is deleted again before the ValueError."""

    def loading(self, model_id, adapter_name, *args, **kwargs):
        existing = self.peft_config.get(adapter_name)
        if existing is not None:
            saved = _saved_config(self, model_id, kwargs, needed=isinstance(existing, LoranConfig))
            if saved is not None:
                refuse_other_update(adapter_name, existing, saved, model_id)
        result = load_adapter(self, model_id, adapter_name, *args, **kwargs)
        config = self.peft_config[adapter_name]
        if isinstance(config, LoranConfig):
            try:
                refuse_unmatched_weights(adapter_name, config, result, model_id)
            except ValueError:
                if existing is None:
                    self.delete_adapter(adapter_name)
                raise
        return result

    return loading


def _saved_config(peft_model: PeftModel, model_id, kwargs: dict, needed: bool) -> PeftConfig | None:
    """The config saved with the adapter at `model_id`, read as PEFT reads it; None (nothing to compare) when a local
    folder has none, or when it is not local and not `needed` (no hub look-up for adapters that are not LoRAN)."""
    hub = hub_kwargs(peft_model, kwargs)
    folder = os.path.join(str(model_id), hub["subfolder"]) if hub.get("subfolder") else str(model_id)
    if os.path.isdir(folder):
        return read_adapter_config(folder) if os.path.isfile(os.path.join(folder, CONFIG_NAME)) else None
    if not needed:
        return None
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[saved_peft_type(str(model_id), hub)]
    return config_cls.from_pretrained(str(model_id), **hub)


def _update_key(config: PeftConfig) -> tuple:
    """What decides the update a config computes from B and A: the LoRAN activation, or the PEFT method."""
    if isinstance(config, LoranConfig):
        return PEFT_TYPE, config.activation, dict(config.activation_kwargs), config.start
    return (getattr(config.peft_type, "value", config.peft_type),)


def _update_of(config: PeftConfig) -> str:
    """The update a config computes, in words: the LoRAN activation with its parameters, or the PEFT method."""
    if isinstance(config, LoranConfig):
        return f"LoRAN activation={config.activation!r} {dict(config.activation_kwargs)} start={config.start!r}"
    return f"{getattr(config.peft_type, 'value', config.peft_type)} (no LoRAN activation)"


def refuse_other_update(adapter_name: str, existing: PeftConfig, saved: PeftConfig, model_id) -> None:
    """ValueError when loading the weights saved with `saved` into the adapter configured as `existing` would make
    them compute another update (only where LoRAN is involved: between other methods PEFT's behaviour stands)."""
    if not (isinstance(existing, LoranConfig) or isinstance(saved, LoranConfig)):
        return
    if _update_key(existing) == _update_key(saved):
        return
    raise ValueError(
        f"adapter {adapter_name!r} already exists as {_update_of(existing)}, but {model_id} holds an adapter saved "
        f"as {_update_of(saved)}: PEFT would load only its weights and keep the existing config, so they would run "
        f"as the existing adapter's update, not their own. Load it under a new adapter_name, or "
        f"delete_adapter({adapter_name!r}) first")


def _module_of(key: str) -> str:
    """The module a LoRA weight key belongs to: 'base_model.model.x.q_proj.lora_A.default.weight' -> 'x.q_proj'."""
    return key.removeprefix("base_model.model.").split(".lora_")[0]


def refuse_unmatched_weights(adapter_name: str, config: LoranConfig, result, model_id) -> None:
    """ValueError naming the modules the adapter adapted that the saved weights lack, and those the weights hold
    that it did not adapt (PEFT's missing and unexpected keys of this load)."""
    missing = sorted({_module_of(k) for k in result.missing_keys
                      if ".lora_" in k and f".{adapter_name}." in k.split(".lora_", 1)[1]})
    unexpected = sorted({_module_of(k) for k in result.unexpected_keys})
    if not (missing or unexpected):
        return
    targets = config.target_modules
    targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
    raise ValueError(
        f"{model_id}: the saved weights do not match the modules that adapter_config.json's "
        f"target_modules={targets!r} adapt: adapted but no weights saved: {missing or 'none'}; "
        f"weights saved for modules not adapted: {unexpected or 'none'}. Those modules would run as the base model. "
        "The config and the weights must come from one save_pretrained")


def read_adapter_config(folder: str | os.PathLike) -> PeftConfig:
    """The adapter config saved in a local `folder`, as PEFT reads it; FileNotFoundError when there is none,
    ValueError naming the file when it is not valid JSON."""
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME} (the adapter's config, which save_pretrained writes)")
    try:
        with open(path) as f:
            json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); restore it, or save the adapter again") from err
    return LoranConfig.from_pretrained(str(folder))


def check_weights_file(folder: str | os.PathLike) -> None:
    """FileNotFoundError naming the folder and the file when a local adapter folder holds no weights."""
    if not any(os.path.isfile(os.path.join(folder, name)) for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)):
        raise FileNotFoundError(
            f"{folder} has no {SAFETENSORS_WEIGHTS_NAME} (nor {WEIGHTS_NAME}): the adapter's weights, which "
            f"save_pretrained writes next to {CONFIG_NAME}")


def get_loran_model(model: nn.Module, config: LoranConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap `model` with a new LoRAN adapter (as ``peft.get_peft_model``)."""
    if not isinstance(config, LoranConfig):
        raise TypeError(f"config must be a LoranConfig, got {type(config).__name__}")
    return get_peft_model(model, config, adapter_name=adapter_name)


def load_loran(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False,
               **kwargs) -> PeftModel:
    """Load a saved LoRAN adapter onto `model`; refuses a folder that holds plain LoRA or another method, has no
    weights or an invalid adapter_config.json, or whose weights do not match the modules its config adapts."""
    folder = os.path.join(str(path), kwargs["subfolder"]) if kwargs.get("subfolder") else str(path)
    if os.path.isdir(folder):
        config = read_adapter_config(folder)
        check_weights_file(folder)
    else:  # a hub repo id: PEFT looks it up
        config = LoranConfig.from_pretrained(str(path), subfolder=kwargs.get("subfolder"))
    if not isinstance(config, LoranConfig):
        kind = getattr(config.peft_type, "value", config.peft_type)
        raise ValueError(f"{path} holds a {kind} adapter, not LoRAN (adapter_config.json peft_type "
                         f'must be "{PEFT_TYPE}"); load it with peft.PeftModel.from_pretrained instead')
    return PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name, is_trainable=is_trainable,
                                     config=config, **kwargs)


def loran_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every LoRAN-adapted layer."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LORAN_LAYERS)]


def _dense_weight(layer: nn.Module) -> torch.Tensor:
    """The base weight as a (d_out, d_in) tensor in float32 (float64 if it is), dequantising bitsandbytes layers."""
    weight = layer.weight
    if is_4bit(layer):
        fix_4bit_quant_state(layer)
        return dequantized_4bit(weight).float()  # unpacked first if repacked for bnb's CPU kernel
    if is_8bit(layer):
        return dequantized_8bit(layer).float()
    return widened(weight.detach())


@torch.no_grad()
def merge_to_full_precision(peft_model: PeftModel, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Merge the active adapters into a full-precision copy of each adapted layer and unload PEFT.

    On a 4-bit base, PEFT's ``merge_and_unload`` requantises W0 + s f(BA) to NF4, which moves the outputs (measured:
    results/adapter_measurements.md). Here each adapted layer becomes an ``nn.Linear`` holding the dequantised W0
    plus the update, in `dtype`, so the merged model computes what the unmerged one did.
    Layers that were not adapted keep their (possibly quantised) type.
    """
    for name, layer in loran_layers(peft_model):
        base = layer.get_base_layer()
        if layer.merged:
            raise ValueError(f"{name} is already merged; merge_to_full_precision needs the unmerged model")
        weight = _dense_weight(base)
        if layer.fan_in_fan_out:
            weight = weight.T
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                delta = LoranVariant.delta(layer, adapter)
                weight = weight + (delta.T if layer.fan_in_fan_out else delta)
        dense = nn.Linear(weight.shape[1], weight.shape[0], bias=base.bias is not None, device=weight.device,
                          dtype=dtype)
        dense.weight.copy_(weight.to(dtype))
        if base.bias is not None:
            dense.bias.copy_(base.bias.to(dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(peft_model.get_submodule(parent_name) if parent_name else peft_model, child, dense)
    return peft_model.get_base_model()
