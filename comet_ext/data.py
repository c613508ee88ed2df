"""Training data: a byte-level tokenizer that needs no download, the reference
JSONL chat format (loss on assistant tokens only), plain text and pre-tokenised
inputs, packing, and batch collation.

A Sample is (input_ids, labels) lists of equal length; labels are -100 where no
loss is taken.
"""
from __future__ import annotations

import codecs
import dataclasses
import json
import logging
import os
from typing import Iterable, Optional, Sequence

import torch

log = logging.getLogger("comet_ext.data")

IGNORE = -100
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


@dataclasses.dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + ChatML specials), built offline:
    every text round-trips, no vocabulary file or download is needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = _bytes_to_unicode()  # id b is the character GPT-2's table gives byte b
    vocab = {table[b]: b for b in range(256)}
    if set(vocab) != set(pre_tokenizers.ByteLevel.alphabet()):
        raise RuntimeError("byte_tokenizer: the tokenizers library's byte alphabet changed")
    for i, tok in enumerate(SPECIAL_TOKENS):
        vocab[tok] = 256 + i
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<pad>",
                                  bos_token=None, unk_token=None)
    tok.chat_template = CHATML
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# --------------------------------------------------------------------------- chat JSONL


def chat_sample(messages: Sequence[dict], tokenizer) -> Sample:
    """The tokens of a conversation in the tokenizer's chat template, labels on the assistant
    turns only (their content and closing text). With a fast tokenizer the whole conversation is
    rendered once and labelled through its character offsets (`_whole_chat_sample`): linear in
    its length, and it takes templates that render earlier turns differently once later ones
    follow (Qwen3's drops the <think> block of assistant turns before the last user turn). Else,
    or where that cannot place a turn, it is built turn by turn (`_turn_by_turn_sample`), which
    needs no offsets but renders the conversation again for every turn and takes only templates
    that append. Where neither can, a ValueError says why for both."""
    whole_problem = "a slow tokenizer gives no character offsets to label one rendering of the whole conversation by"
    if getattr(tokenizer, "is_fast", False):
        try:
            return _whole_chat_sample(messages, tokenizer)
        except ValueError as e:
            whole_problem = str(e)
    try:
        return _turn_by_turn_sample(messages, tokenizer)
    except _RewritesTurns as e:
        raise ValueError(f"{e}, and {whole_problem}. Labels could not be placed: set tokenizer.chat_template to a "
                         "template that only appends, e.g. comet_ext.data.CHATML for ChatML models such as Qwen's"
                         ) from None


class _RewritesTurns(ValueError):
    """The chat template renders earlier turns differently once later ones follow."""


def _turn_by_turn_sample(messages: Sequence[dict], tokenizer) -> Sample:
    """`chat_sample` built turn by turn: each turn's labels are the tokens its rendering adds to
    the conversation before it (with the generation prompt, for an assistant turn). Needs no
    special support from the template, only that it appends (else _RewritesTurns)."""
    ids: list[int] = []
    labels: list[int] = []
    for i, m in enumerate(messages):
        if i:
            prompt = tokenizer.apply_chat_template(list(messages[:i]), add_generation_prompt=m["role"] == "assistant",
                                                   tokenize=True)
        else:
            prompt = _first_turn_prompt(m, tokenizer) if m["role"] == "assistant" else []
        full = tokenizer.apply_chat_template(list(messages[: i + 1]), tokenize=True)
        prompt, full = _ids(prompt), _ids(full)
        if full[: len(ids)] != ids:
            raise _RewritesTurns(
                f"the chat template does not extend the conversation's tokens turn by turn: with message {i} "
                f"({m['role']}) after them, the messages before it render differently")
        start = len(prompt) if m["role"] == "assistant" else len(ids)
        labels += [IGNORE] * (start - len(ids)) + (full[start:] if m["role"] == "assistant" else [IGNORE] * (len(full) - start))
        ids = full
    return Sample(ids, labels)


