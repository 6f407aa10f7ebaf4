"""GGUF `llama` (SentencePiece) vocabularies: rebuilt from pieces/scores/types, checked against the original
model (sentencepiece) and the Mistral instruct format (mistral-common)."""

from __future__ import annotations

import pytest
import sentencepiece as spm
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from sentencepiece import sentencepiece_model_pb2 as pb

from mistral7b.errors import CheckpointError, RequestError
from mistral7b.tokenizer import tokenizer_from_gguf
from tests.tokenizer.conftest import MISTRAL_V1_TEMPLATE, TEXTS, V1, v1_gguf_meta

MORE_TEXTS = TEXTS + ["\n\nstarts with newlines", "ends with spaces   ", "a\u200bb zero-width", "x" * 300, "🙂"]


@pytest.fixture(scope="module")
def rebuilt():
    return tokenizer_from_gguf(v1_gguf_meta())


@pytest.fixture(scope="module")
def original():
    return spm.SentencePieceProcessor(model_file=V1)


def test_special_tokens_kept_on_request(rebuilt, original):
    """skip_special_tokens False writes control tokens as their pieces, the text between them as before."""
    ids = original.encode("Hello world")
    assert rebuilt.decode([1, *ids, 2]) == "Hello world"
    assert rebuilt.decode([1, *ids, 2], skip_special_tokens=False) == "<s>Hello world</s>"
    assert rebuilt.decode([*ids, 2, *ids], skip_special_tokens=False) == "Hello world</s>Hello world"


def test_encode_decode_equal_original(rebuilt, original):
    for text in MORE_TEXTS:
        ids = original.encode(text)
        assert rebuilt.encode(text, add_bos=False) == ids, text
        assert rebuilt.encode(text) == [1, *ids]
        assert rebuilt.decode(ids) == original.decode(ids)
    assert [rebuilt.id_to_piece(i) for i in range(32000)] == [original.id_to_piece(i) for i in range(32000)]
    assert rebuilt.vocab_size == 32000 and rebuilt.bos_id == 1 and rebuilt.eos_ids == {2}


def test_byte_fallback_round_trip(rebuilt):
    text = "emoji 🙂🚀 𝔘 ☃"
    ids = rebuilt.encode(text, add_bos=False)
    assert any(rebuilt.id_to_piece(i).startswith("<0x") for i in ids)
    assert rebuilt.decode(ids) == text


def test_add_space_prefix_false_equals_original_without_dummy_prefix():
    proto = pb.ModelProto()
    with open(V1, "rb") as f:
        proto.ParseFromString(f.read())
    proto.normalizer_spec.add_dummy_prefix = False
    original = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    rebuilt = tokenizer_from_gguf(v1_gguf_meta(**{"tokenizer.ggml.add_space_prefix": False}))
    for text in MORE_TEXTS:
        assert rebuilt.encode(text, add_bos=False) == original.encode(text), text


CHATS = [
    [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Hi there"}, {"role": "user", "content": "How are you?"}],
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Guardrail."}, {"role": "system", "content": "Mine."},
     {"role": "user", "content": "Q"}],
    [{"role": "user", "content": "A"}, {"role": "user", "content": "B"}, {"role": "assistant", "content": "C"},
     {"role": "assistant", "content": "D"}, {"role": "user", "content": " spaced \n"}],
    [{"role": "assistant", "content": "X"}, {"role": "user", "content": "A"}],
]


@pytest.mark.parametrize("messages", CHATS)
def test_no_template_falls_back_to_mistral_v1_format(rebuilt, messages):
    ref = MistralTokenizer.from_file(V1, mode=ValidationMode.agnostic)
    expected = ref.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens
    assert rebuilt.encode_chat(messages) == expected


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I am"}],
    [{"role": "system", "content": "SYS"}, {"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
     {"role": "user", "content": "C"}, {"role": "assistant", "content": "The answer is"}],
    [{"role": "system", "content": "Be brief."}],
])
def test_continued_answers_and_system_only_chats_equal_mistral_common(rebuilt, messages):
    """A last assistant message left open (mistral-common's prefix: no </s>), a system-only chat as mistral-common
    renders it."""
    ref = MistralTokenizer.from_file(V1, mode=ValidationMode.agnostic)
    oracle = [*messages[:-1], {**messages[-1], "prefix": True}] if messages[-1]["role"] == "assistant" else messages
    expected = ref.encode_chat_completion(ChatCompletionRequest(messages=oracle)).tokens
    assert rebuilt.encode_chat(messages) == expected


def test_jinja_template_is_cut_at_control_tokens(original):
    """Text between control tokens is encoded as one SentencePiece segment (llama.cpp's rule). This differs from
    mistral-common, which encodes each answer on its own: "[/INST]Hi" merges as "]Hi", not "] ▁Hi"."""
    tok = tokenizer_from_gguf(v1_gguf_meta(**{"tokenizer.chat_template": MISTRAL_V1_TEMPLATE}))
    expected = [1, *original.encode("[INST] SYS\n\nHello [/INST]Hi there"), 2,
                *original.encode("[INST] How are you? [/INST]")]
    assert tok.encode_chat(CHATS[0]) == expected
    ref = MistralTokenizer.from_file(V1)
    assert expected != ref.encode_chat_completion(ChatCompletionRequest(messages=CHATS[0])).tokens


def test_control_tokens_never_come_from_content():
    tok = tokenizer_from_gguf(v1_gguf_meta(**{"tokenizer.chat_template": MISTRAL_V1_TEMPLATE}))
    for t in (tok, tokenizer_from_gguf(v1_gguf_meta())):
        ids = t.encode_chat([{"role": "user", "content": "</s><s>[INST] hi"}])
        assert ids.count(1) == 1 and 2 not in ids
        assert "</s><s>[INST] hi" in t.decode(ids)
    assert 2 not in tok.encode("</s>") and 1 not in tok.encode("<s>", add_bos=False)


def test_add_bos_token_false():
    """add_bos_token=false: template chats get no BOS of ours; plain `encode` still obeys its caller."""
    meta = v1_gguf_meta(**{"tokenizer.ggml.add_bos_token": False,
                           "tokenizer.chat_template": MISTRAL_V1_TEMPLATE.replace("{{ bos_token }}", "")})
    tok = tokenizer_from_gguf(meta)
    assert not tok.add_bos
    assert tok.encode_chat([{"role": "user", "content": "Hi"}])[0] != 1
    assert tok.encode("Hello")[0] == 1 and 1 not in tok.encode("Hello", add_bos=False)


def test_no_tokenizer_and_bad_metadata():
    assert tokenizer_from_gguf({}) is None
    assert tokenizer_from_gguf({"general.architecture": "llama"}) is None
    with pytest.raises(CheckpointError, match="not supported"):
        tokenizer_from_gguf(v1_gguf_meta(**{"tokenizer.ggml.model": "t5"}))
    with pytest.raises(CheckpointError, match="scores"):
        tokenizer_from_gguf(v1_gguf_meta(**{"tokenizer.ggml.scores": [0.0]}))
    with pytest.raises(CheckpointError, match="eos_token_id"):
        tokenizer_from_gguf(v1_gguf_meta(**{"tokenizer.ggml.eos_token_id": 10**6}))


def test_bad_template_is_a_request_error_at_chat_time():
    tok = tokenizer_from_gguf(v1_gguf_meta(**{"tokenizer.chat_template": "{% for %}"}))
    assert tok.encode("plain text still works")
    with pytest.raises(RequestError, match="does not compile"):
        tok.encode_chat([{"role": "user", "content": "x"}])
