"""The passkey diagnostics in bench/ (gates, layouts) measure what they say they measure, on a
tiny random model: the mechanics, not the trained model's numbers."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from comet_ext import CometConfig, CometForCausalLM
from comet_ext.data import byte_tokenizer
from comet_ext.passkey import FILLER, NEEDLE, QUESTION, build_haystack, needle_start

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench")


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _model(tok, gate_snap: float = 1.0) -> CometForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
    comet = CometConfig(chunk_size=64, num_global=4, temp_stride=8, temp_budget=16, gate_snap=gate_snap)
    model = CometForCausalLM.from_base(Qwen3ForCausalLM(cfg), comet).eval()
    for layer_memory in model.memory_layers:  # gates start at 0.5 everywhere; spread them
        torch.nn.init.normal_(layer_memory.global_memory_net.gate.weight, std=0.3)
    return model


@pytest.mark.parametrize("snap", [1.0, 0.5])
def test_captured_gates_are_the_ones_the_update_uses(tok, snap):
    """passkey_gates.capture_gates: one (B, G) gate per layer and gated update, snapped to exactly
    1 above the model's gate_snap, and reading with the capture gives the same memory."""
    capture_gates = _bench("passkey_gates").capture_gates
    ids = torch.randint(0, len(tok), (2, 64 * 4))
    plain = _model(tok, snap).read(ids, progress=False)
    model = _model(tok, snap)
    gates = capture_gates(model)
    captured = model.read(ids, progress=False)
    for l in range(2):
        torch.testing.assert_close(captured.state[l], plain.state[l], rtol=0, atol=0)
    assert sorted(gates) == [0, 1] and all(len(g) == 3 and g[0].shape == (2, 4) for g in gates.values())
    g = torch.cat([torch.stack(v) for v in gates.values()])
    if snap < 1:
        assert (g == 1).any() and ((g == 1) | (g <= snap)).all()
    else:
        assert ((g > 0) & (g < 1)).all()


@pytest.mark.parametrize("first, phase", [(0, 0), (40, 0), (0, 17)])
def test_layout_batches_and_their_teacher_forced_answers(tok, first, phase):
    """passkey_layouts: the haystack has the asked first chunk / filler phase, the question starts
    a chunk, and the teacher-forced first digit is the one streaming predicts after the question."""
    layouts = _bench("passkey_layouts")
    model = _model(tok)
    cs, question = 64, tok(QUESTION, add_special_tokens=False)["input_ids"]
    ids, answer_pos, sizes = layouts.layout_batch(tok, cs, 3, 0.0, 3, first=first, phase=phase)
    assert sizes[0] == (first or cs) and all(s == cs for s in sizes[1:-1]) and sum(sizes) == ids.shape[1]
    for b, p in enumerate(answer_pos):
        key = tok.decode(ids[b, p:p + 5].tolist())
        hay_len = p - 1 - len(question)
        text = tok.decode(ids[b, :hay_len].tolist())
        needle = NEEDLE.format(key=key)
        assert text.startswith(needle) and (FILLER * 3)[phase:].startswith(text[len(needle):])
        assert hay_len == (first or cs) + 2 * cs  # the question starts chunk 4
    predicted = layouts.predict(model, ids, answer_pos, sizes)
    for b, p in enumerate(answer_pos):
        hay_len = p - 1 - len(question)
        if first == 0:  # fixed chunks: streaming reads the same layout
            memory = model.read(ids[b:b + 1, :hay_len], progress=False)
            _, last = model.read(torch.tensor([question + [ids[b, p - 1].item()]]), memory, return_last_hidden=True)
            assert model.base.lm_head(model.decoder.norm(last))[0].argmax().item() == predicted[b, 0].item()