def _whole_chat_sample(messages: Sequence[dict], tokenizer) -> Sample:
    """`chat_sample` on one rendering of the whole conversation (a fast tokenizer's): each
    assistant turn labelled over its body as it stands there — from the end of the template's
    assistant header (its generation prompt) through the closing text it puts after a turn's
    content (`_assistant_frame`) — mapped to tokens through the tokenizer's character offsets (a
    token is labelled when its characters overlap a body).

    The messages are found in order: each other message's content moves the search past it (a
    header quoted in a user turn is not a turn). An assistant turn ends at the one closing text,
    past those its content quotes, after which its body ends with its answer (the content after
    any reasoning block, stripped): the body may hold more (a <think> block the template adds)
    or less (one it drops). What the template ends a conversation with after a last answer is
    learned with it, as turn by turn. No such end, or several, is a ValueError saying which turn
    and how it rendered, never a guess."""
    header, closing = _assistant_frame(tokenizer)
    if not header or not closing:
        raise ValueError("its assistant turns have no header or no closing text to find them by")
    text = tokenizer.apply_chat_template(list(messages), tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = _ids(enc)
    if ids != _ids(tokenizer.apply_chat_template(list(messages), tokenize=True)):
        raise ValueError("its rendered text does not tokenize to its tokens")
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        content = m["content"]
        if m["role"] != "assistant":
            shown = content.strip()  # (a template may trim it, as it may an answer)
            at = text.find(shown, cursor)
            if at < 0:
                raise ValueError(f"message {i} ({m['role']}) does not appear as it is in one rendering of the "
                                 "whole conversation")
            cursor = at + len(shown)
            continue
        begin = text.find(header, cursor)
        if begin < 0:
            raise ValueError(f"message {i} (assistant) has no assistant header {header!r} after the messages before it")
        start = begin + len(header)
        answer = content.rsplit("</think>", 1)[-1].strip()
        # The turn ends at the closing text after those its body quotes: its answer's at least, its
        # whole content's at most (where the template keeps the reasoning). Exactly one of these
        # ends must leave a body that ends with the answer (or, with none, a reasoning block).
        ends = []
        for _ in range(content.count(closing) + 1):
            at = text.find(closing, ends[-1] + len(closing) if ends else start)
            if at < 0:
                break
            ends.append(at)
        fits = [e for e in ends[answer.count(closing):] if _ends_with_answer(text[start:e], answer)]
        if len(fits) != 1:
            body = text[start:ends[-1]] if ends else text[start:]
            raise ValueError(f"message {i} (assistant) renders as {_clip(body)}, which " + (
                f"does not end with its answer {_clip(answer)}" if not fits else
                f"could end at any of {len(fits)} closing texts {closing!r}, each after its answer {_clip(answer)}"))
        spans.append((start, fits[0] + len(closing)))
        cursor = fits[0] + len(closing)
    if messages[-1]["role"] == "assistant":  # what the template ends a conversation with after an answer
        spans[-1] = (spans[-1][0], len(text))  # (an end-of-text token) is learned, as turn by turn
    labels, j = [], 0
    for tid, (a, b) in zip(ids, enc["offset_mapping"]):
        while j < len(spans) and spans[j][1] <= a:
            j += 1
        labels.append(tid if j < len(spans) and a < spans[j][1] and b > spans[j][0] else IGNORE)
    return Sample(ids, labels)


def _ends_with_answer(body: str, answer: str) -> bool:
    """Does a rendered assistant body end with its answer? With no answer, it must be blank or
    end with a reasoning block."""
    body = body.rstrip()
    return body.endswith(answer) if answer else (not body or body.endswith("</think>"))


def _clip(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else "..." + text[-n:])


def _assistant_frame(tokenizer) -> tuple[str, str]:
    """(header, closing): the text the template puts before an assistant turn's content when
    asked for a generation prompt, and the text it puts after that content — what follows it both
    where the conversation ends there and where a user turn follows (a template may end a whole
    conversation with more, an end-of-text token)."""
    marker = "COMET_CONTENT_MARKER"
    question = [{"role": "user", "content": "COMET_QUESTION_MARKER"}]
    render = lambda msgs, **kw: tokenizer.apply_chat_template(msgs, tokenize=False, **kw)  # noqa: E731
    plain, asked = render(question), render(question, add_generation_prompt=True)
    answered = render(question + [{"role": "assistant", "content": marker}])
    followed = render(question + [{"role": "assistant", "content": marker}] + question)
    if not asked.startswith(plain) or marker not in answered:
        return "", ""
    closing = answered[answered.index(marker) + len(marker):]
    if marker in followed:  # (a template may hide earlier answers; the search checks each turn)
        closing = _common_token_prefix(tokenizer, closing, followed[followed.index(marker) + len(marker):])
    return asked[len(plain):], closing


def _common_token_prefix(tokenizer, a: str, b: str) -> str:
    """The text of the tokens a and b start with alike: whole tokens, so "<|end|>\n<|endoftext|>"
    and "<|end|>\n<|user|>" share "<|end|>\n", not "<|end|>\n<|"."""
    enc = tokenizer(a, add_special_tokens=False, return_offsets_mapping=True)
    ta, tb = _ids(enc), _ids(tokenizer(b, add_special_tokens=False))
    k = next((k for k, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
    return a[:enc["offset_mapping"][k - 1][1]] if k else ""


def _first_turn_prompt(message: dict, tokenizer) -> list[int]:
    """Tokens the template puts before a conversation's first message, an assistant turn, up to
    where its labels start (a default system block, the turn's header...). For later turns that
    is the conversation so far with a generation prompt, but transformers 5 refuses to render an
    empty one; so this renders the message with a marker for its content and tokenizes the text
    before the marker, up to the end of the assistant header (the generation prompt's text,
    `_assistant_frame`) where it holds one: what a template adds after the header (a <think>
    block) is learned, as in later turns."""
    marker = "COMET_CONTENT_MARKER"  # text no template adds, and with no whitespace a template would strip
    text = tokenizer.apply_chat_template([{**message, "content": marker}], tokenize=False)
    if marker not in text:
        raise ValueError("the chat template does not render a message's content as it is")
    prefix = text[: text.index(marker)]
    header = _assistant_frame(tokenizer)[0]
    if header and header in prefix:
        prefix = prefix[: prefix.rindex(header) + len(header)]
    return _ids(tokenizer(prefix, add_special_tokens=False)["input_ids"])


def _ids(x) -> list[int]:
    if isinstance(x, dict) or hasattr(x, "keys"):
        x = x["input_ids"]
    return list(x)


def read_chat_jsonl(path: str | os.PathLike, tokenizer, max_tokens: Optional[int] = None,
                    on_error: str = "skip") -> tuple[list[Sample], list[str]]:
    """Reads the reference format: one JSON object per line (UTF-8, a leading BOM
    allowed) with `uniq_id` and `messages` (ChatML roles). Returns the samples and a
    list of problems, each naming its line (a line that is not UTF-8 is one).
    on_error="skip" drops bad lines (logged), "raise" stops at the first with a
    ValueError."""
    if on_error not in ("skip", "raise"):
        raise ValueError(f"read_chat_jsonl: on_error must be 'skip' or 'raise', got {on_error!r}")
    samples, problems = [], []
    # read as bytes and decode line by line: a line that is not UTF-8 is one bad line, not a failed file
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1:
                line = line.removeprefix(codecs.BOM_UTF8)  # some editors start a UTF-8 file with one
            if not line.strip():
                continue
            try:
                sample = _chat_line(line, tokenizer, max_tokens)
            except ValueError as e:
                msg = f"{os.fspath(path)}:{lineno}: {e}"
                if on_error == "raise":
                    raise ValueError(msg) from None
                log.warning("skipping %s", msg)
                problems.append(msg)
                continue
            samples.append(sample)
    return samples, problems


def _chat_line(raw: bytes, tokenizer, max_tokens: Optional[int]) -> Sample:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}: {e.reason})") from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON ({e.msg})") from None
    if not isinstance(obj, dict) or "messages" not in obj:
        raise ValueError("missing field 'messages'")
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("empty conversation")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError("every message needs a string 'role' and 'content'")
        try:  # JSON may escape a lone surrogate ("\\ud800"): valid JSON, but no text a tokenizer takes
            m["role"].encode("utf-8"), m["content"].encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"a message holds a lone surrogate ({e.object[e.start]!a}): not Unicode text") from None
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn: nothing to learn")
    try:
        from jinja2 import TemplateError
    except ImportError:  # (no template can run without jinja2)
        TemplateError = ()  # noqa: N806
    try:
        sample = chat_sample(messages, tokenizer)
    except TemplateError as e:  # the template refuses it (Mistral's and Llama 2's: roles that do not alternate)
        raise ValueError(f"the chat template refused it: {e}") from None
    if max_tokens is not None and len(sample) > max_tokens:
        raise ValueError(f"{len(sample)} tokens, longer than the limit of {max_tokens}")
    return sample


