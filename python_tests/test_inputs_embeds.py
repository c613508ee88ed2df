"""inputs_embeds in place of input_ids (forward, base_model, read, generate), as HF's models take
them, and PEFT's prompt learning, which prepends its soft prompt through them: against the
same tokens given as ids, and against the base model (the exact oracle: one chunk, no
temporary memory, an empty memory) with embeddings that are no token's."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from modeling_utils import VOCAB, tiny_comet

D = 64  # the tiny models' hidden size


def ids(B, T, seed=0):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def soft(B, T, seed=0):
    """Embeddings that are no token's (a soft prompt, another modality's features)."""
    return 0.5 * torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed))


def oracle_pair(family="qwen3"):
    """A CoMeT model whose one-chunk forward is its base model's, and that base model."""
    model = tiny_comet(family, temp_stride=-1, chunk_size=64)
    return model, copy.deepcopy(model.base)


def left_and_right_padded(B=3, T=40):
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :7] = 0  # left-padded
    mask[1, 29:] = 0  # right-padded
    return mask


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_forward_of_embeddings_equals_forward_of_their_tokens(family):
    """Over several chunks (the FIFO and the global memory on), with rows padded on either
    side: the logits, the loss and every gradient are those of the ids; the embeddings'
    gradient is what the embedding table gets from the ids."""
    model = tiny_comet(family)
    x, mask = ids(3, 40, seed=1), left_and_right_padded()
    table = model.get_input_embeddings().weight
    embeds = model.get_input_embeddings()(x).detach().requires_grad_()
    logits = model(x, attention_mask=mask).logits
    torch.testing.assert_close(model(inputs_embeds=embeds, attention_mask=mask).logits, logits, rtol=0, atol=0)

    right = torch.ones_like(x)
    right[1, 29:] = 0
    labels = x.masked_fill(right == 0, -100)
    model.zero_grad()
    loss = model(x, labels=labels, attention_mask=right, chunk_sizes=[16, 13, 11]).loss
    loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    loss_e = model(inputs_embeds=embeds, labels=labels, attention_mask=right, chunk_sizes=[16, 13, 11]).loss
    loss_e.backward()
    torch.testing.assert_close(loss_e, loss, rtol=0, atol=0)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    table_grad = expected.pop("base.model.embed_tokens.weight")
    assert "base.model.embed_tokens.weight" not in got or not got["base.model.embed_tokens.weight"].any()
    got.pop("base.model.embed_tokens.weight", None)
    assert got.keys() == expected.keys() and len(got) > 10
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    scattered = torch.zeros_like(table).index_add_(0, x.flatten(), embeds.grad.reshape(-1, D))
    torch.testing.assert_close(scattered, table_grad, rtol=1e-5, atol=1e-7)


def test_soft_embeddings_give_the_base_models_logits_and_loss():
    model, base = oracle_pair()
    embeds = soft(2, 30)
    labels = ids(2, 30, seed=4)
    ours, theirs = model(inputs_embeds=embeds, labels=labels), base(inputs_embeds=embeds, labels=labels)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)
    hidden = model.base_model(inputs_embeds=embeds).last_hidden_state
    torch.testing.assert_close(model.get_output_embeddings()(hidden), ours.logits, rtol=0, atol=0)


def test_read_of_embeddings_equals_read_of_their_tokens():
    """Streaming: every buffer of the memory is the one the ids leave, over several calls
    (ids, then embeddings, then ids), rows of different lengths padded on either side."""
    model = tiny_comet("qwen3")
    x, mask = ids(3, 70, seed=2), left_and_right_padded(3, 70)
    embeds = model.get_input_embeddings()(x)
    expected, last = model.read(x, attention_mask=mask, return_last_hidden=True)
    got, last_e = model.read(inputs_embeds=embeds, attention_mask=mask, return_last_hidden=True)
    torch.testing.assert_close(last_e, last, rtol=0, atol=0)
    for i, (a, b) in enumerate(zip(expected.buffers(), got.buffers())):
        assert torch.equal(a, b), i
    pieces, mixed = model.read(x[:, :23]), model.read(x[:, :23])
    pieces = model.read(x[:, 23:51], memory=pieces)
    mixed = model.read(inputs_embeds=embeds[:, 23:51], memory=mixed)
    for i, (a, b) in enumerate(zip(model.read(x[:, 51:], pieces).buffers(), model.read(x[:, 51:], mixed).buffers())):
        assert torch.equal(a, b), i


