"""The tokenizer stored in a GGUF file's metadata (`tokenizer.ggml.*`), rebuilt without llama.cpp.

- `llama` vocabularies are SentencePiece: pieces, scores and token types become a real SentencePiece BPE
  model (byte fallback on, Mistral/Llama normalizer settings) loaded from memory.
- `gpt2` vocabularies are byte-level BPE: tokens and merges become a `tokenizers` BPE model; the
  `tokenizer.ggml.pre` key picks how text is split before BPE (digits apart for SmolLM, the GPT-2 regex).
GGUF token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
"""

from __future__ import annotations

import warnings
from typing import Any

from mistral7b.errors import CheckpointError
from mistral7b.tokenizer.base import Tokenizer
from mistral7b.tokenizer.chat_template import ChatTemplate
from mistral7b.tokenizer.hf import END_OF_TURN_TOKENS, TokenizersTokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
PRE_TOKENIZERS = ("default", "gpt2", "smollm")
_ORIGIN = "GGUF tokenizer"


def tokenizer_from_gguf(meta: dict[str, Any]) -> Tokenizer | None:
    """The file's tokenizer, or None when its metadata has none."""
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not model or not tokens or model == "none":
        return None
    n = len(tokens)
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * n)
    if len(types) != n:
        raise CheckpointError(f"{_ORIGIN}: {len(types)} token types for {n} tokens")
    source = meta.get("tokenizer.chat_template")
    tool_use = meta.get("tokenizer.chat_template.tool_use")  # llama.cpp's name for a named template
    tool_use = tool_use if isinstance(tool_use, str) else None
    template = (ChatTemplate(source, f"{_ORIGIN} chat template", tool_use=tool_use)
                if isinstance(source, str) and source else None)
    if model == "llama":
        return _sentencepiece(meta, tokens, types, template)
    if model == "gpt2":
        return _byte_level_bpe(meta, tokens, types, template)
    raise CheckpointError(f"{_ORIGIN}: tokenizer.ggml.model {model!r} is not supported (llama and gpt2 are)")


def _id(meta: dict[str, Any], key: str, n: int) -> int | None:
    value = meta.get(f"tokenizer.ggml.{key}")
    if value is None:
        return None
    if not isinstance(value, int) or not 0 <= value < n:
        raise CheckpointError(f"{_ORIGIN}: tokenizer.ggml.{key} = {value!r} is not a token id below {n}")
    return value


def _end_ids(meta: dict[str, Any], tokens: list[str], types: list[int]) -> set[int]:
    """eos, eot and eom ids, plus control tokens that end a turn in common chat formats."""
    keys = ("eos_token_id", "eot_token_id", "eom_token_id")
    ids = {i for key in keys if (i := _id(meta, key, len(tokens))) is not None}
    ids |= {i for i, (t, k) in enumerate(zip(tokens, types)) if k == CONTROL and t in END_OF_TURN_TOKENS}
    return ids


def _sentencepiece(meta: dict[str, Any], tokens: list[str], types: list[int],
                   template: ChatTemplate | None) -> Tokenizer:
    import sentencepiece as spm

    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:  # the generated module needs protobuf
        raise CheckpointError(f"{_ORIGIN}: rebuilding a SentencePiece model needs the protobuf package ({e})") from None

    from mistral7b.tokenizer.spm import SentencePieceTokenizer

    n = len(tokens)
    scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * n)
    if len(scores) != n:
        raise CheckpointError(f"{_ORIGIN}: {len(scores)} scores for {n} tokens")
    piece_type = {NORMAL: pb.ModelProto.SentencePiece.NORMAL, UNKNOWN: pb.ModelProto.SentencePiece.UNKNOWN,
                  CONTROL: pb.ModelProto.SentencePiece.CONTROL, USER_DEFINED: pb.ModelProto.SentencePiece.USER_DEFINED,
                  UNUSED: pb.ModelProto.SentencePiece.UNUSED, BYTE: pb.ModelProto.SentencePiece.BYTE}
    proto = pb.ModelProto()
    for token, score, kind in zip(tokens, scores, types):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = token, float(score), piece_type.get(kind, piece_type[NORMAL])
    bos, eos = _id(meta, "bos_token_id", n), _id(meta, "eos_token_id", n)
    unk = _id(meta, "unknown_token_id", n)
    if unk is None:
        unk = next((i for i, k in enumerate(types) if k == UNKNOWN), 0)
    trainer = proto.trainer_spec
    trainer.model_type = pb.TrainerSpec.BPE
    trainer.vocab_size = n
    trainer.byte_fallback = True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = unk, -1 if bos is None else bos, \
        -1 if eos is None else eos, -1
    trainer.split_digits = True
    trainer.allow_whitespace_only_pieces = True
    trainer.unk_surface = " \u2047 "
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto.SerializeToString())
    except (RuntimeError, OSError) as e:
        raise CheckpointError(f"{_ORIGIN}: the SentencePiece vocabulary does not load ({e})") from None
    specials = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k == CONTROL and t}
    return SentencePieceTokenizer(
        sp, bos_id=bos, eos_id=eos, eos_ids=_end_ids(meta, tokens, types),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
        specials=specials, chat_template=template, origin=_ORIGIN,
    )


def _pre_tokenizer(name: str | None, add_prefix_space: bool):
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
    if name in (None, "", "default", "gpt2"):
        return byte_level
    if name == "smollm":  # SmolLM2's tokenizer.json: each digit on its own, then the GPT-2 regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    warnings.warn(f"{_ORIGIN}: unknown pre-tokenizer tokenizer.ggml.pre={name!r}; using the GPT-2 byte-level "
                  f"split (known: {', '.join(PRE_TOKENIZERS)}); tokens may differ from llama.cpp's", stacklevel=3)
    return byte_level


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str], types: list[int],
                    template: ChatTemplate | None) -> Tokenizer:
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as HFTokenizer

    merges = []
    for m in meta.get("tokenizer.ggml.merges") or []:
        left, sep, right = m.partition(" ")
        if not sep:
            raise CheckpointError(f"{_ORIGIN}: merge {m!r} is not two tokens separated by a space")
        merges.append((left, right))
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    n = len(tokens)
    try:
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    except Exception as e:  # a merge naming a token that is not in the vocabulary
        raise CheckpointError(f"{_ORIGIN}: the BPE vocabulary and merges do not fit ({e})") from None
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"),
                                       bool(meta.get("tokenizer.ggml.add_space_prefix", False)))
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == CONTROL and t])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == USER_DEFINED and t])
    bos, eos = _id(meta, "bos_token_id", n), _id(meta, "eos_token_id", n)
    return TokenizersTokenizer(
        tok, bos_token=tokens[bos] if bos is not None else None, eos_tokens=[tokens[eos]] if eos is not None else [],
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)), chat_template=template, origin=_ORIGIN,
        extra_eos_ids=_end_ids(meta, tokens, types),
    )
