"""attn_implementation="comet" on packed sequences: several sequences in one row, told apart by
position_ids that restart (HF's mask function) or by FlashAttention-style cu_seq_lens_q / _k."""
from __future__ import annotations

import pytest
import torch
import transformers
from modeling_utils import VOCAB, tiny_base
from transformers.masking_utils import (and_masks, bidirectional_mask_function, causal_mask_function, or_masks,
                                        packed_sequence_mask_function)

import comet_ext
from comet_ext import attention
from comet_ext.attention import comet_attention, comet_mask

TOL = dict(rtol=1e-5, atol=1e-5)
PAD = -1  # a trailing pad token at position 0: to HF, a one-token sequence of its own

# Two rows of 13 tokens with different splits into odd lengths; PAD entries are trailing padding.
LAYOUTS = {
    "unpadded": [[3, 5, 5], [7, 1, 5]],
    "padded": [[3, 5, PAD, PAD, PAD, PAD, PAD], [7, 5, PAD]],
}


@pytest.fixture(autouse=True)
def _register():
    comet_ext.register()


def packed(layout, seed=0):
    """input_ids and position_ids (B, S) of a layout, and the (row, start, length) of each real sequence."""
    pos = [torch.cat([torch.arange(1 if n == PAD else n) for n in row]) for row in layout]
    x = torch.randint(0, VOCAB, (len(layout), pos[0].numel()), generator=torch.Generator().manual_seed(seed))
    seqs = []
    for r, row in enumerate(layout):
        start = 0
        for n in row:
            if n != PAD:
                seqs.append((r, start, n))
            start += 1 if n == PAD else n
    return x, torch.stack(pos), seqs


def logits(model, impl, input_ids, **kw):
    model.set_attn_implementation(impl)
    return model(input_ids, use_cache=False, **kw).logits


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_packed_forward_matches_sdpa_eager_and_each_sequence_alone(family, layout):
    model = tiny_base(family)
    x, pos, seqs = packed(LAYOUTS[layout])
    out = logits(model, "comet", x, position_ids=pos)
    torch.testing.assert_close(out, logits(model, "sdpa", x, position_ids=pos), **TOL)
    torch.testing.assert_close(out, logits(model, "eager", x, position_ids=pos), **TOL)
    for r, start, n in seqs:
        alone = logits(model, "sdpa", x[r:r + 1, start:start + n])[0]
        torch.testing.assert_close(out[r, start:start + n], alone, **TOL)
    # the packing matters: read as one sequence per row, the later sequences differ
    assert not torch.allclose(out, logits(model, "comet", x), **TOL)


def test_packed_gqa_model_matches_sdpa():
    model = tiny_base("qwen3", num_attention_heads=6, num_key_value_heads=2, head_dim=8)
    x, pos, _ = packed([[2, 9, 4], [6, 6, 3]], seed=1)
    torch.testing.assert_close(logits(model, "comet", x, position_ids=pos),
                               logits(model, "sdpa", x, position_ids=pos), **TOL)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_packed_parameter_gradients_match_sdpa(family):
    model = tiny_base(family).train()
    x, pos, _ = packed(LAYOUTS["padded"], seed=2)
    grads = {}
    for impl in ("sdpa", "comet"):
        model.set_attn_implementation(impl)
        model.zero_grad()
        model(x, position_ids=pos, labels=x, use_cache=False).loss.backward()
        grads[impl] = {name: p.grad.clone() for name, p in model.named_parameters()}
    for name, g in grads["sdpa"].items():
        torch.testing.assert_close(grads["comet"][name], g, **TOL, msg=name)


def test_packed_sliding_window_takes_sequences_that_fit_it():
    """A sliding window masks nothing inside a sequence no longer than it, however long the row."""
    model = tiny_base("mistral", sliding_window=6)
    x, pos, _ = packed([[4, 6, 3]], seed=3)
    torch.testing.assert_close(logits(model, "comet", x, position_ids=pos),
                               logits(model, "sdpa", x, position_ids=pos), **TOL)
    x, pos, _ = packed([[4, 7, 2]], seed=3)
    with pytest.raises(NotImplementedError, match="7 keys exceed the model's sliding_window 6"):
        logits(model, "comet", x, position_ids=pos)


