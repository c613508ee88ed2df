"""HF `generate` settings for CometForCausalLM.generate, and the choice of each next token.

Which settings apply follows HF's order: keyword arguments, then the `generation_config`
passed in, then the model's own `generation_config` (a checkpoint's
generation_config.json), then HF's defaults. The scores and the stops are transformers'
own: the logits processors and stopping criteria HF's generate builds from the same
settings (`hf_processing`), so every processor HF has (repetition and n-gram penalties, bad
words, min-p, typical-p, ...), a caller's `logits_processor` / `stopping_criteria` /
`prefix_allowed_tokens_fn`, and `stop_strings` / `max_time` act as in HF. What CoMeT's
decoding does not implement (beam search, assisted decoding, classifier-free guidance, ...)
raises when the caller asks for it and warns when it only
comes from the model's defaults — never silently ignored. A prompt given without
attention_mask has its pad tokens taken for padding, as HF does (`prompt_mask`).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import math
import warnings
from typing import Any, Optional

import torch
from torch import Tensor

from .arguments import CACHE_ARGUMENTS, columns


# GenerationConfig fields generate() reads itself, with HF's defaults.
DEFAULTS: dict[str, Any] = {
    "max_new_tokens": None, "max_length": None, "min_new_tokens": None, "min_length": None,
    "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0,
    "eos_token_id": None, "pad_token_id": None,
    "return_dict_in_generate": False, "output_scores": False, "output_logits": False, "num_return_sequences": 1,
}
# GenerationConfig fields that only HF's logits processors and stopping criteria read: passed
# on to them as they are (`processed_fields` keeps those this transformers has).
PROCESSED = ("sequence_bias", "encoder_repetition_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
             "bad_words_ids", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
             "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "top_h", "min_p",
             "typical_p", "epsilon_cutoff", "eta_cutoff", "watermarking_config", "renormalize_logits",
             "max_time", "stop_strings")
# HF generate's own arguments that feed its processors and criteria (the tokenizer serves stop_strings).
ARGUMENTS = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "tokenizer")
# Fields that change nothing CoMeT decodes (the memory is its cache; bos starts no prompt here;
# the assisted-decoding knobs act only with an assistant model, which generate does not take,
# and transformers 5.0's pipelines pass them at their defaults).
NO_EFFECT = {"bos_token_id", "use_cache", "cache_implementation", "transformers_version", "_from_model_config",
             "return_legacy_cache", "disable_compile", "compile_config", "num_assistant_tokens",
             "num_assistant_tokens_schedule", "assistant_confidence_threshold", "assistant_lookbehind",
             "target_lookbehind", "trust_remote_code"}
# HF generate's own arguments for what CoMeT's decoding does not do: accepted at what asks for
# nothing (None, synced_gpus=False), refused by name otherwise, like the unsupported
# GenerationConfig fields.
HF_ARGUMENTS = {"synced_gpus", "assistant_model", "assistant_tokenizer", "negative_prompt_ids",
                "negative_prompt_attention_mask", "custom_generate"}
DEFAULT_MAX_NEW_TOKENS = 20


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """The checked settings of one generate call."""

    max_new_tokens: int
    num_return_sequences: int  # sequences per prompt, each decoded on its own from a copy of its memory
    do_sample: bool
    eos: tuple[int, ...]
    pad: int
    return_dict: bool
    output_scores: bool
    output_logits: bool
    # the id HF's generate takes for padding in a prompt given without attention_mask: pad_token_id
    # when set and not an EOS id, else None (every prompt token is read)
    mask_pad: Optional[int]
    # what HF's processors and criteria are built from: a GenerationConfig holding the settings
    # above and the PROCESSED fields (max_length / min_length count the prompt, as in HF), and
    # the ARGUMENTS given
    hf_config: Any
    arguments: dict[str, Any]


# Values of unsupported fields that ask for nothing: beam-search knobs and guidance at their
# neutral values.
NEUTRAL: dict[str, Any] = {"num_beams": 1, "length_penalty": 1.0, "diversity_penalty": 0.0, "num_beam_groups": 1,
                           "guidance_scale": 1.0}


@functools.cache
def processed_fields() -> frozenset[str]:
    """The PROCESSED fields this transformers' GenerationConfig has (top_h is newer than 5.0):
    one it lacks would be ignored by its processors, so it counts as unsupported."""
    from transformers import GenerationConfig

    return frozenset(PROCESSED) & frozenset(GenerationConfig().to_dict())


def _neutral(name: str, v: Any) -> bool:
    """Whether setting `name` to v asks for nothing (a tensor, model or function always asks)."""
    if v is None or v is False:
        return True
    if isinstance(v, (dict, list, tuple)):  # LogitsProcessorList and StoppingCriteriaList are lists
        return len(v) == 0
    if isinstance(v, (Tensor, torch.nn.Module)) or callable(v):
        return False
    return name in NEUTRAL and NEUTRAL[name] == v


def _unsupported(values: dict[str, Any]) -> dict[str, Any]:
    """The settings in values that ask for something generate() does not do."""
    handled = DEFAULTS.keys() | NO_EFFECT | processed_fields() | set(ARGUMENTS)
    return {k: v for k, v in values.items() if k not in handled and not _neutral(k, v)}


def _brief(v: Any) -> str:
    """v's repr for an error message, cut short (an assistant model's runs to pages)."""
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def _short(values: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k!r}: {_brief(v)}" for k, v in values.items()) + "}"


def _set_fields(config) -> dict[str, Any]:
    """The fields a GenerationConfig sets (HF leaves every unset field None)."""
    return {k: v for k, v in config.to_dict().items() if v is not None and v != {}} if config is not None else {}


def resolve(model_config, passed_config, kwargs: dict[str, Any], prompt_tokens: int, vocab: int,
            seq_tokens: Optional[int] = None) -> DecodeSettings:
    """model_config: the model's generation_config; passed_config: generate's
    generation_config argument; kwargs: generate's other keyword arguments;
    prompt_tokens: the prompt's width (max_length / min_length count it, as in HF);
    seq_tokens: the width of the ids that HF's processors read and generate returns before
    the new tokens (default prompt_tokens; 0 for a prompt given as inputs_embeds alone)."""
    from transformers import GenerationConfig

    known = set(GenerationConfig().to_dict()) | set(DEFAULTS) | NO_EFFECT | set(ARGUMENTS) | HF_ARGUMENTS
    unknown = sorted(k for k in kwargs if k not in known)
    if unknown:
        raise TypeError(f"generate: unexpected keyword arguments {unknown}")
    if passed_config is not None and not isinstance(passed_config, GenerationConfig):
        raise ValueError(f"generate: generation_config must be a transformers.GenerationConfig, "
                         f"got {type(passed_config).__name__}")
    asked = {**_set_fields(passed_config), **{k: v for k, v in kwargs.items() if v is not None}}
    model_set = _set_fields(model_config)
    bad = _unsupported(asked)
    if bad:
        raise ValueError(f"generate: {_short(bad)} not supported: CoMeT decodes greedy or sampled sequences (supported "
                         f"settings: {sorted(DEFAULTS)}, the arguments {list(ARGUMENTS)}, and what HF's logits "
                         f"processors and stopping criteria read: comet_ext.generation.PROCESSED)")
    ignored = {k: v for k, v in _unsupported(model_set).items() if k not in asked}
    if ignored:
        warnings.warn(f"generate: the model's generation_config sets {_short(ignored)}, which CoMeT's decoding "
                      "does not implement; ignored (pass them explicitly to get an error instead)", UserWarning,
                      stacklevel=3)
    value = {k: asked.get(k, model_set.get(k, d)) for k, d in DEFAULTS.items()}
    # a keyword passed as None unsets the field, as in HF: its default, except top_k, whose filter
    # HF then leaves out (top_k=None keeps every token; an unset top_k in a GenerationConfig is 50)
    value.update({k: 0 if k == "top_k" else DEFAULTS[k] for k, v in kwargs.items() if v is None and k in DEFAULTS})
    # max_new_tokens wins over max_length, as in HF; without either, HF's 20 new tokens
    max_new = value["max_new_tokens"]
    if max_new is None and value["max_length"] is not None:
        max_length = _int(value["max_length"], "max_length", 1)
        if max_length <= prompt_tokens:
            raise ValueError(f"generate: max_length {max_length} counts the prompt's {prompt_tokens} tokens and "
                             "leaves none to generate; use max_new_tokens")
        max_new = max_length - prompt_tokens
    max_new = _int(DEFAULT_MAX_NEW_TOKENS if max_new is None else max_new, "max_new_tokens", 0)
    min_new = value["min_new_tokens"]
    if min_new is None:  # min_length counts the prompt (transformers 5.0's pipelines pass min_length 0)
        min_length = value["min_length"]
        min_new = 0 if min_length is None else max(_int(min_length, "min_length", 0) - prompt_tokens, 0)
    min_new = _int(min_new, "min_new_tokens", 0)
    do_sample = value["do_sample"]
    if not isinstance(do_sample, bool):
        raise ValueError(f"generate: do_sample must be a bool, got {do_sample!r}")
    temperature, top_p, penalty = (_float(value[k], k) for k in ("temperature", "top_p", "repetition_penalty"))
    if do_sample and not temperature > 0:
        raise ValueError(f"generate: temperature must be > 0 when sampling, got {temperature}")
    if not 0 <= top_p <= 1:
        raise ValueError(f"generate: top_p must lie in [0, 1], got {top_p}")
    if not penalty > 0:
        raise ValueError(f"generate: repetition_penalty must be > 0, got {penalty}")
    top_k = _int(value["top_k"], "top_k", 0)
    num_seq = _int(value["num_return_sequences"], "num_return_sequences", 1)
    eos = _token_ids(value["eos_token_id"], "eos_token_id", vocab)
    pad = value["pad_token_id"]
    pad = None if pad is None else _token_ids(pad, "pad_token_id", vocab)[0]
    mask_pad = pad if pad is not None and pad not in eos else None  # HF's rule: a pad that is an EOS id marks nothing
    # The GenerationConfig HF's generate would decode with, as its _prepare_generated_length leaves
    # it (lengths counting the prompt). The processed fields go in through update(), as in HF's
    # generate: it converts them (a watermarking_config dict) and validates them (a forced EOS id
    # that is also suppressed raises; a sampling-only one set for greedy decoding is logged).
    hf = GenerationConfig()
    hf.do_sample, hf.temperature, hf.top_k, hf.top_p, hf.repetition_penalty = do_sample, temperature, top_k, top_p, \
        penalty
    hf.num_beams, hf.num_return_sequences = 1, num_seq  # (validated below: several greedy sequences raise, as in HF)
    processed = {k: kwargs[k] if k in kwargs else asked.get(k, model_set.get(k))  # a keyword None unsets, as in HF
                 for k in processed_fields()}
    processed = {k: v for k, v in processed.items() if v is not None}
    _check_token_fields(processed, vocab)
    hf.update(**processed)
    hf.eos_token_id, hf.pad_token_id = (list(eos) or None), pad
    hf.max_new_tokens, hf.min_new_tokens = None, None
    seq = prompt_tokens if seq_tokens is None else seq_tokens
    hf.max_length, hf.min_length = seq + max_new, (seq + min_new if min_new else 0)
    pad = eos[0] if pad is None and eos else (0 if pad is None else pad)
    return DecodeSettings(max_new, num_seq, do_sample, eos, pad,
                          *(bool(value[k]) for k in ("return_dict_in_generate", "output_scores", "output_logits")),
                          mask_pad=mask_pad, hf_config=hf,
                          arguments={k: kwargs[k] for k in ARGUMENTS if kwargs.get(k) is not None})


def _check_token_fields(fields: dict[str, Any], vocab: int) -> None:
    """The processed fields that hold token ids (and max_time), checked before anything is read:
    HF's processors index the scores with them only when first called, mid-decoding (an id past
    the vocabulary: a bare IndexError after the prompt is in the memory)."""
    for name in ("forced_bos_token_id", "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens"):
        if name in fields:
            _token_ids(fields[name], name, vocab)
    words = fields.get("bad_words_ids")
    if words is not None:
        if not isinstance(words, (list, tuple)) or not all(isinstance(w, (list, tuple)) for w in words):
            raise ValueError(f"generate: bad_words_ids must be a list of token id lists, got {_brief(words)}")
        for w in words:
            _token_ids(list(w), "bad_words_ids", vocab)
    bias = fields.get("sequence_bias")
    if bias is not None:
        pairs = isinstance(bias, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in bias)
        if not isinstance(bias, dict) and not pairs:
            raise ValueError("generate: sequence_bias must be a dict {tuple of token ids: bias} or a list of "
                             f"[token ids, bias] pairs, got {_brief(bias)}")
        for ids in (bias if isinstance(bias, dict) else [p[0] for p in bias]):
            _token_ids(list(ids) if isinstance(ids, (list, tuple)) else ids, "sequence_bias", vocab)
    if "max_time" in fields:
        _float(fields["max_time"], "max_time")


def prompt_mask(input_ids: Optional[Tensor], attention_mask: Optional[Tensor], s: DecodeSettings) -> Optional[Tensor]:
    """The attention_mask (B, T) generate reads the prompt input_ids (B, T) with, checked: the
    caller's, or, without one, HF's inference: the prompt's s.mask_pad tokens are padding (None
    when it holds none, or HF infers nothing: every token is read; input_ids None, a prompt
    given as inputs_embeds alone: nothing to infer from). Each row must hold a token and be
    left-padded (HF's layout) or right-padded: the memory cannot hold a hole."""
    inferred = ""
    if attention_mask is None and s.mask_pad is not None and input_ids is not None:
        is_pad = input_ids == s.mask_pad
        if not bool(is_pad.any()):
            return None
        attention_mask = (~is_pad).long()
        inferred = (f" (generate was given no attention_mask, so, as HF's generate does, it took the prompt's "
                    f"pad_token_id {s.mask_pad} tokens for padding; pass an attention_mask to read them)")
    if attention_mask is None:
        return None
    mask = attention_mask.bool()
    if not bool(mask.any(1).all()):
        raise ValueError(f"generate: every sample needs at least one prompt token; attention_mask rows "
                         f"{(~mask.any(1)).nonzero().flatten().tolist()} are all zeros{inferred}")
    T = mask.shape[1]
    lengths, j = mask.sum(1, keepdim=True), torch.arange(T, device=mask.device)
    if not bool(((mask == (j < lengths)).all(1) | (mask == (j >= T - lengths)).all(1)).all()):
        raise ValueError(f"generate: attention_mask must be left-padded (zeros, then ones: HF's layout) or "
                         f"right-padded (ones, then zeros) in every row{inferred}")
    return attention_mask


def hf_layout(input_ids: Tensor, attention_mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """The prompt (B, T) with a mask prompt_mask has checked (rows left- or right-padded) in
    HF's layout for generation, every sample's tokens last, which its logits processors and
    stopping criteria read: (hf_ids, hf_mask). Each row is rotated by where its tokens start:
    no host sync."""
    if attention_mask is None:
        return input_ids, None
    mask = attention_mask.to(input_ids.device).bool()
    T = mask.shape[1]
    lengths = mask.sum(1, keepdim=True)
    first = mask.int().argmax(1, keepdim=True)  # where a row's tokens start: T - length when left-padded, else 0
    j = torch.arange(T, device=mask.device)
    return torch.gather(input_ids, 1, (j + first - (T - lengths)) % T), (j >= T - lengths).to(attention_mask.dtype)


def hf_processing(model, s: DecodeSettings, hf_ids: Tensor, hf_mask: Optional[Tensor]) -> tuple[Any, Any]:
    """The LogitsProcessorList and StoppingCriteriaList HF's generate builds for s, from the
    prompt in HF's layout (hf_ids, hf_mask from hf_layout, one row per prompt), made by
    transformers' own generate code on `model` (a GenerationMixin), so that they act as in
    HF: its default processors in its order, the caller's merged in as HF merges them. They
    then read the num_return_sequences rows of each prompt, as HF's do."""
    from transformers.generation import LogitsProcessorList, StoppingCriteriaList

    cfg = copy.copy(s.hf_config)  # HF's preparation below writes into it
    model._prepare_special_tokens(cfg, kwargs_has_attention_mask=True, device=hf_ids.device)
    mask = None if hf_mask is None else hf_mask.repeat_interleave(s.num_return_sequences, 0)
    processors = model._get_logits_processor(
        cfg, input_ids_seq_length=hf_ids.shape[1], encoder_input_ids=hf_ids,
        prefix_allowed_tokens_fn=s.arguments.get("prefix_allowed_tokens_fn"),
        logits_processor=s.arguments.get("logits_processor", LogitsProcessorList()), device=hf_ids.device,
        model_kwargs={} if mask is None else {"attention_mask": mask})
    # generate's loop stops at max_new_tokens itself; HF's max-length criterion would also warn
    # once the sequence passes max_position_embeddings, which CoMeT decodes past by design
    cfg.max_length = None
    criteria = model._get_stopping_criteria(cfg, s.arguments.get("stopping_criteria", StoppingCriteriaList()),
                                            s.arguments.get("tokenizer"))
    return processors, criteria


def _int(v, name: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"generate: {name} must be an int >= {lo}, got {v!r}")
    return v


def _float(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"generate: {name} must be a finite number, got {v!r}")
    return float(v)


def _token_ids(v, name: str, vocab: int) -> tuple[int, ...]:
    """An id, a sequence of ids or a tensor of them -> a tuple of ids in [0, vocab)."""
    if v is None:
        return ()
    if isinstance(v, Tensor):
        v = v.flatten().tolist()
    ids = [v] if isinstance(v, int) else list(v) if isinstance(v, (list, tuple)) else None
    if ids is None or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in ids):
        raise ValueError(f"generate: {name} must be a token id or a list of them in [0, {vocab}), got {v!r}")
    return tuple(ids)


def pick(scores: Tensor, s: DecodeSettings, generator: Optional[torch.Generator]) -> Tensor:
    """The next token per row of scores (B, vocab): argmax, or a sample of softmax(scores)."""
    if not s.do_sample:
        return scores.argmax(-1)
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)


