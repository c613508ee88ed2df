"""The on-disk format of a CometForCausalLM (save_pretrained / from_pretrained).

A folder holds config.json (the base model's config, its dtype, a "comet" entry with the
CometConfig and, while LoRA adapters are applied, a "comet_lora" entry with their
settings), generation_config.json (the model's decoding defaults) and the weights, written
atomically together: model.safetensors, or, above max_shard_size (HF's default, 50GB), HF's
sharded layout (model-00001-of-0000N.safetensors ... and model.safetensors.index.json, split
as transformers splits them), which HF's loaders and the Hub take as they take HF's own.

Weights are stored under the base model's own names (``model.layers.0...``,
``lm_head.weight``) and the memory's under ``comet.`` (``comet.memory_layers.0...``,
``comet.memory_embeddings.readout``): a plain ``AutoModelForCausalLM.from_pretrained(folder)``
then loads the fine-tuned base model (HF reports the ``comet.*`` weights it does not use)
instead of a randomly initialised one. LoRA adapters go under ``comet.`` too, and the
weights they adapt under the plain names: a plain load gets the base without them. Folders
written before this layout (every key under ``base.``) load too.

The files are written to temporary files first, all of them, then renamed into place
(atomic.atomic_write_all), config.json last; the weights files of an earlier save that the new
one does not overwrite (the other layout, more shards) are removed after. A save that fails
while writing (a full disk) leaves the folder's previous model whole. The weights files, the
index and config.json carry one save id, so a crash between the renames is refused on load
instead of pairing new settings with old weights.
"""
from __future__ import annotations

import json
import numbers
import os
import re
import uuid
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from torch import Tensor, nn

from .atomic import atomic_write, atomic_write_all, write_json
from .config import CometConfig

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
# HF's sharded layout: shards named by this pattern's {suffix} (-00001-of-00003), and their index
SHARD_PATTERN = "model{suffix}.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_WEIGHTS_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")
# top-level modules of CometForCausalLM besides `base`: stored under "comet."
MEMORY_MODULES = ("memory_layers.", "memory_embeddings.")


# what peft's LoRA layers call the layer they wrap, and their own parameters
ADAPTED = ".base_layer."
ADAPTER = ".lora_"
# the memory's parameters as saved before they were renamed out of LoRA's usual targets and
# into modules PEFT's modules_to_save can take (files of format 2 and earlier;
# comet_ext.memory_modules.LowRankAdapter and MemoryEmbeddings say why)
LEGACY_EMBEDDINGS = {"compression_embedding": "memory_embeddings.compression",
                     "readout_embedding": "memory_embeddings.readout"}
LEGACY_MEMORY_NAMES = {
    "global_memory_net.g_proj.weight": "global_memory_net.gate.weight",
    "global_memory_net.o_proj.down_proj.weight": "global_memory_net.rla.down",
    "global_memory_net.o_proj.up_proj.weight": "global_memory_net.rla.up",
    "temp_memory_net.rla.down_proj.weight": "temp_memory_net.rla.down",
    "temp_memory_net.rla.up_proj.weight": "temp_memory_net.rla.up",
}
# config.json entries this module writes; a loaded config carries them, a save rewrites them
OWN_ENTRIES = ("comet", "comet_lora", "comet_save_id")


def saved_key(key: str) -> str:
    """A CometForCausalLM state-dict key -> its name in model.safetensors."""
    if not key.startswith("base.") or ADAPTER in key:
        return "comet." + key  # the memory, LoRA adapters
    return key[len("base."):].replace(ADAPTED, ".")  # a LoRA-wrapped layer: the plain layer's name


def model_key(key: str, model_keys=None) -> str:
    """A key of model.safetensors (this layout or an older one), or of the model's own state
    dict -> the model's state-dict key. model_keys (the model's own): a plain layer name whose
    layer carries LoRA adapters maps to the wrapped layer."""
    if key.startswith("comet."):
        key = key[len("comet."):]
    key = LEGACY_EMBEDDINGS.get(key, key)
    if key.startswith("memory_layers."):
        layer, _, rest = key[len("memory_layers."):].partition(".")
        return f"memory_layers.{layer}.{LEGACY_MEMORY_NAMES.get(rest, rest)}"
    if key.startswith(("base.",) + MEMORY_MODULES):
        return key
    key = "base." + key
    if model_keys is not None and key not in model_keys:
        head, _, last = key.rpartition(".")
        if f"{head}{ADAPTED}{last}" in model_keys:
            return f"{head}{ADAPTED}{last}"
    return key


