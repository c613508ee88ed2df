"""Chunk planner, training data, and the training loop (single process)."""
from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from modeling_utils import VOCAB, tiny_comet

from comet_ext.data import (CHATML, IGNORE, Sample, byte_tokenizer, chat_sample, collate, pack, read_chat_jsonl,
                            synthetic_recall, text_sample, token_sample)
from comet_ext.planner import ChunkPlanner, fixed, random_sizes, right_aligned, semantic, uniform
from comet_ext.training import TrainConfig, Trainer, lr_factor, memory_parameter_names

# --------------------------------------------------------------------------- planner


@pytest.mark.parametrize("T", [1, 15, 16, 17, 100])
def test_strategies_cover_the_sequence_within_chunk_size(T):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 10, T).tolist()
    for sizes in (fixed(T, 16), right_aligned(T, 16), uniform(T, 16), random_sizes(T, 16, 5, rng),
                  semantic(tokens, 16, [3])):
        assert sum(sizes) == T and all(1 <= s <= 16 for s in sizes), sizes


def test_strategy_shapes():
    assert right_aligned(40, 16) == [8, 16, 16]
    assert uniform(40, 16) == [14, 13, 13]
    assert semantic([0, 0, 9, 0, 0, 0, 9, 0, 0, 0], 5, [9]) == [3, 4, 3]
    sizes = random_sizes(1000, 64, 20, np.random.default_rng(1))
    assert all(s >= 20 for s in sizes[:-1])


@pytest.mark.parametrize("T", [96, 200, 300, 481, 1000, 4133])
def test_random_sizes_keep_every_chunk_within_bounds_where_a_split_exists(T):
    """Every chunk in [min_size, chunk_size], the last included, whenever T splits so; the cuts vary."""
    seen = set()
    for seed in range(20):
        sizes = random_sizes(T, 128, 96, np.random.default_rng(seed))
        assert sum(sizes) == T and all(96 <= s <= 128 for s in sizes), sizes
        seen.add(tuple(sizes))
    assert len(seen) > 1 or T == 96


def test_random_sizes_without_a_split_end_on_one_short_chunk():
    """138 tokens do not split into chunks of 96..128: a full chunk, then the rest."""
    assert random_sizes(138, 128, 96, np.random.default_rng(0)) == [128, 10]
    assert random_sizes(50, 128, 96, np.random.default_rng(0)) == [50]


def test_planner_is_a_function_of_seed_and_step():
    p = ChunkPlanner(16, min_size=4, seed=3)
    plans = [p.plan(200, step) for step in range(40)]
    assert plans == [ChunkPlanner(16, min_size=4, seed=3).plan(200, step) for step in range(40)]
    assert {name for name, _ in plans} >= {"fixed", "random"}
    with pytest.raises(ValueError, match="unknown strategies"):
        ChunkPlanner(16, mix={"clever": 1.0})


def test_planner_rejects_tokens_of_another_length():
    """`semantic` cuts the tokens it is given: they must be the sequence's T tokens."""
    p = ChunkPlanner(4, mix={"semantic": 1.0}, boundary_ids=[1])
    with pytest.raises(ValueError, match=r"tokens has 3 ids.*T=10"):
        p.plan(10, 0, tokens=[1, 1, 1])
    with pytest.raises(ValueError, match=r"tokens has 10 ids.*T=3"):
        p.plan(3, 0, tokens=[2] * 10)
    assert p.plan(10, 0, tokens=[2] * 10) == ("semantic", [4, 4, 2])


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -0.5])
@pytest.mark.parametrize("others", [{}, {"fixed": 1.0}])
def test_planner_rejects_non_finite_or_negative_weights(weight, others):
    with pytest.raises(ValueError, match=r"mix\['random'\] must be a finite weight >= 0"):
        ChunkPlanner(16, mix={**others, "random": weight})


# --------------------------------------------------------------------------- data


def test_chat_labels_cover_only_assistant_turns():
    tok = byte_tokenizer()
    s = chat_sample([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                     {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}], tok)
    learned = tok.decode([i for i, lab in zip(s.input_ids, s.labels) if lab != IGNORE])
    assert learned == "4<|im_end|>\n6<|im_end|>\n"
    assert tok.decode(s.input_ids).count("<|im_start|>") == 4


def test_bad_jsonl_lines_are_reported_with_line_numbers(tmp_path):
    good = {"uniq_id": "a", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    lines = [json.dumps(good), "{not json", json.dumps({"uniq_id": "b"}), json.dumps({"messages": []}),
             json.dumps({"messages": [{"role": "user", "content": "x" * 500}, {"role": "assistant", "content": "y"}]}),
             json.dumps({"messages": [{"role": "user", "content": "no answer"}]}), json.dumps(good)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    tok = byte_tokenizer()
    samples, problems = read_chat_jsonl(path, tok, max_tokens=200)
    assert len(samples) == 2
    assert [p.split(":")[1] for p in problems] == ["2", "3", "4", "5", "6"]
    assert "malformed JSON" in problems[0] and "missing field 'messages'" in problems[1]
    assert "empty conversation" in problems[2] and "longer than the limit" in problems[3]
    with pytest.raises(ValueError, match=r"data.jsonl:2: malformed JSON"):
        read_chat_jsonl(path, tok, max_tokens=200, on_error="raise")


def test_a_line_the_chat_template_refuses_is_a_problem_of_that_line(tmp_path):
    """Templates such as Mistral's raise on roles that do not alternate (jinja2's TemplateError,
    not a ValueError): that line is reported and skipped, the file read on."""
    tok = byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                         "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                         "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}")
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    bad = {"messages": [{"role": "assistant", "content": "yo"}, {"role": "assistant", "content": "again"}]}
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in (good, bad, good)) + "\n")
    samples, problems = read_chat_jsonl(path, tok)
    assert len(samples) == 2 and len(problems) == 1
    assert ":2: the chat template refused it: roles must alternate" in problems[0]


