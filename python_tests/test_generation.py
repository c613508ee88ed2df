"""CometForCausalLM.generate's HF settings (comet_ext/generation.py): which apply, the
logits processors and stopping criteria against HF's own and against HF's generate, the
streamer protocol, the returned output, and the memory a stopped generation leaves."""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import HAS_CUDA
from modeling_utils import VOCAB, HostReads, tiny_comet
from transformers import GenerationConfig
from transformers.generation import WatermarkingConfig
from transformers.generation.logits_process import (LogitsProcessor, LogitsProcessorList,
                                                    MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList


def ids(B, T, seed=0):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return tiny_comet("qwen3")


def test_processed_scores_match_hf_logits_processors(model):
    """Every step's scores are HF's processors and warpers, in HF's order, applied to that
    step's raw logits and the sequence so far (the oracle: transformers' own classes)."""
    prompt = ids(2, 7, seed=1)
    settings = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3,
                    min_new_tokens=3, eos_token_id=[5, 9])
    out = model.generate(prompt, max_new_tokens=6, generator=torch.Generator().manual_seed(0),
                         return_dict_in_generate=True, output_scores=True, output_logits=True, **settings)
    hf = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3),
                              MinNewTokensLengthLogitsProcessor(7, 3, [5, 9]),
                              TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)])
    assert len(out.scores) == len(out.logits) == out.sequences.shape[1] - 7 >= 3
    for step, (scores, logits) in enumerate(zip(out.scores, out.logits)):
        expected = hf(out.sequences[:, :7 + step], logits.clone())
        torch.testing.assert_close(scores, expected, rtol=0, atol=0)
        assert torch.isinf(scores).any()  # the warpers did cut (the comparison is not vacuous)


def test_kwargs_over_passed_config_over_model_config(model):
    prompt = ids(1, 5, seed=2)
    free = model.generate(prompt, max_new_tokens=8)[0, 5:].tolist()
    model.generation_config.eos_token_id = free[2]
    try:
        assert model.generate(prompt, max_new_tokens=8)[0, 5:].tolist() == free[:3]  # the model's eos applies
        passed = GenerationConfig(max_new_tokens=8, eos_token_id=free[4])
        assert model.generate(prompt, generation_config=passed)[0, 5:].tolist() == free[:5]
        out = model.generate(prompt, generation_config=passed, max_new_tokens=2, eos_token_id=free[6])
        assert out[0, 5:].tolist() == free[:2]  # keywords win over the passed config
    finally:
        model.generation_config.eos_token_id = None


def test_max_length_counts_the_prompt_and_max_new_tokens_wins(model):
    prompt = ids(1, 5, seed=3)
    assert model.generate(prompt, max_length=9).shape == (1, 9)
    assert model.generate(prompt, max_length=9, max_new_tokens=2).shape == (1, 7)
    assert model.generate(prompt).shape == (1, 25)  # HF's default: 20 new tokens
    with pytest.raises(ValueError, match="max_length 5 counts the prompt's 5 tokens"):
        model.generate(prompt, max_length=5)


def test_a_keyword_set_to_none_unsets_the_models_default(model):
    prompt = ids(1, 5, seed=3)
    free = model.generate(prompt, max_new_tokens=6)
    model.generation_config.eos_token_id = int(free[0, 6])
    try:
        assert model.generate(prompt, max_new_tokens=6).shape == (1, 7)
        assert torch.equal(model.generate(prompt, max_new_tokens=6, eos_token_id=None), free)
    finally:
        model.generation_config.eos_token_id = None


def test_top_k_none_keeps_every_token_as_in_hf(model):
    """top_k=None as a keyword leaves HF's top-k filter out; unset, HF's default of 50 applies."""
    prompt, kw = ids(1, 5, seed=3), dict(do_sample=True, max_new_tokens=1, return_dict_in_generate=True,
                                         output_scores=True)
    assert VOCAB > 50
    assert int(torch.isfinite(model.generate(prompt, **kw).scores[0]).sum()) == 50
    assert int(torch.isfinite(model.generate(prompt, top_k=None, **kw).scores[0]).sum()) == VOCAB


