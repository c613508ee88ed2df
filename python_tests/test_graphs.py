"""CUDA graphs of streaming steps (comet_ext/graphs.py): how a step is keyed and its tensors
swapped (on any machine), and recorded steps against eager ones (on a GPU)."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from conftest import HAS_CUDA
from modeling_utils import tiny_comet

from comet_ext.graphs import StepGraphs, ambient_key, host_key, tensor_leaves, with_leaves
from comet_ext.modeling import _StepPlan
from comet_ext.segments import plan_segment


@dataclasses.dataclass
class _Inner:
    a: torch.Tensor
    note: tuple[int, ...]


@dataclasses.dataclass
class _Outer:
    inner: _Inner
    maybe: torch.Tensor | None
    flag: bool


def test_leaves_are_swapped_in_order_and_host_values_kept():
    obj = (_Outer(_Inner(torch.zeros(2), (1, 2)), torch.ones(3), True), torch.arange(4), None)
    leaves = tensor_leaves(obj)
    assert [tuple(t.shape) for t in leaves] == [(2,), (3,), (4,)]
    fresh = [t.clone() + 10 for t in leaves]
    rebuilt = with_leaves(obj, iter(fresh))
    assert rebuilt[0].inner.a is fresh[0] and rebuilt[0].maybe is fresh[1] and rebuilt[1] is fresh[2]
    assert rebuilt[0].inner.note == (1, 2) and rebuilt[0].flag is True and rebuilt[2] is None
    assert obj[0].inner.a is leaves[0]  # the original is untouched


def test_segment_round_trips_and_its_key_follows_the_host_plan():
    model = tiny_comet("qwen3")
    cc = model.comet_config
    seg = plan_segment(cc, [0, 3], [cc.chunk_size, 5], [True, False], torch.device("cpu"))
    rebuilt = with_leaves(seg, iter([t.clone() for t in tensor_leaves(seg)]))
    assert rebuilt.closing_list == seg.closing_list and rebuilt.comp_counts == seg.comp_counts
    for a, b in zip(tensor_leaves(seg), tensor_leaves(rebuilt)):
        assert torch.equal(a, b) and a is not b
    assert host_key(seg) == host_key(rebuilt)
    other = plan_segment(cc, [0, 3], [cc.chunk_size, 5], [True, True], torch.device("cpu"))
    assert host_key(other) != host_key(seg)  # a different closing plan is a different recording


def test_key_rejects_what_it_cannot_compare():
    with pytest.raises(TypeError, match="cannot key a step on a dict"):
        host_key(({"a": 1},))
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        StepGraphs(0)


def test_key_holds_the_ambient_modes():
    """Autocast (and its dtype), inference mode and grad mode change what a recording holds:
    each is part of the key, so a step recorded under one is not replayed under another."""
    cpu = torch.device("cpu")
    keys = {"plain": ambient_key(cpu)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        keys["bf16 autocast"] = ambient_key(cpu)
    with torch.autocast("cpu", dtype=torch.float16):
        keys["fp16 autocast"] = ambient_key(cpu)
    with torch.inference_mode():
        keys["inference mode"] = ambient_key(cpu)
    with torch.no_grad():
        keys["no grad"] = ambient_key(cpu)
    assert len(set(keys.values())) == len(keys), keys
    assert ambient_key(cpu) == keys["plain"]


def test_a_step_that_cannot_be_recorded_runs_eagerly_and_says_so(monkeypatch):
    """A failed recording keeps the step's eager result (it has already run), warns once, and
    is not tried again for that key: later steps of the shape run eagerly."""
    graphs, calls, tried = StepGraphs(), [], []

    def step(x):
        calls.append(1)
        return x * 2

    def failing_record(key, fn, args):
        tried.append(key)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "_record", failing_record)
    x = torch.arange(3.0)
    assert torch.equal(graphs.run(step, (x,), "ctx"), x * 2)  # first sighting: eager
    with pytest.warns(RuntimeWarning, match="could not be recorded.*stream is capturing"):
        assert torch.equal(graphs.run(step, (x,), "ctx"), x * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            assert torch.equal(graphs.run(step, (x + 1,), "ctx"), (x + 1) * 2)
    assert len(calls) == 5 and len(tried) == 1 and graphs.replays == 0


def test_cuda_graphs_switch_is_harmless_off_the_gpu():
    model = tiny_comet("llama")
    ids = torch.randint(0, 97, (2, 5 * model.comet_config.chunk_size + 3))
    plain = model.read(ids, progress=False)
    model.use_cuda_graphs()
    graphed = model.read(ids, progress=False)
    assert model._step_graphs.replays == 0  # nothing is recorded on the CPU
    for a, b in zip(plain.buffers(), graphed.buffers()):
        assert torch.equal(a, b)
    assert model.use_cuda_graphs(False)._step_graphs is None


def test_steps_reading_the_whole_key_buffer_equal_tight_ones(monkeypatch):
    """Recorded steps read the whole key buffer (attention stops at each sample's k_lens), so that
    decode steps share a recording: reading and generating that way gives the same memory and tokens."""
    model = tiny_comet("qwen3")
    cs = model.comet_config.chunk_size
    ids = torch.randint(0, 97, (2, 6 * cs + 3), generator=torch.Generator().manual_seed(1))

    def run():
        memory = model.read(ids[:, :-1], progress=False)
        out = model.generate(ids[:, -1:], memory=memory, max_new_tokens=cs + 5)
        return memory, out

    tight_mem, tight_out = run()
    build = _StepPlan.build
    monkeypatch.setattr(_StepPlan, "build", staticmethod(lambda *a, **k: build(*a, **{**k, "full_width": True})))
    wide_mem, wide_out = run()
    assert torch.equal(wide_out, tight_out)
    for a, b in zip(wide_mem.buffers(), tight_mem.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_recorded_steps_match_eager_steps(family):
    """A long read with recorded steps leaves exactly the memory an eager read leaves, and the
    same last hidden state; recordings replay (FIFO full, same shape each chunk), also on a fresh
    memory's buffers, and are not replayed once the parameters are new tensors."""
    model = tiny_comet(family).cuda()
    cs = model.comet_config.chunk_size
    ids = torch.randint(0, 97, (2, 20 * cs + 5), generator=torch.Generator().manual_seed(0)).cuda()
    mask = torch.ones_like(ids)
    mask[1, -2 * cs:] = 0  # ragged: the second sample ends two chunks early

    def read():
        return model.read(ids, attention_mask=mask, progress=False, return_last_hidden=True)

    def assert_same(got, expected, what):
        torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0, msg=f"last hidden, {what}")
        for a, b in zip(got[0].buffers(), expected[0].buffers()):
            assert torch.equal(a, b), f"memory differs, {what}"

    eager = read()
    model.use_cuda_graphs()
    graphs = model._step_graphs
    assert_same(read(), eager, "first graphed read")
    replays = graphs.replays
    assert replays > 0
    assert_same(read(), eager, "second graphed read (new memory buffers)")
    assert graphs.replays > replays
    with torch.no_grad():  # new parameter tensors, new values: the recordings read the old ones
        for p in model.parameters():
            p.data = p.data * 1.01
    model._step_graphs = None
    eager = read()
    model._step_graphs = graphs
    assert_same(read(), eager, "graphed read after the parameters changed")
    model.comet_config = dataclasses.replace(model.comet_config, gate_snap=0.55)  # a number baked in
    model._step_graphs = None
    eager = read()
    model._step_graphs = graphs
    assert_same(read(), eager, "graphed read after gate_snap changed")
    # decoding: every token a step of the same shape (the whole key buffer read), chunks closing
    model._step_graphs = None
    eager_tokens = model.generate(ids[:, :5], max_new_tokens=3 * cs, return_memory=True)
    model._step_graphs = graphs
    replays = graphs.replays
    graphed_tokens = model.generate(ids[:, :5], max_new_tokens=3 * cs, return_memory=True)
    assert graphs.replays > replays + cs
    assert torch.equal(graphed_tokens[0], eager_tokens[0])
    for a, b in zip(graphed_tokens[1].buffers(), eager_tokens[1].buffers()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_recorded_steps_follow_autocast_inference_mode_and_memory_buffers():
    """Recordings stay right across the modes a caller reads under: a step recorded under bf16
    autocast casts the weights itself (autocast's cached casts die with its block), so it still
    equals eager after an in-place weight update under a new block, and is not replayed without
    autocast; a step recorded under inference mode is not replayed outside it (its input copies
    are inference tensors); and two live memories never share a recording."""
    model = tiny_comet("qwen3").cuda()
    cs = model.comet_config.chunk_size
    ids = torch.randint(0, 97, (2, 12 * cs), generator=torch.Generator().manual_seed(3)).cuda()
    graphs = StepGraphs()

    def both(run):
        """run() eagerly and with recordings; the graphed run must replay."""
        model._step_graphs = None
        eager = run()
        model._step_graphs = graphs
        replays = graphs.replays
        graphed = run()
        assert graphs.replays > replays
        for a, b in zip(graphed.buffers(), eager.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        return graphed

    def autocast_read():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model.read(ids, progress=False)

    both(autocast_read)
    with torch.no_grad():  # same tensors, new values: the recordings must read them, not old casts
        for p in model.parameters():
            p.mul_(1.01)
    both(autocast_read)
    both(lambda: model.read(ids, progress=False))  # without autocast: fp32 recordings of its own

    def inference_then_plain():
        memory = model.read(ids[:, :cs], progress=False)
        with torch.inference_mode():
            model.read(ids[:, cs:8 * cs], memory=memory, progress=False)
        return model.read(ids[:, 8 * cs:], memory=memory, progress=False)

    both(inference_then_plain)
    # two live memories: the second read's steps must write its own buffers, not the first's
    first = both(lambda: model.read(ids, progress=False))
    kept = [t.clone() for t in first.buffers()]
    second = both(lambda: model.read(ids.flip(1), progress=False))
    for a, b in zip(first.buffers(), kept):
        assert torch.equal(a, b), "a recording of the first memory wrote into it during the second read"
    assert any(not torch.equal(a, b) for a, b in zip(first.buffers(), second.buffers()))
