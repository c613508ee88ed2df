"""The on-disk format of a CometForCausalLM (save_pretrained / from_pretrained).

A folder holds config.json (the base model's config, its dtype, a "comet" entry with the
CometConfig and, while LoRA adapters are applied, a "comet_lora" entry with their
settings), generation_config.json (the model's decoding defaults) and
model.safetensors, each written atomically.

Weights are stored under the base model's own names (``model.layers.0...``,
``lm_head.weight``) and the memory's under ``comet.`` (``comet.memory_layers.0...``,
``comet.readout_embedding``): a plain ``AutoModelForCausalLM.from_pretrained(folder)``
then loads the fine-tuned base model (HF reports the ``comet.*`` weights it does not use)
instead of a randomly initialised one. Folders written before this layout (every key
under ``base.``) load too.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .atomic import atomic_write, write_json
from .config import CometConfig

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
# top-level modules of CometForCausalLM besides `base`: stored under "comet."
MEMORY_MODULES = ("memory_layers.", "compression_embedding", "readout_embedding")


def saved_key(key: str) -> str:
    """A CometForCausalLM state-dict key -> its name in model.safetensors."""
    return key[len("base."):] if key.startswith("base.") else "comet." + key


def model_key(key: str) -> str:
    """A key of model.safetensors (this layout or the older all-"base." one), or of the
    model's own state dict -> the model's state-dict key."""
    if key.startswith("comet."):
        return key[len("comet."):]
    if key.startswith("base.") or key.startswith(MEMORY_MODULES):
        return key
    return "base." + key


def remap_saved_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: a state dict read from model.safetensors (e.g. by
    transformers.Trainer when it resumes from a checkpoint) loads into the model."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new = prefix + model_key(key[len(prefix):])
        if new != key:
            state_dict[new] = state_dict.pop(key)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_dtype(dtype, saved: Optional[str]) -> torch.dtype:
    """from_pretrained's dtype: a torch.dtype, its name ("bfloat16"), or None / "auto" for
    the dtype the model was saved in (float32 when the folder does not say)."""
    if dtype is None or dtype == "auto":
        dtype = saved or "float32"
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"from_pretrained: dtype must be a floating torch.dtype, its name or 'auto', got {dtype!r}")
    return dtype


def lora_settings(model) -> Optional[dict]:
    """The LoRA settings to save with the model (None without adapters); adapters that
    apply_lora did not inject have none, and cannot be saved unmerged."""
    settings = getattr(model, "comet_lora", None)
    has_adapters = any("lora_" in name for name, _ in model.named_parameters())
    if has_adapters and settings is None:
        raise ValueError("save_pretrained: the model holds LoRA adapters that comet_ext.apply_lora did not inject; "
                         "fold them into the weights first (comet_ext.merge_lora(model)) or inject them with "
                         "apply_lora, whose settings are saved and re-applied on load")
    return settings if has_adapters else None


def save(model, folder: str, state_dict: Optional[dict[str, Tensor]], tied: list[tuple[str, str]]) -> None:
    """Writes config.json, generation_config.json and model.safetensors into folder."""
    os.makedirs(folder, exist_ok=True)
    config = model.config.to_dict()
    config["dtype"] = _dtype_name(model.base.dtype)
    config["comet"] = model.comet_config.to_dict()
    config["architectures"] = ["CometForCausalLM"]
    lora = lora_settings(model)
    if lora is not None:
        config["comet_lora"] = lora
    atomic_write(os.path.join(folder, CONFIG_NAME), lambda p: write_json(p, config))
    if getattr(model, "generation_config", None) is not None:
        generation = model.generation_config.to_diff_dict()
        atomic_write(os.path.join(folder, GENERATION_CONFIG_NAME), lambda p: write_json(p, generation))
    state_dict = model.state_dict() if state_dict is None else state_dict
    state = {saved_key(k): v.detach().contiguous().cpu() for k, v in state_dict.items()}
    for _, dropped in tied:  # safetensors refuses shared storage: keep one copy
        state.pop(saved_key(dropped), None)
    atomic_write(os.path.join(folder, WEIGHTS_NAME),
                 lambda p: save_file(state, p, metadata={"format": "pt", "comet_ext": "2"}))


def load(cls, folder: str, dtype, device):
    """Builds cls (CometForCausalLM) from a folder save() wrote."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from .families import family_of

    with open(os.path.join(folder, CONFIG_NAME)) as f:
        raw = json.load(f)
    comet_config = CometConfig.from_dict(raw["comet"])
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    family_of(config)
    dtype = resolve_dtype(dtype, raw.get("dtype") or raw.get("torch_dtype"))
    model = cls(AutoModelForCausalLM.from_config(config, dtype=dtype), comet_config)
    if os.path.isfile(os.path.join(folder, GENERATION_CONFIG_NAME)):
        model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    if raw.get("comet_lora") is not None:  # saved with adapters: the same adapters, then their weights
        from .lora import apply_lora

        apply_lora(model, **raw["comet_lora"])
    path = os.path.join(folder, WEIGHTS_NAME)
    try:
        state = {model_key(k): v for k, v in load_file(path).items()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"from_pretrained: cannot read the weights {path!r} ({e}); the file is missing, "
                         "truncated or not safetensors") from e
    for kept, dropped in tied_keys(model):
        if dropped not in state and kept in state:
            state[dropped] = state[kept]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"from_pretrained: weights do not match the model: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    model.to(dtype)
    return model.to(device) if device is not None else model


def tied_keys(model: nn.Module) -> list[tuple[str, str]]:
    """(kept, dropped) state-dict keys of parameters that share storage (tied embeddings)."""
    seen, pairs = {}, []
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.data_ptr(), t.shape)
        if key in seen:
            pairs.append((seen[key], name))
        else:
            seen[key] = name
    return pairs