@pytest.mark.parametrize("field, value", [
    ("min_lr_ratio", -1.0), ("min_lr_ratio", 5.0), ("lr", float("inf")), ("lr", 0.0), ("memory_lr_mult", float("nan")),
    ("warmup_steps", -3), ("checkpoint_every", -1), ("total_steps", 10.5), ("batch_size", True), ("log_every", -1),
    ("weight_decay", -0.1),
])
def test_train_config_refuses_settings_that_would_train_wrong(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field} must be"):
        TrainConfig(**{field: value})


# A template that rewrites earlier turns once later ones follow, as Qwen3's does (written here
# after its behaviour): assistant turns after the last user turn carry a <think> block (empty
# without reasoning), earlier ones lose theirs.
THINKING_TEMPLATE = (
    "{%- set ns = namespace(last=-1) %}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' %}"
    "{%- set content = m['content'] %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if loop.index0 > ns.last %}{{- '<think>\\n' + reasoning + '\\n</think>\\n\\n' }}{%- endif %}"
    "{{- content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def _pieces(tok, *pieces: tuple[str, bool]) -> Sample:
    """The sample of texts in order, each learned or not (the byte tokenizer has no merges, so
    the tokens of a text are its pieces' tokens in a row)."""
    ids, labels = [], []
    for text, learned in pieces:
        t = tok(text, add_special_tokens=False)["input_ids"]
        ids += t
        labels += t if learned else [IGNORE] * len(t)
    return Sample(ids, labels)


def test_a_template_that_rewrites_earlier_turns_is_labelled_on_the_whole_conversation():
    """Turn by turn, the second user turn changes how the first answer renders (its <think> block
    goes); the sample is then the whole conversation rendered once, each assistant turn learned
    over its body as it stands there: the reasoning kept in the last turn, gone in the first."""
    tok = byte_tokenizer()
    tok.chat_template = THINKING_TEMPLATE
    chat = [{"role": "system", "content": "sys"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "<think>\nplan\n</think>\n\nline 1\nline 2"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "<think>\nmore\n</think>\n\ncafé ✓"}]
    expected = _pieces(tok, ("<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n"
                             "<|im_start|>assistant\n", False),
                       ("line 1\nline 2<|im_end|>\n", True),
                       ("<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n", False),
                       ("<think>\nmore\n</think>\n\ncafé ✓<|im_end|>\n", True))
    assert chat_sample(chat, tok) == expected
    # one answer: the template only appends, the turn-by-turn sample, the same body learned
    one = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert chat_sample(one, tok) == _pieces(tok, ("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n", False),
                                            ("<think>\n\n</think>\n\na<|im_end|>\n", True))


def test_whole_conversation_labels_pass_over_a_quoted_frame_and_a_closing_at_the_end():
    """A user turn quoting the assistant header, an answer quoting the closing text, a reasoning
    block on the answer's line, a template that ends a whole conversation with an end-of-text
    token: each turn is still found where it is."""
    tok = byte_tokenizer()
    tok.chat_template = THINKING_TEMPLATE
    chat = [{"role": "user", "content": "log:\n<|im_start|>assistant\nok"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "q"}, {"role": "assistant", "content": "x<|im_end|>\nx"},
            {"role": "user", "content": "r"}, {"role": "assistant", "content": "<think>plan</think>answer"},
            {"role": "user", "content": "s"}, {"role": "assistant", "content": "b"}]
    head = "<|im_start|>assistant\n"
    expected = [("<|im_start|>user\nlog:\n<|im_start|>assistant\nok<|im_end|>\n" + head, False),
                ("ok<|im_end|>\n", True), ("<|im_start|>user\nq<|im_end|>\n" + head, False),
                ("x<|im_end|>\nx<|im_end|>\n", True), ("<|im_start|>user\nr<|im_end|>\n" + head, False),
                ("answer<|im_end|>\n", True), ("<|im_start|>user\ns<|im_end|>\n" + head, False),
                ("<think>\n\n</think>\n\nb<|im_end|>\n", True)]
    assert chat_sample(chat, tok) == _pieces(tok, *expected)
    # what the template ends a conversation with after the last answer is learned, as turn by turn
    tok.chat_template = THINKING_TEMPLATE + ("{% if messages[-1]['role'] == 'assistant' and not add_generation_prompt %}"
                                             "<|endoftext|>{% endif %}")
    assert chat_sample(chat, tok) == _pieces(tok, *expected, ("<|endoftext|>", True))
    assert chat_sample(chat[:2], tok) == _pieces(tok, *expected[:1], ("<think>\n\n</think>\n\nok<|im_end|>\n"
                                                                     "<|endoftext|>", True))


def test_whole_conversation_labels_where_the_template_trims_or_drops_reasoning_that_quotes_the_frame():
    tok = byte_tokenizer()
    tok.chat_template = THINKING_TEMPLATE.replace("+ m['content'] +", "+ m['content'] | trim +")
    head, last = "<|im_start|>assistant\n", ("<|im_start|>user\nr<|im_end|>\n<|im_start|>assistant\n", False)
    learned_b = ("<think>\n\n</think>\n\nb<|im_end|>\n", True)
    cases = [  # (conversation, its first answer's pieces)
        # trimmed system and user turns are still found
        ([{"role": "system", "content": "Be brief.\n"}, {"role": "user", "content": " q"},
          {"role": "assistant", "content": "<think>x</think>\na"}],
         [("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nq<|im_end|>\n" + head, False),
          ("a<|im_end|>\n", True)]),
        # dropped reasoning that quotes the closing text: the turn ends at its answer's closing
        ([{"role": "user", "content": "q"},
          {"role": "assistant", "content": "<think>ChatML ends a turn with <|im_end|>\n</think>ok"}],
         [("<|im_start|>user\nq<|im_end|>\n" + head, False), ("ok<|im_end|>\n", True)]),
        # ... and an empty answer after it: its closing only, not the next user turn's frame
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>x<|im_end|>\n</think>"}],
         [("<|im_start|>user\nq<|im_end|>\n" + head, False), ("<|im_end|>\n", True)]),
    ]
    for first, pieces in cases:
        chat = first + [{"role": "user", "content": "r"}, {"role": "assistant", "content": "b"}]
        assert chat_sample(chat, tok) == _pieces(tok, *pieces, last, learned_b), first
    # an empty answer whose kept reasoning forms the closing text with the template's newline: refused
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "r"}, {"role": "assistant", "content": "<think>x<|im_end|></think>"}]
    with pytest.raises(ValueError, match=r"message 3 \(assistant\) renders as '<think>\\nx', which does not end"):
        chat_sample(chat, tok)
    # an empty answer after a reasoning block that quotes the closing text: either closing would do
    from comet_ext.data import _whole_chat_sample

    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<|im_end|>\nhelpful<think></think>"}]
    with pytest.raises(ValueError, match=r"could end at any of 2 closing texts '<\|im_end\|>\\n', each after its answer ''"):
        _whole_chat_sample(chat, byte_tokenizer())