@pytest.mark.parametrize("at", [0, 1, 89, 100, 128 + 37])
def test_needle_at_haystack_puts_the_needle_where_asked_between_whole_passages(tok, at):
    """passkey_layouts.needle_at_haystack (the --offsets rows): the needle starts at token `at`,
    the filler before it ends a passage and the filler after it starts one, as in comet-passkey's
    haystacks, which it reproduces where the needle falls on a passage boundary."""
    layouts = _bench("passkey_layouts")
    key, length = "31415", 320
    hay = layouts.needle_at_haystack(tok, length, at, key)
    needle = tok(NEEDLE.format(key=key), add_special_tokens=False)["input_ids"]
    assert len(hay) == length and hay[at:at + len(needle)] == needle
    before, after = tok.decode(hay[:at]), tok.decode(hay[at + len(needle):])
    assert (FILLER * 4).endswith(before) and (FILLER * 4).startswith(after)
    period = len(tok(FILLER, add_special_tokens=False)["input_ids"])
    if at % period == 0:
        depth = at / (length - len(needle))
        assert needle_start(tok, length, depth, key) == at
        assert hay == build_haystack(tok, length, depth, key)[0]
    with pytest.raises(ValueError, match="at must lie in"):
        layouts.needle_at_haystack(tok, length, length - len(needle) + 1, key)


def test_offset_rows_place_the_needle_in_the_asked_chunk(tok):
    """layout_batch(needle_at=...): fixed chunks, the needle at the asked index, the question
    starting a chunk of its own."""
    layouts = _bench("passkey_layouts")
    ids, answer_pos, sizes = layouts.layout_batch(tok, 64, 3, 0.0, 2, needle_at=64 + 5)
    needle_head = tok("The pass key is ", add_special_tokens=False)["input_ids"]
    assert sizes[:3] == [64, 64, 64] and sum(sizes) == ids.shape[1]
    assert all(ids[b, 69:69 + len(needle_head)].tolist() == needle_head for b in range(2))


def test_misses_set_each_sweep_cell_beside_the_offset_probe(tok, tmp_path):
    """passkey_misses --offsets: a passkey_layouts table is read back row by row, and each sweep
    cell is matched with the row at its needle's offset in the chunk."""
    misses = _bench("passkey_misses")
    table = tmp_path / "offsets.md"
    table.write_text("# title\n\n| needle offset | exact | digits right |\n|---|---|---|\n"
                     "| 0 | 10/10 | 1.00 |\n| 6 | 3/10 | 0.80 |\n\nAll rows: 13/20 keys exact (65.0%).\n")
    probe = misses.read_offsets(str(table))
    assert probe == {0: (10, 10), 6: (3, 10)}
    length = 128 * 4
    runs = lambda depth, right: [{"length": length, "depth": depth, "expected": "12345", "correct": c}
                                 for c in right]
    cells = [{"length": length, "depth": 0.0, "runs": runs(0.0, [True, True])},
             {"length": length, "depth": 1.0, "runs": runs(1.0, [True, False])}]
    offsets = [needle_start(tok, length, d, "12345") % 128 for d in (0.0, 1.0)]
    assert offsets[0] == 0 and offsets[1] not in probe  # depth 1.0 lands on no probed offset: skipped
    lines = misses.offset_table({"cells": cells}, tok, 128, probe)
    assert lines[2] == f"| {length} | 0.0 | 0 | 2/2 | 10/10 |" and len(lines) == 5
    assert lines[-1] == "1 cells; mean |sweep - probe| 0.000, at most 0.00."