@pytest.mark.skipif(not hasattr(transformers, "DataCollatorWithFlattening"), reason="no DataCollatorWithFlattening")
def test_data_collator_with_flattening():
    """The collator's position_ids (sdpa sees them too), and its FlashAttention kwargs alone:
    cu_seq_lens_q / _k are honoured, not ignored (sdpa ignores them and attends across)."""
    model = tiny_base("llama")
    g = torch.Generator().manual_seed(4)
    lengths = [5, 3, 7]
    features = [{"input_ids": torch.randint(0, VOCAB, (n,), generator=g).tolist()} for n in lengths]
    batch = transformers.DataCollatorWithFlattening()(features)
    assert batch["input_ids"].shape == (1, sum(lengths))
    out = logits(model, "comet", **batch)
    torch.testing.assert_close(out, logits(model, "sdpa", **batch), **TOL)

    flash = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=False)(features)
    assert "position_ids" not in flash and "cu_seq_lens_q" in flash
    out_cu = logits(model, "comet", **flash)
    start = 0
    for n in lengths:  # alone at the same positions (no position_ids: they run on along the row)
        alone = logits(model, "sdpa", flash["input_ids"][:, start:start + n],
                       position_ids=torch.arange(start, start + n).unsqueeze(0))
        torch.testing.assert_close(out_cu[0, start:start + n], alone[0], **TOL)
        start += n
    assert not torch.allclose(out_cu, logits(model, "sdpa", **flash), **TOL)