def test_min_new_tokens_holds_eos_back(model):
    prompt = ids(1, 5, seed=4)
    first = int(model.generate(prompt, max_new_tokens=1)[0, 5])
    assert model.generate(prompt, max_new_tokens=6, eos_token_id=first).shape == (1, 6)
    out = model.generate(prompt, max_new_tokens=6, eos_token_id=first, min_new_tokens=3)
    assert out.shape[1] >= 8 and first not in out[0, 5:8].tolist()
    assert torch.equal(model.generate(prompt, max_new_tokens=6, eos_token_id=first, min_length=8), out)
    # a min_length the prompt already reaches holds nothing back (transformers 5.0's pipelines pass 0)
    assert model.generate(prompt, max_new_tokens=6, eos_token_id=first, min_length=0).shape == (1, 6)


def test_eos_goes_into_the_memory_so_the_next_turn_follows_the_transcript(model):
    """A sample stopped by EOS has read its EOS: the memory equals reading prompt + output,
    and the next turn decodes as from that transcript."""
    prompt, question = ids(1, 9, seed=5), ids(1, 4, seed=6)
    free = model.generate(prompt, max_new_tokens=6)
    eos = int(free[0, 11])
    out, memory = model.generate(prompt, max_new_tokens=6, eos_token_id=eos, return_memory=True)
    assert out.shape == (1, 12) and int(memory.tokens[0]) == 12
    transcript = model.read(out)
    for field in ("tokens", "open_text", "fifo_len", "has_global"):
        assert torch.equal(getattr(memory, field), getattr(transcript, field)), field
    next_turn = model.generate(question, memory=memory, max_new_tokens=5)
    assert torch.equal(next_turn, model.generate(question, memory=transcript, max_new_tokens=5))


@pytest.mark.parametrize("settings", [dict(), dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.8,
                                                     repetition_penalty=1.3, min_new_tokens=40)])
@pytest.mark.parametrize("with_eos", [False, True])
def test_a_decode_step_does_not_wait_on_the_device(model, settings, with_eos):
    """A decode step (pick the token, read it: through every layer, closing chunks as they
    fill) asks the device for nothing, so on a GPU the host queues the next step while the
    device runs this one; with EOS ids it reads back one thing, which samples are still
    alive (as HF's generate does). Counted as the difference between 40 and 20 new tokens
    of a left-padded batch, chunks closing on the way."""
    prompt, mask = ids(2, 6, seed=11), torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    kwargs = dict(settings, attention_mask=mask)
    eos = None
    if with_eos:  # an id the free run never produces: both runs go their full length
        free = model.generate(prompt, max_new_tokens=40, generator=torch.Generator().manual_seed(0), **kwargs)
        eos = next(t for t in range(VOCAB) if t not in free.flatten().tolist())
    reads = []
    for n in (20, 40):
        counter = HostReads()
        with counter:
            out = model.generate(prompt, max_new_tokens=n, eos_token_id=eos,
                                 generator=torch.Generator().manual_seed(0), **kwargs)
        assert out.shape == (2, 6 + n)
        reads.append(counter.counts)
    assert reads[0], "the counter saw no host read at all: the count would prove nothing"
    per_step = reads[1].copy()
    per_step.subtract(reads[0])
    per_step = {k: v / 20 for k, v in per_step.items() if v}
    if with_eos:
        assert list(per_step.values()) == [1.0] and next(iter(per_step))[0] == "tolist", per_step
    else:
        assert per_step == {}, f"host reads per decode step: {per_step}"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda_graphs"])
