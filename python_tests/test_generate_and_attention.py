"""CometForCausalLM.generate, and attn_implementation="comet" for plain HF models."""
from __future__ import annotations

import pytest
import torch
from modeling_utils import VOCAB, tiny_base, tiny_comet

import comet_ext


def ids(B, T, seed=0):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_generation_is_the_argmax_of_the_training_forward(family):
    """Across several chunk closings (prompt 21 + 30 new tokens, chunks of 16), every
    generated token is the argmax of the teacher-forced training forward."""
    model = tiny_comet(family)
    prompt = ids(2, 21)
    out = model.generate(prompt, max_new_tokens=30)
    assert out.shape == (2, 51) and torch.equal(out[:, :21], prompt)
    assert int(out.min()) >= 0 and int(out.max()) < VOCAB  # no compression / readout ids exist
    pred = model(out).logits.argmax(-1)
    assert torch.equal(pred[:, 20:-1], out[:, 21:])


def test_generate_from_a_memory_continues_the_stream():
    model = tiny_comet("llama")
    doc, question = ids(1, 40, seed=1), ids(1, 5, seed=2)
    memory = model.read(doc)
    after_memory = model.generate(question, memory=memory, max_new_tokens=8)
    in_one_go = model.generate(torch.cat([doc, question], 1), max_new_tokens=8)
    assert torch.equal(after_memory[:, 5:], in_one_go[:, 45:])