def remap_saved_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: a state dict read from model.safetensors (e.g. by
    transformers.Trainer when it resumes from a checkpoint) loads into the model."""
    own = set(module.state_dict(keep_vars=True))
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new = prefix + model_key(key[len(prefix):], own)
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


def save_id(folder: str) -> Optional[str]:
    """The id a save wrote into folder's config.json and weights file (None: saved before ids,
    or no readable config): what ties a training checkpoint's trainer.pt to its model/."""
    try:
        with open(os.path.join(folder, CONFIG_NAME)) as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return None
    return raw.get("comet_save_id") if isinstance(raw, dict) else None


def check_shard_size(max_shard_size) -> None:
    """max_shard_size as HF's save_pretrained takes it: a number of bytes (an int > 0) or a size
    with a unit of KB, MB, GB or TB (powers of 1000), such as "5GB"."""
    if isinstance(max_shard_size, str):
        try:  # parsed as the save parses it
            split_torch_state_dict_into_shards({}, max_shard_size=max_shard_size)
            positive = float(max_shard_size.strip()[:-2]) > 0
        except (ValueError, OverflowError) as e:
            raise ValueError(f"save_pretrained: max_shard_size {max_shard_size!r} is not a size ({e})") from None
    else:
        positive = isinstance(max_shard_size, numbers.Integral) and not isinstance(max_shard_size, bool) \
            and max_shard_size > 0
    if not positive:
        raise ValueError(f"save_pretrained: max_shard_size must be a positive number of bytes or a size such as "
                         f"'5GB', got {max_shard_size!r}")