def test_chat_sample_renders_a_long_conversation_once_and_falls_back_to_turn_by_turn():
    """A fast tokenizer labels the whole conversation on one rendering (a constant number of
    template calls, not one per turn: bench/results/chat_labels_cpu.md); a slow tokenizer, or a
    turn the single rendering cannot place, goes turn by turn."""
    from comet_ext.data import _turn_by_turn_sample

    tok = byte_tokenizer()
    calls = []
    render = tok.apply_chat_template

    class Counting:  # the tokenizer, counting its template renderings
        is_fast = True

        def apply_chat_template(self, *a, **kw):
            calls.append(1)
            return render(*a, **kw)

        def __call__(self, *a, **kw):
            return tok(*a, **kw)

        def __getattr__(self, name):
            return getattr(tok, name)

    chat = [{"role": ("user", "assistant")[i % 2], "content": f"turn {i}"} for i in range(40)]
    assert chat_sample(chat, Counting()) == _turn_by_turn_sample(chat, tok)
    assert len(calls) <= 6, len(calls)
    calls.clear()
    Counting.is_fast = False  # no offsets: turn by turn, two renderings a turn
    assert chat_sample(chat, Counting()) == _turn_by_turn_sample(chat, tok) and len(calls) >= 40
    # an empty answer after a reasoning block quoting the closing text could end at either closing
    # in one rendering; turn by turn (the template appends) places it
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<|im_end|>\nhelpful<think></think>"}]
    assert chat_sample(chat, tok) == _turn_by_turn_sample(chat, tok)


@pytest.mark.parametrize("template", ["chatml", "system"])
def test_whole_conversation_labels_equal_the_turn_by_turn_ones_where_the_template_only_appends(template):
    """The oracle of the whole-conversation path: where the template only appends, both paths
    must give the very same sample."""
    from comet_ext.data import _turn_by_turn_sample, _whole_chat_sample

    tok = byte_tokenizer()
    if template == "system":
        tok.chat_template = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n"
                             "{% endif %}" + CHATML)
    g = random.Random(7)
    words = ["a", "café", "2+2?", "", "line\nbreak", " padded ", "<|im_end|> quoted", "✓✓",
             "<|im_end|>\n", "<|im_start|>assistant\n", "<|im_start|>user\n"]  # a turn's frame, quoted
    for n in range(1, 9):
        roles = [g.choice(["user", "assistant"]) for _ in range(n - 1)] + ["assistant"]
        chat = [{"role": r, "content": " ".join(g.choice(words) for _ in range(g.randint(0, 3)))} for r in roles]
        assert _whole_chat_sample(chat, tok) == _turn_by_turn_sample(chat, tok), chat