def test_cu_seq_lens_are_refused_where_they_cannot_hold():
    q = torch.randn(1, 2, 6, 8)
    kv = torch.randn(1, 2, 9, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="without a KV cache"):
        comet_attention(None, q, kv, kv, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    with pytest.raises(NotImplementedError, match="both given, and equal"):
        comet_attention(None, q, q, q, None, cu_seq_lens_q=cu, cu_seq_lens_k=torch.tensor([0, 3, 6]))
    for bad in ([0, 4, 2], [1, 6], [0, 3, 7], [[0, 6]]):  # decreasing, not from 0, past the 6 tokens, 2D
        bad = torch.tensor(bad, dtype=torch.int32)
        with pytest.raises(ValueError, match="cu_seq_lens_q / cu_seq_lens_k must be 1D offsets"):
            comet_attention(None, q, q, q, None, cu_seq_lens_q=bad, cu_seq_lens_k=bad)
    short = torch.tensor([0, 2, 4], dtype=torch.int32)  # stops short of the 6 tokens: the rest is padding
    out, _ = comet_attention(None, q, q, q, None, cu_seq_lens_q=short, cu_seq_lens_k=short)
    assert out[0, 4:].abs().max().item() == 0.0


def test_attention_over_sequence_ids_with_padding_holes_and_gqa_matches_a_reference():
    """Sequence ids straight into the attention function: 0 marks padding (its output rows are
    zeros), wherever it sits; 6 query heads over 2 key heads. Outputs and q / k / v gradients."""
    seq = torch.tensor([[1, 1, 0, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 0, 0, 0], [0, 3, 3, 7, 7, 7, 7, 7]])
    g = torch.Generator().manual_seed(5)
    q = torch.randn(3, 6, 8, 16, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(3, 2, 8, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out, _ = comet_attention(None, q, k, v, seq, scaling=0.3)

    i = torch.arange(8)
    sees = (seq[:, :, None] == seq[:, None, :]) & (seq[:, None, :] != 0) & (i[None, :, None] >= i[None, None, :])
    scores = (q @ k.repeat_interleave(3, 1).transpose(-1, -2) * 0.3).masked_fill(~sees[:, None], float("-inf"))
    ref = (scores.softmax(-1).nan_to_num() @ v.repeat_interleave(3, 1)).transpose(1, 2)
    ref = ref * (seq != 0)[:, :, None, None]
    torch.testing.assert_close(out, ref)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    for got, want in zip(grads, torch.autograd.grad((ref * w).sum(), (q, k, v))):
        torch.testing.assert_close(got, want)


def _packed_function(ids):
    return and_masks(causal_mask_function, packed_sequence_mask_function(torch.tensor(ids)))


@pytest.mark.parametrize("conv", ["cache_position", "q_offset"])
def test_mask_function_hands_over_sequence_ids_in_both_calling_conventions(conv):
    # transformers 5.0 calls a mask interface with cache_position; later 5.x with q_length / q_offset
    where = dict(cache_position=torch.arange(7)) if conv == "cache_position" else dict(q_length=7, q_offset=0)
    fn = _packed_function([[0, 0, 1, 1, 1, 2, 2], [0, 0, 0, 0, 0, 0, 1]])
    ids = comet_mask(batch_size=2, kv_length=7, kv_offset=0, mask_function=fn, **where)
    assert ids.dtype == torch.long
    assert ids.tolist() == [[1, 1, 2, 2, 2, 3, 3], [1, 1, 1, 1, 1, 1, 2]]
    # one sequence per row: plain causal, no mask
    assert comet_mask(batch_size=2, kv_length=7, kv_offset=0, mask_function=_packed_function([[0] * 7] * 2),
                      **where) is None


def _prefix_lm(b, h, q, kv):  # the first 3 tokens see each other, as an image block or a prefix LM would
    return (q < 3) & (kv < 3)


@pytest.mark.parametrize("mask_function", [
    bidirectional_mask_function,
    or_masks(causal_mask_function, _prefix_lm),
    and_masks(causal_mask_function, lambda b, h, q, kv: kv != 0),
    and_masks(_packed_function([[0, 0, 1, 1, 1, 1]]), lambda b, h, q, kv: kv != 3),
], ids=["bidirectional", "causal-or-block", "causal-without-key-0", "packed-without-key-3"])
def test_a_mask_neither_causal_nor_packed_is_refused(mask_function):
    with pytest.raises(NotImplementedError, match="asked for another mask"):
        comet_mask(batch_size=1, q_length=6, q_offset=0, kv_length=6, kv_offset=0, mask_function=mask_function)


def test_packed_sequences_with_cached_keys_are_refused():
    # queries 4..7 over keys 0..7: the sequences of the cached keys are not the kernel's to know
    fn = _packed_function([[0, 0, 0, 0, 0, 1, 1, 1]])
    with pytest.raises(NotImplementedError, match="only for a prefill without a KV cache"):
        comet_mask(batch_size=1, q_length=4, q_offset=4, kv_length=8, kv_offset=0, mask_function=fn)


# ---------------------------------------------------------------- review: the cases a user meets

@pytest.mark.parametrize("pos", [
    [[0, 0, 0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 1, 0, 1]],  # left padding (pads at position 0: sequences of 1)
    [[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 0, 1, 0, 1, 2]],  # one row one sequence, the other three
    [[5, 6, 7, 8, 9, 10, 11, 12], [0, 0, 1, 2, 3, 4, 5, 0]],  # one sequence not from 0; sequences of 1 at both ends
    [[0] * 8, [0] * 8],  # every token a sequence of its own
    [[3, 4, 5, 9, 10, 11, 0, 1], [0, 1, 1, 2, 3, 3, 4, 5]],  # restarts that are not at 0, repeated positions
], ids=["left-padded", "one-and-three", "ends-of-one", "all-ones", "odd-restarts"])
def test_packed_rows_of_every_shape_match_sdpa_and_eager(pos):
    model = tiny_base("llama")
    x = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(6))
    pos = torch.tensor(pos)
    out = logits(model, "comet", x, position_ids=pos)
    torch.testing.assert_close(out, logits(model, "sdpa", x, position_ids=pos), **TOL)
    torch.testing.assert_close(out, logits(model, "eager", x, position_ids=pos), **TOL)


def test_an_attention_mask_beside_packed_position_ids_is_read_as_hf_reads_it():
    """With an attention_mask HF does not look for packed sequences (no implementation does):
    the rows are read as one sequence each behind their padding, as sdpa reads them."""
    model = tiny_base("llama")
    x = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(7))
    pos = torch.tensor([[0, 0, 0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 1, 0, 1]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    out = logits(model, "comet", x, position_ids=pos, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(out[real], logits(model, "sdpa", x, position_ids=pos, attention_mask=mask)[real], **TOL)


def test_packed_forward_and_backward_under_bf16_autocast_match_sdpa():
    """Under autocast the kernel computes in bf16 while HF's rotary embedding hands it fp32
    queries and keys: the output is bf16, as sdpa's is, and the gradients reach the weights."""
    x, pos, _ = packed(LAYOUTS["padded"], seed=8)
    res = {}
    for impl in ("sdpa", "comet"):
        model = tiny_base("llama").train()
        model.set_attn_implementation(impl)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, position_ids=pos, labels=x, use_cache=False)
        out.loss.backward()
        res[impl] = out.logits.float(), out.loss, model.model.layers[0].self_attn.q_proj.weight.grad
    for got, want in zip(res["comet"], res["sdpa"]):
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


@pytest.mark.skipif(not hasattr(transformers, "DataCollatorWithFlattening"), reason="no DataCollatorWithFlattening")
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_trainer_with_the_flattening_collator_matches_sdpa_eager_and_each_sequence_alone(tmp_path, bf16):
    """transformers.Trainer end to end on packed batches (bf16: under autocast): the loss of every
    step is sdpa's (and eager's), and before training it is the loss of each sequence alone."""
    g = torch.Generator().manual_seed(9)
    data = [{"input_ids": torch.randint(0, VOCAB, (n,), generator=g).tolist()} for n in (5, 3, 7, 1, 6, 2, 9, 4)]
    model = tiny_base("llama")
    seqs = [torch.tensor([f["input_ids"]]) for f in data if len(f["input_ids"]) > 1]
    alone = sum(model(s, labels=s).loss * (s.shape[1] - 1) for s in seqs) / sum(s.shape[1] - 1 for s in seqs)
    losses = {}
    for impl in ("comet", "sdpa") if bf16 else ("comet", "sdpa", "eager"):
        model = tiny_base("llama")
        model.set_attn_implementation(impl)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / impl), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
            per_device_eval_batch_size=len(data), use_cpu=True, bf16=bf16, report_to=[], save_strategy="no",
            logging_steps=1, disable_tqdm=True, seed=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                                       data_collator=transformers.DataCollatorWithFlattening())
        before = trainer.evaluate()["eval_loss"]  # one batch of all the sequences, packed into one row
        trainer.train()
        losses[impl] = torch.tensor([before] + [h["loss"] for h in trainer.state.log_history if "loss" in h])
    tol = dict(rtol=0.02, atol=0.02) if bf16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(losses["comet"][0], alone.detach(), **tol)
    for impl in losses:
        torch.testing.assert_close(losses["comet"], losses[impl], **tol, msg=impl)
    assert losses["comet"].numel() == 4 and not torch.allclose(losses["comet"][1], losses["comet"][-1])


@pytest.mark.parametrize("how", ["position_ids", "cu_seq_lens"])
def test_the_layout_is_read_from_the_device_once_per_forward_not_once_per_layer(how):
    """Every decoder layer gets the same mask (and cu_seq_lens) tensor: the layout's host reads
    (nonzero's sizes, the buckets' sizes; the check of cu_seq_lens; the mask probe, and under
    transformers 5.0 the query end from cache_position) happen once per forward, whatever the
    depth: at most 5."""
    from modeling_utils import HostReads

    x, pos, _ = packed(LAYOUTS["padded"], seed=10)
    reads = {}
    for layers in (1, 4):
        if how == "position_ids":
            kw = dict(position_ids=pos)
        else:  # the 26 tokens of both rows, flattened; new tensors, as a new batch would bring
            cu = torch.tensor([0, 4, 13, 20, 26], dtype=torch.int32)
            kw = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu.clone())
        model = tiny_base("llama", num_hidden_layers=layers)
        model.set_attn_implementation("comet")
        with HostReads() as counter:
            model(x, use_cache=False, **kw)
        reads[layers] = counter.counts
    assert reads[4] == reads[1] and 0 < sum(reads[4].values()) <= 5, reads