def test_sampling_is_deterministic_given_a_generator():
    model = tiny_comet("qwen2")
    prompt = ids(2, 9)
    kw = dict(max_new_tokens=12, do_sample=True, temperature=0.7, top_k=8, top_p=0.9)
    a = model.generate(prompt, generator=torch.Generator().manual_seed(0), **kw)
    b = model.generate(prompt, generator=torch.Generator().manual_seed(0), **kw)
    c = model.generate(prompt, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_eos_stops_a_sample_and_pads_it():
    model = tiny_comet("llama")
    prompt = ids(2, 9)
    free = model.generate(prompt, max_new_tokens=6)
    eos = int(free[0, 10])  # sample 0's second generated token
    out = model.generate(prompt, max_new_tokens=6, eos_token_id=eos, pad_token_id=-1 % VOCAB)
    assert torch.equal(out[0, :11], free[0, :11])
    assert (out[0, 11:] == VOCAB - 1).all()


def test_memory_stays_constant_through_long_generation():
    model = tiny_comet("llama")
    prompt = ids(1, 4)
    out, memory = model.generate(prompt, max_new_tokens=70, return_memory=True)
    assert out.shape[1] == 74
    assert memory.nbytes() == model.new_memory(1).nbytes()
    assert int(memory.tokens[0]) == 74  # the memory holds every returned token


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_drop_in_attention_matches_sdpa_for_prefill_and_decode(family):
    comet_ext.register()
    base = tiny_base(family)
    x = ids(2, 13, seed=3)
    mask = torch.ones_like(x)
    mask[1, :4] = 0  # left padding, as HF batches prompts for generation
    runs = {}
    for impl in ("sdpa", "comet"):
        base.set_attn_implementation(impl)
        runs[impl] = base.generate(x, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0,
                                   output_logits=True, return_dict_in_generate=True)
    assert torch.equal(runs["sdpa"].sequences, runs["comet"].sequences)
    for a, b in zip(runs["sdpa"].logits, runs["comet"].logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_drop_in_attention_with_a_static_cache_matches_sdpa(padded):
    """A static cache holds key slots past the last query that are not written yet: the mask
    function's shorter mask keeps the kernel off them (they were read as keys before)."""
    comet_ext.register()
    base = tiny_base("llama")
    x = ids(2, 9, seed=5)
    mask = torch.ones_like(x)
    if padded:
        mask[0, :3] = 0
    runs = {}
    for impl in ("sdpa", "comet"):
        base.set_attn_implementation(impl)
        runs[impl] = base.generate(x, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                                   cache_implementation="static", output_logits=True,
                                   return_dict_in_generate=True)
    assert torch.equal(runs["sdpa"].sequences, runs["comet"].sequences)
    for a, b in zip(runs["sdpa"].logits, runs["comet"].logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_drop_in_attention_prefill_with_right_padding_matches_sdpa():
    comet_ext.register()
    base = tiny_base("llama")
    x = ids(2, 11, seed=4)
    mask = torch.ones_like(x)
    mask[0, 7:] = 0
    logits = {}
    for impl in ("sdpa", "comet"):
        base.set_attn_implementation(impl)
        logits[impl] = base(x, attention_mask=mask).logits
    torch.testing.assert_close(logits["comet"][0, :7], logits["sdpa"][0, :7], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits["comet"][1], logits["sdpa"][1], rtol=1e-5, atol=1e-5)


def test_drop_in_attention_takes_a_sliding_window_only_where_it_masks_nothing():
    comet_ext.register()
    base = tiny_base("mistral", sliding_window=8)
    x = ids(1, 8)
    logits = {}
    for impl in ("sdpa", "comet"):
        base.set_attn_implementation(impl)
        logits[impl] = base(x).logits
    torch.testing.assert_close(logits["comet"], logits["sdpa"], rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="9 keys exceed the model's sliding_window 8"):
        base(ids(1, 9))


def test_drop_in_attention_refuses_masks_with_holes():
    comet_ext.register()
    base = tiny_base("llama")
    base.set_attn_implementation("comet")
    x = ids(1, 6)
    with pytest.raises(ValueError, match="contiguous run"):
        base(x, attention_mask=torch.tensor([[1, 1, 0, 1, 1, 1]]))


def test_mask_function_takes_both_transformers_calling_conventions():
    # transformers 5.0 calls a mask interface with cache_position; later 5.x with q_length / q_offset
    from comet_ext.attention import comet_mask
    pad = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    late = comet_mask(batch_size=2, q_length=3, kv_length=5, q_offset=2, kv_offset=0, attention_mask=pad)
    early = comet_mask(batch_size=2, cache_position=torch.arange(2, 5), kv_length=5, kv_offset=0,
                       attention_mask=pad)
    assert torch.equal(late, pad.bool()) and torch.equal(early, pad.bool())
    # nothing padded: no mask at all, so the kernel takes its unmasked path
    assert comet_mask(batch_size=2, cache_position=torch.arange(5), kv_length=5,
                      attention_mask=torch.ones(2, 5, dtype=torch.long)) is None


@pytest.mark.parametrize("conv", ["q_length", "cache_position"])
def test_a_sliding_window_only_the_mask_carries_is_refused_where_it_masks_something(conv):
    """Some models (Qwen2MoE, PhiMoE) pass no sliding_window to the attention: the window is only
    in the mask function. Where a query sees more keys than the window lets it, the mask function
    raises (the kernel would attend them); within the window it masks nothing."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    from comet_ext.attention import comet_mask

    def mask(n, offset=0):
        where = dict(q_length=n, q_offset=offset) if conv == "q_length" else dict(cache_position=torch.arange(offset, offset + n))
        return comet_mask(batch_size=2, kv_length=offset + n, local_size=4,
                          mask_function=sliding_window_causal_mask_function(4), **where)

    assert mask(4) is None and mask(1, offset=3) is None
    for n, offset in ((5, 0), (1, 4), (12, 0)):
        with pytest.raises(NotImplementedError, match=f"{offset + n} keys exceed the model's sliding_window 4"):
            mask(n, offset)


def test_a_model_whose_sliding_window_is_in_its_mask_only_matches_eager_or_raises():
    import transformers

    comet_ext.register()
    torch.manual_seed(0)
    config = transformers.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        use_sliding_window=True, sliding_window=4, max_window_layers=2, initializer_range=0.3)
    model = transformers.Qwen2MoeForCausalLM(config).eval()
    logits = {}
    for impl in ("eager", "comet"):
        model.set_attn_implementation(impl)
        logits[impl] = model(ids(1, 4)).logits
    torch.testing.assert_close(logits["comet"], logits["eager"], rtol=1e-4, atol=1e-4)
    with pytest.raises(NotImplementedError, match="sliding.window"):
        model(ids(1, 12))


def test_non_causal_attention_and_score_changing_arguments_are_refused():
    """Encoders and cross-attention (is_causal=False, from the call or the module) and models
    that change the scores (soft-capping, sinks, a position bias, sparse key indices) are
    refused, not computed as plain causal attention."""
    import transformers

    from comet_ext.attention import comet_attention

    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    encoder = torch.nn.Module()
    encoder.is_causal = False
    with pytest.raises(NotImplementedError, match="non-causal"):
        comet_attention(encoder, q, k, v, None)
    with pytest.raises(NotImplementedError, match="non-causal"):
        comet_attention(None, q, k, v, None, is_causal=False)
    torch.testing.assert_close(comet_attention(encoder, q, k, v, None, is_causal=True)[0],
                               comet_attention(None, q, k, v, None)[0])  # the call's word wins
    for name, value in (("softcap", 50.0), ("s_aux", torch.zeros(2)), ("sinks", torch.zeros(2)),
                        ("position_bias", torch.zeros(1, 2, 5, 5)), ("indices", torch.zeros(1, 5, 2))):
        with pytest.raises(NotImplementedError, match=f"passes {name}"):
            comet_attention(None, q, k, v, None, **{name: value})
    comet_attention(None, q, k, v, None, softcap=None)  # None: nothing asked

    comet_ext.register()
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=8))
    clip.set_attn_implementation("comet")
    with pytest.raises(NotImplementedError, match="non-causal"):
        clip(pixel_values=torch.randn(1, 3, 16, 16))
    gemma = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, attn_logit_softcapping=30.0))
    gemma.set_attn_implementation("comet")
    with pytest.raises(NotImplementedError, match="softcap"):
        gemma(ids(1, 5))


def test_a_mask_shorter_than_the_keys_is_padding_past_its_end_as_hf_reads_it():
    """HF pads a 2D mask shorter than the keys with zeros: tokens past its end are padding."""
    comet_ext.register()
    base = tiny_base("llama")
    x = ids(2, 6, seed=6)
    logits = {}
    for impl, mask in (("sdpa", torch.ones(2, 4, dtype=torch.long)), ("comet", torch.ones(2, 4, dtype=torch.long)),
                       ("explicit", torch.tensor([[1, 1, 1, 1, 0, 0]] * 2))):
        base.set_attn_implementation("comet" if impl == "explicit" else impl)
        logits[impl] = base(x, attention_mask=mask).logits[:, :4]
    torch.testing.assert_close(logits["comet"], logits["sdpa"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits["comet"], logits["explicit"], rtol=0, atol=0)
