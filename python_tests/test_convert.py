"""Reference-implementation checkpoints load into comet_ext and give the same logits."""
from __future__ import annotations

import json

import pytest
import torch
from modeling_utils import naive_forward, tiny_base
from safetensors.torch import save_file

from comet_ext.config import CometConfig
from comet_ext.convert import main as convert_main
from comet_ext.modeling import CometForCausalLM

VOCAB = 97 + 2 + 4  # + placeholder, temp beacon, 4 global beacons


def write_reference_checkpoint(model: CometForCausalLM, folder, shards: int = 1) -> None:
    """Lays a comet model out the way the reference implementation saves MemQwen3ForCausalLM."""
    cc = model.comet_config
    emb = model.base.model.embed_tokens.weight.detach().clone()
    emb[98] = model.compression_embedding.detach()[0]
    emb[99:103] = model.readout_embedding.detach()
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().clone()
        if key.startswith("base.model.layers."):
            i, rest = key[len("base.model.layers."):].split(".", 1)
            state[f"model.layers.{i}.inner_layer.{rest}"] = value
        elif key.startswith("memory_layers."):
            i, rest = key[len("memory_layers."):].split(".", 1)
            rest = (rest.replace("temp_memory_net.norm.", "temp_memory_net.0.")
                        .replace("temp_memory_net.rla.", "temp_memory_net.1."))
            state[f"model.layers.{i}.{rest}"] = value
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
