"""Import of reference-implementation checkpoints (MemQwen3ForCausalLM; usage: README.md).

A reference checkpoint is a decoder whose vocabulary was resized to hold the
beacon tokens, with per-layer keys

    model.layers.{i}.inner_layer.*                        the HF decoder layer
    model.layers.{i}.global_memory_net.{norm, g_proj, o_proj.down_proj, o_proj.up_proj}
    model.layers.{i}.temp_memory_net.{0, 1.down_proj, 1.up_proj}

and config fields chunk_size, placeholder_id, temp_beacon_id,
temp_beacon_stride, temp_mem_budget, global_beacon_ids. The compression
embedding is the temp beacon's row of embed_tokens, the readout embeddings the
global beacons' rows; the vocabulary (and lm_head) keep their resized size, so
logits match the reference model's column for column. A stride <= 0 (the reference then has
no temp_memory_net) gives temp_stride=-1. The weights are read from model.safetensors, else
from the shards of its index (transformers' order; pickled .bin files are not read), in the
dtype config.json names unless asked otherwise; generation_config.json is kept.

    python -m comet_ext.convert REFERENCE_FOLDER OUTPUT_FOLDER

OUTPUT_FOLDER must be new or empty, and outside REFERENCE_FOLDER: the converted model is
written to a temporary folder beside it and renamed into place, so nothing is overwritten
and no older weight files end up next to the new ones.
"""
from __future__ import annotations

import argparse
import json
import os
import re

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .atomic import atomic_folder
from .checkpoint import INDEX_NAME, WEIGHTS_NAME, read_shard_index

REFERENCE_FIELDS = ("chunk_size", "placeholder_id", "temp_beacon_id", "temp_beacon_stride", "temp_mem_budget",
                    "global_beacon_ids")
# the reference's integer fields (placeholder_id is not used by the conversion)
INT_FIELDS = ("chunk_size", "temp_beacon_id", "temp_beacon_stride", "temp_mem_budget")


def is_reference_config(config: dict) -> bool:
    return "global_beacon_ids" in config


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_reference_config(config: dict, path: str) -> None:
    """Refuses a reference config (read from path) whose CoMeT fields are missing or not ints."""
    for name in INT_FIELDS + ("global_beacon_ids",):
        if name not in config:
            raise ValueError(f"convert: {path!r} lacks the reference field {name!r}")
    for name in INT_FIELDS:
        if not _is_int(config[name]):
            raise ValueError(f"convert: {name} in {path!r} must be an int, got {config[name]!r}")
    ids = config["global_beacon_ids"]
    if not isinstance(ids, list) or not ids or not all(_is_int(i) for i in ids):
        raise ValueError(f"convert: global_beacon_ids in {path!r} must be a non-empty list of ints, got {ids!r}")


def check_beacon_ids(config: dict, vocab: int, path: str) -> None:
    """Refuses beacon ids that are not rows of the resized embedding (vocab rows)."""
    for name, ids in (("temp_beacon_id", [config["temp_beacon_id"]]), ("global_beacon_ids", config["global_beacon_ids"])):
        for i in ids:
            if not 0 <= i < vocab:
                raise ValueError(f"convert: {name} in {path!r} holds the id {i}, outside the vocabulary [0, {vocab}) "
                                 "of model.embed_tokens.weight")


def weights_file(folder: str) -> str:
    """The file that says where a reference checkpoint's weights are: model.safetensors, else the
    index of its shards (the order in which transformers, and so the reference, looks)."""
    single = os.path.join(folder, WEIGHTS_NAME)
    return single if os.path.isfile(single) or not os.path.isfile(os.path.join(folder, INDEX_NAME)) \
        else os.path.join(folder, INDEX_NAME)


