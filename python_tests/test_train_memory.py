"""The training-forward memory (comet_ext.train_memory): the FIFO as a window of
pieces equals the ring buffer, and a recomputed step keeps per chunk only new
information."""
from __future__ import annotations

import pytest
import torch
from modeling_utils import tiny_comet

from comet_ext import ops
from comet_ext import reference as ref
from comet_ext.train_memory import FifoWindow, TrainMemory
from comet_ext.training import saved_for_backward_mb

# Per-chunk valid rows of 3 right-padded samples: sample 1 ends in chunk 3 (a partial
# piece), sample 2 in chunk 1; chunk 4 is wider than the others.
CHUNKS = [([4, 4, 4], 4), ([4, 4, 2], 4), ([4, 3, 0], 4), ([6, 0, 0], 6), ([4, 0, 0], 4), ([4, 0, 0], 4)]


@pytest.mark.parametrize("capacity", [3, 6, 11, 40])
def test_window_equals_the_ring_buffer(capacity):
    g = torch.Generator().manual_seed(0)
    B, H, D = 3, 2, 4
    ring = ops.fifo_empty(B, capacity, (H, D), dtype=torch.float64)
    window = FifoWindow(capacity, B)
    for counts, rows in CHUNKS:
        k = torch.randn(B, rows, H, D, generator=g, dtype=torch.float64)
        ref.fifo_push(*ring, k, torch.tensor(counts))
        window = window.pushed(k, 2 * k, counts)
        heads, lengths = window.layout()
        head, length = torch.tensor(heads), torch.tensor(lengths)
        fk, fv = FifoWindow.view(window.tensors(), head, length, capacity)
        expected = ref.fifo_view(ring[0], ring[1], ring[2])
        assert lengths == ring[2].tolist()
        torch.testing.assert_close(fk, expected, rtol=0, atol=0)
        torch.testing.assert_close(fv, 2 * expected, rtol=0, atol=0)
        # kept: a frozen piece per set of samples that ended together, and the pushed
        # pieces the others may still read
        assert window.frozen <= 2
        assert sum(p.k.shape[1] for p in window.pieces[window.frozen:]) < capacity + max(r for _, r in CHUNKS)


def test_window_gradients_equal_the_functional_ring():
    """Every FIFO view of the sequence weighted and summed: the same gradients for
    every pushed row through the window (with its frozen pieces) as through
    fifo_push_functional's rings."""
    g = torch.Generator().manual_seed(3)
    B, C, H, D = 3, 6, 2, 4
    rows = [torch.randn(B, r, H, D, generator=g, dtype=torch.float64, requires_grad=True) for _, r in CHUNKS]
    weights = [torch.randn(B, C, H, D, generator=g, dtype=torch.float64) for _ in CHUNKS]
    ring, window = ops.fifo_empty(B, C, (H, D), dtype=torch.float64), FifoWindow(C, B)
    ring_loss = window_loss = 0
    for (counts, _), x, w in zip(CHUNKS, rows, weights):
        buffer, head, length = ops.fifo_push_functional(*ring, x, torch.tensor(counts))
        ring = (buffer, head, length)
        ring_loss = ring_loss + (ops.fifo_view(buffer, head, length) * w).sum()
        window = window.pushed(x, x, counts)
        heads, lengths = window.layout()
        fk, _ = FifoWindow.view(window.tensors(), torch.tensor(heads), torch.tensor(lengths), C)
        window_loss = window_loss + (fk * w).sum()
    expected = torch.autograd.grad(ring_loss, rows)
    got = torch.autograd.grad(window_loss, rows)
    for e, o in zip(expected, got):
        torch.testing.assert_close(o, e, rtol=1e-12, atol=1e-12)


def test_stale_pieces_are_dropped():
    window = FifoWindow(4, 1)
    for _ in range(10):
        window = window.pushed(torch.zeros(1, 2, 1, 1), torch.zeros(1, 2, 1, 1), [2])
    assert len(window.pieces) == 2 and window.layout() == ([0], [4])


