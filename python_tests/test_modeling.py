"""CometForCausalLM: the fast formulation against the naive oracle and the base model,
streaming against training, pieces against one read, save / load, bad inputs."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from modeling_utils import FAMILIES, VOCAB, HostReads, naive_forward, tiny_base, tiny_comet

from comet_ext import ops
from comet_ext.config import CometConfig
from comet_ext.memory import CometMemory
from comet_ext.modeling import CometForCausalLM
from comet_ext.planner import semantic

FAMILY_NAMES = list(FAMILIES)


def ids(B, T, seed=0):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_one_chunk_without_interleaved_tokens_is_the_base_model(family):
    """Empty memory, one chunk, compression only after the last text token: the text
    rows see exactly what the base model sees."""
    model = tiny_comet(family, temp_stride=16)
    x = ids(2, 16)
    torch.testing.assert_close(model(x).logits, model.base(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("chunks", [[16, 16, 16, 7], [5, 16, 3, 11, 16]], ids=["even", "uneven"])
def test_fast_formulation_equals_naive_oracle(family, chunks):
    model = tiny_comet(family)
    x = ids(2, sum(chunks), seed=1)
    fast = model(x, chunk_sizes=chunks).logits
    naive = naive_forward(model, x, chunks)
    torch.testing.assert_close(fast, naive, rtol=1e-5, atol=1e-5)


def test_oracle_runs_in_the_models_dtype():
    """The oracle builds its masks, positions and empty FIFOs in the model's dtype and on its
    device (a float32 mask or FIFO would upcast a bf16 model's rows and fail in its layers)."""
    model = tiny_comet("qwen3").to(torch.bfloat16)
    x = ids(1, 40, seed=4)
    sizes = model._chunk_sizes(None, 40)
    naive = naive_forward(model, x, sizes)
    assert naive.dtype == torch.bfloat16
    fast = model(x).logits
    # both sides round every layer's rows to bf16: hold them to a few bf16 roundings of the logits
    scale = fast.float().abs().max().item()
    assert (naive.float() - fast.float()).abs().max().item() <= 0.05 * scale


@pytest.mark.parametrize("comet", [dict(temp_stride=-1), dict(temp_budget=0), dict(temp_stride=5, chunk_size=12)],
                         ids=["no-temp", "budget-0", "partial-groups"])
def test_oracle_agrees_in_other_configurations(comet):
    model = tiny_comet("qwen3", **comet)
    x = ids(1, 40, seed=2)
    sizes = model._chunk_sizes(None, 40)
    torch.testing.assert_close(model(x).logits, naive_forward(model, x, sizes), rtol=1e-5, atol=1e-5)


def test_gate_snap_reaches_every_path():
    """With gates snapped (about half of this model's gates are above 0.55) training forward,
    token-by-token streaming and the naive oracle agree, and differ from the unsnapped model."""
    model = tiny_comet("qwen3", gate_snap=0.55)
    x = ids(1, 60, seed=2)
    fast = model(x).logits
    torch.testing.assert_close(fast, naive_forward(model, x, model._chunk_sizes(None, 60)), rtol=1e-5, atol=1e-5)
    memory, got = None, []
    for t in range(x.shape[1]):
        memory, last = model.read(x[:, t:t + 1], memory, return_last_hidden=True)
        got.append(model.base.lm_head(model.decoder.norm(last)))
    torch.testing.assert_close(torch.stack(got, 1), fast, rtol=1e-5, atol=1e-5)
    assert (tiny_comet("qwen3")(x).logits - fast).abs().max() > 1e-3


def test_snapped_gates_keep_the_global_memory_exactly(tmp_path):
    """gate_snap below every gate: after the first chunk the state never changes, bit for bit.
    The snap shapes no state: a memory read with it loads into the same model without it."""
    model = tiny_comet("llama", gate_snap=1e-6)
    x = ids(2, 90, seed=5)
    first = model.read(x[:, :17])  # the 17th token closes the first chunk
    assert bool(first.has_global.all())
    last = model.read(x)
    assert torch.equal(last.state, first.state)
    assert not torch.equal(tiny_comet("llama").read(x).state, first.state)
    last.save(tmp_path / "mem.safetensors")
    CometMemory.load(tmp_path / "mem.safetensors", tiny_comet("llama"))


def _deep_tiny(layers: int) -> CometForCausalLM:
    cfg = CometConfig(chunk_size=16, num_global=4, temp_stride=4, temp_budget=6, rla_rank=2)
    return CometForCausalLM.from_base(tiny_base("qwen3", num_hidden_layers=layers), cfg)


def test_streaming_host_syncs_do_not_grow_with_depth_or_length():
    """read() plans every step on the host, from the memory's host counters (written by the
    step before) and host values of its arguments: it waits on the device a fixed number of
    times per call (checking input_ids and the mask), however deep the model and however many
    chunks it reads. On a GPU a wait per layer or per chunk would stall the launch queue."""
    reads = {}
    for layers in (2, 5):
        model = _deep_tiny(layers).eval()
        x = ids(2, 80, seed=5)
        mask = torch.ones_like(x)
        mask[1, 57:] = 0  # ragged: the second sample ends mid-chunk
        memory = model.read(x[:, :16], progress=False)
        for end in (20, 80):  # part of one chunk; four chunks
            counter = HostReads()
            with counter:
                model.read(x[:, 16:end], memory.clone(), attention_mask=mask[:, 16:end], progress=False)
            reads[layers, end] = counter.counts
    assert reads[2, 20], "the counter saw no host read at all: the count would prove nothing"
    assert len({frozenset(c.items()) for c in reads.values()}) == 1, f"host reads per read differ: {reads}"
    # input_ids' range, the mask to the host, its lengths as a list (a host tensor already)
    assert sorted(where.split(":")[0] for _, where in reads[2, 20].elements()) == ["check_ids", "read", "row_lengths"]


def test_an_interrupted_step_leaves_a_memory_that_refuses_to_go_on(tmp_path):
    """Ctrl-C (or running out of memory) inside a step that closes a chunk, after layer 0 wrote
    its global state and FIFO and before layer 1 and the counters did: reading on would close the
    chunk twice in layer 0, silently. The memory, and any copy of it, refuses every later use; a
    copy taken before goes on as if nothing happened; an input refused before the step writes
    anything leaves the memory as it was."""
    model = tiny_comet("llama")
    x = ids(1, 40, seed=21)
    memory = model.read(x[:, :10])
    kept = memory.clone()

    def interrupt(module, args, output):
        raise KeyboardInterrupt

    hook = model.decoder.layers[1].mlp.register_forward_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            model.read(x[:, 10:20], memory)  # closes the first chunk (16 tokens)
    finally:
        hook.remove()
    uses = {"read": lambda: model.read(x[:, 20:], memory),
            "generate": lambda: model.generate(x[:, :2], memory=memory, max_new_tokens=2),
            "save": lambda: memory.save(tmp_path / "m.safetensors"),
            "clone": lambda: model.read(x[:, 20:], memory.clone()),
            "select": lambda: model.read(x[:, 20:], memory.select(0)),
            "to": lambda: model.read(x[:, 20:], memory.to(dtype=torch.float64).to(dtype=torch.float32))}
    for name, use in uses.items():
        with pytest.raises(ValueError, match="half-written by a read / generate step interrupted by KeyboardInterrupt"):
            use()
    assert not (tmp_path / "m.safetensors").exists()

    with pytest.raises(ValueError, match="must lie in"):  # refused before the step: the memory is intact
        model.read(torch.full((1, 3), VOCAB), kept)
    whole = model.read(x)
    model.read(x[:, 10:], kept)
    for f in ("state", "fifo_k", "kv_k", "open_text", "tokens"):
        torch.testing.assert_close(getattr(kept, f), getattr(whole, f), msg=f)


def test_a_memory_read_under_inference_mode_continues_after_it():
    """A memory read under torch.inference_mode() holds normal tensors: reading on and
    generating from it outside the block works, and equals doing it all outside."""
    model = _deep_tiny(2).eval()
    x = ids(1, 50, seed=8)
    with torch.inference_mode():
        memory = model.read(x[:, :20], progress=False)
    assert not any(t.is_inference() for t in memory.buffers())
    model.read(x[:, 20:], memory, progress=False)
    plain = model.read(x, progress=False)
    assert torch.equal(model.generate(x[:, :2], memory=memory, max_new_tokens=4),
                       model.generate(x[:, :2], memory=plain, max_new_tokens=4))
    with torch.inference_mode():  # a copy made under it too
        assert not any(t.is_inference() for t in plain.clone().buffers())


@pytest.mark.parametrize("index", [[2, 0], torch.tensor([2, 0]), torch.tensor([True, False, True]), slice(0, 2), 1, -1,
                                   np.int64(1), torch.tensor(2)],
                         ids=["list", "tensor", "mask", "slice", "int", "negative-int", "numpy-int", "0-d-tensor"])
def test_memory_select_copies_the_chosen_samples(index):
    """select takes sample numbers in every usual form, keeps the batch dimension, and shares
    no storage with the original: reading into the selection leaves the original as it was."""
    model = _deep_tiny(2).eval()
    x = ids(3, 30, seed=9)
    memory = model.read(x, progress=False)
    index_int = int(index) if isinstance(index, (np.integer, torch.Tensor)) and np.ndim(index) == 0 else index
    chosen = list(range(3))[index_int] if isinstance(index_int, (slice, int)) else (
        [0, 2] if isinstance(index, torch.Tensor) and index.dtype == torch.bool else [int(i) for i in index])
    chosen = chosen if isinstance(chosen, list) else [chosen]
    before = memory.clone()
    part = memory.select(index)
    assert part.batch_size == len(chosen)
    for a, b in zip(part.buffers(), before.select(torch.tensor(chosen)).buffers()):
        assert torch.equal(a, b)
    model.read(ids(len(chosen), 20, seed=10), part, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(memory.buffers(), before.buffers()))
    with pytest.raises(ValueError, match=r"outside \[-3, 3\)"):
        memory.select([3])
    with pytest.raises(ValueError, match="one entry per sample"):
        memory.select(torch.tensor([True, False]))
    for empty in ([], slice(0, 0), torch.zeros(3, dtype=torch.bool)):  # alike, whatever the form
        with pytest.raises(ValueError, match="the selection is empty"):
            memory.select(empty)
    for odd in (None, "0", 1.5):
        with pytest.raises(ValueError, match="select: index must be sample numbers"):
            memory.select(odd)


@pytest.mark.parametrize("comet", [dict(), dict(temp_budget=2), dict(temp_stride=-1)],
                         ids=["fifo", "fifo_smaller_than_a_chunk", "no_fifo"])
@pytest.mark.parametrize("inference_mode", [False, True])
def test_host_counters_follow_the_device_counters(comet, inference_mode):
    """The memory's host counters, kept by each step without reading the device, equal the
    device's counters after every kind of step (ragged batches, closing and open chunks,
    cuts, FIFO eviction, the global-memory ablation, decoding with EOS); counters changed
    behind the model's back are read back, not trusted, under inference mode too."""
    cfg = CometConfig(**{**dict(chunk_size=16, num_global=4, temp_stride=4, temp_budget=6, rla_rank=2), **comet})
    seen = []
    with torch.inference_mode(inference_mode):
        for global_memory in (True, False):
            model = CometForCausalLM.from_base(tiny_base("qwen3", num_hidden_layers=2), cfg).eval()
            x = ids(3, 90, seed=7)
            mask = torch.ones_like(x)
            mask[1, 61:] = 0
            mask[2, 5:] = 0
            memory = model.new_memory(3)
            for a, b, end in ((0, 7, False), (7, 30, True), (30, 31, False), (31, 90, False), (90, 90, False)):
                if b > a:
                    model.read(x[:, a:b], memory, attention_mask=mask[:, a:b], progress=False, end_chunk=end,
                               global_memory=global_memory)
                else:  # decoding, a sample stopping at its EOS
                    free = model.generate(x[:, :1], memory=memory.clone(), max_new_tokens=20,
                                          global_memory=global_memory)
                    model.generate(x[:, :1], memory=memory, max_new_tokens=20, eos_token_id=int(free[0, 9]),
                                   global_memory=global_memory)
                kept = memory.host_counts()
                memory._host = None  # read them back from the device
                assert memory.host_counts() == kept, (global_memory, a, b)
                seen.append(kept)
        fifo = cfg.fifo_capacity
        # the steps covered: global rows, a full FIFO evicting, a chunk cut by end_chunk (sample 2 reads
        # no token in that call: its open chunk closes with its closing rows alone)
        assert any(any(c.has_global) for c in seen) and (fifo == 0 or any(fifo in c.fifo_len for c in seen))
        assert seen[0].open_text[2] == 5 and seen[1].open_text == (0, 0, 0)
        memory.open_text.zero_()
        assert memory.host_counts().open_text == (0, 0, 0)
        if fifo:  # an in-place op of ours counts as a write too
            ops.fifo_push(memory.fifo_k[0], memory.fifo_head[0], memory.fifo_len[0], memory.fifo_k[0, :, :1],
                          torch.ones(3, dtype=torch.long))
            assert memory.host_counts().fifo_len == tuple(min(n + 1, fifo) for n in kept.fifo_len)


@pytest.mark.parametrize("recompute,return_logits", [(True, True), (False, True), (True, False)])
def test_training_host_syncs_do_not_grow_with_depth(recompute, return_logits):
    """The training forward and backward branch on host copies of what the plan knows
    (which samples have global rows, FIFO lengths, compression counts) and queue their
    index tensors without waiting: the host waits on the device a fixed number of times
    per batch however deep the model and however many chunks."""
    syncs = []
    for layers in (2, 5):
        model = _deep_tiny(layers).train()
        x = ids(2, 80, seed=6)
        mask = torch.ones_like(x)
        mask[1, 41:] = 0

        def step():
            model(x, labels=x.masked_fill(mask == 0, -100), attention_mask=mask, recompute=recompute,
                  return_logits=return_logits).loss.backward()

        counter = HostReads()
        with counter:
            step()
        syncs.append(counter.counts)
    assert syncs[0], "the counter saw no host read at all: the count would prove nothing"
    assert syncs[1] == syncs[0], f"host reads per training step: {syncs[0]} with 2 layers, {syncs[1]} with 5"
    # input_ids' and labels' ranges, the mask, its lengths as a list (a host tensor); which chunks have labels
    expected = ["check_ids", "check_labels", "row_lengths", "_plan_chunks"] + ([] if return_logits else
                                                                               ["_chunk_targets"])
    assert sorted(where.split(":")[0] for _, where in syncs[0].elements()) == sorted(expected), syncs[0]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_streaming_token_by_token_equals_training_forward(family):
    """Chunk-outer streaming (one token per step, chunks closing as they fill) gives the
    layer-outer training forward's logits at every position."""
    model = tiny_comet(family)
    x = ids(2, 37, seed=3)
    expected = model(x).logits
    memory, got = None, []
    for t in range(x.shape[1]):
        memory, last = model.read(x[:, t:t + 1], memory, return_last_hidden=True)
        got.append(model.base.lm_head(model.decoder.norm(last)))
    torch.testing.assert_close(torch.stack(got, 1), expected, rtol=1e-5, atol=1e-5)


def test_read_in_pieces_equals_one_read():
    model = tiny_comet("mistral")
    x = ids(2, 61, seed=4)
    whole, last = model.read(x, return_last_hidden=True)
    mem = None
    for a, b in [(0, 7), (7, 33), (33, 61)]:
        mem, piece_last = model.read(x[:, a:b], mem, return_last_hidden=True)
    torch.testing.assert_close(piece_last, last, rtol=1e-5, atol=1e-5)
    for f in ("fifo_len", "fifo_head", "open_text", "open_rows", "mem_len", "tokens"):
        assert torch.equal(getattr(mem, f), getattr(whole, f)), f
    torch.testing.assert_close(mem.state, whole.state, rtol=1e-5, atol=1e-5)


def test_ragged_batch_equals_samples_alone():
    model = tiny_comet("llama")
    x = ids(2, 45, seed=5)
    mask = torch.ones_like(x)
    mask[1, 29:] = 0
    batch_mem, batch_last = model.read(x, attention_mask=mask, return_last_hidden=True)
    for b, n in [(0, 45), (1, 29)]:
        mem, last = model.read(x[b:b + 1, :n], return_last_hidden=True)
        torch.testing.assert_close(batch_last[b:b + 1], last, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batch_mem.state[:, b:b + 1], mem.state, rtol=1e-5, atol=1e-5)
        assert int(batch_mem.tokens[b]) == n


BOUNDARY = 5  # a token id standing for "." in the boundary tests


def _with_boundaries(x, every, seed):
    """x with BOUNDARY at random places, about one in `every` tokens (none elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.where(x == BOUNDARY, BOUNDARY + 1, x)
    return torch.where(torch.rand(x.shape, generator=g) < 1 / every, BOUNDARY, x)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_read_with_boundaries_equals_training_on_semantic_chunks(family):
    """read(boundary_ids=...) cuts the chunks exactly where planner.semantic does: its last
    hidden state is the training forward's with those chunk sizes, and not the fixed chunks'."""
    model = tiny_comet(family)
    x = _with_boundaries(ids(1, 90, seed=21), every=6, seed=22)
    sizes = semantic(x[0].tolist(), model.comet_config.chunk_size, [BOUNDARY])
    assert len(sizes) > len(model._chunk_sizes(None, 90)), "no chunk was cut early: the test proves nothing"
    expected = model(x, chunk_sizes=sizes).logits[:, -1]
    mem, last = model.read(x, boundary_ids=[BOUNDARY], return_last_hidden=True)
    torch.testing.assert_close(model.base.lm_head(model.decoder.norm(last)), expected, rtol=1e-5, atol=1e-5)
    assert int(mem.open_text[0]) == sizes[-1] % model.comet_config.chunk_size
    fixed_last = model.read(x, return_last_hidden=True)[1]
    assert (fixed_last - last).abs().max() > 1e-3


def test_read_with_boundaries_cuts_each_sample_on_its_own():
    """In a ragged batch each sample is cut at its own boundaries, as if read alone; a span
    with no boundary is cut at chunk_size."""
    model = tiny_comet("mistral")
    x = _with_boundaries(ids(2, 70, seed=23), every=7, seed=24)
    x[1, 10:50] = BOUNDARY + 2  # 40 tokens with no boundary: a forced cut at chunk_size
    mask = torch.ones_like(x)
    mask[0, 55:] = 0
    batch_mem, batch_last = model.read(x, attention_mask=mask, boundary_ids=[BOUNDARY, 90],
                                       return_last_hidden=True)
    for b, n in [(0, 55), (1, 70)]:
        mem, last = model.read(x[b:b + 1, :n], boundary_ids=[BOUNDARY, 90], return_last_hidden=True)
        torch.testing.assert_close(batch_last[b:b + 1], last, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batch_mem.state[:, b:b + 1], mem.state, rtol=1e-5, atol=1e-5)
        assert int(batch_mem.open_text[b]) == int(mem.open_text[0])


def test_read_with_end_chunk_closes_the_last_chunk():
    """end_chunk=True closes each sample's partial last chunk: what is read after it starts a
    chunk of its own, as chunk sizes [16, 16, 8, 16, ...] do in the training forward."""
    model = tiny_comet("qwen3")
    x, y = ids(2, 40, seed=25), ids(2, 21, seed=26)
    mask = torch.ones_like(x)
    mask[1, 33:] = 0
    memory = model.read(x, attention_mask=mask, end_chunk=True)
    assert memory.open_text.tolist() == [0, 0] and memory.tokens.tolist() == [40, 33]
    _, last = model.read(y, memory, return_last_hidden=True)
    for b, n in [(0, 40), (1, 33)]:
        sizes = [16, 16, n - 32, 16, 5]
        expected = model(torch.cat([x[b:b + 1, :n], y[b:b + 1]], 1), chunk_sizes=sizes).logits[0, -1]
        torch.testing.assert_close(model.base.lm_head(model.decoder.norm(last[b])), expected, rtol=1e-5, atol=1e-5)
    open_last = model.read(y, model.read(x, attention_mask=mask), return_last_hidden=True)[1]
    assert (open_last - last).abs().max() > 1e-3


@pytest.mark.parametrize("boundary_ids", [".", [], [1.5], [True], 5], ids=["str", "empty", "float", "bool", "int"])
def test_read_refuses_bad_boundary_ids(boundary_ids):
    with pytest.raises(ValueError, match="boundary_ids must be a non-empty sequence of token ids"):
        tiny_comet("llama").read(ids(1, 8), boundary_ids=boundary_ids)


def test_without_global_memory_nothing_else_carries_information():
    """The ablation switch: with the FIFO off as well, inputs that differ only in an
    earlier chunk continue identically without the global memory, differently with it.
    (With the FIFO on, information also flows on through chains of compression rows.)"""
    model = tiny_comet("qwen3", temp_stride=-1)
    tail = ids(1, 50, seed=11)
    a, b = torch.cat([ids(1, 16, seed=12), tail], 1), torch.cat([ids(1, 16, seed=13), tail], 1)
    prompt = ids(1, 3, seed=14)

    def continuation(x, global_memory):
        mem = model.read(x, global_memory=global_memory)
        out = model.generate(prompt, mem, max_new_tokens=4, global_memory=global_memory, return_memory=True)[1]
        _, last = model.read(prompt, out, return_last_hidden=True, global_memory=global_memory)
        return mem, last

    mem_a, off_a = continuation(a, False)
    _, off_b = continuation(b, False)
    assert not bool(mem_a.has_global.any()) and not bool(mem_a.mem_len.any()) and not bool(mem_a.state.any())
    torch.testing.assert_close(off_a, off_b, rtol=0, atol=0)
    _, on_a = continuation(a, True)
    _, on_b = continuation(b, True)
    assert (on_a - on_b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="global_memory=False needs a memory without global rows"):
        model.read(prompt, model.read(a), global_memory=False)


def test_memory_size_does_not_grow_with_input():
    model = tiny_comet("llama")
    short = model.read(ids(1, 20))
    long = model.read(ids(1, 400))
    assert short.nbytes() == long.nbytes()
    assert int(long.tokens[0]) == 400 and int(long.open_text[0]) == 400 % 16


def test_gradients_reach_every_memory_module():
    model = tiny_comet("qwen3").train()
    x = ids(2, 40, seed=6)
    out = model(x, labels=x)
    out.loss.backward()
    for name, p in model.memory_layers.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.memory_embeddings.readout.grad.abs().sum() > 0
    assert model.memory_embeddings.compression.grad.abs().sum() > 0


def test_loss_is_next_token_cross_entropy():
    model = tiny_comet("llama")
    x = ids(2, 30, seed=7)
    labels = x.clone()
    labels[:, :5] = -100
    out = model(x, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


# --------------------------------------------------------------------------- persistence


def test_save_and_load_pretrained_is_bit_exact(tmp_path):
    model = tiny_comet("qwen3", seed=3)
    model.save_pretrained(tmp_path)
    loaded = CometForCausalLM.from_pretrained(tmp_path)
    assert loaded.comet_config == model.comet_config
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    x = ids(1, 30)
    assert torch.equal(model(x).logits, loaded(x).logits)


def test_from_pretrained_refuses_a_plain_model(tmp_path):
    tiny_base("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no CoMeT model"):
        CometForCausalLM.from_pretrained(tmp_path)


def test_memory_save_load_continue_equals_uninterrupted(tmp_path):
    model = tiny_comet("llama")
    x = ids(2, 50, seed=8)
    _, expected = model.read(x, return_last_hidden=True)
    mem = model.read(x[:, :27])
    mem.save(tmp_path / "mem.safetensors")
    loaded = CometMemory.load(tmp_path / "mem.safetensors", model)
    _, got = model.read(x[:, 27:], loaded, return_last_hidden=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_memory_load_refuses_other_model_and_corrupt_files(tmp_path):
    model = tiny_comet("llama")
    path = tmp_path / "mem.safetensors"
    model.read(ids(1, 20)).save(path)
    other = tiny_comet("llama", num_global=5)
    with pytest.raises(ValueError, match="belongs to another model"):
        CometMemory.load(path, other)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable memory file"):
        CometMemory.load(tmp_path / "cut.safetensors", model)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable memory file"):
        CometMemory.load(tmp_path / "junk.safetensors", model)
    with pytest.raises(FileNotFoundError):
        CometMemory.load(tmp_path / "missing.safetensors", model)


@pytest.mark.parametrize("edit, match", [
    (lambda t: t["open_text"].fill_(40), r"open_text in \[0, chunk_size = 16\)"),  # would invent 24 tokens
    (lambda t: t["mem_len"].fill_(-3), "mem_len = 4 \\* has_global \\+ fifo_len"),
    (lambda t: t["pending"].fill_(99), r"pending in \[0, \d+\]"),
    (lambda t: t["fifo_len"][1].add_(1), "the same in every layer"),
    (lambda t: t.update(fifo_v=t["fifo_v"][:, :, :2].contiguous()), "fifo_v \\(2, 1, 2, 2, 16\\) torch.float32 vs \\(2, 1, 6, 2, 16\\)"),
    (lambda t: t.update(open_text=t["open_text"].repeat(2)), "open_text \\(2,\\)"),
], ids=["open-text", "mem-len", "pending", "fifo-len", "fifo-v-shape", "counter-batch"])
def test_memory_load_refuses_tensors_and_counters_no_read_leaves(tmp_path, edit, match):
    """A file with the right header whose tensors were edited (or written by other code): the
    next read would read past its buffers or count tokens never read; load names what is off."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = tiny_comet("llama")
    path = tmp_path / "mem.safetensors"
    model.read(ids(1, 37, seed=22)).save(path)
    CometMemory.load(path, model)  # as saved: fine
    with safe_open(path, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, path, metadata=meta)
    with pytest.raises(ValueError, match=match):
        CometMemory.load(path, model)


@pytest.mark.parametrize("other", [dict(num_global=5), dict(temp_budget=8), dict(chunk_size=20)],
                         ids=["num_global", "temp_budget", "chunk_size"])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_read_and_generate_refuse_a_memory_of_another_model(other, signed):
    """Before this check a memory with a smaller FIFO was read without a word (and wrongly)."""
    model = tiny_comet("llama")
    memory = tiny_comet("llama", **other).read(ids(1, 40, seed=17))
    if not signed:  # a memory built by hand: its shapes still give it away
        memory.signature = {}
    match = "belongs to another model" if signed else "memory tensors do not fit this model"
    with pytest.raises(ValueError, match=match):
        model.read(ids(1, 8, seed=18), memory.clone())
    with pytest.raises(ValueError, match=match):
        model.generate(ids(1, 8, seed=18), memory=memory.clone(), max_new_tokens=2)


def test_comet_config_replaced_only_where_it_shapes_no_weight(tmp_path):
    """gate_snap, chunk_size... may change on a built model (and save); num_global and rla_rank
    are the weights' sizes: a config that contradicts them is refused when assigned, instead of
    a checkpoint that does not load or a read that fails deep inside."""
    import dataclasses

    model = tiny_comet("llama")
    model.comet_config = dataclasses.replace(model.comet_config, gate_snap=0.9, chunk_size=24)
    model.save_pretrained(tmp_path / "m")
    assert CometForCausalLM.from_pretrained(tmp_path / "m").comet_config == model.comet_config
    G, r = model.comet_config.num_global, model.comet_config.rla_rank
    with pytest.raises(ValueError, match=rf"num_global={G + 1} does not fit the model's weights \(num_global {G}\)"):
        model.comet_config = dataclasses.replace(model.comet_config, num_global=G + 1)
    with pytest.raises(ValueError, match=rf"rla_rank={r + 1} does not fit"):
        model.comet_config = dataclasses.replace(model.comet_config, rla_rank=r + 1)
    with pytest.raises(ValueError, match="must be a CometConfig"):
        model.comet_config = {"gate_snap": 0.5}
    assert model.comet_config.num_global == G and model.comet_config.gate_snap == 0.9


def test_resize_global_memory(tmp_path):
    model = tiny_comet("qwen3", seed=4)
    old = model.memory_embeddings.readout.detach().clone()
    one_chunk, two_chunks = ids(1, 16, seed=19), ids(1, 30, seed=19)
    before_one, before_two = model(one_chunk).logits, model(two_chunks).logits
    stale = model.read(two_chunks)

    model.resize_global_memory(7, noise=0.5, generator=torch.Generator().manual_seed(0))
    assert model.comet_config.num_global == 7 and model.memory_embeddings.readout.shape == (7, old.shape[1])
    new = model.memory_embeddings.readout.detach()
    assert torch.equal(new[:4], old)
    jitter = new[4:] - old[:3]
    assert 0.25 < float(jitter.std() / old.std()) < 1.0  # noise 0.5 x the embedding's spread
    # The first chunk's text never sees its own readout rows; the second reads 7 slots.
    torch.testing.assert_close(model(one_chunk).logits, before_one, rtol=0, atol=1e-6)
    assert not torch.allclose(model(two_chunks).logits, before_two, atol=1e-3)
    assert model.read(two_chunks).state.shape[2] == 7
    with pytest.raises(ValueError, match="belongs to another model"):
        model.read(ids(1, 8), stale)

    model.save_pretrained(tmp_path)
    loaded = CometForCausalLM.from_pretrained(tmp_path)
    assert loaded.comet_config.num_global == 7
    assert torch.equal(loaded(two_chunks).logits, model(two_chunks).logits)

    model.resize_global_memory(2)
    assert torch.equal(model.memory_embeddings.readout.detach(), old[:2]) and model.comet_config.num_global == 2
    model.resize_global_memory(4)  # without noise a new slot is an exact copy
    assert torch.equal(model.memory_embeddings.readout.detach(), old[[0, 1, 0, 1]])
    # the new embedding trains as the old one did (build_optimizer takes trainable parameters only)
    assert model.memory_embeddings.readout.requires_grad
    model.memory_embeddings.readout.requires_grad_(False)
    model.resize_global_memory(5)
    assert not model.memory_embeddings.readout.requires_grad
    for bad, match in [(0, "num_global must be an int >= 1"), (2.0, "num_global must be an int"),
                       (True, "num_global must be an int")]:
        with pytest.raises(ValueError, match=match):
            model.resize_global_memory(bad)
    with pytest.raises(ValueError, match="noise must be a finite number >= 0"):
        model.resize_global_memory(4, noise=-1.0)
    with pytest.raises(ValueError, match="noise must be a finite number >= 0"):
        model.resize_global_memory(4, noise=float("nan"))


# --------------------------------------------------------------------------- bad inputs


def test_a_low_precision_model_under_autocast_to_another_is_a_clear_error():
    model = tiny_comet("qwen3").to(torch.bfloat16)
    x = ids(1, 20)
    with torch.autocast("cpu", dtype=torch.float16):
        for call in (lambda: model.read(x), lambda: model(x), lambda: model.generate(x, max_new_tokens=1)):
            with pytest.raises(ValueError, match="a torch.bfloat16 model under torch.float16 autocast"):
                call()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # its own precision: fine
        model.read(x)


def test_unsupported_family_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"does not support model_type 'gpt2'.*llama.*mistral.*qwen2.*qwen3"):
        CometForCausalLM.from_base(gpt2, CometConfig())


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: m(torch.zeros(1, 0, dtype=torch.long)), "input_ids is empty"),
        (lambda m: m(torch.full((1, 5), VOCAB)), r"must lie in \[0, 97\)"),
        (lambda m: m(torch.zeros(5, dtype=torch.long)), "shape \\(batch, tokens\\)"),
        (lambda m: m(torch.zeros(1, 10, dtype=torch.long), chunk_sizes=[4, 4]), "sum to the 10 tokens"),
        (lambda m: m(torch.zeros(1, 10, dtype=torch.long), chunk_sizes=[10, 0]), "must be positive"),
        (lambda m: m(torch.zeros(1, 20, dtype=torch.long), chunk_sizes=[20]), r"at most comet_config.chunk_size \(16\)"),
        (lambda m: m(torch.zeros(1, 10, dtype=torch.long), chunk_sizes=[5.5, 4.5]), "must be ints"),
        (lambda m: m(torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 5, dtype=torch.long)), "labels"),
        (lambda m: m.read(torch.zeros(2, 4, dtype=torch.long), m.new_memory(3)), "memory holds 3 samples"),
        (lambda m: m.read(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.tensor([[1, 0, 1, 1]])),
         "one run"),
        (lambda m: m(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 0, 1]])), "one run"),
        (lambda m: m(torch.zeros(1, 4, dtype=torch.long), logits_to_keep=-1), "logits_to_keep must be an int"),
        (lambda m: m(torch.zeros(1, 4, dtype=torch.long), logits_to_keep=torch.tensor([4])), "outside the input"),
        (lambda m: m([[1, 2]], logits_to_keep=torch.tensor([1])), "input_ids must be an int64 tensor"),
        (lambda m: m(torch.zeros(1, 4, dtype=torch.long), logits_to_keep=1, labels=torch.zeros(1, 4, dtype=torch.long)),
         "logits_to_keep with labels"),
        (lambda m: m.read(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 5)), "attention_mask must have shape"),
        (lambda m: m.read(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 2, 0]])),
         r"ones \(tokens\) and zeros \(padding\) only, got values such as \[2\]"),
        (lambda m: m.read(torch.zeros(1, 2, dtype=torch.long), attention_mask=torch.tensor([[1.0, 0.5]])), "ones"),
        (lambda m: m.read(torch.zeros(1, 2, dtype=torch.long), attention_mask=[[1, 1]]), "must be a tensor"),
        (lambda m: m.generate(torch.zeros(1, 2, dtype=torch.long), attention_mask=torch.tensor([[-1, 1]])), "ones"),
        (lambda m: m.generate([[1, 2]], attention_mask=torch.ones(1, 2)), "input_ids must be an int64 tensor"),
        (lambda m: m(torch.zeros(1, 2, dtype=torch.long), attention_mask=torch.tensor([[1, 3]])), "ones"),
        (lambda m: m.resize_global_memory(8, noise=float("inf")), "noise must be a finite number"),
        (lambda m: m.resize_global_memory(8, noise="0.1"), "noise must be a finite number"),
        (lambda m: m.new_memory(0), "batch_size must be an int >= 1"),
        (lambda m: m(torch.zeros(1, 4, dtype=torch.long), inputs_embeds=torch.zeros(1, 4, 64)),
         "exactly one of input_ids and inputs_embeds, got both"),
        (lambda m: m(torch.zeros(1, 4, dtype=torch.long), output_attentions=True), "output_attentions"),
    ],
    ids=["empty", "out-of-vocab", "1-d", "sizes-sum", "size-zero", "size-over-chunk", "size-float", "labels-shape",
         "memory-batch", "mask-hole", "forward-mask-hole", "keep-negative", "keep-outside", "keep-list-ids", "keep-with-labels",
         "mask-shape", "mask-value-2", "mask-value-half", "mask-list", "generate-mask-value",
         "generate-ids-list", "forward-mask-value", "resize-noise-inf", "resize-noise-str", "memory-batch-0", "inputs-embeds", "output-attentions"],
)
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call(tiny_comet("llama"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(chunk_size=0), "chunk_size"), (dict(temp_stride=0), "temp_stride"), (dict(temp_budget=-1), "temp_budget"),
    (dict(rla_rank=0), "rla_rank"), (dict(num_global=0), "num_global"), (dict(chunk_size=2.5), "must be an int"),
    (dict(gate_snap=0), "gate_snap must be a number in"), (dict(gate_snap=1.01), "gate_snap"),
    (dict(gate_snap=float("nan")), "gate_snap"), (dict(gate_snap=True), "gate_snap"), (dict(gate_snap="0.9"), "gate_snap"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CometConfig(**kwargs)


def test_training_forward_with_padding_equals_samples_alone():
    model = tiny_comet("qwen3")
    x = ids(2, 40, seed=9)
    mask = torch.ones_like(x)
    mask[1, 23:] = 0
    batch = model(x, attention_mask=mask).logits
    torch.testing.assert_close(batch[0:1], model(x[0:1]).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch[1:2, :23], model(x[1:2, :23]).logits, rtol=1e-5, atol=1e-5)


def _padded(rows: list[torch.Tensor], T: int, side: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """rows (1-D token tensors) padded to T: "left", "right", or "both" (a token of padding before)."""
    x, mask = torch.full((len(rows), T), 5), torch.zeros(len(rows), T, dtype=torch.long)
    for b, (r, how) in enumerate(zip(rows, side)):
        start = {"left": T - len(r), "right": 0, "both": 1}[how]
        x[b, start:start + len(r)], mask[b, start:start + len(r)] = r, 1
    return x, mask


def test_rows_padded_on_the_left_or_both_sides_read_as_if_right_padded():
    """A row's tokens may start anywhere (left padding, or a left-padded prompt before a
    right-padded completion, as RL trainers batch them): it is read from its first token, so the
    forward's logits at its tokens and `read`'s memory equal those of the right-padded batch."""
    model = tiny_comet("qwen3")
    rows = [ids(1, 37, seed=30)[0], ids(1, 21, seed=31)[0], ids(1, 40, seed=32)[0]]
    x_r, m_r = _padded(rows, 41, ["right"] * 3)
    right = model(x_r, attention_mask=m_r).logits
    memory = model.read(x_r, attention_mask=m_r)
    for side in (["left", "both", "right"], ["both", "left", "left"]):
        x, m = _padded(rows, 41, side)
        logits = model(x, attention_mask=m).logits
        for b in range(3):
            torch.testing.assert_close(logits[b][m[b].bool()], right[b, :len(rows[b])], rtol=1e-5, atol=1e-5)
        for a, c in zip(model.read(x, attention_mask=m).buffers(), memory.buffers()):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    # HF's left-padded position_ids (counting each row's tokens) are accepted; counting the columns
    # is named, and a mask with a hole gets the mask's own error, with position_ids too
    x, m = _padded(rows, 41, ["left", "both", "right"])
    positions = (m.cumsum(1) - 1).clamp(min=0)
    torch.testing.assert_close(model(x, attention_mask=m, position_ids=positions).logits,
                               model(x, attention_mask=m).logits)
    with pytest.raises(ValueError, match="from its first one .*cumsum"):
        model(x, attention_mask=m, position_ids=torch.arange(41).unsqueeze(0))
    m[0, -2] = 0
    with pytest.raises(ValueError, match="one run"):
        model(x, attention_mask=m, position_ids=positions)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_logits_to_keep_computes_the_logits_it_names_as_hf_does(padding):
    """logits_to_keep (HF's, what TRL passes): an int keeps the last positions (0: all), a 1-D
    tensor the positions it lists; each equals the full forward's logits there."""
    model = tiny_comet("llama")
    x, m = _padded([ids(1, 35, seed=33)[0], ids(1, 20, seed=34)[0]], 36, [padding] * 2)
    full = model(x, attention_mask=m).logits
    for keep, cols in [(0, list(range(36))), (5, list(range(31, 36))), (50, list(range(36))),
                       (torch.tensor([0, 17, -1, 35]), [0, 17, 35, 35])]:
        got = model(x, attention_mask=m, logits_to_keep=keep).logits
        assert got.shape == (2, len(cols), VOCAB)
        for b in range(2):
            real = [i for i, c in enumerate(cols) if m[b, c]]
            torch.testing.assert_close(got[b, real], full[b, [cols[i] for i in real]], rtol=1e-5, atol=1e-5)


def test_base_model_is_the_backbone_whose_hidden_states_give_the_logits():
    """model.base_model, as HF's causal LMs have it (TRL's fused LM head calls it and projects
    last_hidden_state itself): lm_head of its hidden states is the forward's logits, memory
    included, left padding too, and gradients reach the memory through it."""
    model = tiny_comet("qwen3")
    x, m = _padded([ids(1, 35, seed=37)[0], ids(1, 20, seed=38)[0]], 36, ["left", "right"])
    backbone = model.base_model
    assert backbone is model.base_model and backbone not in list(model.modules())
    hidden = backbone(x, attention_mask=m, use_cache=False).last_hidden_state
    assert hidden.shape == (2, 36, model.config.hidden_size)
    torch.testing.assert_close(model.base.lm_head(hidden), model(x, attention_mask=m).logits)
    hidden.sum().backward()
    assert model.memory_layers[0].global_memory_net.rla.up.grad.abs().sum() > 0
    torch.testing.assert_close(backbone(x, attention_mask=m, logits_to_keep=3).last_hidden_state, hidden[:, -3:])
    copy_ = copy.deepcopy(model)
    assert copy_.base_model.model is copy_
    assert model.base_model.training is False  # the model's mode (tiny_comet is in eval mode)
    model.base_model.train()
    assert model.training and model.base_model.training
    with pytest.raises(ValueError, match="output_hidden_states"):
        backbone(x, output_hidden_states=True)


def test_padding_free_arguments_are_refused_as_packed_rows():
    model = tiny_comet("llama")
    x = ids(1, 20, seed=39)
    cu = torch.tensor([0, 12, 20], dtype=torch.int32)
    for call in (model, model.base_model):
        with pytest.raises(ValueError, match="packed rows .*cu_seq_lens_q, cu_seq_lens_k"):
            call(x, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=12, max_length_k=12)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['beam'\\]"):
        model(x, beam=2)
    model(x, cu_seq_lens_q=None)  # what asks for nothing passes


def test_labels_need_right_padded_rows():
    model = tiny_comet("llama")
    x, m = _padded([ids(1, 30, seed=35)[0], ids(1, 20, seed=36)[0]], 30, ["left", "left"])
    with pytest.raises(ValueError, match="right-padded .* padding_side='left'"):
        model(x, attention_mask=m, labels=x)


@pytest.mark.parametrize("return_logits", [True, False])
def test_a_batch_padded_past_its_samples_trains_as_the_cropped_batch(return_logits):
    """Padding to a multiple (HF collators) leaves whole chunks with no token of any sample:
    they carry no rows and change nothing (a zero-row chunk used to crash the layer step)."""
    model = tiny_comet("qwen3").train()
    x = ids(2, 40, seed=13)
    mask = torch.ones_like(x)
    mask[0, 30:], mask[1, 20:] = 0, 0  # the third chunk of 16 holds padding only
    labels = x.masked_fill(mask == 0, -100)
    runs = []
    for T in (40, 30):
        model.zero_grad()
        out = model(x[:, :T], labels=labels[:, :T], attention_mask=mask[:, :T], return_logits=return_logits)
        out.loss.backward()
        runs.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (padded, g_padded), (cropped, g_cropped) = runs
    torch.testing.assert_close(padded.loss, cropped.loss, rtol=1e-6, atol=1e-6)
    if return_logits:
        torch.testing.assert_close(padded.logits[:, :30], cropped.logits, rtol=1e-5, atol=1e-5)
    assert g_padded.keys() == g_cropped.keys() and len(g_padded) > 10
    for name in g_padded:
        torch.testing.assert_close(g_padded[name], g_cropped[name], rtol=1e-5, atol=1e-6, msg=name)


def test_training_labels_are_checked_and_both_loss_paths_agree():
    """labels of any integer dtype train as int64; values outside the vocabulary (but -100) and
    float labels are ValueErrors naming labels; labels that leave nothing to learn give a loss
    of 0 on both paths (the full-logits path gave NaN, the chunked one 0)."""
    model = tiny_comet("llama").train()
    x = ids(2, 30, seed=14)
    losses = [model(x, labels=x.to(dtype), return_logits=r).loss for dtype in (torch.long, torch.int32)
              for r in (True, False)]
    for loss in losses[1:]:
        torch.testing.assert_close(loss, losses[0], rtol=1e-6, atol=1e-6)
    for bad, match in ((x.float(), "integer token ids"), (x.masked_fill(x == x[0, 3], VOCAB), r"in \[0, 97\) or -100"),
                       (x.masked_fill(x == x[0, 3], -5), r"got \[-5\]"), (x[:, :5], "shape of input_ids")):
        with pytest.raises(ValueError, match=match):
            model(x, labels=bad)
    nothing = torch.full_like(x, -100)
    for return_logits in (True, False):
        loss = model(x, labels=nothing, return_logits=return_logits).loss
        assert loss.item() == 0.0 and loss.requires_grad


def test_recomputation_gives_identical_gradients():
    model = tiny_comet("llama").train()
    x = ids(2, 50, seed=10)
    grads = []
    for recompute in (False, True):
        model.zero_grad()
        loss = model(x, labels=x, recompute=recompute).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0, msg=name)


def test_chunkwise_loss_equals_the_full_logits_loss():
    model = tiny_comet("qwen3").train()
    x = ids(2, 45, seed=12)
    labels = x.clone()
    labels[0, :10] = -100
    mask = torch.ones_like(x)
    mask[1, 30:] = 0
    labels[1, 30:] = -100
    losses, grads = [], []
    for kw in (dict(), dict(return_logits=False), dict(return_logits=False, recompute=True)):
        model.zero_grad()
        out = model(x, labels=labels, attention_mask=mask, **kw)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append(model.memory_embeddings.readout.grad.clone())
        assert (out.logits is None) == (kw.get("return_logits") is False)
    for loss, grad in zip(losses[1:], grads[1:]):
        torch.testing.assert_close(loss, losses[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, grads[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("prefix", [16, 32, 48], ids=["fifo-part-full", "fifo-full", "fifo-wrapped"])
def test_training_forward_continues_a_read_memory(prefix):
    """Truncated BPTT: a training forward from the memory `read` left after whole chunks
    gives the uninterrupted forward's logits and loss, and leaves the memory unchanged."""
    model = tiny_comet("qwen3")
    x = ids(2, 80, seed=13)
    expected = model(x).logits[:, prefix:]
    with torch.no_grad():
        memory = model.read(x[:, :prefix])
    before = memory.clone()
    got = model(x[:, prefix:], memory=memory).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - model(x[:, prefix:]).logits).abs().max() > 1e-2, "the memory made no difference: proves nothing"
    for name, a, b in zip(("state", "fifo_k", "fifo_head", "fifo_len"),
                          (memory.state, memory.fifo_k, memory.fifo_head, memory.fifo_len),
                          (before.state, before.fifo_k, before.fifo_head, before.fifo_len)):
        assert torch.equal(a, b), f"forward changed memory.{name}"
    loss = model(x[:, prefix:], labels=x[:, prefix:], memory=memory, return_logits=False, recompute=True).loss
    ce = torch.nn.functional.cross_entropy(expected[:, :-1].reshape(-1, VOCAB), x[:, prefix + 1:].reshape(-1))
    torch.testing.assert_close(loss, ce, rtol=1e-5, atol=1e-6)
    model.zero_grad()
    loss.backward()
    gate = model.memory_layers[0].global_memory_net.gate.weight.grad
    assert gate is not None and gate.abs().sum() > 0, "no gradient reached the gate through the continued memory"


def _ragged_memory(model):
    with torch.no_grad():
        return model.read(ids(2, 32, seed=14), attention_mask=torch.tensor([[1] * 16 + [0] * 16, [1] * 32]))


@pytest.mark.parametrize("memory, match", [
    (lambda m: m.read(ids(2, 20, seed=15)), "open chunk"),
    (_ragged_memory, "different numbers of FIFO rows"),
    (lambda m: m.read(ids(3, 16, seed=15)), "memory holds 3 samples"),
    (lambda m: tiny_comet("qwen3", temp_budget=8).new_memory(2), "belongs to another model"),
    (lambda m: "memory.safetensors", "must be a CometMemory"),
], ids=["open-chunk", "ragged-fifo", "batch", "other-model", "not-a-memory"])
def test_training_forward_refuses_a_memory_it_cannot_continue(memory, match):
    model = tiny_comet("qwen3")
    with pytest.raises(ValueError, match=match):
        model(ids(2, 16, seed=16), memory=memory(model))


def test_gate_logit_is_the_gate_the_update_blends_with():
    """GlobalMemoryNet.gate_logit (diagnostics, train_passkey's --gate-entropy): sigmoid of it is
    the g of comet::gated_update's S <- g S + (1 - g) RMSNorm_g(R)."""
    from comet_ext.memory_modules import GlobalMemoryNet

    torch.manual_seed(0)
    net = GlobalMemoryNet(32, 4)
    torch.nn.init.normal_(net.gate.weight, std=0.3)
    readout, state = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    new_state, _ = net(readout, state)
    g = torch.sigmoid(net.gate_logit(readout, state)).unsqueeze(-1)
    assert ((g > 0.05) & (g < 0.95)).any()  # the blend is not trivially one side
    torch.testing.assert_close(new_state, g * state + (1 - g) * net.norm(readout), rtol=1e-5, atol=1e-5)


def test_training_forward_refuses_attention_dropout_it_would_ignore():
    model = tiny_comet("llama").train()
    model.config.attention_dropout = 0.1
    with pytest.raises(NotImplementedError, match="attention_dropout is 0.1"):
        model(torch.zeros(1, 4, dtype=torch.long))
    model.eval()(torch.zeros(1, 4, dtype=torch.long))  # no dropout at evaluation: nothing to refuse


def test_hf_standard_forward_arguments_at_neutral_values_pass():
    """What PEFT's get_peft_model wrapper passes to the model it wraps."""
    model = tiny_comet("qwen3")
    x = ids(1, 20)
    out = model(input_ids=x, labels=x, inputs_embeds=None, output_attentions=None, output_hidden_states=None,
                return_dict=True, use_cache=False)
    assert torch.equal(out.logits, model(x).logits)