def test_generate_from_soft_embeddings_is_the_base_models():
    """As in HF: given inputs_embeds alone, the output holds the new tokens only; max_length
    counts the embedded prompt; a left-padded batch decodes each row as HF does."""
    model, base = oracle_pair()
    embeds, mask = soft(2, 12, seed=3), torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0
    for kwargs, new in ((dict(max_new_tokens=7), 7), (dict(max_length=17), 5),
                        (dict(max_new_tokens=5, attention_mask=mask), 5)):
        ours = model.generate(inputs_embeds=embeds, do_sample=False, **kwargs)
        theirs = base.generate(inputs_embeds=embeds, do_sample=False, pad_token_id=0, **kwargs)
        assert ours.shape == (2, new), ours.shape
        assert torch.equal(ours, theirs), (kwargs, ours, theirs)
    torch.manual_seed(5)
    theirs = base.generate(inputs_embeds=embeds, do_sample=True, top_k=20, max_new_tokens=6, pad_token_id=0)
    torch.manual_seed(5)
    ours = model.generate(inputs_embeds=embeds, do_sample=True, top_k=20, max_new_tokens=6)
    assert torch.equal(ours, theirs)


def test_generate_with_ids_and_their_embeddings():
    """Both given: the embeddings are read, the ids stand for the prompt in the output and in
    what the processors see (the repetition penalty reaches the prompt's tokens), as in HF."""
    model, base = oracle_pair()
    x = ids(2, 10, seed=6).clamp(min=1)  # (no pad token 0, from which HF would infer a mask)
    embeds = soft(2, 10, seed=7)  # not the ids' own embeddings: which of the two is read shows
    kwargs = dict(do_sample=False, max_new_tokens=6, repetition_penalty=5.0)
    ours = model.generate(x, inputs_embeds=embeds, **kwargs)
    theirs = base.generate(input_ids=x, inputs_embeds=embeds, pad_token_id=0, **kwargs)
    assert torch.equal(ours, theirs), (ours, theirs)
    assert torch.equal(ours[:, :10], x)
    assert not torch.equal(ours, model.generate(x, **kwargs))  # the embeddings, not the ids, were read
    with warnings.catch_warnings():  # (newer transformers warn that the penalty sees the new tokens only)
        warnings.simplefilter("ignore", UserWarning)
        alone = model.generate(inputs_embeds=embeds, **kwargs)
    assert not torch.equal(ours[:, 10:], alone)  # the penalty saw x


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_peft_prompt_learning_trains_and_generates_as_on_the_base_model(method):
    """PEFT's prompt tuning / P-tuning prepend a trained soft prompt through inputs_embeds (and,
    in generate, through prepare_inputs_for_generation): with the exact oracle, the loss, the
    soft prompt's gradient and the generated tokens are those of the same PEFT model over the
    base model."""
    peft = pytest.importorskip("peft")
    model, base = oracle_pair()
    config = (peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5) if method == "prompt_tuning"
              else peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=32))
    torch.manual_seed(1)
    ours = peft.get_peft_model(model, config)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(base, copy.deepcopy(config))
    x = ids(2, 20, seed=8)
    right = torch.ones_like(x)
    right[1, 15:] = 0
    labels = x.masked_fill(right == 0, -100)
    losses, grads = [], []
    for m in (ours, theirs):
        loss = m(input_ids=x, attention_mask=right, labels=labels).loss
        loss.backward()
        losses.append(loss)
        grads.append([p.grad for p in m.parameters() if p.requires_grad])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert len(grads[0]) == len(grads[1]) >= 1 and all(g is not None and g.any() for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    with torch.no_grad():  # a trained prompt is not the initial one: make it matter
        for m in (ours, theirs):
            for p in m.prompt_encoder.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(9)))
    kwargs = dict(do_sample=False, max_new_tokens=6)
    expected = theirs.generate(input_ids=x, **kwargs)
    assert torch.equal(ours.generate(input_ids=x, **kwargs), expected)
    assert not torch.equal(model.generate(x, **kwargs), expected)  # the soft prompt was read
    # Left-padded: PEFT has HF's generate count the padding in the positions (it drops the
    # position_ids), so HF's batched output differs from each prompt's own; CoMeT reads each
    # row's tokens right after the soft prompt: every prompt's own output.
    left = torch.ones_like(x)
    left[1, :6] = 0
    batched = ours.generate(input_ids=x, attention_mask=left, **kwargs)
    for b, start in ((0, 0), (1, 6)):
        alone = theirs.generate(input_ids=x[b:b + 1, start:], **kwargs)
        assert torch.equal(batched[b, start:], alone[0]), b