# --------------------------------------------------------------------------- other inputs


def text_sample(text: str, tokenizer) -> Sample:
    """Plain text: loss on every token."""
    ids = _ids(tokenizer(text, add_special_tokens=False)["input_ids"])
    return Sample(ids, list(ids))


def token_sample(ids: Sequence[int], labels: Optional[Sequence[int]] = None) -> Sample:
    """Pre-tokenised input; labels default to the ids."""
    ids = [int(i) for i in ids]
    labels = list(ids) if labels is None else [int(x) for x in labels]
    if len(labels) != len(ids):
        raise ValueError(f"token_sample: {len(ids)} ids but {len(labels)} labels")
    return Sample(ids, labels)


def pack(samples: Iterable[Sample], seq_len: int, separator: Optional[int] = None) -> list[Sample]:
    """Greedily packs samples into sequences of at most seq_len tokens (a separator
    token, without loss, between two samples). A sample longer than seq_len is an error."""
    packed, ids, labels = [], [], []
    for s in samples:
        if len(s) > seq_len:
            raise ValueError(f"pack: a sample of {len(s)} tokens does not fit seq_len={seq_len}")
        extra = 1 if (ids and separator is not None) else 0
        if ids and len(ids) + extra + len(s) > seq_len:
            packed.append(Sample(ids, labels))
            ids, labels, extra = [], [], 0
        if extra:
            ids.append(separator)
            labels.append(IGNORE)
        ids += s.input_ids
        labels += s.labels
    if ids:
        packed.append(Sample(ids, labels))
    return packed