def read_json(path: str, what: str):
    """A JSON file's content; an error naming `what` and the file where it is missing or not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path!r} is not valid JSON ({e})") from None


def load_reference_state(folder: str) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint."""
    where = weights_file(folder)
    if where.endswith(INDEX_NAME):
        _, weight_map, files = read_shard_index(where, "convert")
    else:
        weight_map, files = {}, [WEIGHTS_NAME]
    state = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            bin_only = name == WEIGHTS_NAME and any(os.path.isfile(os.path.join(folder, n))
                                              for n in ("pytorch_model.bin", "pytorch_model.bin.index.json"))
            raise FileNotFoundError(f"reference checkpoint {folder!r} lacks {name}" + (
                " (its pytorch_model.bin is not read: pickled weights can run code; load the reference model "
                "and save_pretrained it with safe_serialization=True first)" if bin_only else ""))
        try:
            shard = load_file(path)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"convert: cannot read {path!r} ({e}); the file is truncated or not safetensors") from e
        lacking = sorted(k for k, v in weight_map.items() if v == name and k not in shard)
        if lacking:
            raise ValueError(f"convert: the reference checkpoint lacks the weights {lacking[:8]} (expected in {path!r})")
        state.update(shard)
    return state


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(inner_layer|global_memory_net|temp_memory_net)\.(.+)$")
# the reference's memory parameters (under model.layers.{i}.<part>.) -> ours (memory_layers.{i}.<part>.)
_MEMORY = {
    "global_memory_net": {"norm.weight": "norm.weight", "g_proj.weight": "gate.weight",
                          "o_proj.down_proj.weight": "rla.down", "o_proj.up_proj.weight": "rla.up"},
    "temp_memory_net": {"0.weight": "norm.weight", "1.down_proj.weight": "rla.down", "1.up_proj.weight": "rla.up"},
}
_REFERENCE = {f"{part}.{ours}": f"{part}.{ref}" for part, names in _MEMORY.items() for ref, ours in names.items()}
_OURS = re.compile(r"^(base\.model\.layers|memory_layers)\.(\d+)\.(.+)$")


def reference_key(key: str) -> str:
    """A CometForCausalLM state-dict key -> its name in a reference checkpoint (convert_state's inverse)."""
    m = _OURS.match(key)
    if m is None:
        return key[len("base."):] if key.startswith("base.") else key
    modules, i, rest = m.groups()
    if modules == "base.model.layers":
        return f"model.layers.{i}.inner_layer.{rest}"
    return f"model.layers.{i}.{_REFERENCE.get(rest, rest)}"


def _weight(state: dict[str, torch.Tensor], key: str, where: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"convert: the reference checkpoint lacks the weight {key!r} (expected in {where!r})")
    return state[key]


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
        else:
            if rest not in _MEMORY[part]:
                raise ValueError(f"convert: unexpected {part} key {key!r}")
            out[f"memory_layers.{i}.{part}.{_MEMORY[part][rest]}"] = value
    embed = out["base.model.embed_tokens.weight"]
    out["memory_embeddings.compression"] = embed[config["temp_beacon_id"]].unsqueeze(0).clone()
    out["memory_embeddings.readout"] = embed[list(config["global_beacon_ids"])].clone()
    return out


def has_fifo(config: dict) -> bool:
    """The reference builds no temp_memory_net (and feeds no compression token) for a stride <= 0."""
    return config["temp_beacon_stride"] > 0


def comet_config_of(config: dict, state: dict[str, torch.Tensor]):
    from .config import CometConfig

    down = state["model.layers.0.global_memory_net.o_proj.down_proj.weight"]
    return CometConfig(chunk_size=config["chunk_size"], num_global=len(config["global_beacon_ids"]),
                       temp_stride=config["temp_beacon_stride"] if has_fifo(config) else -1,
                       temp_budget=config["temp_mem_budget"],
                       rla_rank=int(down.shape[0]))


def base_config_of(config: dict):
    """The plain decoder config under a reference config (its model_type may be a Mem* one)."""
    from transformers import AutoConfig

    plain = {k: v for k, v in config.items() if k not in REFERENCE_FIELDS and k not in ("auto_map", "architectures")}
    model_type = plain.pop("model_type", "qwen3")
    model_type = re.sub(r"^mem", "", model_type.lower()) or "qwen3"
    return AutoConfig.for_model(model_type, **plain)