def test_peft_soft_prompt_starts_the_memory_only():
    """As PEFT injects its soft prompt into an empty cache only: generate reads it when the memory
    is empty, and a memory that has read something (an earlier turn, which read the soft prompt)
    goes on without it. Multitask prompt tuning takes its task_ids, as over the base model."""
    peft = pytest.importorskip("peft")
    model, base = oracle_pair()
    config = peft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, num_tasks=2)
    torch.manual_seed(2)
    ours = peft.get_peft_model(model, config)
    torch.manual_seed(2)
    theirs = peft.get_peft_model(base, copy.deepcopy(config))
    x, tasks = ids(2, 9, seed=10), torch.tensor([0, 1])
    kwargs = dict(do_sample=False, max_new_tokens=5)
    first, memory = ours.generate(input_ids=x, task_ids=tasks, return_memory=True, **kwargs)
    assert torch.equal(first, theirs.generate(input_ids=x, task_ids=tasks, **kwargs))
    assert not torch.equal(first, theirs.generate(input_ids=x, task_ids=tasks.flip(0), **kwargs))  # tasks matter
    y = ids(2, 6, seed=11)
    again = ours.generate(input_ids=y, memory=memory.clone(), task_ids=tasks, **kwargs)
    assert torch.equal(again, model.generate(y, memory=memory.clone(), **kwargs))


def test_peft_prompt_learning_refuses_what_hf_refuses():
    """inputs_embeds cannot go through PEFT's prepare_inputs_for_generation (HF's generate refuses
    them there too: the soft prompt would be left out); a left-padded forward batch gets a mask
    with a hole after the soft prompt's ones: refused, saying why."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_comet("qwen3"), peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                             num_virtual_tokens=3))
    x = ids(2, 8)
    with pytest.raises(ValueError, match="inputs_embeds cannot go through the model's prepare_inputs_for_generation"):
        model.generate(inputs_embeds=model.get_input_embeddings()(x), max_new_tokens=2)
    left = torch.ones_like(x)
    left[1, :3] = 0
    with pytest.raises(ValueError, match="soft prompt before the caller's mask, so a left-padded batch has a hole"):
        model(input_ids=x, attention_mask=left)


def test_peft_prefix_tuning_is_refused_by_name():
    """Prefix tuning passes a KV cache of trained prefixes; CoMeT's memory is its cache."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_comet("qwen3"), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                             num_virtual_tokens=4))
    x = ids(1, 8)
    with pytest.raises(ValueError, match="(past_key_values|cache) is not supported: CoMeT's memory is its cache"):
        model(input_ids=x, labels=x)
    with pytest.raises(ValueError, match="KV cache"):
        model.generate(input_ids=x, max_new_tokens=2)


def _m():
    return tiny_comet("llama")


@pytest.mark.parametrize("call, match", [
    (lambda m: m(), "exactly one of input_ids and inputs_embeds, got neither"),
    (lambda m: m.read(ids(1, 4), inputs_embeds=soft(1, 4)), "read: pass exactly one of input_ids and inputs_embeds"),
    (lambda m: m.read(), "read: pass exactly one"),
    (lambda m: m(inputs_embeds=torch.zeros(1, 4, 32)), r"inputs_embeds must be a floating-point tensor of shape "
                                                       r"\(batch, tokens, 64\).* got torch.float32 \(1, 4, 32\)"),
    (lambda m: m(inputs_embeds=torch.zeros(1, 4, 64, dtype=torch.long)), "floating-point tensor"),
    (lambda m: m(inputs_embeds=torch.zeros(4, 64)), r"\(batch, tokens, 64\)"),
    (lambda m: m(inputs_embeds=torch.zeros(1, 0, 64)), "inputs_embeds is empty"),
    (lambda m: m(inputs_embeds=soft(1, 4), labels=ids(1, 5)),
     r"labels \(1, 5\) must be a tensor of the shape of inputs_embeds \(batch, tokens\) \(1, 4\)"),
    (lambda m: m.read(inputs_embeds=soft(1, 4), boundary_ids=[3]), "boundary_ids needs input_ids"),
    (lambda m: m.generate(), "input_ids .* or inputs_embeds is required"),
    (lambda m: m.generate(ids(1, 4), inputs_embeds=soft(1, 5)), r"input_ids \(1, 4\) must name the tokens"),
    (lambda m: m.generate(inputs_embeds=soft(1, 0)), "inputs_embeds is empty"),
    (lambda m: m.generate(inputs_embeds=soft(1, 4), attention_mask=torch.ones(1, 5)), "attention_mask must have shape"),
    (lambda m: m.generate(inputs_embeds=soft(1, 4), max_length=4), "max_length 4 counts the prompt's 4 tokens"),
    (lambda m: m(ids(1, 4), past_key_values=object()), "past_key_values is not supported"),
], ids=["forward-neither", "read-both", "read-neither", "width", "int-embeds", "2-d", "empty", "labels-shape",
        "boundary-ids", "generate-neither", "generate-shapes", "generate-empty", "generate-mask", "generate-max-length",
        "past-key-values"])
def test_bad_inputs_embeds(call, match):
    with pytest.raises(ValueError, match=match):
        call(_m())