def _in_place_edits_are_seen(g: torch.Generator) -> None:
    """In-place edits of the mask (directly and through a view) and of cu_seq_lens change the
    attention as they change it on copies no cache can know; unedited, the cached layout serves."""
    q, k, v = (torch.randn(2, 2, 6, 8, generator=g) for _ in range(3))

    def attend(*args, **kw):
        return comet_attention(None, q, k, v, *args, **kw)[0]

    def fresh(*args, **kw):  # the same call on copies no cache can know
        return attend(*(None if a is None else a.clone() for a in args), **{n: t.clone() for n, t in kw.items()})

    seq = torch.tensor([[1, 1, 1, 2, 2, 2], [1, 1, 2, 2, 2, 2]])
    before = attend(seq)
    torch.testing.assert_close(before, fresh(seq))
    torch.testing.assert_close(attend(seq), before)  # from the cache
    seq[0, 3:] = 1  # in place: row 0 is one sequence now
    after = attend(seq)
    torch.testing.assert_close(after, fresh(seq))
    assert not torch.allclose(before[0], after[0])
    seq[:, 1:].zero_()  # through a view: every row a sequence of one token
    torch.testing.assert_close(attend(seq), fresh(seq))

    cu = torch.tensor([0, 3, 6, 12])
    before = attend(None, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    torch.testing.assert_close(attend(None, cu_seq_lens_q=cu, cu_seq_lens_k=cu), before)
    cu[1] = 5
    after = attend(None, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    torch.testing.assert_close(after, fresh(None, cu_seq_lens_q=cu, cu_seq_lens_k=cu))
    assert not torch.allclose(before, after)


def test_a_mask_changed_in_place_or_replaced_is_read_again():
    """The cached layout is keyed on the tensor object and its version counter: an in-place
    edit of the mask or of cu_seq_lens is seen, a new tensor at a recycled address too, and the
    cache keeps no mask alive."""
    import gc
    import weakref

    g = torch.Generator().manual_seed(11)
    _in_place_edits_are_seen(g)
    q, k, v = (torch.randn(2, 2, 6, 8, generator=g) for _ in range(3))

    def attend(seq):
        return comet_attention(None, q, k, v, seq)[0]

    seq = torch.tensor([[1, 1, 1, 2, 2, 2], [1, 1, 2, 2, 2, 2]])
    attend(seq)
    gone = weakref.ref(seq)
    del seq
    gc.collect()
    assert gone() is None
    for _ in range(20):  # new masks, some where the last one lived (a recycled id())
        seq = 1 + (torch.rand(2, 6, generator=g) < 0.3).cumsum(1)
        torch.testing.assert_close(attend(seq), attend(seq.clone()))
        del seq
    kept = [torch.tensor([[1, 1, 2, 2, 2, 2]] * 2) for _ in range(20)]  # masks a caller keeps: a bounded cache
    for seq in kept:
        attend(seq)
    assert len(attention._LAYOUTS) <= attention._MAX_LAYOUTS


def test_cu_seq_lens_count_the_flattened_tokens_so_a_sequence_may_run_on_into_the_next_row():
    """As FlashAttention's varlen call reads them, cu_seq_lens are offsets into the B * S tokens
    flattened: a sequence across the end of a row is one sequence, not two."""
    g = torch.Generator().manual_seed(12)
    q = torch.randn(2, 6, 6, 8, generator=g)
    k, v = (torch.randn(2, 2, 6, 8, generator=g) for _ in range(2))
    cu = torch.tensor([0, 4, 9, 12], dtype=torch.int32)  # tokens 4..8: the last 2 of row 0, the first 3 of row 1
    out, _ = comet_attention(None, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu)

    def flat(t):  # (2, H, 6, D) -> (1, H, 12, D)
        return t.transpose(0, 1).reshape(1, t.shape[1], 12, t.shape[3])

    ref, _ = comet_attention(None, flat(q), flat(k), flat(v), None, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    torch.testing.assert_close(out, ref.view(2, 6, 6, 8))


def test_torch_compile_graph_breaks_on_packed_sequences_and_stays_right():
    """The layout's sizes are data: torch.compile breaks the graph there (fullgraph=True refuses
    loudly) and the compiled model computes what the eager one does, forward and backward."""
    torch._dynamo.reset()
    try:
        model = tiny_base("llama", num_hidden_layers=1).train()
        x, pos, _ = packed(LAYOUTS["padded"], seed=13)
        model.set_attn_implementation("sdpa")
        want = model(x, position_ids=pos, labels=x, use_cache=False)
        want_grad = torch.autograd.grad(want.loss, model.model.embed_tokens.weight)[0]
        model.set_attn_implementation("comet")
        got = torch.compile(model, backend="eager")(x, position_ids=pos, labels=x, use_cache=False)
        torch.testing.assert_close(got.logits, want.logits, **TOL)
        torch.testing.assert_close(torch.autograd.grad(got.loss, model.model.embed_tokens.weight)[0], want_grad, **TOL)
        torch._dynamo.reset()
        with pytest.raises(Exception, match="tolist|nonzero|data-dependent|graph break"):
            torch.compile(model, backend="eager", fullgraph=True)(x, position_ids=pos, use_cache=False)
    finally:
        torch._dynamo.reset()


def test_packed_forward_under_inference_mode_matches_sdpa():
    model = tiny_base("qwen3")
    x, pos, _ = packed(LAYOUTS["unpadded"], seed=14)
    with torch.inference_mode():
        torch.testing.assert_close(logits(model, "comet", x, position_ids=pos),
                                   logits(model, "sdpa", x, position_ids=pos), **TOL)


@pytest.mark.parametrize("how", ["position_ids", "cu_seq_lens"])
def test_inference_tensors_keep_their_layout_across_layers_by_content(how):
    """Inference tensors keep no version counter: their layout is cached with a copy and checked
    by content, one host read per further layer where computing it again takes three."""
    from modeling_utils import HostReads

    x, pos, _ = packed(LAYOUTS["padded"], seed=15)
    reads = {}
    for layers in (1, 4):
        model = tiny_base("llama", num_hidden_layers=layers)
        model.set_attn_implementation("comet")
        with torch.inference_mode(), HostReads() as counter:
            cu = torch.tensor([0, 4, 13, 20, 26], dtype=torch.int32)
            kw = dict(position_ids=pos) if how == "position_ids" else dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu.clone())
            model(x, use_cache=False, **kw)
        reads[layers] = sum(counter.counts.values())
    assert reads[4] == reads[1] + 3, reads


def test_an_inference_tensor_changed_in_place_is_read_again():
    """Under inference mode an in-place edit leaves no trace in a version counter; the content
    check sees it, for the mask and for cu_seq_lens."""
    with torch.inference_mode():
        _in_place_edits_are_seen(torch.Generator().manual_seed(16))


# ---------------------------------------------------------------- length buckets: uneven lengths

def _bucket(n):  # ceil(log2(n)): lengths in (2^(j-1), 2^j] share bucket j
    return (n - 1).bit_length()


def _recorded_calls(monkeypatch):
    """Records the (batch, rows) of q in every prefix_attention call the attention function makes."""
    import types

    calls = []
    real = attention.ops.prefix_attention

    def record(q, k, v, *args):
        calls.append(tuple(q.shape[:2]))
        return real(q, k, v, *args)

    monkeypatch.setattr(attention, "ops", types.SimpleNamespace(prefix_attention=record))
    return calls


def _ids(rows):
    """(B, S) sequence ids of rows of lengths; a negative length is that many padding tokens (id 0)."""
    return torch.stack([torch.cat([torch.full((abs(n),), i + 1 if n > 0 else 0) for i, n in enumerate(r)])
                        for r in rows])


def _causal_alone(q, k, v, scaling):  # q (1, Hq, n, D), k / v (1, Hkv, n, D): one sequence, plain causal
    rep = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True, scale=scaling).transpose(1, 2)


@pytest.mark.parametrize("how", ["ids", "cu_seq_lens"])
def test_very_uneven_lengths_pad_to_under_twice_the_tokens_in_one_call_per_bucket(monkeypatch, how):
    """One 4096-token sequence beside 63 of 64 tokens and short ones (8192 tokens): padded to the
    longest they were 70 x 4096 = 287k kernel rows (35x); by length bucket each call pads only to
    its bucket's longest, the rows stay under 2x the tokens, and the output is each sequence's alone."""
    lengths = [64] * 30 + [4096, 1, 17] + [64] * 33 + [3, 36, 2, 5]
    assert sum(lengths) == 8192
    g = torch.Generator().manual_seed(15)
    q = torch.randn(1, 2, 8192, 8, generator=g)
    k, v = (torch.randn(1, 1, 8192, 8, generator=g) for _ in range(2))
    calls = _recorded_calls(monkeypatch)
    if how == "ids":
        out, _ = comet_attention(None, q, k, v, _ids([lengths]), scaling=0.4)
    else:
        cu = torch.tensor([0] + lengths).cumsum(0).int()
        out, _ = comet_attention(None, q, k, v, None, scaling=0.4, cu_seq_lens_q=cu, cu_seq_lens_k=cu)

    assert sum(n * L for n, L in calls) < 2 * sum(lengths)  # 8220 rows
    assert len(calls) == len({_bucket(n) for n in lengths})  # 7: one per non-empty bucket, shortest first
    assert calls == [(1, 1), (1, 2), (1, 3), (1, 5), (1, 17), (64, 64), (1, 4096)]
    start = 0
    for n in lengths:
        s = slice(start, start + n)
        torch.testing.assert_close(out[0, s], _causal_alone(q[:, :, s], k[:, :, s], v[:, :, s], 0.4)[0], **TOL)
        start += n


SPLITS = {  # rows of 92 tokens; negative: padding tokens
    "ascending-descending": [[1, 2, 3, 5, 17, 64], [64, 17, 5, 3, 2, 1]],
    "mixed": [[3, 1, 64, 2, 17, 5], [17, 17, 17, 17, 17, 5, 2]],
    "one-long-all-ones": [[92], [1] * 92],
    "bucket-edges": [[33, 31, 16, 9, 2, 1], [32, 32, 8, 8, 4, 4, 2, 2]],
    "padded": [[5, -3, 64, 17, -2, 1], [-4, 2, 3, 65, 18]],
}


@pytest.mark.parametrize("split", SPLITS)
def test_uneven_splits_match_a_reference_and_each_sequence_alone_with_gradients(monkeypatch, split):
    """Sequences of lengths across many buckets, straight into the attention function (GQA, fp64):
    outputs and q / k / v gradients are a dense reference's, each sequence's output is its own
    attention alone, padding rows are zeros, one kernel call per bucket, and cu_seq_lens agree."""
    rows = SPLITS[split]
    seq = _ids(rows)
    S = seq.shape[1]
    g = torch.Generator().manual_seed(16)
    q = torch.randn(2, 6, S, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, S, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    calls = _recorded_calls(monkeypatch)
    out, _ = comet_attention(None, q, k, v, seq, scaling=0.3)
    lengths = [n for r in rows for n in r if n > 0]
    assert len(calls) == len({_bucket(n) for n in lengths})
    assert sum(n * L for n, L in calls) < 2 * sum(lengths)

    i = torch.arange(S)
    sees = (seq[:, :, None] == seq[:, None, :]) & (seq[:, None, :] != 0) & (i[None, :, None] >= i[None, None, :])
    scores = (q @ k.repeat_interleave(3, 1).transpose(-1, -2) * 0.3).masked_fill(~sees[:, None], float("-inf"))
    ref = (scores.softmax(-1).nan_to_num() @ v.repeat_interleave(3, 1)).transpose(1, 2)
    ref = ref * (seq != 0)[:, :, None, None]
    torch.testing.assert_close(out, ref)
    assert not out[seq == 0].any()
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    for got, want in zip(grads, torch.autograd.grad((ref * w).sum(), (q, k, v))):
        torch.testing.assert_close(got, want)
    with torch.no_grad():
        for r, row in enumerate(rows):
            start = 0
            for n in row:
                s = slice(start, start + abs(n))
                if n > 0:
                    alone = _causal_alone(q[r:r + 1, :, s], k[r:r + 1, :, s], v[r:r + 1, :, s], 0.3)[0]
                    torch.testing.assert_close(out[r, s], alone)
                start += abs(n)
        if min(n for r in rows for n in r) > 0:  # the same sequences as cu_seq_lens of the flattened rows
            cu = torch.tensor([0] + lengths).cumsum(0)
            torch.testing.assert_close(comet_attention(None, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu,
                                                       cu_seq_lens_k=cu)[0], out)


@pytest.mark.parametrize("split", ["ascending-descending", "bucket-edges", "padded"])
def test_uneven_packed_model_matches_sdpa_and_each_sequence_alone_forward_and_backward(split):
    """A model on rows of uneven packed sequences (position_ids that restart): logits are sdpa's
    and each sequence's alone, and so are the parameter gradients of the loss."""
    layout = [[n if n > 0 else PAD for n in r for _ in range(1 if n > 0 else -n)] for r in SPLITS[split]]
    x, pos, seqs = packed(layout, seed=17)
    model = tiny_base("llama").train()
    res = {}
    for impl in ("sdpa", "comet"):
        model.set_attn_implementation(impl)
        model.zero_grad()
        out = model(x, position_ids=pos, labels=x, use_cache=False)
        out.loss.backward()
        res[impl] = out.logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}
    torch.testing.assert_close(res["comet"][0], res["sdpa"][0], **TOL)
    for name, grad in res["sdpa"][1].items():
        torch.testing.assert_close(res["comet"][1][name], grad, **TOL, msg=name)
    model.eval()
    with torch.no_grad():
        for r, start, n in seqs:
            alone = logits(model, "sdpa", x[r:r + 1, start:start + n])[0]
            torch.testing.assert_close(res["comet"][0][r, start:start + n], alone, **TOL)


def test_the_layout_places_each_sequence_at_the_front_of_a_row_of_its_bucket():
    """_layout on random lengths: buckets shortest first, every sequence's length in (L_j / 2, L_j]
    of its bucket (so padding < 2x the tokens), lens[j]'s longest is L_j, and dest puts each token
    at its place in its own row of its bucket's batch, one token a row."""
    g = torch.Generator().manual_seed(18)
    lengths = (2 ** (torch.rand(300, generator=g) * 10)).long().tolist()  # 1 .. 1023, log-uniform
    seq = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(lengths)]).view(1, -1)
    lay = attention._layout(seq)
    T = sum(lengths)
    assert lay.row.numel() == T and lay.L == max(lengths)
    assert [lj.numel() for lj in lay.lens] == [n for n, _ in lay.sizes]
    assert sorted(torch.cat(lay.lens).tolist()) == sorted(lengths)
    bucket_of = [_bucket(L) for _, L in lay.sizes]
    assert bucket_of == sorted(set(bucket_of)) == sorted({_bucket(n) for n in lengths})
    for (n, L), lj in zip(lay.sizes, lay.lens):
        assert int(lj.max()) == L and all(_bucket(x) == _bucket(L) for x in lj.tolist())
    padded = sum(n * L for n, L in lay.sizes)
    assert padded < 2 * T
    assert lay.dest.unique().numel() == T and int(lay.dest.max()) < padded
    # the flat rows back to (bucket row, place): each sequence's tokens in order from place 0
    flat = torch.full((padded,), -1)
    flat[lay.dest] = seq[lay.row, lay.col]
    at = 0
    for (n, L), lj in zip(lay.sizes, lay.lens):
        block = flat[at:at + n * L].view(n, L)
        for b, m in enumerate(lj.tolist()):
            assert (block[b, :m] == block[b, 0]).all() and (block[b, m:] == -1).all()
            assert lengths[int(block[b, 0]) - 1] == m
        at += n * L