def test_a_rewriting_template_is_refused_where_its_turns_cannot_be_found():
    tok = byte_tokenizer()
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "r"}, {"role": "assistant", "content": "b"}]
    # earlier answers are redacted: the first answer's body does not end with its content
    tok.chat_template = THINKING_TEMPLATE.replace("{{- content + '<|im_end|>", "{{- (content if loop.index0 > ns.last "
                                                                          "else '[redacted]') + '<|im_end|>")
    with pytest.raises(ValueError, match=r"message 2 \(user\) after them, the messages before it render differently, "
                                         r"and message 1 \(assistant\) renders as '\[redacted\]', which does not end "
                                         r"with its answer 'a'"):
        chat_sample(chat, tok)
    tok.chat_template = THINKING_TEMPLATE

    class Slow:  # what a slow tokenizer is to chat_sample: no character offsets
        is_fast = False

        def __getattr__(self, name):
            return getattr(tok, name)

    with pytest.raises(ValueError, match="a slow tokenizer gives no character offsets.*comet_ext.data.CHATML"):
        chat_sample(chat, Slow())
    s = chat_sample(chat, tok)  # the fast tokenizer labels it
    assert tok.decode([i for i, lab in zip(s.input_ids, s.labels) if lab != IGNORE]) == \
        "a<|im_end|>\n<think>\n\n</think>\n\nb<|im_end|>\n"


