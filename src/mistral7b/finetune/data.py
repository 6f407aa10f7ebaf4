"""Training data: JSONL records -> token ids with a loss mask -> packed rows.

Two record shapes, one per line: `{"messages": [...]}` (an OpenAI-shaped chat) and `{"text": "..."}`.

Chats use the model's own chat format and only the assistant tokens carry loss:
- Mistral tokenizers (mistral-common): the request is validated and normalized by mistral-common, then each
  message is encoded by its instruct tokenizer one at a time (as mistral-finetune does), so we know exactly which
  tokens are an assistant's answer (its text and the EOS closing it). The concatenation is checked against
  mistral-common's own `encode_instruct`.
- Chat templates: the assistant span of turn k is what rendering messages[:k+1] adds to rendering messages[:k]
  with the generation prompt (the template's own "assistant:" header stays out of the loss).
Plain text carries loss on every token (BOS as the tokenizer says, EOS appended); a text longer than a row is
cut into row-sized pieces, never dropped.

Packing: each example becomes (inputs = ids[:-1], targets = ids[1:], mask of targets). Examples are packed
greedily into rows of `seq_len`; positions restart at 0 for every example and segment ids keep attention inside
it (the sliding window then applies exactly as at inference). Unused row tail: position -1, no loss.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mistral7b.errors import Mistral7BError, RequestError
from mistral7b.tokenizer.base import Tokenizer, check_messages

IGNORE = -100


class DataError(Mistral7BError):
    """A training file or record that cannot be used; the message names the file and line."""


@dataclass
class Example:
    ids: list[int]
    mask: list[bool]  # mask[i]: token ids[i] is a training target
    line: int


def eos_id(tok: Tokenizer) -> int:
    """The one id that closes a document (the tokenizer's EOS token)."""
    raw = getattr(tok, "_raw", None)
    if raw is not None:  # mistral-common
        return int(raw.eos_id)
    name = getattr(tok, "eos_token", None)
    inner = getattr(tok, "_tok", None)
    if name and inner is not None and inner.token_to_id(name) is not None:
        return int(inner.token_to_id(name))
    return min(tok.eos_ids)


def _mistral_chat(tok: Tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    mt = tok._mt  # type: ignore[attr-defined]
    request = mt._chat_completion_request_validator.validate_request(ChatCompletionRequest(messages=messages))
    instruct = mt._instruct_request_normalizer.from_chat_completion_request(request)
    it = mt.instruct_tokenizer
    it.validate_messages(instruct.messages)
    first_user, last_user = it.find_first_last_user(instruct)
    ids: list[int] = list(it.start())
    mask = [False] * len(ids)
    for i, msg in enumerate(instruct.messages):
        if isinstance(msg, UserMessage):
            new, _, _ = it.encode_user_message(msg, instruct.available_tools, i == last_user, i == first_user,
                                               system_prompt=instruct.system_prompt, force_img_first=True,
                                               settings=instruct.settings)
            target = False
        elif isinstance(msg, AssistantMessage):
            new, target = it.encode_assistant_message(msg, i < last_user), True
        else:
            raise RequestError(f"{type(msg).__name__} messages are not supported for fine-tuning")
        ids += new
        mask += [target] * len(new)
    if ids != list(it.encode_instruct(instruct).tokens):
        raise RequestError("per-message encoding differs from mistral-common's encode_instruct")
    return ids, mask


def _template_chat(tok: Tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    ids = tok.encode_chat(messages, add_generation_prompt=False)
    mask = [False] * len(ids)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        upto = tok.encode_chat(messages[: k + 1], add_generation_prompt=False)
        prompt = tok.encode_chat(messages[:k], add_generation_prompt=True) if k else []
        if ids[: len(upto)] != upto or upto[: len(prompt)] != prompt:
            raise RequestError("the chat template does not render conversation prefixes as prefixes")
        for i in range(len(prompt), len(upto)):
            mask[i] = True
    return ids, mask


def encode_record(tok: Tokenizer, record: object, seq_len: int, line: int) -> list[Example]:
    """The example(s) of one parsed JSONL record (RequestError for a bad one)."""
    if not isinstance(record, dict) or ("messages" in record) == ("text" in record):
        raise RequestError('expected an object with either "messages" (a chat) or "text"')
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str) or not text:
            raise RequestError('"text" must be a non-empty string')
        ids = tok.encode(text, add_bos=tok.add_bos) + [eos_id(tok)]
        # Pieces of seq_len+1 tokens overlapping by one, so every token is a target exactly once.
        return [Example(ids[i : i + seq_len + 1], [True] * len(ids[i : i + seq_len + 1]), line)
                for i in range(0, max(len(ids) - 1, 1), seq_len)]
    messages = check_messages(record["messages"], add_generation_prompt=False)
    if messages[-1]["role"] != "assistant":
        raise RequestError("the last message must be from the assistant (it is what the model learns)")
    ids, mask = (_mistral_chat if hasattr(tok, "_mt") else _template_chat)(tok, messages)
    if len(ids) - 1 > seq_len:
        raise RequestError(f"the chat has {len(ids)} tokens, more than --seq-len {seq_len} + 1")
    return [Example(ids, mask, line)]


def read_jsonl(path: str, tok: Tokenizer, seq_len: int, skip_bad: bool = False) -> tuple[list[Example], int]:
    """All examples of a JSONL file and the number of records skipped (only with skip_bad; else DataError)."""
    examples: list[Example] = []
    skipped = 0
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror or e})") from None
    with f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            found = encode_record(tok, record, seq_len, n)
            if not any(any(ex.mask[1:]) for ex in found):
                raise RequestError("no token carries loss")
        except (json.JSONDecodeError, RequestError, Mistral7BError) as e:
            if not skip_bad:
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise DataError(f"{path}: line {n}: {msg}") from None
            skipped += 1
            continue
        except Exception as e:  # mistral-common's validation errors have many types
            if not skip_bad:
                detail = str(e).splitlines()[0] if str(e) else ""
                raise DataError(f"{path}: line {n}: {type(e).__name__}: {detail}") from None
            skipped += 1
            continue
        examples.extend(found)
    if not examples:
        raise DataError(f"{path}: no usable records")
    return examples, skipped