def save(model, folder: str, state_dict: Optional[dict[str, Tensor]], tied: list[tuple[str, str]],
         max_shard_size: int | str = "50GB") -> None:
    """Writes the weights (one file, or HF's shards and index above max_shard_size),
    generation_config.json and config.json into folder; then removes weights files of an
    earlier save that these did not replace."""
    check_shard_size(max_shard_size)
    os.makedirs(folder, exist_ok=True)
    save_id = uuid.uuid4().hex
    config = {k: v for k, v in model.config.to_dict().items() if k not in OWN_ENTRIES}
    config["dtype"] = _dtype_name(model.base.dtype)
    config["comet"] = model.comet_config.to_dict()
    config["architectures"] = ["CometForCausalLM"]
    config["comet_save_id"] = save_id
    lora = lora_settings(model)
    if lora is not None:
        config["comet_lora"] = lora
    state_dict = model.state_dict() if state_dict is None else state_dict
    state = {saved_key(k): v.detach().contiguous().cpu() for k, v in state_dict.items()}
    for _, dropped in tied:  # safetensors refuses shared storage: keep one copy
        state.pop(saved_key(dropped), None)
    split = split_torch_state_dict_into_shards(state, filename_pattern=SHARD_PATTERN, max_shard_size=max_shard_size)
    metadata = {"format": "pt", "comet_ext": "3", "save_id": save_id}
    writes = [(os.path.join(folder, name), lambda p, shard={k: state[k] for k in keys}: save_file(shard, p, metadata))
              for name, keys in split.filename_to_tensors.items()]
    if split.is_sharded:
        index = {"metadata": {**split.metadata, "comet_save_id": save_id},
                 "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        writes.append((os.path.join(folder, INDEX_NAME), lambda p: write_json(p, index)))
    if getattr(model, "generation_config", None) is not None:
        generation = model.generation_config.to_diff_dict()
        writes.append((os.path.join(folder, GENERATION_CONFIG_NAME), lambda p: write_json(p, generation)))
    writes.append((os.path.join(folder, CONFIG_NAME), lambda p: write_json(p, config)))
    atomic_write_all(writes)
    written = {os.path.basename(path) for path, _ in writes}
    for name in os.listdir(folder):  # an earlier save's: the other layout, or more shards
        if _WEIGHTS_FILE.fullmatch(name) and name not in written:
            os.remove(os.path.join(folder, name))


def read_shard_index(path: str, who: str) -> tuple[dict, dict[str, str], list[str]]:
    """(metadata, weight_map, shard file names) of HF's safetensors index at path, checked: a
    weight_map from weight names to shard files of the index's own folder (a name like
    ../x.safetensors would read weights from elsewhere). Errors start with `who`."""
    try:
        with open(path) as f:
            index = json.load(f)
    except OSError as e:
        raise ValueError(f"{who}: cannot read the weights index {path!r} ({e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{who}: the weights index {path!r} is not valid JSON ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise ValueError(f"{who}: {path!r} must hold a 'weight_map' from weight names to shard files")
    files = sorted(set(weight_map.values()))
    outside = [name for name in files if os.path.basename(name) != name or name in ("", ".", "..")]
    if outside:
        raise ValueError(f"{who}: {path!r} names shard files outside its folder: {outside[:4]}")
    metadata = index.get("metadata")
    return metadata if isinstance(metadata, dict) else {}, weight_map, files


def _weights_files(folder: str, save_id: Optional[str]) -> list[str]:
    """The weights files of the save config.json names (save_id; None: saved before ids): the
    shards its index lists, or model.safetensors. Where both layouts are there (a crash before
    the earlier save's files were removed), the one whose save id is config.json's."""
    single, index = os.path.join(folder, WEIGHTS_NAME), os.path.join(folder, INDEX_NAME)
    if not os.path.isfile(index):
        return [single]
    metadata, _, shards = read_shard_index(index, "from_pretrained")
    if os.path.isfile(single) and save_id is not None and metadata.get("comet_save_id") != save_id:
        return [single]
    return [os.path.join(folder, name) for name in shards]


def load(cls, folder: str, dtype, device):
    """Builds cls (CometForCausalLM) from a folder save() wrote."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from .families import family_of

    with open(os.path.join(folder, CONFIG_NAME)) as f:
        raw = json.load(f)
    comet_config = CometConfig.from_dict(raw["comet"])
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    for entry in OWN_ENTRIES:  # read here; the model's config keeps the base model's fields only
        if hasattr(config, entry):
            delattr(config, entry)
    family_of(config)
    dtype = resolve_dtype(dtype, raw.get("dtype") or raw.get("torch_dtype"))
    model = cls(AutoModelForCausalLM.from_config(config, dtype=dtype), comet_config)
    if os.path.isfile(os.path.join(folder, GENERATION_CONFIG_NAME)):
        model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    if raw.get("comet_lora") is not None:  # saved with adapters: the same adapters, then their weights
        from .lora import apply_lora

        apply_lora(model, **raw["comet_lora"])
    own = set(model.state_dict(keep_vars=True))
    state = {}
    paths = _weights_files(folder, raw.get("comet_save_id"))
    for path in paths:
        try:
            with safe_open(path, framework="pt") as f:
                save_id = (f.metadata() or {}).get("save_id")
                state.update({model_key(k, own): f.get_tensor(k) for k in f.keys()})
        except (SafetensorError, OSError) as e:
            raise ValueError(f"from_pretrained: cannot read the weights {path!r} ({e}); the file is missing, "
                             "truncated or not safetensors") from e
        if raw.get("comet_save_id") is not None and save_id != raw["comet_save_id"]:
            raise ValueError(f"from_pretrained: {path!r} is not a weights file saved with {CONFIG_NAME} (save ids "
                             f"{save_id} and {raw['comet_save_id']}): a save_pretrained into {folder!r} was cut "
                             "between its files; save again")
    path = paths[0] if len(paths) == 1 else os.path.join(folder, INDEX_NAME)  # (for the messages below)
    for kept, dropped in tied_keys(model):
        if dropped not in state and kept in state:
            state[dropped] = state[kept]
        elif kept in state and dropped in state and not torch.equal(state[kept], state[dropped]):
            # loading both into the one shared tensor would keep whichever comes last, silently
            raise ValueError(f"from_pretrained: {CONFIG_NAME} in {folder!r} ties {dropped} to {kept} "
                             f"(tie_word_embeddings), but {path!r} holds different values for them: the config "
                             f"does not describe these weights (an edited tie_word_embeddings?)")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that disagree with config.json (an edited size, rank or vocabulary)
        raise ValueError(f"from_pretrained: the weights {path!r} do not fit the model {CONFIG_NAME} describes: "
                         f"{e}") from None
    if missing or unexpected:
        raise ValueError(f"from_pretrained: weights do not match the model: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    cast_parameters(model, dtype)
    return model.to(device) if device is not None else model


def upgrade_peft_adapter(folder: str) -> int:
    """Renames the memory's weights in a PEFT adapter folder saved before format 3 (a
    get_peft_model run with modules_to_save over global_memory_net / temp_memory_net holds
    ...memory_layers.{i}.global_memory_net.g_proj.weight and the like), which
    PeftModel.from_pretrained would no longer find: PEFT looks every key up by the model's names
    before any load hook of ours runs. Rewrites adapter_model.safetensors in place (atomically)
    and returns how many keys it renamed (0: nothing to do, the file is left alone)."""
    path = os.path.join(folder, "adapter_model.safetensors")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata()
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"upgrade_peft_adapter: cannot read {path!r} ({e}); expected a PEFT adapter folder "
                         "saved with safetensors") from e
    renamed = {}
    for key in state:
        head, found, rest = key.partition("memory_layers.")
        if found:
            renamed[key] = head + model_key(found + rest)
    renamed = {k: v for k, v in renamed.items() if k != v}
    if renamed:
        state = {renamed.get(k, k): v for k, v in state.items()}
        atomic_write(path, lambda p: save_file(state, p, metadata=metadata))
    return len(renamed)


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """model.to(dtype) for the parameters only (LoRA adapters included): the base's RoPE
    frequencies (rotary_emb.inv_freq) stay float32, as transformers' from_config /
    from_pretrained leave them; cast to bfloat16 they move positions by radians at a few
    thousand."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


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
