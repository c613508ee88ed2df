"""CometForCausalLM: a pre-trained HF decoder with the CoMeT memory.

One chunk through one layer (`_layer_segment`) is the unit everything is built
from. Streaming (`read`, `generate`) runs it chunk-outer, layer-inner on a
`CometMemory` updated in place; the training forward runs it layer-outer,
chunk-inner on functional state so gradients flow through the memories. Both
follow docs/model.md exactly, computed its fast way: memory rows only
contribute keys / values.

Shapes: B batch, T text tokens, N rows of a segment, d hidden, G = num_global,
C = temp_budget, Hkv kv heads, D head dim, L layers.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import numbers
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import ModelOutput

from . import arguments, checkpoint, generation, ops, planner
from .config import CometConfig
from .families import Family, apply_rope, check_positions, family_of, kv_projection, layer_step, pack_keys
from .graphs import StepGraphs
from .memory_modules import CometLayerMemory, MemoryEmbeddings
from .memory import CometMemory, HostCounts, signature_diff
from .train_memory import FifoWindow, TrainMemory, loss_divisor
from .segments import Segment, gather_rows, max_chunk_rows, max_compression_rows, plan_segment
from .transfer import upload


# transformers.Trainer's label smoothing (label_smoothing_factor) shifts the labels against the logits
# only for the causal-LM classes named here; for any other class it compares logits[p] with labels[p]
MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault("comet_ext", "CometForCausalLM")


@dataclass
class CometOutput(ModelOutput):
    """loss when labels are given; logits (B, T, vocab) for the text tokens, aligned with
    input_ids. An HF ModelOutput (``out.loss``, ``out["loss"]``, ``out[0]``), so
    transformers.Trainer and other HF tools take it as they take a CausalLMOutput."""

    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None


class CometBackbone(nn.Module):
    """`model.base_model` of a CometForCausalLM: what an HF ...ForCausalLM's base model is, all but
    the LM head, memory included. Its forward takes the model's forward arguments but the loss's
    (labels, return_logits, num_items_in_batch) and returns a BaseModelOutput whose
    last_hidden_state (B, T, d) holds the final-normed hidden states of the text tokens at the
    caller's positions (only logits_to_keep's, when given), so that lm_head(last_hidden_state)
    is the forward's logits: what TRL's fused LM head reads. It holds the model without owning
    it (no submodule, no parameter of its own); its train / eval mode is the model's."""

    _tp_plan = _pp_plan = None  # (PreTrainedModel asks its base model for parallel plans)

    def __init__(self, model: "CometForCausalLM"):
        super().__init__()
        self.__dict__["model"] = model  # not a submodule: the model owns the backbone, not the reverse

    @property
    def training(self) -> bool:
        model = self.__dict__.get("model")
        return model.training if model is not None else True

    @training.setter
    def training(self, mode: bool) -> None:  # (nn.Module's init and train() set it)
        if self.__dict__.get("model") is not None:
            self.model.train(mode)

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                chunk_sizes: Optional[Sequence[int]] = None, recompute: Optional[bool] = None,
                memory: Optional[CometMemory] = None, position_ids: Optional[Tensor] = None,
                logits_to_keep: int | Tensor = 0, inputs_embeds: Optional[Tensor] = None,
                output_attentions: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None, use_cache: Optional[bool] = None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput

        arguments.check_hf_arguments("base_model", output_attentions, output_hidden_states, return_dict, kwargs)
        hidden = self.model._forward(input_ids, None, chunk_sizes, attention_mask, recompute, True, memory, None,
                                     position_ids, logits_to_keep, inputs_embeds, head=False)
        return BaseModelOutput(last_hidden_state=hidden)