@dataclass
class Row:
    """One packed training row of `seq_len` tokens."""

    tokens: list[int]
    targets: list[int]  # IGNORE where there is no loss
    positions: list[int]  # -1 = padding
    segments: list[int]


def pack(examples: Sequence[Example], seq_len: int) -> list[Row]:
    """Pack examples, in the given order, greedily into rows (an example never spans two rows)."""
    rows: list[Row] = []
    current = Row([], [], [], [])
    for seg, ex in enumerate(examples):
        inputs = ex.ids[:-1]
        targets = [t if m else IGNORE for t, m in zip(ex.ids[1:], ex.mask[1:])]
        if len(current.tokens) + len(inputs) > seq_len:
            rows.append(current)
            current = Row([], [], [], [])
        current.tokens += inputs
        current.targets += targets
        current.positions += range(len(inputs))
        current.segments += [seg] * len(inputs)
    if current.tokens:
        rows.append(current)
    for r in rows:
        pad = seq_len - len(r.tokens)
        r.tokens += [0] * pad
        r.targets += [IGNORE] * pad
        r.positions += [-1] * pad
        r.segments += [-1] * pad
    return rows


def epoch_rows(examples: Sequence[Example], seq_len: int, seed: int, epoch: int) -> list[Row]:
    """The rows of one epoch: examples shuffled by (seed, epoch) alone, so a resumed run sees the same order."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(examples), generator=g).tolist()
    return pack([examples[i] for i in order], seq_len)


def collate(rows: Sequence[Row]) -> dict[str, torch.Tensor]:
    """A micro-batch of rows as tensors [rows, length], cut to what holds tokens: rows with none are left out
    (one is kept when all are empty, so that every rank still runs its backward) and so are the padding
    columns after the longest row's last token. Padding computes nothing the loss sees: 20 short chats fill
    one row of ~500 tokens, which the default micro-batch (4 rows of 1,024) padded to 4,096."""
    lengths = [max((i + 1 for i, p in enumerate(r.positions) if p >= 0), default=0) for r in rows]
    kept = [r for r, n in zip(rows, lengths) if n] or list(rows[:1])
    width = max(max(lengths, default=0), 1)
    return {k: torch.tensor([getattr(r, k)[:width] for r in kept], dtype=torch.long)
            for k in ("tokens", "targets", "positions", "segments")}