def test_wire_round_trip_keeps_the_fifo():
    g = torch.Generator().manual_seed(1)
    B, C, H, D = 3, 6, 2, 4
    window = FifoWindow(C, B)
    for counts, rows in CHUNKS[:3]:
        k = torch.randn(B, rows, H, D, generator=g)
        window = window.pushed(k, k + 1, counts)
    mem = TrainMemory(torch.randn(B, 2, 8), torch.tensor([True, True, False]), window)
    wire = mem.to_wire(H, D)
    assert [tuple(t.shape) for t in wire] == [(B, 2, 8), (B, C, H, D), (B, C, H, D), (B,), (B,)]
    back = TrainMemory.from_wire(wire)
    for a, b in ((mem, back), (back, mem)):
        heads, lengths = a.fifo.layout()
        view = FifoWindow.view(a.fifo.tensors(), torch.tensor(heads), torch.tensor(lengths), C)
        other_heads, other_lengths = b.fifo.layout()
        assert lengths == other_lengths
        torch.testing.assert_close(view, FifoWindow.view(b.fifo.tensors(), torch.tensor(other_heads),
                                                         torch.tensor(other_lengths), C))


def test_rows_that_are_not_contiguous_are_refused():
    window = FifoWindow(8, 1).pushed(torch.zeros(1, 4, 1, 1), torch.zeros(1, 4, 1, 1), [2])
    with pytest.raises(RuntimeError, match="sample 0's FIFO rows are not contiguous"):
        window.pushed(torch.zeros(1, 4, 1, 1), torch.zeros(1, 4, 1, 1), [3])


def test_view_applies_rope_like_fifo_view():
    g = torch.Generator().manual_seed(2)
    k = torch.randn(2, 5, 2, 4, generator=g)
    window = FifoWindow(4, 2).pushed(k[:, :3], k[:, :3], [3, 3]).pushed(k[:, 3:], k[:, 3:], [2, 1])
    heads, lengths = window.layout()
    inv = 1.0 / 10000 ** (torch.arange(0, 4, 2) / 4)
    freqs = torch.outer(torch.arange(7.0, 12.0), inv)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    ring = k.clone()  # the concatenation, read as a ring whose rows never wrap
    expected = ops.fifo_view(ring, torch.tensor(heads), torch.tensor(lengths), cos, sin)[:, :4]
    got, _ = FifoWindow.view(window.tensors(), torch.tensor(heads), torch.tensor(lengths), 4, cos, sin)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _saved_mb(model, chunks: int, chunk: int) -> float:
    """MB autograd keeps for backward in a recomputed training step."""
    x = torch.randint(0, 90, (2, chunks * chunk), generator=torch.Generator().manual_seed(chunks))
    return saved_for_backward_mb(lambda: model(x, labels=x, recompute=True, return_logits=False).loss)


def test_recomputation_keeps_only_new_information_per_chunk():
    """Per chunk, a recomputed step keeps each layer's input rows, global state and
    FIFO piece — nothing that grows with the FIFO's capacity (a ring per chunk would
    add temp_budget rows of keys and values per layer)."""
    cc = dict(chunk_size=32, num_global=4, temp_stride=4, temp_budget=64, rla_rank=2)
    model = tiny_comet("qwen3", **cc).train()
    per_chunk = (_saved_mb(model, 12, 32) - _saved_mb(model, 4, 32)) / 8 * 2**20
    cfg = model.config
    B, L, d, kv = 2, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    comp = 32 // 4
    rows = 32 + comp + 4  # text, compression and readout rows
    layer_inputs = B * rows * d * L * 4
    new_information = layer_inputs + B * (4 * d + 2 * comp * kv) * L * 4  # + state + FIFO piece k / v
    # + the chunk's row plan (segments.plan_segment: one int64 buffer, kept whole by the index
    # views autograd saves): kind / token / slot per row, text / compression / readout row
    # indices and 4 counts per sample
    new_information += B * (3 * rows + 32 + comp + 4 + 4) * 8
    assert layer_inputs < per_chunk <= 1.05 * new_information
