"""Write a (fine-tuned or merged) model as a checkpoint our engine and others load, with its tokenizer.

The format follows the base checkpoint unless asked otherwise: a native folder stays native, a Hugging Face
folder stays Hugging Face (tokenizer files copied beside the weights), a GGUF file becomes a float32 GGUF
carrying the base file's tokenizer metadata.
"""

from __future__ import annotations

import os
import shutil

from mistral7b.loading import Checkpoint, save_gguf, save_hf, save_native
from mistral7b.model.transformer import Transformer

FORMATS = ("native", "hf", "gguf")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "generation_config.json", "chat_template.jinja")


def copy_tokenizer_files(src: str, dst: str) -> None:
    if not os.path.isdir(src):
        return
    for name in os.listdir(src):
        if name in _TOKENIZER_FILES or name.startswith("tokenizer.model.v") or name.startswith("tekken"):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


def save_model(model: Transformer, base: Checkpoint, out: str, fmt: str | None = None) -> str:
    """Save `model` under folder `out` (GGUF: out/model.gguf). Returns the path to load."""
    fmt = fmt or base.format
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    state = {k: v.detach().float() if fmt == "gguf" else v.detach() for k, v in model.state_dict().items()}
    os.makedirs(out, exist_ok=True)
    if fmt == "gguf":
        path = os.path.join(out, "model.gguf")
        save_gguf(path, model.args, state, "F32", tokenizer_metadata=base.metadata)
        return path
    (save_native if fmt == "native" else save_hf)(out, model.args, state)
    if base.format != "gguf":
        copy_tokenizer_files(base.path, out)
    return out
