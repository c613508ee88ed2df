"""The saved layout of a CometForCausalLM (comet_ext/checkpoint.py): what HF tools read
from it, what older folders still give, dtypes, decoding defaults, LoRA adapters, and the
memory's dtype."""
from __future__ import annotations

import json

import pytest
import torch
from modeling_utils import VOCAB, tiny_base, tiny_comet
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from comet_ext import CometMemory
from comet_ext.checkpoint import model_key, saved_key
from comet_ext.modeling import CometForCausalLM


def ids(B, T, seed=0):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def test_plain_hf_loading_gets_the_fine_tuned_base_not_random_weights(tmp_path):
    """AutoModelForCausalLM on a CoMeT folder loads the base model's weights (the memory's,
    under comet.*, are left out), so its logits are the base model's."""
    model = tiny_comet("qwen3", seed=3)
    with torch.no_grad():  # as fine-tuning would: base weights that no fresh init reproduces
        model.base.lm_head.weight.add_(0.5)
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert "lm_head.weight" in keys and "comet.memory_embeddings.readout" in keys
    assert not any(k.startswith("base.") for k in keys)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    x = ids(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, model.base(x).logits, rtol=1e-5, atol=1e-5)


def test_folders_of_the_older_layout_still_load(tmp_path):
    model = tiny_comet("llama", seed=1)
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    old = {model_key(k): v for k, v in load_file(path).items()}  # every key as the model names it
    assert any(k.startswith("base.") for k in old) and any(k.startswith("memory_layers.") for k in old)
    save_file(old, path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["comet_save_id"]  # nor did older folders have save ids
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = CometForCausalLM.from_pretrained(tmp_path)
    x = ids(1, 30)
    assert torch.equal(loaded(x).logits, model(x).logits)


# the memory's parameter names in files of format 2 and earlier, written out here (not taken from
# checkpoint.LEGACY_MEMORY_NAMES, which is under test)
FORMAT_2_NAMES = {"memory_embeddings.compression": "compression_embedding",
                  "memory_embeddings.readout": "readout_embedding", "gate.weight": "g_proj.weight", "global_memory_net.rla.down": "global_memory_net.o_proj.down_proj.weight",
                  "global_memory_net.rla.up": "global_memory_net.o_proj.up_proj.weight",
                  "temp_memory_net.rla.down": "temp_memory_net.rla.down_proj.weight",
                  "temp_memory_net.rla.up": "temp_memory_net.rla.up_proj.weight"}


def as_format_2(key: str) -> str:
    for new, old in FORMAT_2_NAMES.items():
        if key.endswith(new):
            return key[: -len(new)] + old
    return key


@pytest.mark.parametrize("older_layout", [False, True])
def test_files_of_the_memory_names_before_the_rename_still_load(tmp_path, older_layout):
    """Before format 3 the memory's modules were nn.Linear layers named g_proj, o_proj.down_proj,
    o_proj.up_proj, rla.down_proj and rla.up_proj (the reference's names, which LoRA's usual
    targets hit), and its embeddings the model's parameters compression_embedding and
    readout_embedding. Folders saved so (the shipped passkey model among them), under comet.* or under
    the older unprefixed layout, load to the same model; so does a state dict read from such a
    file (transformers.Trainer resuming from an older checkpoint)."""
    model = tiny_comet("qwen3", seed=4)
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    saved = load_file(path)
    keys = {k: model_key(k) if older_layout else k for k in saved}
    old = {as_format_2(keys[k]): v for k, v in saved.items()}
    # per layer the gate and both RLAs' weights, and the two embeddings
    assert sum(as_format_2(k) != k for k in keys.values()) == 2 * 5 + 2
    save_file(old, path, metadata={"format": "pt", "comet_ext": "2"})
    config = json.loads((tmp_path / "config.json").read_text())
    del config["comet_save_id"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = CometForCausalLM.from_pretrained(tmp_path)
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    other = tiny_comet("qwen3", seed=5)
    missing, unexpected = other.load_state_dict(old, strict=True)
    assert not missing and not unexpected
    x = ids(1, 30)
    assert torch.equal(other(x).logits, model(x).logits)


def test_parameter_order_is_the_one_saved_optimizer_states_are_indexed_by():
    """torch optimizers save their state by parameter position: the renamed memory keeps the
    order of the names before format 3 (the embeddings first, then the base, then per layer the
    global net's norm, gate and RLA, the temporary net's norm and RLA), so a trainer.pt or an HF
    optimizer.pt saved before still fits."""
    names = [n for n, _ in tiny_comet("qwen3").named_parameters()]
    base = [i for i, n in enumerate(names) if n.startswith("base.")]
    assert base == list(range(2, 2 + len(base)))
    per_layer = ["global_memory_net.norm.weight", "global_memory_net.g_proj.weight",
                 "global_memory_net.o_proj.down_proj.weight", "global_memory_net.o_proj.up_proj.weight",
                 "temp_memory_net.norm.weight", "temp_memory_net.rla.down_proj.weight",
                 "temp_memory_net.rla.up_proj.weight"]
    before = ["compression_embedding", "readout_embedding"] + [f"memory_layers.{l}.{n}" for l in range(2)
                                                               for n in per_layer]
    assert [as_format_2(n) for n in names if not n.startswith("base.")] == before


def test_a_peft_adapter_saved_with_the_old_memory_names_loads_once_upgraded(tmp_path):
    """A get_peft_model run with modules_to_save over the memory's modules, saved before format 3,
    holds the old names; PEFT looks its keys up by the model's names, so PeftModel.from_pretrained
    fails on it until upgrade_peft_adapter renames them (and then loads the trained model)."""
    peft = pytest.importorskip("peft")
    from safetensors import safe_open

    from comet_ext.checkpoint import upgrade_peft_adapter

    tiny_comet("qwen3", seed=6).save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(CometForCausalLM.from_pretrained(tmp_path / "base"), peft.LoraConfig(
        r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["global_memory_net", "temp_memory_net"]))
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x = ids(1, 40)
    trained = model(x).logits
    model.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    new = load_file(path)
    old = {as_format_2(k): v for k, v in new.items()}
    assert sum(k not in new for k in old) == 2 * 5  # the gate and both RLAs' weights per layer
    save_file(old, path, metadata=metadata)
    with pytest.raises(KeyError):
        peft.PeftModel.from_pretrained(CometForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert upgrade_peft_adapter(tmp_path / "adapter") == 2 * 5
    assert load_file(path).keys() == new.keys()
    assert upgrade_peft_adapter(tmp_path / "adapter") == 0  # nothing left to rename
    loaded = peft.PeftModel.from_pretrained(CometForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert torch.equal(loaded(x).logits, trained)
    with pytest.raises(ValueError, match="cannot read"):
        upgrade_peft_adapter(tmp_path / "base")


def test_key_mapping_round_trips():
    shared = ("base.lm_head.weight", "memory_embeddings.readout", "memory_layers.1.global_memory_net.gate.weight",
              "memory_embeddings.compression")
    plain = shared + ("base.model.layers.0.self_attn.q_proj.weight",)
    with_lora = shared + ("base.model.layers.0.self_attn.q_proj.base_layer.weight",
                          "base.model.layers.0.self_attn.q_proj.lora_A.default.weight")
    for keys in (plain, with_lora):  # the model's keys, of a model without and with adapters
        for key in keys:
            assert model_key(saved_key(key), set(keys)) == key and model_key(key) == key
    assert saved_key(with_lora[-2]) == saved_key(plain[-1]) == "model.layers.0.self_attn.q_proj.weight"


def test_a_state_dict_read_from_the_file_loads_strictly(tmp_path):
    """What transformers.Trainer does when it resumes: load_state_dict(load_file(...))."""
    model = tiny_comet("qwen3", seed=2)
    model.save_pretrained(tmp_path)
    other = tiny_comet("qwen3", seed=5)
    missing, unexpected = other.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    assert not missing and not unexpected
    x = ids(1, 20)
    assert torch.equal(other(x).logits, model(x).logits)


@pytest.mark.parametrize("asked, expected", [(None, torch.bfloat16), ("auto", torch.bfloat16),
                                             ("float32", torch.float32), (torch.float16, torch.float16)])
def test_dtype_is_saved_and_chosen_on_load(tmp_path, asked, expected):
    model = tiny_comet("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = CometForCausalLM.from_pretrained(tmp_path, dtype=asked)
    assert {p.dtype for p in loaded.parameters()} == {expected}


def test_a_bad_dtype_or_unreadable_weights_raise(tmp_path):
    tiny_comet("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        CometForCausalLM.from_pretrained(tmp_path, dtype="int8")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        CometForCausalLM.from_pretrained(tmp_path)


def test_generation_config_round_trips(tmp_path):
    model = tiny_comet("qwen3")
    model.generation_config.eos_token_id = 7
    model.generation_config.top_k = 11
    model.save_pretrained(tmp_path)
    loaded = CometForCausalLM.from_pretrained(tmp_path)
    assert loaded.generation_config.eos_token_id == 7 and loaded.generation_config.top_k == 11


def test_lora_adapters_are_saved_with_their_settings_and_reapplied(tmp_path):
    pytest.importorskip("peft")
    from comet_ext.lora import apply_lora, lora_parameters, merge_lora

    model = tiny_comet("qwen3")
    apply_lora(model, rank=2, alpha=4.0, target_modules=("q_proj", "down_proj"))
    with torch.no_grad():  # adapters that do something (peft starts lora_B at zero)
        for p in lora_parameters(model):
            p.normal_(std=0.1)
    model.save_pretrained(tmp_path / "adapters")
    loaded = CometForCausalLM.from_pretrained(tmp_path / "adapters")
    assert loaded.comet_lora == model.comet_lora and len(lora_parameters(loaded)) == len(lora_parameters(model))
    x = ids(1, 20)
    adapted = model(x).logits
    assert torch.equal(loaded(x).logits, adapted)
    resumed = tiny_comet("qwen3", seed=4)  # as transformers.Trainer resumes: the file into a LoRA model
    apply_lora(resumed, rank=2, alpha=4.0, target_modules=("q_proj", "down_proj"))
    resumed.load_state_dict(load_file(tmp_path / "adapters" / "model.safetensors"), strict=True)
    assert torch.equal(resumed(x).logits, adapted)
    merge_lora(model)
    model.save_pretrained(tmp_path / "merged")
    assert "comet_lora" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    torch.testing.assert_close(CometForCausalLM.from_pretrained(tmp_path / "merged")(x).logits, adapted,
                               rtol=1e-5, atol=1e-5)


def test_a_loaded_lora_model_merged_and_saved_again_loads_plain(tmp_path):
    """The loaded config carries the saved comet_lora entry; a save after merge_lora must not
    write it back (the load would re-apply adapters the weights no longer have)."""
    pytest.importorskip("peft")
    from comet_ext.lora import apply_lora, lora_parameters, merge_lora

    model = tiny_comet("llama")
    apply_lora(model, rank=2)
    model.save_pretrained(tmp_path / "adapters")
    loaded = CometForCausalLM.from_pretrained(tmp_path / "adapters")
    assert not hasattr(loaded.config, "comet_lora") and not hasattr(loaded.config, "comet")
    merge_lora(loaded)
    loaded.save_pretrained(tmp_path / "merged")
    again = CometForCausalLM.from_pretrained(tmp_path / "merged")
    assert again.comet_lora is None and not lora_parameters(again)
    x = ids(1, 20)
    torch.testing.assert_close(again(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


def test_plain_hf_loading_of_a_folder_with_adapters_gets_the_wrapped_weights(tmp_path):
    """With LoRA adapters in, the layers they wrap are saved under the plain names: a plain
    load gets the base model without the adapters, every weight present (none random)."""
    pytest.importorskip("peft")
    from comet_ext.lora import apply_lora, lora_parameters

    model = tiny_comet("qwen3")
    apply_lora(model, rank=2, target_modules=("q_proj", "down_proj"))
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(std=0.1)
    model.save_pretrained(tmp_path)
    plain, info = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    wrapped = model.base.model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(plain.model.layers[0].self_attn.q_proj.weight, wrapped)


def test_a_save_cut_between_its_files_is_refused(tmp_path):
    model = tiny_comet("llama")
    model.save_pretrained(tmp_path)
    weights = (tmp_path / "model.safetensors").read_bytes()
    model.save_pretrained(tmp_path)  # a second save, whose config.json then "never got written":
    (tmp_path / "model.safetensors").write_bytes(weights)  # (the same as new weights with the old config)
    with pytest.raises(ValueError, match="was cut between its files"):
        CometForCausalLM.from_pretrained(tmp_path)


def test_adapters_injected_outside_apply_lora_are_refused_at_save(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_comet("qwen3")
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["q_proj"]), model.base.model)
    with pytest.raises(ValueError, match="merge_lora"):
        model.save_pretrained(tmp_path)


def test_resize_token_embeddings_reaches_the_base_and_survives_saving(tmp_path):
    model = tiny_comet("llama")
    model.resize_token_embeddings(VOCAB + 8)
    assert model.get_input_embeddings().num_embeddings == VOCAB + 8 == model.config.vocab_size
    x = torch.tensor([[VOCAB + 3, 1, 2]])
    assert model(x).logits.shape == (1, 3, VOCAB + 8)
    model.save_pretrained(tmp_path)
    assert torch.equal(CometForCausalLM.from_pretrained(tmp_path)(x).logits, model(x).logits)


def test_a_memory_of_another_dtype_is_refused_by_read_and_cast_by_load(tmp_path):
    model = tiny_comet("llama")
    memory = model.read(ids(1, 20))
    memory.save(tmp_path / "mem.safetensors")
    model.to(torch.bfloat16)
    with pytest.raises(ValueError, match="memory.to"):
        model.read(ids(1, 4), memory)
    loaded = CometMemory.load(tmp_path / "mem.safetensors", model)
    assert loaded.kv_k.dtype == loaded.state.dtype == torch.bfloat16 and loaded.tokens.dtype == torch.long
    model.read(ids(1, 4), loaded)
    before = memory.clone()
    model.read(ids(1, 4), memory.to(dtype=torch.bfloat16))
    for a, b in zip(memory.buffers(), before.buffers()):  # the cast copy shares no buffer, counters included
        assert torch.equal(a, b)


def test_a_low_precision_load_keeps_the_rope_frequencies_in_float32(tmp_path):
    """from_pretrained(dtype=bf16) cast the base's rotary inv_freq to bf16, which transformers
    leaves in float32: positions moved by radians at a few thousand, and the model differed from
    the same weights built by from_base (or the reference import)."""
    model = tiny_comet("qwen3")
    model.save_pretrained(tmp_path / "m")
    loaded = CometForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert loaded.decoder.rotary_emb.inv_freq.dtype == torch.float32
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    built = CometForCausalLM.from_base(AutoModelForCausalLM.from_config(model.base.config, dtype=torch.bfloat16),
                                       model.comet_config)
    built.load_state_dict(loaded.state_dict())
    x = torch.randint(0, 97, (1, 40))
    torch.testing.assert_close(loaded(x).logits, built(x).logits, rtol=0, atol=0)


def test_a_config_edited_to_other_sizes_than_the_weights_is_named(tmp_path):
    model = tiny_comet("qwen3")
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["comet"]["rla_rank"] = 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"(?s)weights .*model.safetensors' do not fit the model config.json "
                                         r"describes.*size mismatch"):
        CometForCausalLM.from_pretrained(tmp_path / "m")


def test_a_config_edited_to_tie_untied_embeddings_is_refused(tmp_path):
    """Tied, the embedding and the LM head are one tensor: loading two different saved ones into
    it would keep whichever comes last, a model neither of them was. A tied model's own folder
    (one copy saved) still loads, tied."""
    model = tiny_comet("llama")
    assert not model.config.tie_word_embeddings
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"ties base.lm_head.weight to base.model.embed_tokens.weight "
                                         r"\(tie_word_embeddings\), "
                                         r"but .* holds different values"):
        CometForCausalLM.from_pretrained(tmp_path / "m")
    tied = CometForCausalLM.from_base(tiny_base("llama", tie_word_embeddings=True), model.comet_config)
    tied.save_pretrained(tmp_path / "tied")
    loaded = CometForCausalLM.from_pretrained(tmp_path / "tied")
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    assert torch.equal(loaded.get_input_embeddings().weight, tied.get_input_embeddings().weight)


# ----------------------------------------------------------------------------- sharded weights


def _weights_files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("model") and "safetensors" in p.name)


def _nudged(model, seed: int):
    """model with every parameter moved by a seeded amount: saves that can be told apart."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return model


def _assert_same_parameters(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_weights_over_max_shard_size_are_saved_as_hf_shards_and_load_here_and_in_hf(tmp_path):
    """Above max_shard_size the weights go into HF's sharded layout (as transformers splits them):
    every shard at most the size unless one tensor is larger, the index naming every weight. Both
    CometForCausalLM and HF's AutoModelForCausalLM load it, the same as from one file."""
    model = _nudged(tiny_comet("qwen3", seed=2), 1)
    model.save_pretrained(tmp_path / "one")
    single = load_file(tmp_path / "one" / "model.safetensors")
    total = sum(t.numel() * t.element_size() for t in single.values())
    biggest = max(t.numel() * t.element_size() for t in single.values())
    limit = max(total // 4, biggest)
    for size in (limit, f"{limit / 1000}KB"):
        folder = tmp_path / f"sharded-{type(size).__name__}"
        model.save_pretrained(folder, max_shard_size=size)
        files = _weights_files(folder)
        shards = [f for f in files if f != "model.safetensors.index.json"]
        assert "model.safetensors" not in files and "model.safetensors.index.json" in files
        assert len(shards) >= 4 and shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                               for i in range(1, len(shards) + 1)]
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == total
        assert sorted(index["weight_map"]) == sorted(single) and sorted(set(index["weight_map"].values())) == shards
        held = {}
        for shard in shards:
            part = load_file(folder / shard)
            assert sum(t.numel() * t.element_size() for t in part.values()) <= limit
            assert all(index["weight_map"][k] == shard for k in part)
            held.update(part)
        assert held.keys() == single.keys() and all(torch.equal(held[k], single[k]) for k in single)
        loaded = CometForCausalLM.from_pretrained(folder)
        _assert_same_parameters(loaded, model)
        x = ids(2, 40, seed=4)
        assert torch.equal(loaded(x).logits, model(x).logits)
        plain = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(plain(x).logits, model.base(x).logits, rtol=1e-5, atol=1e-5)


def test_a_save_replaces_the_weights_files_of_an_earlier_one(tmp_path):
    """Saving into a folder removes the weights files the new save did not write (one file after
    shards, fewer shards after more, shards after one file): what is left is the last save's."""
    model = tiny_comet("llama", seed=5)
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    for seed, size in enumerate((total // 6, "50GB", total // 6, total // 2, "50GB")):
        _nudged(model, seed)
        model.save_pretrained(tmp_path, max_shard_size=size)
        files = _weights_files(tmp_path)
        if size == "50GB":
            assert files == ["model.safetensors"]
        else:
            index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
            assert files == sorted(set(index["weight_map"].values()) | {"model.safetensors.index.json"})
        _assert_same_parameters(CometForCausalLM.from_pretrained(tmp_path), model)


def test_a_sharded_save_cut_between_its_files_is_refused_or_loads_the_whole_one(tmp_path):
    """A shard left from another save (a crash between the renames) is refused by its save id; a
    crash after config.json but before the earlier layout's files were removed leaves both
    layouts, and the one config.json names is loaded."""
    model = tiny_comet("llama", seed=6)
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    model.save_pretrained(tmp_path / "a", max_shard_size=total // 3)
    first, second = _weights_files(tmp_path / "a")[:2]
    assert first.startswith("model-00001-of-") and second.startswith("model-00002-of-")
    old_shard = (tmp_path / "a" / first).read_bytes()
    model.save_pretrained(tmp_path / "a", max_shard_size=total // 3)
    (tmp_path / "a" / first).write_bytes(old_shard)
    with pytest.raises(ValueError, match="was cut between its files"):
        CometForCausalLM.from_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "a", max_shard_size=total // 3)  # whole again, then a shard lost
    (tmp_path / "a" / second).unlink()
    with pytest.raises(ValueError, match=f"cannot read the weights .*{second}"):
        CometForCausalLM.from_pretrained(tmp_path / "a")

    for first, last in ((total // 3, "50GB"), ("50GB", total // 3)):  # both layouts on disk: the last one loads
        folder = tmp_path / f"{first}-then-{last}"
        model.save_pretrained(folder, max_shard_size=first)
        earlier = {f.name: f.read_bytes() for f in folder.iterdir() if f.name.startswith("model")}
        _nudged(model, 7)
        model.save_pretrained(folder, max_shard_size=last)
        for name, data in earlier.items():  # as if the save stopped before removing them
            (folder / name).write_bytes(data)
        files = _weights_files(folder)
        assert "model.safetensors" in files and "model.safetensors.index.json" in files
        _assert_same_parameters(CometForCausalLM.from_pretrained(folder), model)


@pytest.mark.parametrize("size", [0, -5, "0GB", "-1MB", "5GiB", "lots", 1.5, True, None])
def test_a_bad_max_shard_size_is_refused_before_anything_is_written(tmp_path, size):
    model = tiny_comet("llama")
    with pytest.raises(ValueError, match="max_shard_size"):
        model.save_pretrained(tmp_path / "m", max_shard_size=size)
    assert not (tmp_path / "m").exists()