def test_drift_swaps_one_layers_global_memory_and_reads_the_answer_as_streaming_does(tok):
    """passkey_drift: with_layer_from puts back exactly one layer's global memory (state and the
    global rows' keys / values), leaving the other layers, the FIFO rows and the late memory
    itself alone; digit_probs' argmax first digit is what streaming predicts after the question."""
    drift = _bench("passkey_drift")
    model, G = _model(tok), 4
    ids = torch.randint(0, len(tok), (1, 64 * 4))
    early = model.read(ids[:, :128], progress=False).clone()
    late = model.read(ids[:, 128:], memory=early.clone(), progress=False)
    before = late.clone()
    mixed = drift.with_layer_from(late, early, 1, G)
    for field in ("state", "kv_k", "kv_v", "fifo_k"):
        torch.testing.assert_close(getattr(late, field), getattr(before, field), rtol=0, atol=0)
    torch.testing.assert_close(mixed.state[1], early.state[1], rtol=0, atol=0)
    torch.testing.assert_close(mixed.state[0], late.state[0], rtol=0, atol=0)
    torch.testing.assert_close(mixed.kv_k[1, :, :G], early.kv_k[1, :, :G], rtol=0, atol=0)
    torch.testing.assert_close(mixed.kv_v[1, :, G:], late.kv_v[1, :, G:], rtol=0, atol=0)
    assert not torch.equal(mixed.state[1], late.state[1])  # the swap is not a no-op here

    key = "52445"
    question = tok(QUESTION, add_special_tokens=False)["input_ids"]
    space = tok(" ", add_special_tokens=False)["input_ids"]
    probs, found = drift.digit_probs(model, tok, question, late, key)
    assert len(probs) == 5 and all(0 < p < 1 for p in probs) and len(found) == 5
    _, last = model.read(torch.tensor([question + space]), late.clone(), return_last_hidden=True)
    first = model.base.lm_head(model.decoder.norm(last))[0].argmax().item()
    assert tok.decode([first]) == found[0]


def test_drift_rejects_a_length_that_is_no_whole_number_of_chunks(tok):
    drift = _bench("passkey_drift")
    with pytest.raises(ValueError, match="--length must be a whole number of chunks"):
        drift.probe(_model(tok), tok, "52445", 64 * 4 + 1, 2, [3])


def test_window_cuts_whole_chunks_around_the_needle_and_reads_them_from_an_empty_memory(tok):
    """passkey_window: a window is the haystack's own chunks, the needle at the same offset in
    its chunk; the window that starts at chunk 0 and ends with the haystack is the haystack
    itself, so its answer is the one reading the whole haystack gives."""
    win = _bench("passkey_window")
    model, key, length, cs = _model(tok), "52445", 64 * 6, 64
    hay, question = build_haystack(tok, length, 0.5, key)
    at = needle_start(tok, length, 0.5, key)
    first = at // cs
    assert 0 < first < 5  # the windows below need a chunk before the needle's and one after it
    cut = win.window(hay, at, cs, 1, 2)
    needle = tok(NEEDLE.format(key=key), add_special_tokens=False)["input_ids"]
    assert len(cut) == 3 * cs and cut == hay[(first - 1) * cs:(first + 2) * cs]
    assert cut[cs + at % cs:cs + at % cs + len(needle)] == needle

    rows = win.probe(model, tok, key, length, 0.5, [(first, 6 - first), (0, 1)])
    memory = model.read(torch.tensor([hay]), progress=False)
    probs, found = _bench("passkey_drift").digit_probs(model, tok, question, memory, key)
    assert rows[0] == (0, 5, probs, found)
    assert rows[1][:2] == (first, first) and rows[1][2] != probs


@pytest.mark.parametrize("text", ["", "1", "1:0", "-1:2", "a:b", "1:2:3"])
def test_window_rejects_malformed_windows(text):
    with pytest.raises(ValueError, match="--windows must be comma-separated B:A pairs"):
        _bench("passkey_window").parse_windows(text)


def test_window_rejects_a_window_past_the_haystack():
    win = _bench("passkey_window")
    assert win.parse_windows("0:8,4:28") == [(0, 8), (4, 28)]
    with pytest.raises(ValueError, match="--windows: 3:1 runs past the haystack's 4 chunks"):
        win.window(list(range(256)), 130, 64, 3, 1)
    with pytest.raises(ValueError, match="--windows: 0:3 runs past"):
        win.window(list(range(256)), 130, 64, 0, 3)