def prepared_prompt(hook, base_prepare, input_ids: Optional[Tensor], inputs_embeds: Optional[Tensor],
                    attention_mask: Optional[Tensor], **model_kwargs):
    """The prompt a prepare_inputs_for_generation set on the model has it read: HF's generate
    calls it before every forward, the first time with an empty cache and is_first_iteration
    (or, in older transformers, cache_position) saying so, and feeds the model what it
    returns. PEFT's prompt learning sets one around its generate, which then prepends its soft
    prompt: inputs_embeds (B, n + T, d) and a mask (B, n + T) of ones before the caller's.
    A left-padded prompt so has padding between the soft prompt and the tokens, which HF's
    generate steps over (its positions count the mask's ones): the rows are read the same way,
    every row's tokens moved first, in order. base_prepare: the model class's own
    prepare_inputs_for_generation, which the hook calls on (its arguments are this transformers
    version's). model_kwargs: generate's arguments for the hook (PEFT's task_ids).
    -> (input_ids, inputs_embeds, attention_mask), one of the first two None."""
    if inputs_embeds is not None and "inputs_embeds" not in inspect.signature(hook).parameters:
        raise ValueError("generate: inputs_embeds cannot go through the model's prepare_inputs_for_generation, which "
                         "does not take them (PEFT's prompt learning sets one that prepends its soft prompt to the "
                         "embeddings of input_ids), as HF's generate refuses them there; pass input_ids")
    text = inputs_embeds if inputs_embeds is not None else input_ids
    B, T = text.shape[:2]
    dev = text.device
    ids = input_ids if input_ids is not None else torch.empty(B, 0, dtype=torch.long, device=dev)
    mask = attention_mask.to(dev) if attention_mask is not None else torch.ones(B, T, dtype=torch.long, device=dev)
    params = inspect.signature(base_prepare).parameters
    first = {k: v for k, v in (("is_first_iteration", True), ("cache_position", torch.arange(T, device=dev)))
             if k in params}
    embeds = {} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    prepared = hook(ids, attention_mask=mask, use_cache=True, **first, **embeds, **model_kwargs)
    if any(prepared.get(k) is not None for k in CACHE_ARGUMENTS):
        raise ValueError("generate: the model's prepare_inputs_for_generation passes a KV cache (past_key_values, as "
                         "PEFT's prefix tuning does), which CoMeT cannot read: its memory is its cache")
    text = prepared.get("inputs_embeds")
    text = prepared["input_ids"] if text is None else text
    mask = prepared.get("attention_mask")
    if mask is None:
        return (text, None, None) if text.dim() == 2 else (None, text, None)
    if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(text.shape[:2]):
        raise ValueError(f"generate: the model's prepare_inputs_for_generation returned an attention_mask that is "
                         f"not a (batch, tokens) tensor of its input's {tuple(text.shape[:2])}")
    order = torch.sort((mask == 0).int(), dim=1, stable=True).indices  # each row's tokens first, in order
    text, mask = columns(text, order.to(text.device)), torch.gather(mask, 1, order)
    return (text, None, mask) if text.dim() == 2 else (None, text, mask)