def load_reference(folder: str, dtype=None):
    """Builds a CometForCausalLM from a reference checkpoint folder, in `dtype` (None: the dtype
    its config.json names, as from_pretrained's "auto"), with its generation_config.json."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from .checkpoint import cast_parameters, resolve_dtype
    from .modeling import CometForCausalLM

    config_path = os.path.join(folder, "config.json")
    config = read_json(config_path, "the reference config")
    if not isinstance(config, dict) or not is_reference_config(config):
        raise ValueError(f"{folder!r} is not a reference-implementation checkpoint (no global_beacon_ids)")
    check_reference_config(config, config_path)
    dtype = resolve_dtype(dtype, config.get("dtype") or config.get("torch_dtype"))
    state = load_reference_state(folder)
    where = weights_file(folder)
    check_beacon_ids(config, _weight(state, "model.embed_tokens.weight", where).shape[0], config_path)
    _weight(state, "model.layers.0.global_memory_net.o_proj.down_proj.weight", where)
    base_config = base_config_of(config)
    base = AutoModelForCausalLM.from_config(base_config, dtype=dtype)
    try:
        comet_config = comet_config_of(config, state)
    except ValueError as e:
        raise ValueError(f"convert: {config_path!r} does not give a valid CoMeT memory: {e}") from None
    model = CometForCausalLM(base, comet_config)
    converted = convert_state(state, config)
    try:
        missing, unexpected = model.load_state_dict(converted, strict=False)
    except RuntimeError as e:  # shapes that disagree with config.json (sizes, ranks)
        raise ValueError(f"convert: the weights in {where!r} do not fit the model {config_path!r} describes: "
                         f"{e}") from None
    tied = getattr(base_config, "tie_word_embeddings", False)
    missing = [reference_key(k) for k in missing
               if not (k == "base.lm_head.weight" and tied)
               and not (".temp_memory_net." in k and not has_fifo(config))]  # (kept as initialised, unused)
    if missing:
        raise ValueError(f"convert: the reference checkpoint lacks the weights {missing[:8]} (expected in {where!r})")
    if unexpected:
        raise ValueError(f"convert: the reference checkpoint {where!r} holds weights the model does not have: "
                         f"{[reference_key(k) for k in unexpected[:8]]}")
    if tied:
        base.tie_weights()
    generation = os.path.join(folder, "generation_config.json")
    if os.path.isfile(generation):  # its EOS ids, sampling defaults
        try:
            model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"convert: {generation!r} cannot be read as a generation config ({e})") from None
    cast_parameters(model, dtype)
    return model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Convert a reference-implementation CoMeT checkpoint to comet_ext's format")
    ap.add_argument("reference", help="folder of the reference checkpoint (config.json + safetensors)")
    ap.add_argument("output", help="new or empty folder to write the converted model to")
    args = ap.parse_args(argv)
    reference, output = os.path.realpath(args.reference), os.path.realpath(args.output)
    if os.path.commonpath([reference, output]) == reference:
        ap.error(f"output {args.output!r} is the reference folder or inside it; give a new folder outside it")
    if os.path.lexists(output) and not (os.path.isdir(output) and not os.listdir(output)):
        ap.error(f"output {args.output!r} is not empty (or not a folder); give a new or empty folder, so that no "
                 "file of yours is overwritten and no older weights end up beside the converted ones")
    if not os.path.isfile(os.path.join(reference, "config.json")):
        ap.error(f"reference {args.reference!r} is not a folder holding config.json")
    try:
        model = load_reference(args.reference)
    except (ValueError, FileNotFoundError) as e:
        ap.error(str(e))
    atomic_folder(output, model.save_pretrained)  # written beside it, then renamed into place
    print(f"converted {args.reference} -> {args.output} ({model.comet_config})")


if __name__ == "__main__":
    main()
