"""Reference-implementation checkpoints load into comet_ext and give the same logits."""
from __future__ import annotations

import json
import re

import pytest
import torch
from modeling_utils import naive_forward, tiny_base
from safetensors.torch import load_file, save_file

from comet_ext.config import CometConfig
from comet_ext.convert import main as convert_main
from comet_ext.modeling import CometForCausalLM

VOCAB = 97 + 2 + 4  # + placeholder, temp beacon, 4 global beacons


# our memory parameters -> the reference's (MemQwen3ForCausalLM's names), written out here
# rather than taken from convert.reference_key, which is under test
REFERENCE_MEMORY_NAMES = {
    "global_memory_net.norm.weight": "global_memory_net.norm.weight",
    "global_memory_net.gate.weight": "global_memory_net.g_proj.weight",
    "global_memory_net.rla.down": "global_memory_net.o_proj.down_proj.weight",
    "global_memory_net.rla.up": "global_memory_net.o_proj.up_proj.weight",
    "temp_memory_net.norm.weight": "temp_memory_net.0.weight",
    "temp_memory_net.rla.down": "temp_memory_net.1.down_proj.weight",
    "temp_memory_net.rla.up": "temp_memory_net.1.up_proj.weight",
}


def write_reference_checkpoint(model: CometForCausalLM, folder, shards: int = 1) -> None:
    """Lays a comet model out the way the reference implementation saves MemQwen3ForCausalLM."""
    cc = model.comet_config
    emb = model.base.model.embed_tokens.weight.detach().clone()
    emb[98] = model.memory_embeddings.compression.detach()[0]
    emb[99:103] = model.memory_embeddings.readout.detach()
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().clone()
        if key.startswith("base.model.layers."):
            i, rest = key[len("base.model.layers."):].split(".", 1)
            state[f"model.layers.{i}.inner_layer.{rest}"] = value
        elif key.startswith("memory_layers."):
            i, rest = key[len("memory_layers."):].split(".", 1)
            state[f"model.layers.{i}.{REFERENCE_MEMORY_NAMES[rest]}"] = value
        elif key == "base.model.embed_tokens.weight":
            state["model.embed_tokens.weight"] = emb
        elif key.startswith("base."):
            state[key[len("base."):]] = value
    config = model.config.to_dict()
    config.update(architectures=["MemQwen3ForCausalLM"], chunk_size=cc.chunk_size, placeholder_id=97,
                  temp_beacon_id=98, temp_beacon_stride=cc.temp_stride, temp_mem_budget=cc.temp_budget,
                  global_beacon_ids=list(range(99, 103)))
    (folder / "config.json").write_text(json.dumps(config))
    keys = sorted(state)
    if shards == 1:
        save_file(state, folder / "model.safetensors")
        return
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[s::shards]}
        save_file(part, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def qwen3_with_beacon_vocab() -> CometForCausalLM:
    """A tiny Qwen3 CoMeT model whose vocabulary has room for the reference's beacon ids,
    with random memory modules."""
    model = CometForCausalLM.from_base(tiny_base("qwen3", vocab_size=VOCAB),
                                       CometConfig(chunk_size=16, num_global=4, temp_stride=4, temp_budget=6, rla_rank=2))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.memory_layers.named_parameters():
            p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("shards", [1, 3])
def test_reference_checkpoint_gives_the_same_logits(tmp_path, shards):
    model = qwen3_with_beacon_vocab()
    write_reference_checkpoint(model, tmp_path, shards)
    loaded = CometForCausalLM.from_pretrained(tmp_path)
    assert loaded.comet_config == model.comet_config
    x = torch.randint(0, 97, (2, 45), generator=torch.Generator().manual_seed(4))
    expected = naive_forward(model, x, model._chunk_sizes(None, 45))
    torch.testing.assert_close(loaded(x).logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


def test_convert_cli_writes_our_format(tmp_path):
    model = qwen3_with_beacon_vocab()
    (tmp_path / "ref").mkdir()
    write_reference_checkpoint(model, tmp_path / "ref")
    convert_main([str(tmp_path / "ref"), str(tmp_path / "ours")])
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["comet"]["num_global"] == 4 and "global_beacon_ids" not in config
    ours = CometForCausalLM.from_pretrained(tmp_path / "ours")
    x = torch.randint(0, 97, (1, 30))
    torch.testing.assert_close(ours(x).logits, model(x).logits, rtol=0, atol=0)


@pytest.fixture(scope="module")
def reference_model() -> CometForCausalLM:
    return qwen3_with_beacon_vocab()


def edited_reference(model, folder, config_edit=None, drop=(), shards: int = 1):
    """A reference checkpoint in folder, its config edited and the weights `drop` left out
    of the safetensors files (the index, if any, still lists them)."""
    folder.mkdir()
    write_reference_checkpoint(model, folder, shards)
    if config_edit is not None:
        config = json.loads((folder / "config.json").read_text())
        config_edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    for path in folder.glob("*.safetensors"):
        state = load_file(path)
        if any(k in state for k in drop):
            save_file({k: v for k, v in state.items() if k not in drop}, path)
    return folder


@pytest.mark.parametrize("field", ["chunk_size", "temp_beacon_id", "temp_beacon_stride", "temp_mem_budget"])
def test_a_missing_reference_field_is_named(tmp_path, reference_model, field):
    folder = edited_reference(reference_model, tmp_path / "ref", lambda c: c.pop(field))
    with pytest.raises(ValueError, match=rf"config\.json' lacks the reference field '{field}'"):
        CometForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("key", ["model.embed_tokens.weight",
                                 "model.layers.0.global_memory_net.o_proj.down_proj.weight",
                                 "model.layers.1.global_memory_net.norm.weight",
                                 "model.layers.1.temp_memory_net.0.weight",
                                 "model.layers.0.inner_layer.mlp.up_proj.weight"])
def test_a_missing_weight_is_named_with_its_file(tmp_path, reference_model, key):
    folder = edited_reference(reference_model, tmp_path / "ref", drop=[key])
    with pytest.raises(ValueError, match=rf"lacks the weight.*'{re.escape(key)}'.*model\.safetensors'"):
        CometForCausalLM.from_pretrained(folder)


def test_a_weight_missing_from_its_shard_names_the_shard(tmp_path, reference_model):
    key = "model.embed_tokens.weight"
    folder = edited_reference(reference_model, tmp_path / "ref", drop=[key], shards=3)
    shard = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][key]
    with pytest.raises(ValueError, match=rf"lacks the weight.*'{re.escape(key)}'.*{re.escape(shard)}"):
        CometForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("field, value, bad", [("temp_beacon_id", 1000, 1000), ("temp_beacon_id", -1, -1),
                                               ("global_beacon_ids", [99, 100, 101, 500], 500),
                                               ("global_beacon_ids", [99, 100, 101, -1], -1)])
def test_a_beacon_id_outside_the_vocabulary_is_refused(tmp_path, reference_model, field, value, bad):
    folder = edited_reference(reference_model, tmp_path / "ref", lambda c: c.update({field: value}))
    with pytest.raises(ValueError, match=rf"{field}.*holds the id {bad}, outside the vocabulary \[0, {VOCAB}\)"):
        CometForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("field, value", [("temp_beacon_stride", 4.7), ("temp_beacon_stride", 4.0),
                                          ("temp_mem_budget", "6"), ("chunk_size", True),
                                          ("temp_beacon_id", 98.0), ("global_beacon_ids", [99, 100, "101", 102]),
                                          ("global_beacon_ids", []), ("global_beacon_ids", 99)])
def test_a_reference_field_that_is_not_an_int_is_refused(tmp_path, reference_model, field, value):
    folder = edited_reference(reference_model, tmp_path / "ref", lambda c: c.update({field: value}))
    with pytest.raises(ValueError, match=rf"{field} in '.*config\.json' must be .*int.*got {re.escape(repr(value))}"):
        CometForCausalLM.from_pretrained(folder)


def test_a_reference_field_out_of_range_is_refused_naming_the_file(tmp_path, reference_model):
    folder = edited_reference(reference_model, tmp_path / "ref", lambda c: c.update(chunk_size=0))
    with pytest.raises(ValueError, match=r"config\.json.*chunk_size must be >= 1, got 0"):
        CometForCausalLM.from_pretrained(folder)


def folder_bytes(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("where", ["same", "symlink", "inside", "trailing_slash"])
@pytest.mark.parametrize("shards", [1, 3])
def test_convert_cli_refuses_to_write_into_the_reference(tmp_path, reference_model, capsys, where, shards):
    ref = edited_reference(reference_model, tmp_path / "ref", shards=shards)
    before = folder_bytes(ref)
    output = {"same": ref, "inside": ref / "converted", "trailing_slash": f"{ref}/"}.get(where)
    if where == "symlink":
        output = tmp_path / "link"
        output.symlink_to(ref, target_is_directory=True)
    with pytest.raises(SystemExit):
        convert_main([str(ref), str(output)])
    assert "is the reference folder or inside it" in capsys.readouterr().err
    assert folder_bytes(ref) == before


@pytest.mark.parametrize("leftover", ["model-00001-of-00003.safetensors", "model.safetensors.index.json",
                                      "pytorch_model.bin", "notes.txt"])
def test_convert_cli_refuses_a_non_empty_output_folder(tmp_path, reference_model, capsys, leftover):
    ref = edited_reference(reference_model, tmp_path / "ref")
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / leftover).write_bytes(b"user data")
    with pytest.raises(SystemExit):
        convert_main([str(ref), str(tmp_path / "ours")])
    assert "is not empty" in capsys.readouterr().err
    assert folder_bytes(tmp_path / "ours") == {leftover: b"user data"}


def test_convert_cli_into_an_empty_folder_leaves_nothing_else_behind(tmp_path, reference_model):
    ref = edited_reference(reference_model, tmp_path / "ref")
    (tmp_path / "ours").mkdir()
    convert_main([str(ref), str(tmp_path / "ours")])
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["config.json", "generation_config.json",
                                                                     "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "ref"]  # no temporary folder left
    x = torch.randint(0, 97, (1, 20))
    torch.testing.assert_close(CometForCausalLM.from_pretrained(tmp_path / "ours")(x).logits,
                               reference_model(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("stride", [-1, 0])
def test_a_reference_without_temporary_memory_loads_with_the_fifo_off(tmp_path, reference_model, stride):
    """The reference builds no temp_memory_net for a stride <= 0, so such a checkpoint has none of
    its weights: it was refused as lacking them (and a stride of 0 as invalid)."""
    temp = [k for k in load_file_of(reference_model, tmp_path / "probe") if ".temp_memory_net." in k]
    folder = edited_reference(reference_model, tmp_path / "ref", lambda c: c.update(temp_beacon_stride=stride),
                              drop=temp)
    loaded = CometForCausalLM.from_pretrained(folder)
    assert loaded.comet_config.temp_stride == -1
    no_fifo = qwen3_with_beacon_vocab()
    no_fifo.comet_config = CometConfig(**{**no_fifo.comet_config.to_dict(), "temp_stride": -1})
    x = torch.randint(0, 97, (2, 45), generator=torch.Generator().manual_seed(4))
    expected = naive_forward(no_fifo, x, no_fifo._chunk_sizes(None, 45))
    torch.testing.assert_close(loaded(x).logits, expected, rtol=1e-5, atol=1e-5)


def load_file_of(model, folder) -> dict:
    folder.mkdir()
    write_reference_checkpoint(model, folder)
    return load_file(folder / "model.safetensors")


def test_model_safetensors_wins_over_a_stale_index_as_in_transformers(tmp_path, reference_model):
    """A folder with an older save's shards and index beside a newer model.safetensors: the
    reference (transformers) reads model.safetensors; the import read the stale shards."""
    folder = edited_reference(reference_model, tmp_path / "ref", shards=3)
    newer = qwen3_with_beacon_vocab()
    with torch.no_grad():
        for p in newer.parameters():
            p.mul_(1.5)
    write_reference_checkpoint(newer, tmp_path / "ref")  # model.safetensors, the index left beside it
    assert (folder / "model.safetensors.index.json").exists()
    x = torch.randint(0, 97, (1, 30))
    torch.testing.assert_close(CometForCausalLM.from_pretrained(folder)(x).logits, newer(x).logits, rtol=0, atol=0)


def test_the_reference_generation_config_and_dtype_are_kept(tmp_path, reference_model):
    """Import dropped the reference's generation_config.json (EOS ids, sampling defaults: generate
    ran past EOS), and the CLI wrote a bf16 reference as float32 (from_pretrained kept bf16)."""
    folder = edited_reference(reference_model.to(torch.bfloat16), tmp_path / "ref",
                              lambda c: c.update(dtype="bfloat16"))
    reference_model.to(torch.float32)
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [5, 6], "do_sample": True, "temperature": 0.7, "top_k": 5}))
    loaded = CometForCausalLM.from_pretrained(folder)
    convert_main([str(folder), str(tmp_path / "ours")])
    converted = CometForCausalLM.from_pretrained(tmp_path / "ours", dtype="auto")
    for model in (loaded, converted):
        assert model.dtype == torch.bfloat16
        g = model.generation_config
        assert (g.eos_token_id, g.do_sample, g.temperature, g.top_k) == ([5, 6], True, 0.7, 5)


def test_damaged_reference_files_are_named(tmp_path, reference_model, capsys):
    ref = edited_reference(reference_model, tmp_path / "ref")
    data = (ref / "model.safetensors").read_bytes()
    (ref / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read '.*model\.safetensors'.*truncated or not safetensors"):
        CometForCausalLM.from_pretrained(ref)
    (ref / "model.safetensors").unlink()
    (ref / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match=r"lacks model\.safetensors \(its pytorch_model\.bin is not read"):
        CometForCausalLM.from_pretrained(ref)
    index = ref / "model.safetensors.index.json"
    for content, pattern in [("{", r"index.*is not valid JSON"),
                             ('{"metadata": {}}', r"must hold a 'weight_map'"),
                             ('{"weight_map": ["a"]}', r"must hold a 'weight_map'"),
                             ('{"weight_map": {"w": "../elsewhere.safetensors"}}', r"shard files outside its folder")]:
        index.write_text(content)
        with pytest.raises(ValueError, match=pattern):
            CometForCausalLM.from_pretrained(ref)
    (ref / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config '.*config\.json' is not valid JSON"):
        CometForCausalLM.from_pretrained(ref)
    with pytest.raises(SystemExit):
        convert_main([str(tmp_path / "missing"), str(tmp_path / "out")])
    assert "is not a folder holding config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert_main([str(ref), str(tmp_path / "out")])
    assert "is not valid JSON" in capsys.readouterr().err


def test_weights_of_other_shapes_than_the_config_are_named(tmp_path, reference_model):
    temp_down = "model.layers.0.temp_memory_net.1.down_proj.weight"
    folder = edited_reference(reference_model, tmp_path / "ref")
    state = load_file(folder / "model.safetensors")
    state[temp_down] = torch.zeros(3, state[temp_down].shape[1])  # rank 3, the global RLA's 2
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"(?s)do not fit the model '.*config\.json' describes.*temp_memory_net"):
        CometForCausalLM.from_pretrained(folder)


def test_a_comet_entry_that_is_not_a_config_is_named(tmp_path, reference_model):
    reference_model.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    config["comet"] = None
    (tmp_path / "ours" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'comet' entry of .* must be the CoMeT config \(a JSON object\), got None"):
        CometForCausalLM.from_pretrained(tmp_path / "ours")


def test_a_damaged_reference_generation_config_is_named(tmp_path, reference_model, capsys):
    folder = edited_reference(reference_model, tmp_path / "ref")
    (folder / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"generation_config.json' cannot be read as a generation config"):
        CometForCausalLM.from_pretrained(folder)
    with pytest.raises(SystemExit):
        convert_main([str(folder), str(tmp_path / "out")])
    assert "cannot be read as a generation config" in capsys.readouterr().err