def test_chat_may_start_with_the_assistant():
    """The first turn's prompt is the text the template puts before its content (here a default
    system block and the assistant header), found without rendering an empty conversation."""
    tok = byte_tokenizer()
    chat = [{"role": "assistant", "content": "first"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"}]
    s = chat_sample(chat, tok)
    learned = tok.decode([i for i, lab in zip(s.input_ids, s.labels) if lab != IGNORE])
    assert tok.decode(s.input_ids).startswith("<|im_start|>assistant\nfirst<|im_end|>\n")
    assert learned == "first<|im_end|>\na<|im_end|>\n"
    tok.chat_template = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n{% endif %}"
                         + CHATML)
    s = chat_sample(chat, tok)
    learned = tok.decode([i for i, lab in zip(s.input_ids, s.labels) if lab != IGNORE])
    assert tok.decode(s.input_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>assistant\nfirst")
    assert learned == "first<|im_end|>\na<|im_end|>\n"


def test_a_first_assistant_turn_learns_what_the_template_adds_after_its_header_on_either_path():
    """Turn by turn (a slow tokenizer), the first turn's labels start where a later turn's do: at
    the end of the assistant header, so a <think> block the template adds is learned, as the one
    rendering of the whole conversation (a fast tokenizer) learns it."""
    from comet_ext.data import _turn_by_turn_sample, _whole_chat_sample

    tok = byte_tokenizer()
    tok.chat_template = THINKING_TEMPLATE
    expected = _pieces(tok, ("<|im_start|>assistant\n", False), ("<think>\n\n</think>\n\nfirst<|im_end|>\n", True))
    chat = [{"role": "assistant", "content": "first"}]
    assert _whole_chat_sample(chat, tok) == expected
    assert _turn_by_turn_sample(chat, tok) == expected
    tok.chat_template = "{{- '<|im_start|>system\\nBe brief.<|im_end|>\\n' }}" + THINKING_TEMPLATE  # a system block
    expected = _pieces(tok, ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>assistant\n", False),
                       ("<think>\n\n</think>\n\nfirst<|im_end|>\n", True))
    assert _whole_chat_sample(chat, tok) == expected
    assert _turn_by_turn_sample(chat, tok) == expected


def test_jsonl_lines_that_are_not_unicode_are_reported_and_a_bom_is_accepted(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    path = tmp_path / "data.jsonl"
    answer = b', {"role": "assistant", "content": "x"}]}\n'
    path.write_bytes(b"\xef\xbb\xbf" + good.encode() + b"\n"  # a BOM before the first line
                     + b'{"messages": [{"role": "user", "content": "caf\xe9"}' + answer  # Latin-1, not UTF-8
                     + b'{"messages": [{"role": "user", "content": "\\ud800"}' + answer  # a lone surrogate
                     + good.encode() + b"\n")
    tok = byte_tokenizer()
    samples, problems = read_chat_jsonl(path, tok)
    assert len(samples) == 2 and [p.split(":")[1] for p in problems] == ["2", "3"]
    assert "not UTF-8" in problems[0] and "surrogate" in problems[1]
    with pytest.raises(ValueError, match=r"data.jsonl:2: not UTF-8"):
        read_chat_jsonl(path, tok, on_error="raise")
    path.write_bytes(b"\xef\xbb\xbf" + good.encode() + b"\n" + good.encode() + b"\n")
    assert read_chat_jsonl(path, tok, on_error="raise")[0] == samples


def test_synthetic_recall_has_the_requested_length_or_refuses_it():
    assert [len(s) for s in synthetic_recall(3, 11, vocab=50)] == [11] * 3  # no filler
    assert [len(s) for s in synthetic_recall(3, 12, vocab=50, key_len=2)] == [12] * 3
    with pytest.raises(ValueError, match=r"length must be >= 11 .*got 5"):
        synthetic_recall(1, 5, vocab=50)


def test_text_tokens_packing_and_collation():
    tok = byte_tokenizer()
    a, b = text_sample("hello", tok), token_sample([7, 8, 9])
    assert tok.decode(a.input_ids) == "hello" and a.labels == a.input_ids
    packed = pack([a, b, a], seq_len=10, separator=256)
    assert [len(p) for p in packed] == [9, 5]
    assert packed[0].labels[5] == IGNORE
    batch = collate(packed, pad_id=259)
    assert batch["input_ids"].shape == (2, 9) and batch["attention_mask"].sum().item() == 14
    assert (batch["labels"][1, 5:] == IGNORE).all()
    with pytest.raises(ValueError, match="does not fit"):
        pack([Sample([1] * 20, [1] * 20)], seq_len=10)


# --------------------------------------------------------------------------- loop


def _trainer(model, steps, **kw):
    samples = synthetic_recall(8, 60, vocab=97, seed=0)
    cfg = TrainConfig(total_steps=steps, batch_size=2, lr=3e-3, memory_lr_mult=5.0, warmup_steps=2,
                      progress=False, **kw)
    return Trainer(model, samples, cfg, ChunkPlanner(16, min_size=6, seed=0))


def test_memory_modules_get_five_times_the_learning_rate():
    model = tiny_comet("llama")
    tr = _trainer(model, 10)
    groups = {g["name"]: g for g in tr.optimizer.param_groups}
    assert groups["memory"]["lr"] == pytest.approx(5 * groups["base"]["lr"])
    mem = memory_parameter_names(model)
    assert {id(p) for p in groups["memory"]["params"]} == {id(p) for n, p in model.named_parameters() if n in mem}
    cfg = TrainConfig(total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(100, cfg) == pytest.approx(0.1)


def test_max_grad_norm_must_be_positive_and_inf_does_not_clip():
    """clip_grad_norm_ to 0 would zero every gradient (a run that trains nothing): refused;
    float("inf") leaves the gradients as they are and still logs their norm."""
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
            TrainConfig(max_grad_norm=bad)
    torch.manual_seed(0)
    model = tiny_comet("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    history = _trainer(model, 1, max_grad_norm=float("inf")).train()
    assert history[0]["grad_norm"] > 1 and np.isfinite(history[0]["grad_norm"])  # > 1: the default would clip
    # the gradients the step applied (still in .grad) have the logged, unclipped norm
    applied = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert float(applied) == pytest.approx(history[0]["grad_norm"], rel=1e-5)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_short_training_run_lowers_the_loss():
    torch.manual_seed(0)
    tr = _trainer(tiny_comet("qwen3"), 30)
    history = tr.train()
    first, last = np.mean([h["loss"] for h in history[:3]]), np.mean([h["loss"] for h in history[-3:]])
    assert last < 0.6 * first, (first, last)
    assert all(h["chunks"] >= 4 for h in history)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = _trainer(tiny_comet("llama"), 6, grad_accum=2)
    expected = [h["loss"] for h in full.train()]
    first = _trainer(tiny_comet("llama"), 6, grad_accum=2)
    first.train(steps=3)
    first.save_checkpoint(str(tmp_path / "ckpt"))
    resumed = _trainer(tiny_comet("llama", seed=5), 6, grad_accum=2)  # other weights: all restored
    resumed.load_checkpoint(str(tmp_path / "ckpt"))
    got = [h["loss"] for h in resumed.train()]
    assert got == expected


def test_resume_refuses_another_run_and_takes_a_longer_one(tmp_path):
    """A checkpoint resumed under another CoMeT config or other TrainConfig settings would go on
    as another run (memory layout, data order, schedule) under this one's name: refused, naming
    the differences. How long it runs, how it logs and checkpoints may change."""
    first = _trainer(tiny_comet("llama"), 4)
    first.train(steps=1)
    first.save_checkpoint(str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match=r"another CoMeT config.*'temp_budget': \(6, 2\)"):
        _trainer(tiny_comet("llama", temp_budget=2), 4).load_checkpoint(str(tmp_path / "ckpt"))
    other = _trainer(tiny_comet("llama"), 4)
    other.cfg = dataclasses.replace(other.cfg, seed=7)
    with pytest.raises(ValueError, match=r"other TrainConfig settings.*'seed': \(0, 7\)"):
        other.load_checkpoint(str(tmp_path / "ckpt"))
    longer = _trainer(tiny_comet("llama"), 9)
    longer.load_checkpoint(str(tmp_path / "ckpt"))
    assert longer.step == 1


def test_save_checkpoint_refuses_a_folder_it_would_wipe_and_replaces_an_earlier_checkpoint(tmp_path):
    """A checkpoint replaces its whole folder: saved into a run folder (notes, the periodic
    step-* checkpoints) or a project folder, it deleted them all. Refused unless the folder is
    new, empty or an earlier checkpoint; a symlinked folder is replaced where it points."""
    tr = _trainer(tiny_comet("llama"), 2)
    tr.train(steps=1)
    runs = tmp_path / "runs"
    (runs / "step-0000001").mkdir(parents=True)
    (runs / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"holds notes.txt, step-0000001, which saving there would delete"):
        tr.save_checkpoint(str(runs))
    assert sorted(p.name for p in runs.iterdir()) == ["notes.txt", "step-0000001"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        tr.save_checkpoint(str(tmp_path / "file"))

    ckpt = tmp_path / "scratch" / "ckpt"
    tr.save_checkpoint(str(ckpt))
    (tmp_path / "link").symlink_to(ckpt)
    tr.train(steps=1)
    tr.save_checkpoint(str(tmp_path / "link"))  # an earlier checkpoint, through a link
    assert (tmp_path / "link").is_symlink()
    assert sorted(p.name for p in ckpt.iterdir()) == ["model", "train_config.json", "trainer.pt"]
    assert sorted(p.name for p in (tmp_path / "scratch").iterdir()) == ["ckpt"]  # no debris
    resumed = _trainer(tiny_comet("llama"), 2)
    resumed.load_checkpoint(str(tmp_path / "link"))
    assert resumed.step == 2


def test_a_checkpoint_that_fails_to_load_leaves_the_trainer_as_it_was(tmp_path):
    """load_checkpoint restored the model's weights, then failed on a damaged trainer.pt (or
    another model's weights), leaving this run's optimizer and step over the checkpoint's weights."""
    first = _trainer(tiny_comet("llama"), 4)
    first.train(steps=1)
    first.save_checkpoint(str(tmp_path / "ckpt"))
    other = _trainer(tiny_comet("llama", seed=5), 4)
    before = {k: v.clone() for k, v in other.model.state_dict().items()}

    def untouched():
        assert other.step == 0 and all(torch.equal(v, before[k]) for k, v in other.model.state_dict().items())

    trainer_pt = tmp_path / "ckpt" / "trainer.pt"
    good = trainer_pt.read_bytes()
    trainer_pt.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"trainer.pt' cannot be read"):
        other.load_checkpoint(str(tmp_path / "ckpt"))
    untouched()
    trainer_pt.write_bytes(good)
    pytest.importorskip("peft")
    from comet_ext.lora import apply_lora

    apply_lora(other.model, rank=2)
    other.optimizer = torch.optim.AdamW(other.model.parameters())
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"other weights than this trainer's.*lora"):
        other.load_checkpoint(str(tmp_path / "ckpt"))
    untouched()


def test_resume_refuses_another_number_of_data_replicas(tmp_path):
    """The batches a step reads depend on the number of data-parallel replicas: resumed under
    another, samples were read twice or skipped, silently."""
    first = _trainer(tiny_comet("llama"), 4)
    first.train(steps=1)
    first.data_size = 2  # as a run on two data replicas saves it
    first.save_checkpoint(str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match="trained with 2 data replicas, this trainer has 1"):
        _trainer(tiny_comet("llama"), 4).load_checkpoint(str(tmp_path / "ckpt"))


def test_resume_refuses_a_checkpoint_whose_model_is_another_checkpoints(tmp_path):
    """A checkpoint folder whose model/ was copied from another checkpoint (of the same run) would
    resume one step's weights with another step's optimizer state and schedule, silently."""
    import shutil

    tr = _trainer(tiny_comet("llama"), 4)
    tr.train(steps=1)
    tr.save_checkpoint(str(tmp_path / "step1"))
    tr.train(steps=1)
    tr.save_checkpoint(str(tmp_path / "step2"))
    resumed = _trainer(tiny_comet("llama"), 4)
    resumed.load_checkpoint(str(tmp_path / "step2"))  # whole: loads
    assert resumed.step == 2
    shutil.rmtree(tmp_path / "step2" / "model")
    shutil.copytree(tmp_path / "step1" / "model", tmp_path / "step2" / "model")
    with pytest.raises(ValueError, match=r"model' is not the model saved with .*trainer.pt' \(save ids [0-9a-f]+ and "
                                         r"[0-9a-f]+\): the folder mixes two checkpoints"):
        _trainer(tiny_comet("llama"), 4).load_checkpoint(str(tmp_path / "step2"))


def test_trainer_refuses_empty_samples_and_a_pad_id_outside_the_vocabulary():
    model = tiny_comet("llama")
    good = token_sample([1, 2, 3])
    with pytest.raises(ValueError, match=r"samples \[1\] hold no token"):
        Trainer(model, [good, token_sample([])], TrainConfig(progress=False), ChunkPlanner(16))
    with pytest.raises(ValueError, match=r"pad_id must be a token id in \[0, 97\)"):
        Trainer(model, [good], TrainConfig(progress=False), ChunkPlanner(16), pad_id=256)


def test_resume_is_exact_with_dropout(tmp_path):
    """A checkpoint carries torch's random state: with LoRA dropout the resumed run draws the
    same masks as the uninterrupted one, whatever the resuming process's generator held."""
    pytest.importorskip("peft")
    from comet_ext.lora import apply_lora

    def trainer(seed):
        model = tiny_comet("llama", seed=seed)
        apply_lora(model, rank=2, dropout=0.3)
        return _trainer(model, 4)

    torch.manual_seed(0)
    expected = [h["loss"] for h in trainer(0).train()]
    torch.manual_seed(0)
    first = trainer(0)
    first.train(steps=2)
    first.save_checkpoint(str(tmp_path / "ckpt"))
    torch.manual_seed(123)
    resumed = trainer(3)
    resumed.load_checkpoint(str(tmp_path / "ckpt"))
    assert [h["loss"] for h in resumed.train()] == expected


def test_periodic_checkpoints_are_complete_folders(tmp_path):
    tr = _trainer(tiny_comet("llama"), 4, checkpoint_every=2, checkpoint_dir=str(tmp_path))
    tr.train()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["step-0000002", "step-0000004"]
    for n in names:
        assert (tmp_path / n / "trainer.pt").exists() and (tmp_path / n / "model" / "model.safetensors").exists()


def test_lora_trains_adapters_and_memory_and_merges_back():
    pytest.importorskip("peft")
    from comet_ext.lora import apply_lora, lora_parameters, merge_lora

    model = tiny_comet("qwen3")
    base_before = {n: p.detach().clone() for n, p in model.base.named_parameters()}
    trainable = apply_lora(model, rank=4)
    assert 0 < trainable < sum(p.numel() for p in model.parameters())
    assert all(p.requires_grad for p in model.memory_layers.parameters())
    tr = _trainer(model, 3)
    tr.train()
    assert any(p.abs().sum() > 0 for p in lora_parameters(model))
    x = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        adapted = model(x).logits
    merge_lora(model)
    assert not lora_parameters(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, adapted, rtol=1e-4, atol=1e-4)
    frozen = [n for n in base_before if "embed" in n]
    for n in frozen:  # frozen base weights did not move
        torch.testing.assert_close(dict(model.base.named_parameters())[n], base_before[n])


def test_lora_cannot_be_applied_twice_and_merge_keeps_what_was_frozen():
    """A second apply_lora would reset the trained adapters (peft re-initialises them): refused.
    merge_lora gives the base weights back the trainability they had before apply_lora."""
    pytest.importorskip("peft")
    from comet_ext.lora import apply_lora, lora_parameters, merge_lora

    model = tiny_comet("llama")
    model.base.model.embed_tokens.weight.requires_grad_(False)  # the user's own choice
    apply_lora(model, rank=2)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_()
    trained = [p.detach().clone() for p in lora_parameters(model)]
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, rank=2)
    assert all(torch.equal(a, b) for a, b in zip(lora_parameters(model), trained))
    merge_lora(model)
    assert not model.base.model.embed_tokens.weight.requires_grad
    assert all(p.requires_grad for n, p in model.base.named_parameters() if "embed_tokens" not in n)
    apply_lora(model, rank=2)  # merged: adapters may come again


def test_a_step_is_the_token_mean_however_it_is_split_into_micro_batches():
    """Two samples with 39 and 5 labelled tokens: one micro-batch of both, or two of one each
    (gradient accumulation), give the same step, the mean over all 44 tokens; a mean per
    micro-batch weighed the 5-token one like the 39-token one."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, VOCAB, (40,), generator=g).tolist() for _ in range(2))
    samples = [token_sample(a), token_sample(b, [-100] * 35 + b[35:])]
    runs = {}
    for batch_size, grad_accum in ((2, 1), (1, 2)):
        model = tiny_comet("llama")
        cfg = TrainConfig(total_steps=1, batch_size=batch_size, grad_accum=grad_accum, progress=False,
                          max_grad_norm=float("inf"))
        record = Trainer(model, samples, cfg, ChunkPlanner(16, mix={"fixed": 1})).train()[0]
        runs[grad_accum] = record, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model = tiny_comet("llama").train()
    summed = sum(model(torch.tensor([s.input_ids]), labels=torch.tensor([s.labels]), num_items_in_batch=1).loss
                 for s in samples)
    assert runs[1][0]["loss"] == pytest.approx(float(summed) / 44, rel=1e-5)
    assert runs[2][0]["loss"] == pytest.approx(runs[1][0]["loss"], rel=1e-5)
    for name, grad in runs[1][1].items():
        torch.testing.assert_close(runs[2][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


USUAL_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MEMORY_MODULES = ["memory_embeddings", "global_memory_net", "temp_memory_net"]


@pytest.mark.parametrize("targets", [USUAL_LORA_TARGETS, "all-linear"])
def test_peft_usual_lora_targets_adapt_the_base_and_leave_the_memory_alone(targets):
    """get_peft_model with the LoRA targets people write for a decoder: the memory holds no
    nn.Linear and none of those names, so the adapters land on the base model's layers only
    (the memory's modules were named o_proj / down_proj / up_proj: PEFT failed on the first,
    and adapters on the others were refused). Adapters start as no-ops (lora_B = 0): the loss is
    the plain model's, and every adapter gets a gradient."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    x = torch.randint(0, 97, (1, 40))
    plain = tiny_comet("qwen3")
    model = get_peft_model(tiny_comet("qwen3"), LoraConfig(r=2, target_modules=targets))
    adapted = {n.split(".lora_A")[0].split(".model.")[-1] for n, _ in model.named_parameters() if ".lora_A" in n}
    layers = {f"layers.{i}.{part}" for i in range(2) for part in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert adapted == layers  # (all-linear leaves out lm_head, as for any causal LM)
    loss = model(x, labels=x).loss
    torch.testing.assert_close(loss, plain(x, labels=x).loss, rtol=0, atol=0)
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    model.read(x)
    assert model.generate(x, max_new_tokens=2).shape == (1, 42)


def test_peft_modules_to_save_trains_the_memory_modules_as_without_peft():
    """LoraConfig(modules_to_save=MEMORY_MODULES) trains copies of all of the memory's modules
    beside the adapters (PEFT otherwise freezes them): the copies are what the model reads
    (PEFT's wrapper hands over the active copy's attributes too), so the loss and the memory's
    gradients are those of the model without PEFT."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    x = torch.randint(0, 97, (2, 40))
    plain = tiny_comet("qwen3")
    model = get_peft_model(tiny_comet("qwen3"), LoraConfig(
        r=2, target_modules=USUAL_LORA_TARGETS, modules_to_save=MEMORY_MODULES))
    with torch.no_grad():  # the copies, not the frozen originals, must be what the forward reads
        for name, p in model.named_parameters():
            if ".original_module." in name:
                p.mul_(-1.0)
    loss = model(x, labels=x).loss
    expected = plain(x, labels=x).loss
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    loss.backward()
    expected.backward()
    copies = {n.split("base_model.model.")[1].replace(".modules_to_save.default", ""): p
              for n, p in model.named_parameters() if ".modules_to_save.default." in n}
    memory = {n: p for n, p in plain.named_parameters() if not n.startswith("base.")}
    assert len(copies) == len(memory) == 2 + 2 * 7 and all(p.requires_grad for p in copies.values())
    for name, p in memory.items():
        torch.testing.assert_close(copies[name].grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
    with pytest.raises(ValueError, match="memory_embeddings is wrapped .* before get_peft_model"):
        model.resize_global_memory(8)


def test_peft_save_reload_and_merge_and_unload_give_the_trained_model(tmp_path):
    """The PEFT round trip users run: PeftModel.save_pretrained (adapters + the memory's trained
    copies), PeftModel.from_pretrained over a CometForCausalLM loaded from its folder, then
    merge_and_unload into a plain CometForCausalLM, saved and loaded as one."""
    peft = pytest.importorskip("peft")
    from comet_ext import CometForCausalLM

    x = torch.randint(0, 97, (1, 40))
    tiny_comet("qwen3").save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(CometForCausalLM.from_pretrained(tmp_path / "base"), peft.LoraConfig(
        r=2, target_modules="all-linear", modules_to_save=MEMORY_MODULES))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # as training would move them
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    trained = model(x).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(CometForCausalLM.from_pretrained(tmp_path / "base"),
                                              tmp_path / "adapter")
    assert torch.equal(reloaded(x).logits, trained)
    merged = reloaded.merge_and_unload()
    assert type(merged) is CometForCausalLM
    merged.save_pretrained(tmp_path / "merged")
    again = CometForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(again(x).logits, trained, rtol=1e-5, atol=1e-5)
    untrained = CometForCausalLM.from_pretrained(tmp_path / "base")(x).logits
    assert not torch.allclose(untrained, trained, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("how", ["layernorm tuning", "lora target_parameters"])
def test_peft_adapters_that_do_reach_the_memory_are_refused_and_excluding_them_works(how):
    """The memory's ops read its modules' weights, so an adapter that does wrap one (PEFT's
    LayerNorm tuning of every `norm`, LoRA's target_parameters naming the RLA's weights) would be
    silently left out: zero gradient, and a merged model unlike the trained one. Refused, naming
    the way out; with the memory excluded, PEFT trains the base's norms."""
    peft = pytest.importorskip("peft")

    def config(**kw):
        if how == "layernorm tuning":
            return peft.LNTuningConfig(target_modules=["norm"], **kw)
        return peft.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=["rla.down"], **kw)

    x = torch.randint(0, 97, (1, 20))
    model = peft.get_peft_model(tiny_comet("qwen3"), config())
    for run in (lambda: model(x), lambda: model.read(x), lambda: model.generate(x, max_new_tokens=2)):
        with pytest.raises(ValueError, match=r"memory modules .* carry adapters \(PEFT\).*exclude_modules"):
            run()
    if how != "layernorm tuning":
        return  # (exclude_modules does not reach target_parameters: the way out is not to name them)
    model = peft.get_peft_model(tiny_comet("qwen3"), config(exclude_modules=r".*memory_layers.*"))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("memory_layers" not in n for n in trained)
    model(x, labels=x).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
