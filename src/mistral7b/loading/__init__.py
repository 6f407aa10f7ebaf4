"""Checkpoint readers and writers: native Mistral (params.json + safetensors), Hugging Face, GGUF.

`open_checkpoint(path)` validates a checkpoint against its config and streams its tensors under the
model's own parameter names; the writers produce each format from such a state dict.
"""

from mistral7b.loading.checkpoint import Checkpoint, open_checkpoint
from mistral7b.loading.writers import GGUF_QTYPES, save_gguf, save_hf, save_native

__all__ = ["Checkpoint", "GGUF_QTYPES", "open_checkpoint", "save_gguf", "save_hf", "save_native"]
