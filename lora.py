"""LoRA through PEFT (an optional install, `pip install peft`): train low-rank adapters on the
language model's linear layers instead of every weight.

    add_adapters(model, rank, alpha, targets)   adapters put in place, every other weight frozen
    adapters_off(model)                         the base model meanwhile: the frozen reference
                                                of beta * KL_ref comes for free, no second copy
    save_adapters / load_adapters               a PEFT adapter folder (PeftModel.from_pretrained
                                                loads it on the base model)
    merged_state_dict                           the plain weights W + scale B A, for a checkpoint
                                                folder that plain transformers loads

Why it fits PAPO: with the adapters switched off the policy IS its starting point, so the
reference model costs nothing; and a 3B policy's trainable state shrinks from 16 bytes a
parameter to the adapters' (docs/performance.md). The adapters are injected into the model
itself (peft.inject_adapter_in_model), not wrapped around it, so every path of model.py -
generation, the chunked log-probs, each prompt read once, gradient checkpointing, DDP - runs on
the same module tree as without LoRA. The vision tower never gets adapters.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

ADAPTER_FOLDER = "adapter"          # inside a checkpoint folder
PEFT_PREFIX = "base_model.model."   # how PEFT's own adapter files name the model's modules


def _bare(model):
    return getattr(model, "module", model)          # the model inside a DDP wrapper


def add_adapters(model, rank: int, alpha: float, targets: list[str]):
    """Put LoRA adapters (rank r, scale alpha / r, B initialised to 0, so the model is unchanged
    until it trains) on the language model's linear layers named in `targets`, and freeze
    every other weight. Returns the model (changed in place)."""
    from peft import LoraConfig, inject_adapter_in_model
    names = "|".join(targets)
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0, bias="none",
                        # a regular expression over full module names: the language model's
                        # decoder layers only, never the vision tower
                        target_modules=rf".*language_model\.layers\.\d+\..*\.({names})")
    inject_adapter_in_model(config, model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    model.papo_lora_config = config
    return model


def has_adapters(model) -> bool:
    return hasattr(_bare(model), "papo_lora_config")


def _adapter_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer
    return [m for m in _bare(model).modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_off(model):
    """The model without its adapters meanwhile: exactly the starting policy."""
    layers = _adapter_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


@contextlib.contextmanager
def reference(policy, ref_model):
    """The frozen reference policy of the KL_ref term: the separate copy when there is one,
    else (LoRA) the policy itself with its adapters switched off."""
    if ref_model is not None:
        yield ref_model
    else:
        with adapters_off(policy) as base:
            yield base


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapters' weights, named as PEFT's own adapter files name them."""
    return {PEFT_PREFIX + k.replace(".default", ""): v.detach().cpu()
            for k, v in _bare(model).state_dict().items() if "lora_" in k}


def save_adapters(model, folder: Path) -> None:
    """folder/adapter_model.safetensors + adapter_config.json: a PEFT adapter folder."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    config = _bare(model).papo_lora_config
    config.base_model_name_or_path = getattr(_bare(model).config, "_name_or_path", None)
    config.save_pretrained(str(folder))
    save_file({k: v.contiguous() for k, v in adapter_state(model).items()},
              str(folder / "adapter_model.safetensors"))


def load_adapters(model, folder: Path) -> None:
    """The adapter weights of a folder written by save_adapters, into a model that has
    adapters of the same shape (add_adapters with the run's settings)."""
    from safetensors.torch import load_file
    saved = load_file(str(folder / "adapter_model.safetensors"))
    bare = _bare(model)
    mine = {PEFT_PREFIX + k.replace(".default", ""): k for k in bare.state_dict() if "lora_" in k}
    if set(saved) != set(mine):
        raise ValueError(f"{folder}: its adapters do not match this model's (rank, targets?): "
                         f"{len(set(saved) ^ set(mine))} names differ")
    bare.load_state_dict({mine[k]: v for k, v in saved.items()}, strict=False)


@torch.no_grad()
def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The plain model's weights with the adapters merged in (W + scale B A, PEFT's
    get_delta_weight), under the names a model without PEFT has - on the CPU."""
    bare = _bare(model)
    deltas = {name: layer.get_delta_weight("default") for name, layer in bare.named_modules()
              if hasattr(layer, "get_delta_weight") and "default" in getattr(layer, "lora_A", {})}
    merged = {}
    for key, value in bare.state_dict().items():
        if "lora_" in key:
            continue
        owner = key.removesuffix(".base_layer.weight")
        if owner != key:
            value = value + deltas[owner].to(value.dtype)
        merged[key.replace(".base_layer.", ".")] = value.detach().cpu()
    return merged


def describe(model) -> str:
    """How many weights train: one line for the log."""
    total = sum(p.numel() for p in _bare(model).parameters())
    trained = sum(p.numel() for p in _bare(model).parameters() if p.requires_grad)
    return f"LoRA: {trained:,} of {total:,} weights train ({100 * trained / total:.2f}%)"