class CometForCausalLM(PreTrainedModel, GenerationMixin):
    """A decoder LM (Llama, Mistral, Qwen2, Qwen3) with the CoMeT memory.

    Build one with :meth:`from_base`, save with :meth:`save_pretrained`, reload with
    :meth:`from_pretrained`. Stream any length with :meth:`read`; decode with
    :meth:`generate` (HF's arguments; the memory replaces the KV cache); train with
    the forward (``model(input_ids, labels=..., chunk_sizes=...)``).

    A PreTrainedModel whose config is the base model's own (plus a "comet"
    entry on save); the HF decoder is kept whole in ``self.base`` and driven
    layer by layer.
    """

    config_class = PretrainedConfig
    base_model_prefix = "comet"
    _supports_sdpa = True
    supports_gradient_checkpointing = True  # as the forward's recompute (activation_checkpointing_enable)
    # transformers.Trainer then passes num_items_in_batch (the labelled tokens of the whole step, every
    # gradient-accumulation micro-batch): each micro-batch's loss is its share of the step's token mean
    accepts_loss_kwargs = True

    def __init__(self, base: nn.Module, comet_config: CometConfig):
        family = family_of(base.config)  # (before PreTrainedModel's checks, which fail on MoE configs unnamed)
        if not isinstance(getattr(base, "model", None), nn.Module) or base.get_output_embeddings() is None:
            raise ValueError(f"from_base: expected a causal LM (a ...ForCausalLM: a decoder under .model and an "
                             f"lm_head), got {type(base).__name__}")
        super().__init__(base.config)
        self.family: Family = family
        cfg = base.config
        d = cfg.hidden_size
        # first of the model's modules: its parameters come first, where the two parameters it
        # replaced were, so optimizer states saved before (indexed by order) still fit
        self.memory_embeddings = MemoryEmbeddings(d, comet_config.num_global)
        self.base = base
        self.comet_config = comet_config
        self.config = cfg
        if getattr(base, "generation_config", None) is not None:  # a checkpoint's generation_config.json
            self.generation_config = copy.deepcopy(base.generation_config)
        self.memory_layers = nn.ModuleList(
            CometLayerMemory(d, comet_config.rla_rank) for _ in range(cfg.num_hidden_layers)
        )
        emb = base.get_input_embeddings().weight
        self.memory_embeddings.to(device=emb.device, dtype=emb.dtype)
        self.memory_layers.to(device=emb.device, dtype=emb.dtype)
        self.reset_memory_parameters()
        # state dicts read from model.safetensors (Trainer's resume) use the saved key layout
        self.register_load_state_dict_pre_hook(checkpoint.remap_saved_keys)
        self.comet_lora: Optional[dict] = None  # apply_lora's settings while its adapters are in
        self._step_graphs: Optional[StepGraphs] = None  # use_cuda_graphs()
        self._recompute = False  # the forward's default; activation_checkpointing_enable()

    # ------------------------------------------------------------------ construction

    @property
    def base_model(self) -> CometBackbone:
        """All but the LM head, as HF's `base_model` of a causal LM (see CometBackbone)."""
        backbone = self.__dict__.get("_backbone")
        if backbone is None or backbone.model is not self:  # (a copy.deepcopy of the model copies it too)
            backbone = self.__dict__["_backbone"] = CometBackbone(self)
        return backbone

    @property
    def comet_config(self) -> CometConfig:
        """The CoMeT settings. Those that shape no weight (chunk_size, temp_stride, temp_budget,
        gate_snap) may be replaced on a built model, e.g. with `dataclasses.replace`; num_global
        and rla_rank are the weights' own (resize_global_memory changes num_global)."""
        return self._comet_config

    @comet_config.setter
    def comet_config(self, value: CometConfig) -> None:
        if not isinstance(value, CometConfig):
            raise ValueError(f"comet_config must be a CometConfig, got {type(value).__name__}")
        if "memory_layers" in self._modules:  # built: the weights fix the sizes
            weights = {"num_global": self.memory_embeddings.readout.shape[0],
                       "rla_rank": self.memory_layers[0].global_memory_net.rla.down.shape[0]}
            differ = {k: (getattr(value, k), n) for k, n in weights.items() if getattr(value, k) != n}
            if differ:
                raise ValueError(
                    "comet_config: " + ", ".join(f"{k}={new} does not fit the model's weights ({k} {n})"
                                                 for k, (new, n) in differ.items())
                    + "; use resize_global_memory(n) for a model with n global slots, a new model for another rank")
        rows = max_chunk_rows(value)
        try:
            check_positions(self.config, rows, f"2 x num_global {value.num_global} + the FIFO's "
                            f"{value.fifo_capacity} + chunk_size {value.chunk_size} + its "
                            f"{max_compression_rows(value)} compression rows")
        except ValueError as e:
            raise ValueError(f"comet_config: {e}") from None
        self._comet_config = value

    @torch.no_grad()
    def reset_memory_parameters(self) -> None:
        """Initialises the CoMeT modules: RLAs start as the identity (up = 0), the gate
        at 1/2, the new token embeddings like the vocabulary's."""
        std = float(self.base.get_input_embeddings().weight.float().std())
        init = getattr(self.config, "initializer_range", 0.02)
        for layer in self.memory_layers:
            for rla in (layer.global_memory_net.rla, layer.temp_memory_net.rla):
                nn.init.normal_(rla.down, std=init)
                nn.init.zeros_(rla.up)
            nn.init.zeros_(layer.global_memory_net.gate.weight)
            nn.init.ones_(layer.global_memory_net.norm.weight)
            nn.init.ones_(layer.temp_memory_net.norm.weight)
        nn.init.normal_(self.memory_embeddings.compression, std=std)
        nn.init.normal_(self.memory_embeddings.readout, std=std)

    @torch.no_grad()
    def resize_global_memory(self, num_global: int, noise: float = 0.0,
                             generator: Optional[torch.Generator] = None) -> None:
        """Gives a (trained) model `num_global` global-memory slots, as
        `resize_token_embeddings` gives it a vocabulary: the readout embedding becomes
        (num_global, d). Shrinking keeps the first `num_global` slots. Growing keeps the old
        ones and fills slot i >= old with a copy of slot i mod old plus Gaussian noise of
        `noise` x the embedding's standard deviation: the gate and the RLA are shared by all
        slots, so a copied slot starts out read and written like its original, and the noise
        lets the two drift apart. Memories read before the resize no longer fit the model, and
        an optimizer built before it holds the old parameter: build it after."""
        if isinstance(num_global, bool) or not isinstance(num_global, int) or num_global < 1:
            raise ValueError(f"resize_global_memory: num_global must be an int >= 1, got {num_global!r}")
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0.0 <= noise < math.inf:
            raise ValueError(f"resize_global_memory: noise must be a finite number >= 0, got {noise!r}")
        if not isinstance(self.memory_embeddings, MemoryEmbeddings):  # PEFT's modules_to_save wrapper
            raise ValueError(f"resize_global_memory: memory_embeddings is wrapped "
                             f"({type(self.memory_embeddings).__name__}, PEFT's modules_to_save?); resize the model "
                             f"before get_peft_model")
        trainable = self.memory_embeddings.readout.requires_grad
        old = self.memory_embeddings.readout.detach()
        index = torch.arange(num_global, device=old.device) % old.shape[0]
        new = old[index].clone()
        if num_global > old.shape[0] and noise > 0:
            extra = new[old.shape[0]:]
            jitter = torch.randn(extra.shape, generator=generator, dtype=torch.float32, device="cpu")
            extra += (jitter * noise * old.float().std().item()).to(extra)
        self.memory_embeddings.readout = nn.Parameter(new, requires_grad=trainable)
        self.comet_config = dataclasses.replace(self.comet_config, num_global=num_global)

    @classmethod
    def from_base(cls, model_or_path, comet_config: Optional[CometConfig] = None, **load_kwargs) -> "CometForCausalLM":
        """Adds the CoMeT memory to a pre-trained HF causal LM (a model or a local folder)."""
        comet_config = comet_config or CometConfig()
        if isinstance(model_or_path, (str, os.PathLike)):
            from transformers import AutoModelForCausalLM

            load_kwargs.setdefault("local_files_only", True)
            model_or_path = AutoModelForCausalLM.from_pretrained(model_or_path, **load_kwargs)
        if not isinstance(model_or_path, nn.Module) or not hasattr(model_or_path, "config"):
            raise ValueError(f"from_base: expected an HF causal LM or a folder, got {type(model_or_path).__name__}")
        return cls(model_or_path, comet_config)

    def save_pretrained(self, folder: str | os.PathLike, is_main_process: bool = True,
                        state_dict: Optional[dict[str, Tensor]] = None, safe_serialization: bool = True,
                        push_to_hub: bool = False, max_shard_size: int | str = "50GB", **unsupported) -> None:
        """config.json (the base config, its dtype and a "comet" entry), generation_config.json
        and the weights, written atomically together: a failed save leaves the folder's previous
        model whole (the layout: comet_ext/checkpoint.py). The weights are model.safetensors, or
        above max_shard_size (bytes, or a size such as "5GB"; HF's default) HF's shards and
        index. HF's arguments as transformers.Trainer passes them: is_main_process=False writes
        nothing (other ranks), state_dict saves that state (e.g. gathered from shards) instead of
        the model's. Only safetensors, no hub. LoRA adapters from apply_lora are saved with their
        settings."""
        if unsupported:
            raise TypeError(f"save_pretrained: unsupported arguments {sorted(unsupported)}")
        if not safe_serialization:
            raise ValueError("save_pretrained: safe_serialization=False is not supported (safetensors only)")
        if push_to_hub:
            raise ValueError("save_pretrained: push_to_hub=True is not supported (comet_ext never uses the network)")
        if not is_main_process:
            return
        checkpoint.save(self, os.fspath(folder), state_dict, checkpoint.tied_keys(self), max_shard_size)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, dtype: Optional[torch.dtype | str] = None,
                        device: Optional[torch.device | str] = None) -> "CometForCausalLM":
        """Loads a model saved by :meth:`save_pretrained`, or a reference-implementation
        checkpoint (local folder, no download). dtype: a torch.dtype, its name, or
        None / "auto" for the dtype it was saved in."""
        folder = os.fspath(folder)
        cfg_path = os.path.join(folder, checkpoint.CONFIG_NAME)
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"from_pretrained: no {checkpoint.CONFIG_NAME} in {folder!r}")
        from .convert import is_reference_config, load_reference, read_json

        raw = read_json(cfg_path, "the config")
        if not isinstance(raw, dict):
            raise ValueError(f"from_pretrained: {cfg_path!r} holds no config (a JSON object)")
        if is_reference_config(raw):  # a reference-implementation checkpoint: convert on load
            model = load_reference(folder, dtype=checkpoint.resolve_dtype(dtype, raw.get("dtype") or raw.get("torch_dtype")))
            return model.to(device) if device is not None else model
        if "comet" not in raw:
            raise ValueError(f"from_pretrained: {folder!r} holds no CoMeT model (its config has no 'comet' entry); "
                             "use CometForCausalLM.from_base to add the memory to a plain model")
        if not isinstance(raw["comet"], dict):
            raise ValueError(f"from_pretrained: the 'comet' entry of {cfg_path!r} must be the CoMeT config "
                             f"(a JSON object), got {raw['comet']!r}")
        return checkpoint.load(cls, folder, dtype, device)

    # ------------------------------------------------------------------ helpers

    # the base model's embeddings, as HF tools (resize_token_embeddings, PEFT) expect them
    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.base.set_input_embeddings(value)

    def get_output_embeddings(self) -> Optional[nn.Module]:
        return self.base.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.base.set_output_embeddings(value)

    def resize_token_embeddings(self, *args, **kwargs) -> nn.Embedding:
        """HF's resize_token_embeddings, on the base model (its config is this model's)."""
        return self.base.resize_token_embeddings(*args, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.memory_embeddings.readout.device

    @property
    def dtype(self) -> torch.dtype:
        return self.memory_embeddings.readout.dtype

    @property
    def decoder(self) -> nn.Module:
        return self.base.model

    def memory_signature(self) -> dict:
        """What a CometMemory must agree on to belong to this model."""
        c = self.config
        return {"model_type": c.model_type, "hidden_size": c.hidden_size, "num_layers": c.num_hidden_layers,
                "num_kv_heads": c.num_key_value_heads, "head_dim": self._head_dim(),
                **{f"comet.{k}": v for k, v in self.comet_config.to_dict().items()
                   if k != "gate_snap"}}  # a memory read with another snap still fits

    def _head_dim(self) -> int:
        return self.decoder.layers[0].self_attn.head_dim

    def _rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin (B, N, D) for integer positions (B, N)."""
        dummy = torch.empty(0, dtype=self.dtype, device=self.device)
        return self.decoder.rotary_emb(dummy, positions)

    def _embed(self, seg: Segment, text: Tensor) -> Tensor:
        """Rows of a segment: its text's embeddings, the compression embedding, readout embeddings.
        text: the segment's tokens (B, n), or their embeddings (B, n, d) (looked up already, or a
        caller's inputs_embeds)."""
        n = text.shape[1]
        index = seg.token.clamp(max=max(n - 1, 0))
        if text.dim() == 3:  # (indexing: torch.gather would keep all of text for backward)
            emb = text[torch.arange(index.shape[0], device=index.device).unsqueeze(1), index] if n \
                else text.new_zeros(*index.shape, text.shape[-1])  # (closing rows alone: no text row to fill)
        else:
            emb = self.decoder.embed_tokens(torch.gather(text, 1, index) if n else torch.zeros_like(seg.token))
        return self.memory_embeddings(emb, seg.kind, seg.slot)

    # ------------------------------------------------------------------ memory

    def new_memory(self, batch_size: int) -> CometMemory:
        """An empty memory for a batch: nothing read yet."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"new_memory: batch_size must be an int >= 1, got {batch_size!r}")
        # made outside inference mode, even under it: steps write the buffers in place, also after it
        with torch.inference_mode(False):
            memory = CometMemory(**{f: torch.zeros(shape, dtype=dtype, device=self.device)
                                    for f, (shape, dtype) in self.memory_layout(batch_size).items()},
                                 signature=self.memory_signature())
        memory.record_host_counts(HostCounts.empty(batch_size))
        return memory

    def memory_layout(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """{field: (shape, dtype)} of this model's memory for a batch (see CometMemory)."""
        c, cc, B = self.config, self.comet_config, batch_size
        L = c.num_hidden_layers

        def keys(rows: int) -> tuple[tuple[int, ...], torch.dtype]:
            return (L, B, rows, c.num_key_value_heads, self._head_dim()), self.dtype

        per_layer, per_sample = ((L, B), torch.long), ((B,), torch.long)
        rows, fifo, pending = keys(self._kv_rows()), keys(cc.fifo_capacity), keys(max_compression_rows(cc))
        return {"state": ((L, B, cc.num_global, c.hidden_size), self.dtype), "kv_k": rows, "kv_v": rows,
                "fifo_k": fifo, "fifo_v": fifo, "fifo_head": per_layer, "fifo_len": per_layer,
                "pending_k": pending, "pending_v": pending, "has_global": ((B,), torch.bool),
                "mem_len": per_sample, "open_rows": per_sample, "open_text": per_sample, "pending": per_sample,
                "tokens": per_sample}

    def _kv_rows(self) -> int:
        """Rows of a streaming memory's key / value buffer: the global rows, the FIFO, the open
        chunk's rows, and the closing segment's readout rows after them."""
        cc = self.comet_config
        return cc.num_global + cc.fifo_capacity + cc.chunk_size + max_compression_rows(cc) + cc.num_global

    def _memory_rows_kv(self, l: int, global_k: Tensor, global_v: Tensor, has_global: Tensor,
                        fifo: tuple[Tensor, Tensor, Tensor, Tensor], rope: tuple[Tensor, Tensor],
                        all_global: Optional[bool] = None) -> tuple[Tensor, Tensor, Tensor]:
        """Keys / values of layer l's memory rows, packed per sample: the global rows
        (positions 0..G-1) if the sample has them, then its FIFO rows (positions G..).
        fifo: the ring (k, v (B, C, Hkv, D) pre-RoPE, head, length). rope: _memory_rope(C).
        all_global: whether every sample has global rows, when known on the host.
        -> k, v (B, G + C, Hkv, D), RoPE'd; mem_len (B,)."""
        fifo_k, fifo_v, head, length = fifo
        if fifo_k.shape[1]:
            G = global_k.shape[1]
            fifo_k = ops.fifo_view(fifo_k, head, length, rope[0][G:], rope[1][G:])
            fifo_v = ops.fifo_view(fifo_v, head, length)
        return self._pack_memory_kv(global_k, global_v, has_global, fifo_k, fifo_v, length, all_global)

    def _memory_rope(self, fifo_rows: int) -> tuple[Tensor, Tensor]:
        """RoPE tables (G + fifo_rows, D) of the memory rows: the global rows at positions
        0..G-1, then FIFO rows from G on, oldest first. The same for every layer and chunk,
        so a step works them out once."""
        n = self.comet_config.num_global + fifo_rows
        cos, sin = self._rope(torch.arange(n, device=self.device).unsqueeze(0))
        return cos[0], sin[0]

    @staticmethod
    def _pack_memory_kv(global_k: Tensor, global_v: Tensor, has_global: Tensor, fifo_k: Tensor, fifo_v: Tensor,
                        length: Tensor, all_global: Optional[bool] = None) -> tuple[Tensor, Tensor, Tensor]:
        """Per sample its global rows (if it has them), then its FIFO rows (B, C, Hkv, D), oldest
        first, RoPE'd -> packed k, v (B, G + C, Hkv, D), mem_len (B,)."""
        n_global = has_global.long() * global_k.shape[1]
        return (pack_keys(global_k, n_global, fifo_k, length, all_global),
                pack_keys(global_v, n_global, fifo_v, length, all_global), n_global + length)

    def _global_kv(self, l: int, memory_rows: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Keys (RoPE'd at positions 0..G-1) and values of layer l's global memory rows (B, G, d).
        rope: _memory_rope(...)."""
        k, v = kv_projection(self.decoder.layers[l], self.family, memory_rows)
        G = memory_rows.shape[1]
        return apply_rope(k, rope[0][:G], rope[1][:G]), v

    # ------------------------------------------------------------------ one layer, one segment

    def _layer_segment(self, l: int, x: Tensor, seg: Segment, cos: Tensor, sin: Tensor,
                       prefix_k: Tensor, prefix_v: Tensor, prefix_lens: Tensor,
                       plan: Optional["_StepPlan"] = None, prefix_full: Optional[bool] = None):
        """Layer l over a segment's rows x (B, N, d) -> (output, compression rows' pre-RoPE
        k / v (B, n_comp, Hkv, D), readout rows' output (B, G, d)). With a streaming step's
        plan the new rows' keys / values are appended to the packed buffers prefix_k / v in
        place; without one (training) the layer reads prefix_k / v and writes nothing
        (prefix_full: whether every sample's prefix_lens fills prefix_k, known on the host)."""
        layer = self.decoder.layers[l]
        if plan is not None:
            y, k, v = _layer_step_cached(layer, self.family, x, cos, sin, prefix_k, prefix_v, plan, prefix_lens,
                                         seg.q_lens)
        else:
            y, k, v = layer_step(layer, self.family, x, cos, sin, prefix_k, prefix_v, prefix_lens, seg.q_lens,
                                 prefix_full)
        comp_k = comp_v = None
        if seg.comp_rows.shape[1]:
            m = self.memory_layers[l].temp_memory_net(gather_rows(y, seg.comp_rows))
            comp_k, comp_v = kv_projection(layer, self.family, m)
        readout = gather_rows(y, seg.readout_rows) if any(seg.closing_list) else None
        return y, comp_k, comp_v, readout

    def _update_global(self, l: int, readout: Tensor, state: Tensor, has_global: Tensor, seg: Segment,
                       has_global_list: Sequence[bool]) -> tuple[Tensor, Tensor]:
        """Gated update for the closing samples; others keep their state. -> (state, memory rows).
        has_global_list: has_global on the host (what to compute is decided without the device)."""
        net = self.memory_layers[l].global_memory_net
        closing = seg.closing
        pairs = list(zip(seg.closing_list, has_global_list))
        snap = self.comet_config.gate_snap
        with_state = net(readout, state, snap) if any(c and g for c, g in pairs) else None
        without = net(readout, None) if any(c and not g for c, g in pairs) else None
        if with_state is None:
            new_state, memory = without
        elif without is None:
            new_state, memory = with_state
        else:
            pick = has_global.view(-1, 1, 1)
            new_state = torch.where(pick, with_state[0], without[0])
            memory = torch.where(pick, with_state[1], without[1])
        keep = closing.view(-1, 1, 1)
        return torch.where(keep, new_state, state), memory

    # ------------------------------------------------------------------ streaming

    @torch.no_grad()
    def _stream_step(self, memory: CometMemory, tokens: Tensor, take: list[int],
                     global_memory: bool = True, cut: Optional[list[bool]] = None) -> tuple[Tensor, Segment]:
        """Appends `take[b]` tokens (tokens (B, max take), or their embeddings (B, max take, d);
        width 0 when no sample takes one) to each sample's open chunk, through every layer,
        closing chunks that fill up, and those with cut[b] set after their tokens. A sample that
        takes none but has cut[b] set closes the chunk it has open with the closing rows alone
        (segments.plan_segment); a chunk with no text never closes. -> (final hidden (B, N, d), segment).
        global_memory=False: closing chunks leave the (empty) global memory empty."""
        cc = self.comet_config
        host = memory.host_counts()
        cut = cut if cut is not None else [False] * len(take)
        close = [o + t > 0 and (o + t >= cc.chunk_size or c) for o, t, c in zip(host.open_text, take, cut)]
        seg = plan_segment(cc, host.open_text, take, close, self.device)
        x = self._embed(seg, tokens)
        prefix_lens = memory.mem_len + memory.open_rows
        positions = prefix_lens.unsqueeze(1) + torch.arange(seg.num_rows, device=self.device)
        cos, sin = self._rope(positions)
        closing = seg.closing
        has_global = memory.has_global | closing if global_memory else memory.has_global
        graphed = self._step_graphs is not None and x.is_cuda
        # Recorded steps read the whole key buffer (attention stops at each sample's k_lens anyway):
        # decode steps, whose key count grows by one a token, then share one recording.
        plan = _StepPlan.build(memory, host, seg, close, global_memory, full_width=graphed)
        counts = memory_rope = None
        if plan.any_closing:  # shared by every layer
            memory_rope = self._memory_rope(memory.fifo_k.shape[2])
            counts = torch.where(closing, memory.pending + seg.comp_count, 0)
        args = (x, seg, plan, cos, sin, prefix_lens, has_global, counts, memory_rope)
        layers = functools.partial(self._step_layers, memory, global_memory)
        try:  # the in-place part: every layer writes its memory, then the counters move
            if graphed:
                x = self._step_graphs.run(layers, args, (global_memory, self._graph_context(memory)))
            else:
                x = layers(*args)
            # Bookkeeping shared by all layers.
            memory.tokens += seg.text_count
            memory.open_text += seg.text_count
            memory.open_rows += seg.q_lens
            memory.pending += seg.comp_count
            if plan.any_closing:
                G = self.comet_config.num_global
                # in place: a recorded step reads these very tensors
                memory.has_global.copy_(has_global)
                fifo_len = memory.fifo_len[0]
                memory.mem_len.copy_(torch.where(closing, G * has_global.long() + fifo_len, memory.mem_len))
                for t in (memory.open_rows, memory.open_text, memory.pending):
                    t.masked_fill_(closing, 0)
            memory.record_host_counts(_counts_after(host, seg, take, global_memory, G=cc.num_global,
                                                    C=memory.fifo_k.shape[2]))
        except BaseException as e:  # Ctrl-C, out of memory...: some layers have written their part, not all
            memory.mark_interrupted(type(e).__name__)
            raise
        return x, seg

    def _step_layers(self, memory: CometMemory, global_memory: bool, x: Tensor, seg: Segment, plan: "_StepPlan",
                     cos: Tensor, sin: Tensor, prefix_lens: Tensor, has_global: Tensor, counts: Optional[Tensor],
                     memory_rope: Optional[tuple[Tensor, Tensor]]) -> Tensor:
        """The layer loop of a streaming step: every layer over the segment's rows x (B, N, d) ->
        the final hidden rows, writing the memory in place (the new rows' keys / values; for
        closing chunks the global state, the FIFO and the memory rows' keys / values). It reads
        nothing but its arguments, the memory's buffers and the model's parameters, and decides
        nothing from tensor values: StepGraphs records it as is."""
        L = self.config.num_hidden_layers
        for l in range(L):
            x, comp_k, comp_v, readout = self._layer_segment(
                l, x, seg, cos, sin, memory.kv_k[l], memory.kv_v[l], prefix_lens, plan)
            if comp_k is not None and plan.comp_rows is not None:  # park them until their chunk closes
                plan.comp_rows.apply(memory.pending_k[l], comp_k)
                plan.comp_rows.apply(memory.pending_v[l], comp_v)
            if readout is None:
                continue
            rows = memory.state[l]  # unread when the global memory is off (has_global stays False)
            if global_memory:
                state, rows = self._update_global(l, readout, memory.state[l], memory.has_global, seg,
                                                  plan.has_global)
                memory.state[l].copy_(state)
            if memory.fifo_k.shape[2]:
                head, length = memory.fifo_head[l], memory.fifo_len[l]
                h0, n0 = head.clone(), length.clone()
                ops.fifo_push(memory.fifo_k[l], head, length, memory.pending_k[l], counts)
                ops.fifo_push(memory.fifo_v[l], h0, n0, memory.pending_v[l], counts)
            gk, gv = self._global_kv(l, rows, memory_rope)
            mk, mv, _ = self._memory_rows_kv(
                l, gk, gv, has_global,
                (memory.fifo_k[l], memory.fifo_v[l], memory.fifo_head[l], memory.fifo_len[l]), memory_rope,
                plan.all_global)
            n, idx = mk.shape[1], plan.closing_idx
            if plan.all_closing:
                memory.kv_k[l, :, :n] = mk
                memory.kv_v[l, :, :n] = mv
            else:
                memory.kv_k[l, idx, :n] = mk[idx]
                memory.kv_v[l, idx, :n] = mv[idx]
        return x

    def _graph_context(self, memory: CometMemory) -> tuple:
        """What a recorded step reads or writes by address without being given it: the memory's
        buffers and the model's parameters (a moved or re-cast model has new ones); the gate
        snap, a number the recording bakes in (a changed comet_config records anew); and the
        train / eval mode (dropout, adapters' switches)."""
        return (tuple(t.data_ptr() for t in memory.buffers()),
                tuple(p.data_ptr() for p in self.parameters()), self.comet_config.gate_snap, self.training)

    def use_cuda_graphs(self, enabled: bool = True, capacity: int = 8) -> "CometForCausalLM":
        """On a CUDA device, record the layer loop of a streaming step as a CUDA graph the second
        time its shape comes up and replay it from then on (comet_ext/graphs.py): every full chunk
        of a long read then costs one graph launch instead of a few hundred kernel launches per
        layer. Keeps up to `capacity` recordings. Off by default. Returns the model."""
        self._step_graphs = StepGraphs(capacity) if enabled else None
        return self

    @torch.no_grad()
    def read(self, input_ids: Optional[Tensor] = None, memory: Optional[CometMemory] = None,
             attention_mask: Optional[Tensor] = None, progress: Optional[bool] = None,
             return_last_hidden: bool = False, global_memory: bool = True,
             boundary_ids: Optional[Sequence[int]] = None, end_chunk: bool = False,
             inputs_embeds: Optional[Tensor] = None):
        """Streams input_ids (B, T) of any length into the memory, chunk by chunk.

        inputs_embeds (B, T, d) in place of input_ids: the rows' input embeddings (a soft
        prompt, another modality's features), read as the embeddings of tokens would be.

        attention_mask (B, T) marks real tokens, one run per row (padding on the right,
        the left or both): samples may have different lengths. Full chunks are closed
        (readout, memory update); the rest stays in the open chunk, which the next `read`
        or `generate` continues.

        boundary_ids (e.g. the ids of "." or a newline): cut chunks at semantic
        boundaries, as the training planner's `semantic` strategy does
        (`comet_ext.planner.semantic` gives the same sizes): where more of this call's
        tokens follow than the open chunk has room for, it closes right after the last
        boundary token that fits (at chunk_size when none does), so that a sentence is not
        torn across two chunks. A model reads best the way it was trained: one trained
        on fixed chunks only reads worse with cuts. Cuts are chosen within one call, so
        reading A then B equals reading A + B only where A ends at a closed chunk.

        end_chunk=True closes each sample's chunk after its last token of this call, full
        or not (a document ends here): the next `read` or `generate` starts a chunk of its
        own, as `chunk_sizes=[..., rest]` ends one in the training forward. A sample with no
        token in this call (all padding, or T = 0) closes the chunk it has open from earlier
        calls, as if those tokens had been read with end_chunk=True; with none open, nothing
        happens. `read(ids[:, :0], memory, end_chunk=True)` so closes every open chunk.

        A tqdm progress bar appears for inputs over 8 chunks unless progress=False.
        Returns the memory (and, with return_last_hidden, the final hidden state of
        each sample's last token, (B, d)).

        global_memory=False is the ablation "temporary memory only": closing
        chunks do not write the global memory, so only the FIFO carries
        information across chunks. It needs a memory with no global rows yet.
        """
        text = self._check_text("read", input_ids, inputs_embeds, allow_no_tokens=True)
        B, T = text.shape[:2]
        if boundary_ids is not None and text.dim() == 3:
            raise ValueError("read: boundary_ids needs input_ids (the boundary tokens are found among them), not "
                             "inputs_embeds")
        lengths, first = torch.stack(arguments.row_lengths(attention_mask, B, T)).tolist()  # (host tensors)
        if any(first):  # rows padded on the left: their tokens first, as if padded on the right
            text = arguments.tokens_first(text, torch.tensor(first))
        memory = memory if memory is not None else self.new_memory(B)
        self._check_memory(memory, B, "read")
        if not global_memory and any(memory.host_counts().has_global):
            raise ValueError("read: global_memory=False needs a memory without global rows (a fresh one, or "
                             "one read with global_memory=False)")
        bar = None
        if progress or (progress is None and T > 8 * self.comet_config.chunk_size):
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(lengths), unit="tok", desc="comet read")
        boundaries = self._boundary_positions(text, boundary_ids)
        last = self._read_steps(memory, text, lengths, global_memory, boundaries, end_chunk, bar,
                                want_last=return_last_hidden)
        if bar is not None:
            bar.close()
        return (memory, last) if return_last_hidden else memory

    def _read_steps(self, memory: CometMemory, text: Tensor, lengths: list[int], global_memory: bool = True,
                    boundaries: Optional[list[list[int]]] = None, end_chunk: bool = False, bar=None,
                    want_last: bool = True) -> Tensor:
        """read's loop, on checked arguments: the first lengths[b] tokens of text (ids (B, T) or
        embeddings (B, T, d)) into each sample's open chunk, a step at a time. -> the final hidden state of each
        sample's last token read (B, d), zeros where it read none (and everywhere unless
        want_last). The host decides every step from host values (lengths, the memory's host
        counters): nothing here waits on the device."""
        B, T = text.shape[:2]
        done = [0] * B
        last = torch.zeros(B, self.config.hidden_size, dtype=self.dtype, device=self.device)
        cs = self.comet_config.chunk_size
        while True:
            open_text = memory.host_counts().open_text
            room = [cs - o for o in open_text]
            left = [n - d for n, d in zip(lengths, done)]
            take = [min(n, r) for n, r in zip(left, room)]
            cut = [False] * B
            if boundaries is not None:
                take, cut = planner.cut_at_boundaries(boundaries, done, left, room)
            if end_chunk:
                # The chunk closes in the step that takes the sample's last token. A sample with
                # none left (none in this call) closes the chunk it has open in the first step,
                # appending only the closing rows; one whose chunk is closed has nothing to close.
                cut = [c or (t == n and o + t > 0) for c, t, n, o in zip(cut, take, left, open_text)]
            if not any(take) and not any(cut):
                break
            width = max(take)
            if min(done) == max(done):  # every sample at the same offset: a slice, no index copy
                tokens = text[:, done[0]:done[0] + width]
            else:
                idx = upload(torch.tensor(done), self.device).unsqueeze(1) + torch.arange(width, device=self.device)
                tokens = arguments.columns(text, idx.clamp(max=T - 1))
            hidden, seg = self._stream_step(memory, tokens, take, global_memory, cut)
            if want_last and seg.text_rows.shape[1]:  # (a step of closing rows alone has no text row)
                has = seg.text_count > 0
                rows = (seg.text_rows.gather(1, (seg.text_count - 1).clamp(min=0).unsqueeze(1))).squeeze(1)
                last = torch.where(has.unsqueeze(1), hidden[torch.arange(B, device=self.device), rows], last)
            done = [d + t for d, t in zip(done, take)]
            if bar is not None:
                bar.update(sum(take))
        return last

    @staticmethod
    def _boundary_positions(input_ids: Tensor, boundary_ids: Optional[Sequence[int]]) -> Optional[list[list[int]]]:
        """Per sample, the sorted positions of boundary tokens (None without boundary_ids)."""
        if boundary_ids is None:
            return None
        ids = list(boundary_ids) if not isinstance(boundary_ids, int) else None
        if ids is None or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"read: boundary_ids must be a non-empty sequence of token ids (int), got {boundary_ids!r}")
        hit = torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))
        return [row.nonzero().flatten().tolist() for row in hit.cpu()]

    # ------------------------------------------------------------------ generation

    def _next_logits(self, hidden: Tensor) -> Tensor:
        return self.base.lm_head(self.decoder.norm(hidden)).float()

    @torch.no_grad()
    def generate(self, input_ids: Optional[Tensor] = None, memory: Optional[CometMemory] = None,
                 attention_mask: Optional[Tensor] = None, generation_config=None, streamer=None, *,
                 inputs: Optional[Tensor] = None, inputs_embeds: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None, return_memory: bool = False,
                 global_memory: bool = True, **kwargs):
        """Decodes from the open chunk, after reading the prompt into the memory.

        input_ids (B, T) (or HF's `inputs`): the prompt, e.g. the question after a
        document read into `memory`; attention_mask (B, T): left padding (HF's layout
        for batched generation) or right padding, at least one token per sample; without
        one, as in HF, the prompt's pad_token_id tokens are padding (when pad_token_id is set
        and is not an EOS id). inputs_embeds (B, T, d): the prompt as input embeddings, read
        in place of input_ids' (as in HF: given alone, the output holds only the new tokens
        and the processors see only them; given with input_ids of the same shape, input_ids
        stand for the prompt in the output and the processors). A prepare_inputs_for_generation
        set on the model (PEFT's prompt learning sets one around its generate) is called once
        for the prompt when the memory is empty (none passed, or one that has read nothing), as
        HF's generate calls it before its first forward, with PEFT's task_ids, and what it
        returns (input_ids or inputs_embeds, attention_mask) is read: a soft prompt starts the
        memory, as it starts PEFT's empty cache.

        HF's settings, as keyword arguments or a GenerationConfig, over the model's
        `generation_config` (see comet_ext/generation.py): greedy or sampling, max_new_tokens /
        max_length, min_new_tokens / min_length, eos / pad ids, return_dict_in_generate with
        output_scores / output_logits, a `streamer` (HF's put / end protocol), and everything
        HF's logits processors and stopping criteria implement, built by transformers' own code:
        temperature, top_k, top_p, min_p, typical_p, repetition and n-gram penalties,
        bad_words_ids, suppress_tokens, sequence_bias, forced / decaying EOS, stop_strings (with
        `tokenizer`), max_time, and a caller's `logits_processor`, `stopping_criteria` and
        `prefix_allowed_tokens_fn`. `generator` seeds the sampling;
        without one it draws from torch's global RNG as HF's generate does (torch.manual_seed(s)
        then generate gives the tokens HF's would). num_return_sequences=k samples each prompt k
        times (greedy decoding refuses it, as HF's), each from its own copy of the memory (the
        memory passed in is then left as it was; return_memory gives the (B·k)-sample one). A
        setting it does not implement (beam search, assisted decoding, guidance_scale, ...)
        raises.

        Returns (B·k, T + new) ids like HF (T = 0 for a prompt given as inputs_embeds alone;
        padded with pad_token_id after a sample's EOS, or after the token that met a stopping
        criterion: HF pads there only when EOS ids are set, and otherwise goes on sampling for
        it), or HF's GenerateDecoderOnlyOutput with return_dict_in_generate (the scores and
        logits of a sample after its stop are not HF's: HF goes on feeding it pad tokens, CoMeT
        stops reading for it, so its logits repeat those of the step that chose its last token);
        with return_memory, (that, memory).
        Compression tokens are fed after every `temp_stride` text tokens of the open chunk and
        never appear in the output; a chunk that fills up is closed (readout, memory update)
        and a new one begins, so generation length is unbounded at constant memory. `memory`
        is updated in place and afterwards holds every returned token, EOS (or the stopping
        token) included, so a later `generate` continues the conversation. global_memory=False
        continues the "temporary memory only" ablation (see `read`).
        """
        if inputs is not None:
            if input_ids is not None:
                raise ValueError("generate: pass the prompt as input_ids or inputs, not both")
            input_ids = inputs
        if input_ids is None and inputs_embeds is None:
            raise ValueError("generate: input_ids (the prompt, e.g. the question after the document "
                             "read into `memory`) or inputs_embeds is required")
        hook = self.__dict__.get("prepare_inputs_for_generation")  # (PEFT puts the class's own back after)
        hook = None if getattr(hook, "__func__", None) is type(self).prepare_inputs_for_generation else hook
        hook_kwargs = {"task_ids": kwargs.pop("task_ids")} if hook is not None and "task_ids" in kwargs else {}
        vocab = self._vocab_size()
        ids_width, embeds_width = (t.shape[1] if isinstance(t, Tensor) and t.dim() >= 2 else 0
                                   for t in (input_ids, inputs_embeds))
        s = generation.resolve(self.generation_config, generation_config, kwargs,  # (lengths count what is read)
                               embeds_width if inputs_embeds is not None else ids_width, vocab, seq_tokens=ids_width)
        # (read takes a call of no tokens, to close chunks; decoding needs a prompt token to follow)
        for name, t in (("input_ids", input_ids), ("inputs_embeds", inputs_embeds)):
            if isinstance(t, Tensor) and t.dim() >= 2 and t.shape[1] == 0:
                raise ValueError(f"generate: {name} is empty: shape {tuple(t.shape)}; every sample needs at least "
                                 f"one prompt token")
        embeds = self._check_embeds(inputs_embeds) if inputs_embeds is not None else None
        input_ids = self._check_ids(input_ids) if input_ids is not None else None
        if input_ids is not None and embeds is not None and input_ids.shape != embeds.shape[:2]:
            raise ValueError(f"generate: input_ids {tuple(input_ids.shape)} must name the tokens of inputs_embeds "
                             f"{tuple(embeds.shape)}: the same (batch, tokens)")
        B = (input_ids if input_ids is not None else embeds).shape[0]
        if attention_mask is not None:
            arguments.check_mask_values(attention_mask, (input_ids if embeds is None else embeds).shape[:2])
        # the caller's mask, or HF's inference of one from the prompt's pad tokens; checked
        attention_mask = generation.prompt_mask(input_ids, attention_mask, s)
        prompt = input_ids if input_ids is not None else torch.empty(B, 0, dtype=torch.long, device=self.device)
        seq, hf_mask = generation.hf_layout(prompt, attention_mask) if input_ids is not None else (prompt, None)
        processors, criteria = generation.hf_processing(self, s, seq, hf_mask)  # before the read: max_time counts it
        read_ids, read_mask = (input_ids if embeds is None else None), attention_mask
        # as PEFT injects its soft prompt into an empty cache only: a memory that has read something
        # (a document, an earlier turn that read the soft prompt) goes on without it
        if hook is not None and (memory is None or (isinstance(memory, CometMemory) and memory.batch_size == B
                                                    and memory.host_counts() == HostCounts.empty(B))):
            read_ids, embeds, read_mask = generation.prepared_prompt(
                hook, type(self).prepare_inputs_for_generation, input_ids, embeds, attention_mask, **hook_kwargs)
        if s.num_return_sequences > 1 and memory is not None:
            self._check_memory(memory, B, "generate")
            memory = memory.clone()  # the caller's stays as it was; each prompt's copies go on from it
        memory, last = self.read(read_ids, memory, read_mask, progress=False, return_last_hidden=True,
                                 global_memory=global_memory, inputs_embeds=embeds)
        if s.num_return_sequences > 1:  # as HF: each prompt num_return_sequences times, in order
            copies = torch.arange(B, device=self.device).repeat_interleave(s.num_return_sequences)
            memory, last, prompt, seq = memory.select(copies), last[copies], prompt[copies], seq[copies]
        B = prompt.shape[0]
        if streamer is not None:
            streamer.put(prompt.cpu())
        # the sequence so far in HF's layout, which the processors and criteria read (none: not kept)
        track = len(processors) > 0 or len(criteria) > 0
        new, scores, raw = [], [], []
        alive = torch.ones(B, dtype=torch.bool, device=self.device)
        alive_list = [True] * B
        for _ in range(s.max_new_tokens):
            logits = self._next_logits(last)
            processed = processors(seq, logits.clone()) if len(processors) else logits  # (some write in place)
            token = torch.where(alive, generation.pick(processed, s, generator), s.pad)
            new.append(token)
            if s.output_scores:
                scores.append(processed)
            if s.output_logits:
                raw.append(logits)
            if streamer is not None:
                streamer.put(token.cpu())
            if track:
                seq = torch.cat([seq, token.unsqueeze(1)], dim=1)
            # every token a live sample produced goes into its memory, its EOS (or the token that
            # met a stopping criterion) too: the memory then holds the whole transcript and the
            # next turn reads after it
            produced = alive_list
            if len(criteria):
                alive = alive & ~criteria(seq, processed)
                alive_list = alive.tolist()  # the step's one host sync: who reads on (without criteria, none)
            step_last = self._read_steps(memory, token.unsqueeze(1), [int(p) for p in produced], global_memory)
            last = torch.where(alive.unsqueeze(1), step_last, last)
            if not any(alive_list):
                break
        if streamer is not None:
            streamer.end()
        out = torch.cat([prompt, torch.stack(new, 1)], dim=1) if new else prompt
        if s.return_dict:
            from transformers.generation.utils import GenerateDecoderOnlyOutput

            out = GenerateDecoderOnlyOutput(sequences=out, scores=tuple(scores) if s.output_scores else None,
                                            logits=tuple(raw) if s.output_logits else None)  # as HF: None if not asked
        return (out, memory) if return_memory else out

    # ------------------------------------------------------------------ HF activation checkpointing

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[dict] = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """HF's switch (``TrainingArguments(gradient_checkpointing=True)``, PEFT, accelerate)
        for the forward's default ``recompute=True``: every (layer, chunk) step is
        checkpointed (non-reentrant). Only whole-model, on-device checkpointing exists."""
        kwargs = dict(activation_checkpointing_kwargs or {})
        if kwargs.pop("use_reentrant", False):
            raise ValueError("activation_checkpointing_enable: use_reentrant=True is not supported (CoMeT "
                             "checkpoints each (layer, chunk) step with use_reentrant=False)")
        if kwargs:
            raise ValueError(f"activation_checkpointing_enable: unsupported activation_checkpointing_kwargs "
                             f"{sorted(kwargs)} (only use_reentrant=False)")
        if every_n_layers != 1 or offload:
            raise ValueError(f"activation_checkpointing_enable: every_n_layers={every_n_layers}, offload={offload} "
                             "are not supported (every layer is checkpointed, activations stay on the device)")
        self._recompute = True

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None, **kwargs) -> None:
        """The older name of :meth:`activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        self._recompute = False

    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def is_activation_checkpointing(self) -> bool:
        return self._recompute

    is_gradient_checkpointing = is_activation_checkpointing

    # ------------------------------------------------------------------ training forward

    def forward(self, input_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                chunk_sizes: Optional[Sequence[int]] = None, attention_mask: Optional[Tensor] = None,
                recompute: Optional[bool] = None, return_logits: bool = True,
                memory: Optional[CometMemory] = None, inputs_embeds: Optional[Tensor] = None,
                output_attentions: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None, use_cache: Optional[bool] = None,
                num_items_in_batch: Optional[Tensor | int] = None,
                position_ids: Optional[Tensor] = None, logits_to_keep: int | Tensor = 0, **kwargs) -> CometOutput:
        """Training-mode forward: layer-outer over all chunks, gradients through the memories.

        input_ids / labels (B, T), or inputs_embeds (B, T, d) in place of input_ids (the rows'
        input embeddings: PEFT's prompt tuning prepends its soft prompt so; gradients reach
        them); chunk_sizes: text tokens per chunk (sums to T;
        default chunk_size each); attention_mask (B, T): one run of tokens per row, a
        sample's chunks end with its tokens (its padded rows never reach the memories).
        Rows padded on the left (or on both sides) are read from their first token, as if
        padded on the right: chunk_sizes count from there, and the logits come back at the
        caller's positions; with labels, rows must be right-padded (HF's loss of a
        left-padded row also has a padding position predict its first token).
        Every chunk is closed. With recompute=True (and grad enabled) each
        (layer, chunk) step is checkpointed: only its inputs are kept and it runs
        again in backward, so activation memory per chunk is one layer input
        (default: off, or on after activation_checkpointing_enable()).
        Returns logits (B, T, vocab) for the text tokens and, with labels, the
        next-token cross-entropy (labels -100 are ignored; shifted inside, as in HF).
        With labels and return_logits=False the loss is computed chunk by chunk
        (checkpointed with recompute), so the (B, T, vocab) logits never exist:
        what training uses; .logits is then None.

        memory: start from what `read` left (truncated BPTT: read a long prefix
        under torch.no_grad(), then train on the chunks after it). It must have no
        open chunk (read whole chunks) and every sample the same number of FIFO
        rows; it is not changed, and no gradient flows into it.

        num_items_in_batch: what the summed loss is divided by (default: this batch's labelled
        tokens). transformers.Trainer passes the labelled tokens of a whole gradient-accumulation
        step, so that the step's gradient is the token mean over all of it, however it is split.

        logits_to_keep: as in HF's models, the logits of the last logits_to_keep positions
        only (0: all), or of the positions a 1-D tensor lists: the others' lm_head is never
        computed (what TRL's trainers pass). Not with labels.

        output_attentions, output_hidden_states, return_dict, use_cache, position_ids, past_key_values / cache:
        HF's standard arguments, accepted at the values that ask for nothing (what PEFT's
        wrappers and other HF tools pass; position_ids 0, 1, 2, ... along each row's tokens);
        anything else raises (a KV cache, as PEFT's prefix tuning passes, too: the memory is
        CoMeT's cache). Packed rows (positions restarting within a row, as
        DataCollatorWithFlattening makes them, or the cu_seq_lens_q / seq_idx arguments of
        padding-free collators) are refused: each row is one sequence.
        """
        arguments.check_hf_arguments("forward", output_attentions, output_hidden_states, return_dict, kwargs)
        return self._forward(input_ids, labels, chunk_sizes, attention_mask, recompute, return_logits, memory,
                             num_items_in_batch, position_ids, logits_to_keep, inputs_embeds)

    def _forward(self, input_ids, labels, chunk_sizes, attention_mask, recompute, return_logits, memory,
                 num_items_in_batch, position_ids, logits_to_keep, inputs_embeds,
                 head: bool = True) -> CometOutput | Tensor:
        """forward past its HF argument checks; head=False (the backbone, `base_model`) returns
        the final-normed hidden states of the text tokens, (B, T, d), in place of the logits."""
        if torch.compiler.is_exporting():  # (torch.compile, which breaks the graph at those reads, works)
            raise NotImplementedError(
                "torch.export of CometForCausalLM is not supported: its forward plans the chunks on the host from "
                "the input's values (the attention_mask's lengths, which chunks hold labels), so it is no single "
                "graph; use torch.compile(model), which breaks the graph there and computes what eager does")
        text = self._check_text("forward" if head else "base_model", input_ids, inputs_embeds)
        if position_ids is not None:
            arguments.check_plain_positions(position_ids, attention_mask, tuple(text.shape[:2]))
        if labels is not None:
            labels = self._check_labels(labels, text)
        recompute = self._recompute if recompute is None else recompute
        if self.training and getattr(self.config, "attention_dropout", 0.0):
            raise NotImplementedError(f"forward: CoMeT's attention does not implement attention dropout (the "
                                      f"config's attention_dropout is {self.config.attention_dropout}); set it to 0")
        if memory is not None:
            self._check_train_start(memory, text.shape[0])
        segs, xs, ropes, sizes, first = self._plan_chunks(text, chunk_sizes, attention_mask, memory)
        keep = arguments.kept_positions(logits_to_keep, sum(sizes))
        if keep is not None and labels is not None:
            raise ValueError("forward: logits_to_keep with labels is not supported (the loss needs every position's "
                             "logits, as in HF's models); pass one or the other")
        if first is not None and labels is not None:
            raise ValueError("forward: with labels, attention_mask must be right-padded (ones, then zeros) in every "
                             "row: HF's loss of a left-padded row also has a padding position predict its first "
                             "token, which CoMeT does not compute (a tokenizer with padding_side='left', e.g. in a "
                             "data collator, pads on the left: set it to 'right')")
        B = segs[0].kind.shape[0]
        targets = self._chunk_targets(labels, sizes, 0) if labels is not None and not return_logits else None
        hidden, total = list(xs), 0.0
        last = self.config.num_hidden_layers - 1
        for l in range(last + 1):
            mem = self._train_memory(B) if memory is None else self._train_memory_from(memory, l)
            for t, seg in enumerate(segs):
                out, mem = self._run_train_step(l, seg, ropes[t], hidden[t], mem, recompute,
                                                targets[t] if targets is not None and l == last else None)
                if targets is not None and l == last and targets[t] is not None:
                    total = total + out  # the chunk's summed loss; its hidden rows are never kept
                else:
                    hidden[t] = out
        if targets is not None:
            loss = total / loss_divisor(labels, num_items_in_batch, self.device) if isinstance(total, Tensor) \
                else hidden[0].sum() * 0
            return CometOutput(logits=None, loss=loss)
        rows = None  # the text positions whose logits are computed, per row (None: all, in place)
        if keep is not None or first is not None:
            T = sum(sizes)
            rows = (keep if keep is not None else torch.arange(T)).unsqueeze(0).expand(B, -1)
            if first is not None:  # the caller's position p of row b is column p - first[b] here
                rows = (rows - first.unsqueeze(1)) % T
            rows = upload(rows.contiguous(), self.device)
        text = self._text_hidden(hidden, segs, sizes, rows)
        if not head:
            return text
        logits = self.base.lm_head(text)
        loss = None
        if labels is not None:  # the mean over labelled tokens; 0 where there is none, as the chunked loss
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100, reduction="sum") / loss_divisor(labels, num_items_in_batch, logits.device)
        return CometOutput(logits=logits, loss=loss)

    def _chunk_targets(self, labels: Tensor, sizes: Sequence[int], first: int) -> list[Optional[Tensor]]:
        """Per chunk (consecutive, its first text token at sequence position `first`),
        the labels its logits meet: logits at position p predict labels[p + 1]. None
        where a chunk has no label to learn."""
        labels = labels.to(self.device)
        starts = [first + sum(sizes[:i]) for i in range(len(sizes))]
        spans = [labels[:, s + 1:s + n + 1] for s, n in zip(starts, sizes)]
        learn = torch.stack([(t != -100).any() for t in spans]).tolist()  # one host sync for all chunks
        return [t if has else None for t, has in zip(spans, learn)]

    def _plan_chunks(self, text: Tensor, chunk_sizes, attention_mask: Optional[Tensor],
                     memory: Optional[CometMemory] = None):
        """Every closed chunk of a training sequence text (checked ids (B, T) or embeddings
        (B, T, d): `_check_text`), planned once: segments, row embeddings, rotary tables
        (positions follow from the memory-row counts the plans imply, starting from `memory`'s
        when given), chunk sizes, and where each row's tokens start ((B,) host tensor; None when
        every row starts at 0): rows padded on the left are read from their first token, as if
        padded on the right."""
        B, T = text.shape[:2]
        sizes = self._chunk_sizes(chunk_sizes, T)
        lengths, first = torch.stack(arguments.row_lengths(attention_mask, B, T)).tolist()  # (host tensors)
        first = torch.tensor(first) if any(first) else None
        if first is not None:
            text = arguments.tokens_first(text, first)
        cc = self.comet_config
        C = cc.fifo_capacity
        dev = self.device
        segs, xs, ropes, start = [], [], [], 0
        # the input's tokens embedded in one call, as HF's models do, so that hooks on the embedding
        # see (B, T, d) (NEFTune's noise, transformers.Trainer's neftune_noise_alpha, scales with T)
        embedded = text if text.dim() == 3 else self.decoder.embed_tokens(text)
        has_global, fifo_len = [False] * B, [0] * B
        if memory is not None:
            host = memory.host_counts()
            has_global, fifo_len = list(host.has_global), list(host.fifo_len)
        for n in sizes:
            take = [min(max(length - start, 0), n) for length in lengths]
            seg = plan_segment(cc, [0] * B, take, [t > 0 for t in take], dev)
            mem_len = upload(torch.tensor([cc.num_global * g + f for g, f in zip(has_global, fifo_len)]), dev)
            ropes.append(self._rope(mem_len.unsqueeze(1) + torch.arange(seg.num_rows, device=dev)))
            xs.append(self._embed(seg, embedded[:, start:start + n]))
            segs.append(seg)
            fifo_len = [min(f + c, C) for f, c in zip(fifo_len, seg.comp_counts)]
            has_global = [g or t > 0 for g, t in zip(has_global, take)]
            start += n
        return segs, xs, ropes, sizes, first

    def _run_train_step(self, l: int, seg: Segment, rope: tuple[Tensor, Tensor], x: Tensor, mem: TrainMemory,
                        recompute: bool, targets: Optional[Tensor] = None) -> tuple[Tensor, TrainMemory]:
        """_train_step, checkpointed when recompute is on and grad is enabled: layer l over
        one chunk -> (its output, layer l's memory after it). With targets (the last layer),
        the step ends in the chunk's summed next-token loss, returned instead of the layer
        output, so the output is never kept."""
        heads, lengths = mem.fifo.layout()
        dev = self.device
        head, length = upload(torch.tensor([heads, lengths], dtype=torch.long), dev)
        kv = mem.fifo.tensors()
        step = functools.partial(self._train_step, l, seg, *rope, mem.has_global_list, tuple(lengths))
        if targets is not None:
            step = functools.partial(self._train_step_loss, step, seg, targets)
        args = (x, mem.state, mem.has_global, head, length, *kv)
        if recompute and torch.is_grad_enabled():
            out, state, has_global, comp_k, comp_v = torch.utils.checkpoint.checkpoint(step, *args, use_reentrant=False)
        else:
            out, state, has_global, comp_k, comp_v = step(*args)
        fifo = mem.fifo.pushed(comp_k, comp_v, list(seg.comp_counts))
        has_global_list = tuple(g or c for g, c in zip(mem.has_global_list, seg.closing_list))
        return out, TrainMemory(state, has_global, fifo, has_global_list)

    def _train_step_loss(self, step, seg: Segment, targets: Tensor, x: Tensor, *mem: Tensor):
        y, *mem = step(x, *mem)
        n = int(seg.text_rows.shape[1]) if seg.text_rows.numel() else 0
        logits = self.base.lm_head(self._text_hidden([y], [seg], [max(n, targets.shape[1])])[:, : targets.shape[1]])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                           ignore_index=-100, reduction="sum")
        return (loss, *mem)

    def _text_hidden(self, hidden: list[Tensor], segs: list[Segment], sizes: list[int],
                     rows: Optional[Tensor] = None) -> Tensor:
        """The final-normed hidden states of the text rows of consecutive chunks, (B, sum(sizes), d),
        what the LM head reads; with rows (B, n) (text positions), only those, (B, n, d)."""
        text = torch.cat([nn.functional.pad(gather_rows(h, s.text_rows), (0, 0, 0, n - s.text_rows.shape[1]))
                          for h, s, n in zip(hidden, segs, sizes)], dim=1)
        if rows is not None:
            text = torch.gather(text, 1, rows.unsqueeze(-1).expand(-1, -1, text.shape[-1]))
        return self.decoder.norm(text)

    def _train_memory(self, B: int) -> TrainMemory:
        """One layer's memory before the first chunk of a training forward."""
        cc, dev = self.comet_config, self.device
        return TrainMemory(state=torch.zeros(B, cc.num_global, self.config.hidden_size, dtype=self.dtype, device=dev),
                           has_global=torch.zeros(B, dtype=torch.bool, device=dev),
                           fifo=FifoWindow(cc.fifo_capacity, B), has_global_list=(False,) * B)

    def _train_memory_from(self, memory: CometMemory, l: int) -> TrainMemory:
        """Layer l's memory as `read` left it, as a training forward carries it: the FIFO
        ring becomes one piece of its rows oldest first (pre-RoPE, detached)."""
        host = memory.host_counts()  # every layer's FIFO holds as many rows, every sample's too
        n = host.fifo_len[0]
        fifo = FifoWindow(self.comet_config.fifo_capacity, memory.batch_size)
        if n:
            head, length = memory.fifo_head[l], memory.fifo_len[l]
            k, v = (ops.fifo_view(buf[l].detach(), head, length)[:, :n] for buf in (memory.fifo_k, memory.fifo_v))
            fifo = fifo.pushed(k, v, [n] * memory.batch_size)
        return TrainMemory(state=memory.state[l].detach().to(self.dtype), has_global=memory.has_global.clone(),
                           fifo=fifo, has_global_list=host.has_global)

    def _check_memory(self, memory: CometMemory, batch_size: int, who: str) -> None:
        """A memory passed in must be this model's, for this batch: the same layers, widths and
        CoMeT config (a memory of another model, or of this one before resize_global_memory,
        would be read as garbage or overflow its buffers)."""
        if not isinstance(memory, CometMemory):
            raise ValueError(f"{who}: memory must be a CometMemory (what read returns), got {type(memory).__name__}")
        memory.require_intact(who)
        if memory.batch_size != batch_size:
            raise ValueError(f"{who}: memory holds {memory.batch_size} samples but the input has {batch_size}")
        diff = signature_diff(memory.signature, self.memory_signature()) if memory.signature else {}
        if diff:
            raise ValueError(f"{who}: memory belongs to another model or CoMeT config; differences "
                             f"(memory, model): {diff}")
        if memory.state.dtype != self.dtype or memory.kv_k.dtype != self.dtype:
            raise ValueError(f"{who}: memory holds {memory.kv_k.dtype} keys / values but the model computes in "
                             f"{self.dtype}; cast it with memory.to(dtype={self.dtype})")
        memory.check_layout(self.memory_layout(batch_size), who)

    def _check_train_start(self, memory: CometMemory, batch_size: int) -> None:
        """A training forward continues a streamed memory only at a chunk boundary, with
        FIFOs a single piece can hold (every sample the same number of rows)."""
        self._check_memory(memory, batch_size, "forward")
        if bool((memory.open_rows != 0).any()):
            raise ValueError(f"forward: memory has an open chunk ({memory.open_text.tolist()} text tokens); a "
                             f"training forward starts at a chunk boundary: read whole chunks of "
                             f"{self.comet_config.chunk_size} tokens before it")
        lens = memory.fifo_len.unique()
        if lens.numel() > 1:
            raise ValueError(f"forward: memory's samples hold different numbers of FIFO rows "
                             f"({memory.fifo_len[0].tolist()}); a training forward continues only samples that "
                             f"have read the same number of chunks, or FIFOs that are full")

    def _train_step(self, l: int, seg: Segment, cos: Tensor, sin: Tensor, has_global_list: tuple[bool, ...],
                    fifo_lens: tuple[int, ...], x: Tensor, state: Tensor, has_global: Tensor, fifo_head: Tensor,
                    fifo_len: Tensor, *fifo_kv: Tensor):
        """Layer l over one closed chunk, functionally: (layer input x, layer l's memory:
        global state, has_global, the FIFO as FifoWindow.tensors() with its layout) ->
        (layer output, new state, new has_global, the chunk's FIFO piece k / v or None).
        has_global_list / fifo_lens: has_global and fifo_len on the host (the step's
        branches never wait on the device).

        The global rows' keys / values are derived here from the state (not carried):
        what a checkpoint keeps of the memory is then only new information."""
        G, C = self.comet_config.num_global, self.comet_config.fifo_capacity
        B, Hkv, D = x.shape[0], self.config.num_key_value_heads, self._head_dim()
        rows = sum(t.shape[1] for t in fifo_kv[: len(fifo_kv) // 2])
        rope = self._memory_rope(rows) if rows or any(has_global_list) else None
        if any(has_global_list):
            gk, gv = self._global_kv(l, self.memory_layers[l].global_memory_net.rla(state), rope)
        else:  # no sample has a global memory yet: its rows are all masked
            gk = gv = x.new_zeros(B, G, Hkv, D)
        fifo = FifoWindow.view(fifo_kv, fifo_head, fifo_len, C, rope[0][G:], rope[1][G:]) if rows else None
        tk, tv = fifo if fifo is not None else (x.new_zeros(B, 0, Hkv, D),) * 2
        all_global = all(has_global_list)
        pk, pv, plen = self._pack_memory_kv(gk, gv, has_global, tk, tv, fifo_len, all_global)
        full = all_global and all(n == tk.shape[1] for n in fifo_lens)  # every sample fills pk
        y, comp_k, comp_v, readout = self._layer_segment(l, x, seg, cos, sin, pk, pv, plen, prefix_full=full)
        closing = seg.closing
        if readout is not None:
            state, _ = self._update_global(l, readout, state, has_global, seg, has_global_list)
        if not C:
            comp_k = comp_v = None
        return y, state, has_global | closing, comp_k, comp_v

    # ------------------------------------------------------------------ input checks

    def _check_memory_modules(self) -> None:
        """The memory's ops read its modules' weights, not their forwards: an adapter that a PEFT
        method put on one of them anyway (targets naming the memory's norm, gate or rla, LayerNorm
        tuning, LoRA's target_parameters) would be silently left out, and PiSSA-style
        initialisations, which move part of the weight into the adapter, would change the model.
        (The usual LoRA targets, q_proj ... down_proj and "all-linear", never reach the memory:
        it holds no nn.Linear and none of those names.)"""
        wrapped = [name for name, m in self.memory_layers.named_modules() if hasattr(m, "base_layer")]
        if wrapped:
            raise ValueError(f"the CoMeT memory modules {wrapped[:4]}{' ...' if len(wrapped) > 4 else ''} carry "
                             f"adapters (PEFT), which comet_ext's memory ops do not apply: leave them out of the "
                             f"adapters' targets (e.g. exclude_modules=r\".*memory_layers.*\" in the PEFT config), "
                             f"or use comet_ext.lora.apply_lora, which trains the memory fully")

    def _check_text(self, who: str, input_ids, inputs_embeds, allow_no_tokens: bool = False) -> Tensor:
        """What a call reads, checked: input_ids (B, T) or inputs_embeds (B, T, d), exactly one of
        them as in HF's models (`_check_ids`, `_check_embeds`)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(f"{who}: pass exactly one of input_ids and inputs_embeds, got "
                             f"{'both' if input_ids is not None else 'neither'}")
        if inputs_embeds is not None:
            return self._check_embeds(inputs_embeds, allow_no_tokens)
        return self._check_ids(input_ids, allow_no_tokens)

    def _check_ids(self, input_ids, allow_no_tokens: bool = False) -> Tensor:
        """`arguments.check_ids` for this model's vocabulary, after `_check_run`."""
        self._check_run()
        return arguments.check_ids(input_ids, self._vocab_size(), self.device, allow_no_tokens)

    def _check_embeds(self, inputs_embeds, allow_no_tokens: bool = False) -> Tensor:
        """`arguments.check_embeds` for this model, after `_check_run`."""
        self._check_run()
        return arguments.check_embeds(inputs_embeds, self.config.hidden_size, self.device, self.dtype, allow_no_tokens)

    def _check_labels(self, labels, text: Tensor) -> Tensor:
        """`arguments.check_labels` for this model's vocabulary."""
        return arguments.check_labels(labels, text, self._vocab_size(), self.device)

    def _vocab_size(self) -> int:
        return self.base.get_input_embeddings().num_embeddings

    def _check_run(self) -> None:
        """Refuses autocast to another low precision than a low-precision model's own, which torch
        itself fails on deep inside (a bfloat16 model under float16 autocast), and memory modules
        wrapped by an adapter library (`_check_memory_modules`)."""
        self._check_memory_modules()
        kind = self.device.type
        if (torch.is_autocast_enabled(kind) and self.dtype in (torch.bfloat16, torch.float16)
                and torch.get_autocast_dtype(kind) != self.dtype):
            raise ValueError(f"a {self.dtype} model under {torch.get_autocast_dtype(kind)} autocast is not supported: "
                             f"run it without autocast, under {self.dtype} autocast, or cast it to float32 first")

    def _chunk_sizes(self, chunk_sizes: Optional[Sequence[int]], T: int) -> list[int]:
        cs = self.comet_config.chunk_size
        if chunk_sizes is None:
            return [min(cs, T - s) for s in range(0, T, cs)]
        sizes = list(chunk_sizes)
        if not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in sizes):
            raise ValueError(f"chunk_sizes must be ints, got {sizes}")
        sizes = [int(n) for n in sizes]
        if any(n < 1 for n in sizes) or sum(sizes) != T:
            raise ValueError(f"chunk_sizes must be positive and sum to the {T} tokens of input_ids, got {sizes}")
        if max(sizes) > cs:  # read() never streams such chunks: the model would read unlike it trained
            raise ValueError(f"chunk_sizes must each be at most comet_config.chunk_size ({cs}), the longest chunk "
                             f"read() streams; got {max(sizes)}")
        return sizes


def _layer_step_cached(layer, family, x, cos, sin, buf_k, buf_v, plan: "_StepPlan", prefix_lens, q_lens):
    """layer_step for streaming: the new rows' keys / values go into the packed per-sample
    buffers buf_k / buf_v (B, capacity, Hkv, D) at prefix_lens, and attention reads the buffers."""
    attn = layer.self_attn
    B, N, _ = x.shape
    h = layer.input_layernorm(x)
    shape = (B, N, -1, attn.head_dim)
    q, k, v = attn.q_proj(h).view(shape), attn.k_proj(h).view(shape), attn.v_proj(h).view(shape)
    if family.qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if plan.new_rows is not None:
        plan.new_rows.apply(buf_k, k)
        plan.new_rows.apply(buf_v, v)
    k_lens = prefix_lens + q_lens
    out, _ = ops.prefix_attention(q, buf_k[:, :plan.width], buf_v[:, :plan.width], attn.scaling, q_lens, k_lens)
    x = x + attn.o_proj(out.reshape(B, N, -1))
    x = x + layer.mlp(layer.post_attention_layernorm(x))
    return x, k, v


@dataclass
class _RowScatter:
    """buf[b[i], pos[i]] = rows[b[i], j[i]]: rows j < counts[b] of a (B, n, ...) block written
    at start[b] + j of a (B, capacity, ...) buffer. Index tensors made on the host and
    queued to the device in one copy, so neither building nor applying it waits on the device."""

    b: Tensor
    j: Tensor
    pos: Tensor

    @staticmethod
    def build(start: Sequence[int], counts: Sequence[int], capacity: int, what: str,
              device: torch.device) -> Optional["_RowScatter"]:
        """start[b], counts[b]: host values per sample."""
        if any(s + c > capacity for s, c in zip(start, counts)):
            raise RuntimeError(f"comet_ext internal error: {what} overflow their buffer ({capacity} rows): "
                               f"start {list(start)}, rows {list(counts)}")
        if not any(counts):
            return None
        counts_t = torch.tensor(counts, dtype=torch.long)  # host tensors: a chunk step has thousands of rows
        b = torch.repeat_interleave(torch.arange(len(counts)), counts_t)
        j = torch.arange(b.numel()) - torch.repeat_interleave(counts_t.cumsum(0) - counts_t, counts_t)
        pos = torch.tensor(start, dtype=torch.long)[b] + j
        b, j, pos = upload(torch.stack([b, j, pos]), device)
        return _RowScatter(b, j, pos)

    def apply(self, buf: Tensor, rows: Tensor) -> None:
        buf[self.b, self.pos] = rows[self.b, self.j].to(buf.dtype)


@dataclass
class _StepPlan:
    """What every layer of one streaming step needs to know about the step, worked out once
    on the host before the first layer, from the memory's host counters: which samples close
    their chunk, where the new rows and the compression rows go, how many keys attention
    reads. Neither building it nor the layers that use it wait on the device (on a GPU each
    wait would stall the queue)."""

    any_closing: bool
    all_closing: bool
    has_global: tuple[bool, ...]  # memory.has_global on the host, before the step
    closing_idx: Optional[Tensor]  # (n_closing,) the closing samples (None when none closes)
    all_global: bool  # every sample has global rows once the step's closing chunks are written
    new_rows: Optional[_RowScatter]  # the segment's rows into the packed key / value buffers
    comp_rows: Optional[_RowScatter]  # compression rows into the pending buffers
    width: int  # keys attention reads: max over samples of prefix + new rows (or the whole buffer)

    @staticmethod
    def build(memory: CometMemory, host: HostCounts, seg: Segment, close: list[bool], global_memory: bool,
              full_width: bool = False) -> "_StepPlan":
        device = memory.kv_k.device
        prefix = [m + r for m, r in zip(host.mem_len, host.open_rows)]
        closing = [b for b, c in enumerate(close) if c]
        return _StepPlan(
            any_closing=bool(closing),
            all_closing=len(closing) == len(close),
            has_global=host.has_global,
            closing_idx=upload(torch.tensor(closing, dtype=torch.long), device) if closing else None,
            all_global=all(g or (c and global_memory) for g, c in zip(host.has_global, close)),
            new_rows=_RowScatter.build(prefix, seg.q_lens_list, memory.kv_k.shape[2], "the open chunk's rows", device),
            comp_rows=_RowScatter.build(host.pending, seg.comp_counts, memory.pending_k.shape[2],
                                        "pending compression rows", device),
            # (the whole buffer: one recording serves every decode step, whatever its key count)
            width=memory.kv_k.shape[2] if full_width else max(p + q for p, q in zip(prefix, seg.q_lens_list)),
        )


def _counts_after(host: HostCounts, seg: Segment, take: Sequence[int], global_memory: bool, G: int,
                  C: int) -> HostCounts:
    """The memory's counters after a streaming step, worked out on the host the way the
    step's bookkeeping and its layers' FIFO pushes work them out on the device (G = num_global,
    C = the FIFO's capacity)."""
    rows = []
    for b, closes in enumerate(seg.closing_list):
        g, m, f = host.has_global[b], host.mem_len[b], host.fifo_len[b]
        r = host.open_rows[b] + seg.q_lens_list[b]
        o = host.open_text[b] + take[b]
        p = host.pending[b] + seg.comp_counts[b]
        if closes:  # the chunk's compression rows go into the FIFO, which keeps the newest C
            g, f = g or global_memory, min(f + p, C)
            m, r, o, p = G * g + f, 0, 0, 0
        rows.append((g, m, r, o, p, f))
    return HostCounts(*(tuple(column) for column in zip(*rows)))