def collate(samples: Sequence[Sample], pad_id: int, length: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Right-pads a batch to `length` (default: its longest sample) -> input_ids,
    labels (-100 on padding) and attention_mask, all (B, T)."""
    T = length or max(len(s) for s in samples)
    if any(len(s) > T for s in samples):
        raise ValueError(f"collate: a sample is longer than length={T}")
    ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), T), dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s)
        ids[b, :n] = torch.tensor(s.input_ids, dtype=torch.long)
        labels[b, :n] = torch.tensor(s.labels, dtype=torch.long)
        mask[b, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def synthetic_recall(n: int, length: int, vocab: int, key_len: int = 4, seed: int = 0) -> list[Sample]:
    """The built-in long-document task: a key of `key_len` tokens near the start,
    filler that repeats short patterns (learnable, so the LM loss falls quickly),
    and at the end a marker followed by the key again. Loss on every token; only
    the memory can predict the final key. Token 0 is the marker, 1 the separator."""
    import numpy as np

    shortest = 2 * key_len + 3  # separator, key, separator, marker, key: no filler
    if length < shortest:
        raise ValueError(f"synthetic_recall: length must be >= {shortest} (2 * key_len + 3, for key_len={key_len}), "
                         f"got {length}")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        key = rng.integers(2, vocab, key_len).tolist()
        period = int(rng.integers(2, 6))
        pattern = rng.integers(2, vocab, period).tolist()
        filler_len = length - 2 * key_len - 3
        filler = [pattern[i % period] for i in range(filler_len)]
        ids = [1] + key + [1] + filler + [0] + key
        out.append(Sample(ids, list(ids)))
    return out