@pytest.mark.parametrize("with_eos", [False, True])
def test_a_decode_step_does_not_sync_the_gpu(graphs, with_eos):
    """What test_a_decode_step_does_not_wait_on_the_device counts on the CPU, measured on a
    GPU: torch's sync debug mode sees no host-device synchronisation in a decode step
    (copies of host values included), one per step with EOS ids. The difference between 48
    and 24 new tokens, chunks closing on the way, decoding from one memory restored in place
    each time (so that, with CUDA graphs, the warm-up runs recorded every step shape and the
    measured runs replay them)."""
    model = tiny_comet("qwen3").cuda()
    if graphs:
        model.use_cuda_graphs(capacity=32)
    prompt = ids(2, 6, seed=11).cuda()
    memory = model.read(ids(2, 40, seed=12).cuda(), progress=False)
    snapshot = memory.clone()

    def decode(n: int, eos=None):
        for t, saved in zip(memory.buffers(), snapshot.buffers()):
            t.copy_(saved)
        return model.generate(prompt, memory=memory, max_new_tokens=n, eos_token_id=eos)

    eos = None
    if with_eos:  # an id the free run never produces: every run goes its full length
        eos = next(t for t in range(VOCAB) if t not in decode(48).flatten().tolist())

    def syncs(n: int) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = decode(n, eos)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert out.shape == (2, 6 + n)
        assert not [w for w in caught if "StepGraphs" in str(w.message)], "a step could not be recorded"
        return [str(w.message) for w in caught if "synchroniz" in str(w.message)]

    syncs(48), syncs(48)
    few = syncs(24)
    replays = model._step_graphs.replays if graphs else 0
    many = syncs(48)
    assert few, "the sync debug mode saw nothing: the count would prove nothing"
    assert len(many) - len(few) == (24 if with_eos else 0), many
    if graphs:  # every step of the run replayed a recording: the prompt's, 48 decode steps
        assert model._step_graphs.replays - replays >= 49


def test_streamer_gets_the_prompt_then_each_token_then_end(model):
    class Recorder:
        def __init__(self):
            self.calls = []

        def put(self, value):
            self.calls.append(value.clone())

        def end(self):
            self.calls.append("end")

    prompt, rec = ids(1, 5, seed=7), Recorder()
    out = model.generate(prompt, max_new_tokens=4, streamer=rec)
    assert torch.equal(rec.calls[0], prompt) and rec.calls[-1] == "end"
    assert [int(t) for t in rec.calls[1:-1]] == out[0, 5:].tolist()


def test_return_dict_and_inputs_alias(model):
    prompt = ids(2, 5, seed=8)
    out = model.generate(inputs=prompt, max_new_tokens=3, return_dict_in_generate=True)
    assert torch.equal(out.sequences, model.generate(prompt, max_new_tokens=3))
    assert out.scores is None and out.logits is None
    with pytest.raises(ValueError, match="not both"):
        model.generate(prompt, inputs=prompt)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_beams=3), ValueError, "num_beams"),
    (dict(num_return_sequences=0), ValueError, "num_return_sequences"),
    (dict(num_return_sequences=2), ValueError, "Greedy methods.*num_return_sequences"),  # HF's own check
    (dict(guidance_scale=1.5), ValueError, "guidance_scale"),
    (dict(penalty_alpha=0.6, top_k=4), ValueError, "penalty_alpha"),
    (dict(stop_strings=["ab"]), ValueError, "tokenizer"),  # HF's own error: stop strings need the tokenizer
    (dict(generation_config=GenerationConfig(num_beams=2)), ValueError, "num_beams"),
    (dict(beam_width=2), TypeError, "beam_width"),
    (dict(max_new_tokens=2.5), ValueError, "max_new_tokens"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(do_sample=True, temperature=float("nan")), ValueError, "temperature"),
    (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
    (dict(eos_token_id=VOCAB), ValueError, "eos_token_id"),
    (dict(generation_config={"max_new_tokens": 2}), ValueError, "GenerationConfig"),
    # ids HF's processors would first index the scores with mid-decoding (a bare IndexError)
    (dict(bad_words_ids=[[VOCAB + 5]]), ValueError, "bad_words_ids"),
    (dict(bad_words_ids=[3, 4]), ValueError, "list of token id lists"),
    (dict(forced_eos_token_id=VOCAB + 5), ValueError, "forced_eos_token_id"),
    (dict(suppress_tokens=[-1]), ValueError, "suppress_tokens"),
    (dict(sequence_bias={(VOCAB + 1,): 1.0}), ValueError, "sequence_bias"),
    (dict(max_time="1"), ValueError, "max_time"),
])
def test_bad_or_unsupported_settings_raise(model, kwargs, error, match):
    """Refused before anything is read: the memory passed in is left as it was."""
    memory = model.read(ids(1, 20, seed=22), progress=False)
    before = memory.clone()
    with pytest.raises(error, match=match):
        model.generate(ids(1, 3), memory=memory, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(memory.buffers(), before.buffers()))


