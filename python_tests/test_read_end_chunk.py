"""read(..., end_chunk=True) closes every sample's open chunk, also for a sample that reads no
token in the call (a row of padding in a ragged batch, or a call with no tokens at all): its
chunk closes with the closing rows alone (docs/model.md, "Rows": the compression token after a final
partial group, then the num_global readout tokens).

Ground truth, independent of the path under test: reading A, then closing with no tokens, leaves
the memory that reading A in one call with end_chunk=True leaves; what is read after it gives the
training forward's logits with A's last chunk ending where A ends; the other samples of the batch
are left as if read alone.
"""
from __future__ import annotations

import pytest
import torch

from modeling_utils import VOCAB, tiny_comet

from comet_ext import ops
from comet_ext.memory import _FIELDS as FIELDS  # the names of memory.buffers(), in order
from comet_ext.segments import COMPRESSION, PAD, READOUT, plan_segment

TOL = dict(rtol=1e-5, atol=1e-5)


def ids(B, T, seed=0):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _live(memory, b: int) -> dict:
    """What sample b's memory holds that a later step can read: its counters, the global state,
    the FIFO rows oldest first, the packed memory and open-chunk keys / values, the open chunk's
    parked compression rows. (Rows past these are stale and never read.)"""
    i = slice(b, b + 1)
    rows = int(memory.mem_len[b] + memory.open_rows[b])
    pending = int(memory.pending[b])
    out = {f: getattr(memory, f)[b] for f in ("has_global", "mem_len", "open_rows", "open_text", "pending", "tokens")}
    out.update(fifo_len=memory.fifo_len[:, b], state=memory.state[:, b], kv_k=memory.kv_k[:, b, :rows],
               kv_v=memory.kv_v[:, b, :rows], pending_k=memory.pending_k[:, b, :pending],
               pending_v=memory.pending_v[:, b, :pending])
    for name in ("fifo_k", "fifo_v"):
        buf = getattr(memory, name)
        out[name] = torch.stack([ops.fifo_view(buf[l, i], memory.fifo_head[l, i], memory.fifo_len[l, i])
                                 for l in range(buf.shape[0])]) if buf.shape[2] else buf[:, i]
    return out


