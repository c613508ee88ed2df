"""Tiny random models of every supported family (offline, built from configs) and
the naive reference-structure oracle of the CoMeT forward."""
from __future__ import annotations

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from comet_ext.reference import naive_comet_forward as naive_forward  # noqa: F401  (re-exported for tests)
from comet_ext.config import CometConfig
from comet_ext.modeling import CometForCausalLM

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


# Calls that make the host wait for the device when their tensor lives on one: a value read
# back, a nonzero's size, a copy to the host, a tensor made from host values on a device.
_HOST_READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy",
               "masked_select"}


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts, under the mode, the calls in comet_ext that would make the host wait for a GPU:
    {(call, the comet_ext function:line that made it): count}. On the CPU nothing waits, so this
    counts what the code asks for, not what it costs; a plain `.to(device)` copy is not seen
    (test_cuda counts real syncs on a GPU with torch.cuda.set_sync_debug_mode)."""

    def __init__(self):
        super().__init__()
        import collections

        self.counts = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _HOST_READS or (name in ("tensor", "as_tensor") and kwargs.get("device") is not None):
            import traceback

            frames = [f for f in traceback.extract_stack()[:-1] if "/comet_ext/" in f.filename]
            if frames:
                self.counts[(name, f"{frames[-1].name}:{frames[-1].lineno}")] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())