def test_unsupported_model_defaults_warn_and_neutral_values_pass(model):
    prompt = ids(1, 3, seed=9)
    expected = model.generate(prompt, max_new_tokens=2)
    model.generation_config.num_beams = 4
    try:
        with pytest.warns(UserWarning, match="num_beams"):
            assert torch.equal(model.generate(prompt, max_new_tokens=2), expected)
    finally:
        model.generation_config.num_beams = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model.generate(prompt, max_new_tokens=2, num_beams=1, use_cache=True, output_attentions=False,
                             typical_p=1.0, guidance_scale=1.0, eos_token_id=torch.tensor([VOCAB - 1]))
    assert torch.equal(out, expected)


def test_left_padded_batches_generate_as_each_sample_alone(model):
    """HF pads decoder-only batches on the left for generation: each sample decodes as if
    alone, and the output keeps the left padding, as HF's does."""
    prompts = [ids(1, 6, seed=10), ids(1, 3, seed=11)]
    batch = torch.full((2, 6), 0, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    for b, p in enumerate(prompts):
        batch[b, 6 - p.shape[1]:], mask[b, 6 - p.shape[1]:] = p[0], 1
    batch[1, :3] = 7  # what the padding holds is the caller's: returned as given, as HF does
    out, memory = model.generate(batch, attention_mask=mask, max_new_tokens=5, pad_token_id=1, return_memory=True)
    assert torch.equal(out[:, :6], batch)
    for b, p in enumerate(prompts):
        alone, own = model.generate(p, max_new_tokens=5, return_memory=True)
        assert torch.equal(out[b, 6:], alone[0, p.shape[1]:])
        assert int(memory.tokens[b]) == int(own.tokens[0])
    with pytest.raises(ValueError, match="right-padded"):  # padding on both sides is neither
        model.generate(batch, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 0]] * 2), max_new_tokens=1)


def test_a_sample_without_prompt_tokens_is_refused(model):
    prompt, mask = ids(2, 4), torch.ones(2, 4, dtype=torch.long)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] are all zeros"):
        model.generate(prompt, attention_mask=mask, max_new_tokens=2)


