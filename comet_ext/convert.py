"""Import of reference-implementation checkpoints (MemQwen3ForCausalLM, DESIGN.md §5).

A reference checkpoint is a decoder whose vocabulary was resized to hold the
beacon tokens, with per-layer keys

    model.layers.{i}.inner_layer.*                        the HF decoder layer
    model.layers.{i}.global_memory_net.{norm, g_proj, o_proj.down_proj, o_proj.up_proj}
    model.layers.{i}.temp_memory_net.{0, 1.down_proj, 1.up_proj}

and config fields chunk_size, placeholder_id, temp_beacon_id,
temp_beacon_stride, temp_mem_budget, global_beacon_ids. The compression
embedding is the temp beacon's row of embed_tokens, the readout embeddings the
global beacons' rows; the vocabulary (and lm_head) keep their resized size, so
logits match the reference model's column for column.

    python -m comet_ext.convert REFERENCE_FOLDER OUTPUT_FOLDER
"""
from __future__ import annotations

import argparse
import json
import os
import re

import torch
from safetensors.torch import load_file

REFERENCE_FIELDS = ("chunk_size", "placeholder_id", "temp_beacon_id", "temp_beacon_stride", "temp_mem_budget",
                    "global_beacon_ids")


def is_reference_config(config: dict) -> bool:
    return "global_beacon_ids" in config


def load_reference_state(folder: str) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"reference checkpoint {folder!r} lacks {name}")
        state.update(load_file(path))
    return state


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(inner_layer|global_memory_net|temp_memory_net)\.(.+)$")
_TEMP = {"0.weight": "norm.weight", "1.down_proj.weight": "rla.down_proj.weight",
         "1.up_proj.weight": "rla.up_proj.weight"}


def convert_state(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Reference state dict -> CometForCausalLM state dict."""
    out = {}
    for key, value in state.items():
        m = _LAYER.match(key)
        if m is None:
            if key.startswith("model.") or key.startswith("lm_head."):
                out["base." + key] = value
                continue
            raise ValueError(f"convert: unexpected key {key!r} in the reference checkpoint")
        i, part, rest = m.groups()
        if part == "inner_layer":
            out[f"base.model.layers.{i}.{rest}"] = value
        elif part == "global_memory_net":
            out[f"memory_layers.{i}.global_memory_net.{rest}"] = value
        else:
            if rest not in _TEMP:
                raise ValueError(f"convert: unexpected temp_memory_net key {key!r}")
            out[f"memory_layers.{i}.temp_memory_net.{_TEMP[rest]}"] = value
    embed = out["base.model.embed_tokens.weight"]
    out["compression_embedding"] = embed[config["temp_beacon_id"]].unsqueeze(0).clone()
    out["readout_embedding"] = embed[list(config["global_beacon_ids"])].clone()
    return out


def comet_config_of(config: dict, state: dict[str, torch.Tensor]):
    from .config import CometConfig

    down = state["model.layers.0.global_memory_net.o_proj.down_proj.weight"]
    return CometConfig(chunk_size=int(config["chunk_size"]), num_global=len(config["global_beacon_ids"]),
                       temp_stride=int(config["temp_beacon_stride"]), temp_budget=int(config["temp_mem_budget"]),
                       rla_rank=int(down.shape[0]))


def base_config_of(config: dict):
    """The plain decoder config under a reference config (its model_type may be a Mem* one)."""
    from transformers import AutoConfig

    plain = {k: v for k, v in config.items() if k not in REFERENCE_FIELDS and k not in ("auto_map", "architectures")}
    model_type = plain.pop("model_type", "qwen3")
    model_type = re.sub(r"^mem", "", model_type.lower()) or "qwen3"
    return AutoConfig.for_model(model_type, **plain)


def load_reference(folder: str, dtype=None):
    """Builds a CometForCausalLM from a reference checkpoint folder."""
    from transformers import AutoModelForCausalLM

    from .modeling import CometForCausalLM

    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    if not is_reference_config(config):
        raise ValueError(f"{folder!r} is not a reference-implementation checkpoint (no global_beacon_ids)")
    state = load_reference_state(folder)
    base_config = base_config_of(config)
    base = AutoModelForCausalLM.from_config(base_config, dtype=dtype or torch.float32)
    model = CometForCausalLM(base, comet_config_of(config, state))
    converted = convert_state(state, config)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    missing = [k for k in missing if not (k == "base.lm_head.weight" and getattr(base_config, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise ValueError(f"convert: the reference weights do not fit: missing {missing[:8]}, unexpected {unexpected[:8]}")
    if getattr(base_config, "tie_word_embeddings", False):
        base.tie_weights()
    return model.to(dtype) if dtype is not None else model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Convert a reference-implementation CoMeT checkpoint to comet_ext's format")
    ap.add_argument("reference", help="folder of the reference checkpoint (config.json + safetensors)")
    ap.add_argument("output", help="folder to write the converted model to")
    args = ap.parse_args(argv)
    model = load_reference(args.reference)
    model.save_pretrained(args.output)
    print(f"converted {args.reference} -> {args.output} ({model.comet_config})")


if __name__ == "__main__":
    main()
