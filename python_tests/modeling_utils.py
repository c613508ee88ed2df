"""Tiny random models of every supported family (offline, built from configs) and
the naive reference-structure oracle of the CoMeT forward."""
from __future__ import annotations

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from comet_ext import reference as ref
from comet_ext.config import CometConfig
from comet_ext.modeling import CometForCausalLM
from comet_ext.segments import plan_segment

VOCAB = 97
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
}


def tiny_base(family: str, seed: int = 0, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(**{**_COMMON, **extra, **overrides})
    config._attn_implementation = "eager"
    return model_cls(config).eval()


def tiny_comet(family: str = "llama", seed: int = 0, **comet) -> CometForCausalLM:
    """A tiny CoMeT model whose memory modules are random (not the identity init),
    so that every path of the memory shows in the outputs."""
    cfg = CometConfig(**{**dict(chunk_size=16, num_global=4, temp_stride=4, temp_budget=6, rla_rank=2), **comet})
    model = CometForCausalLM.from_base(tiny_base(family, seed), cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.memory_layers.named_parameters():
            base = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    return model


@torch.no_grad()
def naive_forward(model: CometForCausalLM, ids: torch.Tensor, chunk_sizes: list[int]) -> torch.Tensor:
    """Text-token logits computed the reference implementation's way: memory rows are
    placeholder rows in the sequence, replaced at every layer's input by that layer's
    memory, and the *full* HF decoder layer runs over all rows (causal mask, positions
    from 0). Memory updates use comet_ext.reference. -> (B, T, vocab)."""
    cc = model.comet_config
    layers, dec = model.decoder.layers, model.decoder
    B, L, G = ids.shape[0], len(layers), cc.num_global
    state, glob = [None] * L, [None] * L
    fifo = [ids.new_zeros(0).float().new_zeros(B, 0, model.config.hidden_size) for _ in range(L)]
    out, start = [], 0
    for n in chunk_sizes:
        seg = plan_segment(cc, [0] * B, [n] * B, [True] * B, ids.device)
        chunk = model._embed(seg, ids[:, start:start + n])
        start += n
        n_mem = (G if glob[0] is not None else 0) + fifo[0].shape[1]
        S = n_mem + chunk.shape[1]
        pos = torch.arange(S).unsqueeze(0)
        cos, sin = dec.rotary_emb(chunk, pos)
        mask = torch.full((S, S), float("-inf")).triu(1).view(1, 1, S, S).expand(B, 1, S, S)
        x = torch.cat([chunk.new_zeros(B, n_mem, chunk.shape[-1]), chunk], dim=1)
        for l, layer in enumerate(layers):
            mem = [glob[l]] if glob[l] is not None else []
            x = torch.cat(mem + [fifo[l], x[:, n_mem:]], dim=1)  # this layer's memory into the placeholders
            x = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
            y = x[:, n_mem:]
            net = model.memory_layers[l]
            t = net.temp_memory_net
            comp = y[:, seg.comp_rows[0, : int(seg.comp_count[0])]]
            m = ref.rla(comp, t.rla.down_proj.weight, t.rla.up_proj.weight, t.norm.weight, t.norm.eps)
            g = net.global_memory_net
            readout = y[:, seg.readout_rows[0]]
            state[l], glob[l] = ref.gated_update(readout, state[l], g.norm.weight, g.g_proj.weight,
                                                 g.o_proj.down_proj.weight, g.o_proj.up_proj.weight)
            if cc.uses_temp_memory:
                fifo[l] = torch.cat([fifo[l], m], dim=1)[:, -cc.temp_budget:]
        text = x[:, n_mem:][:, seg.text_rows[0]]
        out.append(model.base.lm_head(dec.norm(text)))
    return torch.cat(out, dim=1)