def test_hf_text_generation_pipeline_batches_prompts():
    """transformers.pipeline drives generate as it drives an HF model: text in, text out,
    a batch of left-padded prompts giving what each prompt gives alone."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, pipeline

    from comet_ext import CometConfig, CometForCausalLM
    from comet_ext.data import byte_tokenizer

    tok = byte_tokenizer()
    tok.padding_side = "left"
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = CometForCausalLM.from_base(Qwen3ForCausalLM(cfg), CometConfig(chunk_size=32, num_global=4,
                                                                          temp_stride=4, temp_budget=8)).eval()
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    prompts = ["hello", "a longer prompt here"]
    alone = [pipe(p, max_new_tokens=6, do_sample=False)[0]["generated_text"] for p in prompts]
    batched = [r[0]["generated_text"] for r in pipe(prompts, max_new_tokens=6, do_sample=False, batch_size=2)]
    assert batched == alone and all(t.startswith(p) and len(t) > len(p) for t, p in zip(alone, prompts))


@pytest.fixture(scope="module")
def hf_equal():
    """A CoMeT model whose generate must equal its base model's HF generate: no temporary
    memory and a chunk longer than prompt + output, so reading starts from empty memories
    and every logit is the base model's; float64, so that no greedy choice is a near tie.
    The base runs sdpa (HF's eager attention gives NaN on left padding in float64)."""
    model = tiny_comet("qwen3", temp_stride=-1, chunk_size=64).double()
    model.base.config._attn_implementation = "sdpa"
    return model


def test_pad_tokens_of_a_prompt_without_attention_mask_are_padding_as_in_hf(hf_equal):
    """Given no attention_mask, HF's generate takes the prompt's pad_token_id tokens for padding
    (when pad_token_id is set and is not an EOS id), from a keyword or a generation_config alike."""
    prompt = ids(2, 7, seed=12)
    pad = next(t for t in range(VOCAB) if t not in prompt.flatten().tolist())
    prompt[1, :3] = pad
    hf = hf_equal.base.generate(prompt, max_new_tokens=6, pad_token_id=pad, eos_token_id=None)
    assert torch.equal(hf_equal.generate(prompt, max_new_tokens=6, pad_token_id=pad, eos_token_id=None), hf)
    hf_equal.generation_config.pad_token_id = pad
    try:
        assert torch.equal(hf_equal.generate(prompt, max_new_tokens=6, eos_token_id=None), hf)
    finally:
        hf_equal.generation_config.pad_token_id = None
    # pad_token_id among the EOS ids: HF infers nothing, every token is read
    both = dict(max_new_tokens=6, pad_token_id=pad, eos_token_id=[pad, VOCAB - 1])
    assert torch.equal(hf_equal.generate(prompt, **both), hf_equal.base.generate(prompt, **both))
    # a pad token inside a prompt would be a hole, which the memory cannot hold: named, not read
    prompt[0, 3] = pad
    with pytest.raises(ValueError, match=f"pad_token_id {pad}"):
        hf_equal.generate(prompt, max_new_tokens=2, pad_token_id=pad)
    with pytest.raises(ValueError, match=f"rows \\[1\\] are all zeros.*pad_token_id {pad}"):
        hf_equal.generate(torch.full((2, 3), pad).index_fill(0, torch.tensor([0]), 5), max_new_tokens=2,
                          pad_token_id=pad)


def test_a_mask_neither_left_nor_right_padded_names_both_layouts(model):
    with pytest.raises(ValueError, match="left-padded .* or right-padded"):
        model.generate(ids(1, 5), attention_mask=torch.tensor([[1, 1, 0, 1, 1]]), max_new_tokens=1)


@pytest.mark.parametrize("kwargs", [
    dict(synced_gpus=True),
    dict(negative_prompt_ids=torch.tensor([[1, 2]])),
    dict(custom_generate="some/repo"),
])
def test_hf_generate_arguments_it_does_not_implement_raise_a_value_error_naming_them(model, kwargs):
    (name,) = kwargs
    with pytest.raises(ValueError, match=f"{name}.*not supported"):
        model.generate(ids(1, 3), max_new_tokens=2, **kwargs)


def test_hf_generate_arguments_at_neutral_values_change_nothing(model):
    """What HF's generate takes for "none" (what wrappers pass by default) is accepted; the
    tokenizer serves only stop_strings, so without them it changes nothing."""
    prompt = ids(1, 3, seed=9)
    expected = model.generate(prompt, max_new_tokens=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model.generate(prompt, max_new_tokens=3, logits_processor=LogitsProcessorList(),
                             stopping_criteria=StoppingCriteriaList(), prefix_allowed_tokens_fn=None,
                             synced_gpus=False, assistant_model=None, negative_prompt_ids=None,
                             negative_prompt_attention_mask=None, custom_generate=None, tokenizer=object())
    assert torch.equal(out, expected)


def test_an_assistant_model_is_refused_by_name_without_printing_it(model):
    with pytest.raises(ValueError, match="assistant_model") as caught:
        model.generate(ids(1, 3), max_new_tokens=2, assistant_model=model.base)
    assert len(str(caught.value)) < 1000 and "DecoderLayer" not in str(caught.value)  # the model's repr is not in it


def _left_padded_batch():
    prompt = ids(2, 7, seed=13)
    mask = torch.ones_like(prompt)
    prompt[1, :3], mask[1, :3] = 0, 0
    return dict(input_ids=prompt, attention_mask=mask)


@pytest.mark.parametrize("settings", [
    dict(max_new_tokens=8),
    dict(max_length=12, eos_token_id=[90, 28], pad_token_id=1),  # stops sample 1 after 2 tokens
    dict(max_new_tokens=8, do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3),
    dict(max_new_tokens=8, do_sample=True, top_k=0, top_p=1e-9),
    dict(max_new_tokens=8, min_new_tokens=4, repetition_penalty=0.7, return_dict_in_generate=True,
         output_scores=True, output_logits=True),
    dict(max_new_tokens=8, left_padded=True, do_sample=True, repetition_penalty=1.3, return_dict_in_generate=True,
         output_scores=True),
], ids=["greedy", "eos_list_max_length", "sampling", "top_k0_top_p_tiny", "min_new_scores", "left_padded"])
def test_generate_is_hfs_generate_when_the_memory_is_empty_and_one_chunk(hf_equal, settings):
    """The differential oracle: on one chunk with empty memories CoMeT's logits are the base
    model's, so generate must give what HF's generate on the base gives: tokens, padding, scores
    and logits, sampling from the same global RNG. (Scores are compared only where no EOS stops a
    sample: after its EOS HF feeds a sample pad tokens, and its scores are not comparable.)"""
    settings = dict(settings)
    left_padded = settings.pop("left_padded", False)
    prompt = _left_padded_batch() if left_padded else dict(input_ids=ids(2, 7, seed=13))
    if "eos_token_id" not in settings:  # the Qwen3 config has none; state it for both sides
        settings["eos_token_id"] = None
    outputs = []
    for generate in (hf_equal.generate, hf_equal.base.generate):
        torch.manual_seed(0)
        outputs.append(generate(**prompt, **settings))
    ours, hf = outputs
    if not settings.get("return_dict_in_generate"):
        assert torch.equal(ours, hf)
        return
    assert torch.equal(ours.sequences, hf.sequences)
    for name in ("scores", "logits"):
        if getattr(hf, name) is not None:
            torch.testing.assert_close(torch.stack(getattr(ours, name)), torch.stack(getattr(hf, name)))


class _BanAtEvenSteps(LogitsProcessor):
    """A caller's processor: bans `token` whenever the sequence so far has an even length."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores):
        return scores if input_ids.shape[1] % 2 else scores.index_fill(1, torch.tensor([self.token]), -float("inf"))


class _StopAfter(StoppingCriteria):
    """A caller's criterion: a sample is done once its last token is one of `tokens`."""

    def __init__(self, tokens: list[int]):
        self.tokens = torch.tensor(tokens)

    def __call__(self, input_ids, scores, **kwargs):
        return torch.isin(input_ids[:, -1], self.tokens)


# Settings that only HF's own logits processors and stopping criteria implement, each made from the
# tokens the plain greedy run chose (first: its first new token per sample, later: its fourth), so
# that each changes the output. An EOS id the runs never pick is set where a criterion stops a
# sample: HF pads a stopped sample only when it has EOS ids (CoMeT always does).
_PROCESSED = {
    "no_repeat_ngram": lambda first, later: dict(no_repeat_ngram_size=1),
    "bad_words_suppress_bias": lambda first, later: dict(bad_words_ids=[[first[0]], [later[1], later[0]]],
                                                         suppress_tokens=[first[1]], begin_suppress_tokens=[later[0]],
                                                         sequence_bias={(later[1],): 3.0}),
    "forced_eos_decay_renormalize": lambda first, later: dict(
        forced_eos_token_id=later[0], eos_token_id=[later[1]], exponential_decay_length_penalty=(2, 1.5),
        renormalize_logits=True, remove_invalid_values=True, return_dict_in_generate=True, output_scores=True),
    "encoder_penalties": lambda first, later: dict(encoder_repetition_penalty=3.0, encoder_no_repeat_ngram_size=2),
    "min_p_typical_eta_epsilon": lambda first, later: dict(
        do_sample=True, temperature=1.5, top_k=0, min_p=0.05, typical_p=0.9, eta_cutoff=1e-3, epsilon_cutoff=1e-4,
        return_dict_in_generate=True, output_scores=True),
    "callers_processor_and_prefix_fn": lambda first, later: dict(
        logits_processor=LogitsProcessorList([_BanAtEvenSteps(first[0])]),
        prefix_allowed_tokens_fn=lambda b, sent: list(range(0, VOCAB, 2 + b))),
    "callers_criterion": lambda first, later: dict(stopping_criteria=StoppingCriteriaList([_StopAfter([later[0]])]),
                                                   eos_token_id=[_unused(first + later)], pad_token_id=3),
    "max_time": lambda first, later: dict(max_time=0.0),  # stops both samples after their first token
    "watermark": lambda first, later: dict(watermarking_config=WatermarkingConfig(bias=4.0)),
    "left_padded": lambda first, later: dict(left_padded=True, no_repeat_ngram_size=2, repetition_penalty=1.3,
                                             stopping_criteria=StoppingCriteriaList([_StopAfter([later[1]])]),
                                             eos_token_id=[_unused(first + later)]),
}


def _unused(tokens: list[int]) -> int:
    return next(t for t in range(VOCAB) if t not in tokens)


@pytest.mark.parametrize("name", list(_PROCESSED))
def test_hfs_processors_and_criteria_act_as_in_hfs_generate(hf_equal, name):
    """The differential oracle again, for what only transformers' own processors and criteria
    implement (n-gram and encoder penalties, bad words, suppression, sequence bias, forced and
    decaying EOS, min-p / typical / eta / epsilon sampling, a caller's processor, criterion and
    prefix function, max_time): generate builds them with HF's code and must give HF's tokens,
    padding and scores; and each setting changes the output (the comparison is not vacuous)."""
    plain = hf_equal.generate(**_left_padded_batch(), max_new_tokens=8, eos_token_id=None)
    settings = _PROCESSED[name](plain[:, 7].tolist(), plain[:, 10].tolist())
    left_padded = settings.pop("left_padded", False)
    prompt = _left_padded_batch() if left_padded else dict(input_ids=ids(2, 7, seed=13))
    settings = dict(max_new_tokens=8, **{"eos_token_id": None, **settings})
    outputs = []
    for generate in (hf_equal.generate, hf_equal.base.generate, hf_equal.generate):
        torch.manual_seed(0)
        outputs.append(generate(**prompt, **settings))
    torch.manual_seed(0)
    free = hf_equal.generate(**prompt, max_new_tokens=8, eos_token_id=None, do_sample=settings.get("do_sample", False),
                             temperature=settings.get("temperature", 1.0), top_k=settings.get("top_k", 50))
    ours, hf, again = ((o.sequences, o.scores) if settings.get("return_dict_in_generate") else (o, None)
                       for o in outputs)
    assert torch.equal(ours[0], hf[0]) and torch.equal(ours[0], again[0])
    if hf[1] is not None:  # scores compared while a sample runs (after its EOS, HF feeds it pad tokens)
        new_tokens = ours[0][:, 7:]
        stopped = torch.isin(new_tokens, torch.tensor(settings["eos_token_id"] or [-1])).int().cumsum(1)
        running = torch.cat([torch.zeros_like(stopped[:, :1]), stopped[:, :-1]], 1).eq(0).T  # (steps, B)
        assert int(running.sum()) >= 4
        torch.testing.assert_close(torch.stack(ours[1])[running], torch.stack(hf[1])[running])
    assert ours[0].shape != free.shape or not torch.equal(ours[0], free), f"{name} changed nothing"


def test_stop_strings_stop_a_sample_as_in_hf_and_its_memory_holds_what_it_returned():
    """stop_strings with the model's tokenizer (HF's StopStringCriteria): a sample stops at the
    token that completes the string, as in HF's generate on the base, and its memory holds
    exactly the returned tokens, so the next turn follows the transcript."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from comet_ext import CometConfig, CometForCausalLM
    from comet_ext.data import byte_tokenizer

    tok = byte_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = CometForCausalLM.from_base(Qwen3ForCausalLM(cfg), CometConfig(chunk_size=64, num_global=4,
                                                                          temp_stride=-1)).double().eval()
    model.base.config._attn_implementation = "sdpa"
    prompt = torch.tensor([list(b"abcde"), list(b"vwxyz")])
    letters = dict(max_new_tokens=10, prefix_allowed_tokens_fn=lambda b, sent: list(b"abcdefghijklmnopqrstuvwxyz"))
    plain = model.generate(prompt, eos_token_id=None, **letters)
    stop = tok.decode(plain[0, 8:10])  # sample 0 completes it with its fifth new token
    settings = dict(letters, stop_strings=[stop], tokenizer=tok, eos_token_id=tok.eos_token_id)
    ours, memory = model.generate(prompt, return_memory=True, **settings)
    assert torch.equal(ours, model.base.generate(prompt, **settings))
    assert tok.decode(ours[0, 5:10]).endswith(stop) and stop not in tok.decode(ours[0, 5:9])
    assert ours[0, 10:].eq(tok.eos_token_id).all()  # padded after its stop (HF's pad: the EOS id), as in HF
    transcript = model.read(ours[:1, :10])
    assert int(memory.tokens[0]) == int(transcript.tokens[0]) == 10


def test_num_return_sequences_samples_each_prompt_as_hf_does(hf_equal):
    """num_return_sequences=k: each prompt k times (in HF's order), sampled from the same global
    RNG draws, with the processors reading each copy's own sequence: HF's tokens and scores."""
    settings = dict(max_new_tokens=8, do_sample=True, num_return_sequences=3, repetition_penalty=1.3, top_k=20,
                    eos_token_id=None, return_dict_in_generate=True, output_scores=True)
    outputs = []
    for generate in (hf_equal.generate, hf_equal.base.generate):
        torch.manual_seed(0)
        outputs.append(generate(**_left_padded_batch(), **settings))
    ours, hf = outputs
    assert ours.sequences.shape == (6, 15) and torch.equal(ours.sequences, hf.sequences)
    assert not torch.equal(ours.sequences[0], ours.sequences[1])  # the copies sample on their own
    torch.testing.assert_close(torch.stack(ours.scores), torch.stack(hf.scores))


def test_num_return_sequences_leaves_the_callers_memory_and_returns_every_copys(model):
    """Each copy decodes from its own copy of the memory: copies sampled with top_k=1 (HF refuses
    several greedy sequences) equal one greedy run,
    the returned memory holds k samples per prompt, each as that run leaves its memory, and
    the memory passed in is left as it was."""
    memory = model.read(ids(2, 40, seed=20), progress=False)
    before = memory.clone()
    question = ids(2, 5, seed=21)
    out, copies = model.generate(question, memory=memory, max_new_tokens=6, num_return_sequences=2, do_sample=True,
                                 top_k=1, return_memory=True)
    assert all(torch.equal(a, b) for a, b in zip(memory.buffers(), before.buffers()))
    single, alone = model.generate(question, memory=before.clone(), max_new_tokens=6, return_memory=True)
    assert out.shape == (4, 11) and torch.equal(out, single.repeat_interleave(2, 0))
    assert copies.batch_size == 4
    for a, b in zip(copies.buffers(), alone.select([0, 0, 1, 1]).buffers()):  # (4 rows round unlike 2)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
