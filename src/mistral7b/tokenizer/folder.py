"""Which tokenizer a checkpoint folder carries, by the files in it.

Mistral's own files come first (they carry the reference instruct format), then a Hugging Face tokenizer.json,
then a bare SentencePiece tokenizer.model (read as Mistral v1).
"""

from __future__ import annotations

import os

from mistral7b.tokenizer.base import Tokenizer


def _mistral_file(folder: str) -> str | None:
    names = sorted(os.listdir(folder))
    for prefix, suffix in (("tekken", ".json"), ("tokenizer.model.v", "")):
        found = [n for n in names if n.startswith(prefix) and n.endswith(suffix)]
        if found:
            return os.path.join(folder, found[-1])  # the newest version when several are present
    return None


def load_tokenizer(folder: str) -> Tokenizer | None:
    """The folder's tokenizer, or None when it has none. A file that is there but unreadable: CheckpointError."""
    if not os.path.isdir(folder):
        return None
    path = _mistral_file(folder)
    if path is None and os.path.isfile(os.path.join(folder, "tokenizer.json")):
        from mistral7b.tokenizer.hf import load_hf_folder

        return load_hf_folder(folder)
    if path is None and os.path.isfile(os.path.join(folder, "tokenizer.model")):
        path = os.path.join(folder, "tokenizer.model")
    if path is None:
        return None
    from mistral7b.tokenizer.mistral import MistralCommonTokenizer

    return MistralCommonTokenizer(path)
