"""Text <-> token ids and chat formats, behind one interface for every checkpoint kind.

`load_tokenizer(folder)` reads Mistral files (mistral-common) or a Hugging Face tokenizer.json;
`tokenizer_from_gguf(metadata)` rebuilds the tokenizer a GGUF file stores in its metadata.
"""

from mistral7b.tokenizer.base import Tokenizer
from mistral7b.tokenizer.folder import load_tokenizer
from mistral7b.tokenizer.gguf import tokenizer_from_gguf

__all__ = ["Tokenizer", "load_tokenizer", "tokenizer_from_gguf"]