def _assert_same_sample(got, b: int, want) -> None:
    """Sample b of memory `got` holds what the one sample of memory `want` holds: counters
    exactly, values up to float rounding (the same rows computed in other steps)."""
    g, e = _live(got, b), _live(want, 0)
    for name in e:
        if e[name].is_floating_point():
            torch.testing.assert_close(g[name], e[name], **TOL, msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(g[name], e[name]), (name, g[name].tolist(), e[name].tolist())


def _logits(model, hidden):
    return model.base.lm_head(model.decoder.norm(hidden))


# Config variants: the open chunk ends in a partial compression group (a compression token then
# closes it), in a complete one (none does), or there is no FIFO at all.
CONFIGS = {"partial_group": dict(), "stride_2": dict(temp_stride=2), "no_fifo": dict(temp_stride=-1)}


@pytest.mark.parametrize("comet", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("first", [5, 24], ids=["first_chunk", "after_a_closed_chunk"])
def test_batched_read_closes_the_open_chunk_of_a_sample_with_no_tokens(comet, first):
    """A ragged batch read with end_chunk=True: sample 1 reads nothing and has `first` tokens
    read before (an open chunk of 5 or 8): it closes as if those had been read with end_chunk=True
    in one call; sample 0 reads on and closes after its tokens; sample 2 reads nothing and its
    chunk is already closed: nothing changes. Every sample equals itself read alone, and reading
    on after the close equals the training forward with the chunk ending there."""
    model = tiny_comet("qwen3", **comet)
    cs = model.comet_config.chunk_size
    x, y, z = ids(3, 24, seed=31), ids(3, 9, seed=32), ids(3, 6, seed=33)
    before, now = [21, first, 16], [9, 0, 0]
    mask = lambda lens, T: (torch.arange(T) < torch.tensor(lens).unsqueeze(1)).long()  # noqa: E731
    memory = model.read(x, attention_mask=mask(before, 24), progress=False)
    assert memory.open_text.tolist() == [5, first % cs, 0]
    memory = model.read(y, memory, attention_mask=mask(now, 9), end_chunk=True, progress=False)
    assert memory.open_text.tolist() == [0, 0, 0]

    alone = [model.read(y[:1], model.read(x[:1, :21], progress=False), end_chunk=True, progress=False),
             model.read(x[1:2, :first], end_chunk=True, progress=False),
             model.read(x[2:3, :16], progress=False)]
    for b, want in enumerate(alone):
        _assert_same_sample(memory, b, want)

    _, last = model.read(z, memory, return_last_hidden=True, progress=False)
    full = [cs] * (first // cs)
    for b, text, sizes in [(0, torch.cat([x[0, :21], y[0]]), [16, 5 + 9, 6]),
                           (1, x[1, :first], full + [first % cs, 6]),
                           (2, x[2, :16], [16, 6])]:
        expected = model(torch.cat([text, z[b]]).unsqueeze(0), chunk_sizes=sizes).logits[0, -1]
        torch.testing.assert_close(_logits(model, last[b]), expected, **TOL)


NO_TOKENS = {
    "no_columns": lambda x: dict(input_ids=x[:, :0]),
    "all_padding": lambda x: dict(input_ids=x[:, :3], attention_mask=torch.zeros(1, 3, dtype=torch.long)),
    "no_columns_with_a_mask": lambda x: dict(input_ids=x[:, :0], attention_mask=torch.ones(1, 0, dtype=torch.long)),
}


@pytest.mark.parametrize("how", NO_TOKENS.values(), ids=NO_TOKENS.keys())
@pytest.mark.parametrize("comet", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("global_memory", [True, False], ids=["global", "temp_only"])
def test_read_of_no_tokens_closes_the_open_chunk(how, comet, global_memory):
    """read with no tokens and end_chunk=True on a memory with an open chunk (5 text tokens
    after a closed chunk) closes it: the memory equals reading the same 21 tokens in one call
    with end_chunk=True; the last hidden state of a sample that read nothing is zeros."""
    model = tiny_comet("llama", **comet)
    x = ids(1, 21, seed=34)
    memory = model.read(x, progress=False, global_memory=global_memory)
    assert memory.open_text.tolist() == [5]
    memory, last = model.read(memory=memory, end_chunk=True, return_last_hidden=True, progress=False,
                              global_memory=global_memory, **how(x))
    _assert_same_sample(memory, 0, model.read(x, end_chunk=True, progress=False, global_memory=global_memory))
    assert torch.equal(last, torch.zeros_like(last))


@pytest.mark.parametrize("stride, open_text, closing", [
    (4, 5, [COMPRESSION] + [READOUT] * 4),  # a final partial group: its compression token first
    (4, 8, [READOUT] * 4),  # complete groups only: their compression tokens are in already
    (-1, 5, [READOUT] * 4),  # no FIFO, no compression token
], ids=["partial_group", "complete_groups", "no_fifo"])
def test_closing_segment_of_a_sample_with_no_tokens(stride, open_text, closing):
    """The segment that closes a chunk with no new text (docs/model.md, "Rows"): the compression token
    after a final partial group, if any, then the num_global readout tokens; a sample that
    neither reads nor closes gets no row."""
    cc = tiny_comet("llama", temp_stride=stride).comet_config
    seg = plan_segment(cc, [open_text, 3], [0, 0], [True, False], torch.device("cpu"))
    assert seg.kind[0].tolist() == closing and seg.kind[1].tolist() == [PAD] * len(closing)
    assert seg.q_lens_list == (len(closing), 0) and seg.text_count.tolist() == [0, 0]
    assert seg.comp_counts == (closing.count(COMPRESSION), 0) and seg.closing_list == (True, False)
    assert seg.readout_rows[0].tolist() == [len(closing) - 4 + j for j in range(4)]
    assert seg.slot[0, -4:].tolist() == [0, 1, 2, 3]


def _closed(model, x):
    return model.read(x[:, :16], progress=False)  # one full chunk, closed as it fills


def _closed_by_end_chunk(model, x):
    return model.read(x[:, :7], end_chunk=True, progress=False)


def _fresh(model, x):
    return model.new_memory(1)


@pytest.mark.parametrize("how", NO_TOKENS.values(), ids=NO_TOKENS.keys())
@pytest.mark.parametrize("start", [_fresh, _closed, _closed_by_end_chunk],
                         ids=["fresh", "closed", "closed_by_end_chunk"])
@pytest.mark.parametrize("end_chunk", [True, False], ids=["end_chunk", "open"])
def test_read_of_no_tokens_without_an_open_chunk_changes_nothing(how, start, end_chunk):
    """With no chunk open (a fresh memory, or its chunk closed) a read of no tokens has nothing
    to close: every buffer stays as it was, bit for bit. Without end_chunk it changes nothing
    either."""
    model = tiny_comet("llama")
    x = ids(1, 16, seed=35)
    memory = start(model, x)
    before = memory.clone()
    model.read(memory=memory, end_chunk=end_chunk, progress=False, **how(x))
    for name, a, b in zip(FIELDS, memory.buffers(), before.buffers()):
        assert torch.equal(a, b), name


def test_read_of_no_tokens_without_end_chunk_keeps_the_chunk_open():
    """Without end_chunk, no tokens leave the open chunk as it is."""
    model = tiny_comet("llama")
    x = ids(1, 21, seed=36)
    memory = model.read(x, progress=False)
    before = memory.clone()
    model.read(x[:, :0], memory, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(memory.buffers(), before.buffers()))


def test_generate_still_needs_a_prompt_token():
    """read takes a call of no tokens; generate does not (it decodes after the prompt's last one)."""
    model = tiny_comet("llama")
    with pytest.raises(ValueError, match="input_ids is empty"):
        model.generate(ids(1, 4)[:, :0], max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids is empty"):
        model(ids(1, 4)[:, :0])
