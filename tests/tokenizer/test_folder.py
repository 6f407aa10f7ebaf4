"""Which tokenizer `load_tokenizer` picks for a checkpoint folder, and clear errors for corrupt files."""

from __future__ import annotations

import shutil

import pytest

from mistral7b.errors import CheckpointError
from mistral7b.tokenizer import load_tokenizer
from mistral7b.tokenizer.hf import TokenizersTokenizer
from mistral7b.tokenizer.mistral import MistralCommonTokenizer
from tests.tokenizer.conftest import TEKKEN, V1, V3

HELLO = [{"role": "user", "content": "Hello"}]


def minimal_tokenizer_json() -> str:
    import tokenizers

    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    return tok.to_str()


def test_mistral_files_come_first(tmp_path):
    (tmp_path / "tokenizer.json").write_text(minimal_tokenizer_json())
    shutil.copy(V3, tmp_path / "tokenizer.model.v3")
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, MistralCommonTokenizer) and tok.path.endswith("tokenizer.model.v3")
    shutil.copy(TEKKEN, tmp_path / "tekken.json")
    assert load_tokenizer(str(tmp_path)).path.endswith("tekken.json")


def test_tokenizer_json_before_bare_sentencepiece(tmp_path):
    shutil.copy(V1, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.json").write_text(minimal_tokenizer_json())
    assert isinstance(load_tokenizer(str(tmp_path)), TokenizersTokenizer)


def test_bare_tokenizer_model_is_v1(tmp_path):
    shutil.copy(V1, tmp_path / "tokenizer.model")
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, MistralCommonTokenizer)
    assert tok.encode_chat(HELLO) == [1, 733, 16289, 28793, 22557, 733, 28748, 16289, 28793]


def test_no_tokenizer(tmp_path):
    (tmp_path / "params.json").write_text("{}")
    assert load_tokenizer(str(tmp_path)) is None
    assert load_tokenizer(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer.model", "tokenizer.model.v3", "tekken.json"])
def test_corrupt_file_names_it(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x00garbage{")
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_tokenizer(str(tmp_path))


def test_corrupt_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer.json").write_text(minimal_tokenizer_json())
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        load_tokenizer(str(tmp_path))
