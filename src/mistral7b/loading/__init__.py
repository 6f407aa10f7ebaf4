"""Checkpoint readers and writers: native Mistral (params.json + safetensors), Hugging Face, GGUF.

`open_checkpoint(path)` validates a checkpoint against its config and streams its tensors under the
model's own parameter names; the writers produce each format from such a state dict.
"""

from typing import Any

from mistral7b.loading.checkpoint import Checkpoint, open_checkpoint

_WRITERS = ("GGUF_QTYPES", "save_gguf", "save_hf", "save_native")


def __getattr__(name: str) -> Any:
    """The writers import the `gguf` package (slow to import): load them only when asked for."""
    if name in _WRITERS:
        from mistral7b.loading import writers

        return getattr(writers, name)
    raise AttributeError(f"module 'mistral7b.loading' has no attribute {name!r}")

__all__ = ["Checkpoint", "GGUF_QTYPES", "open_checkpoint", "save_gguf", "save_hf", "save_native"]
