"""The sampling a model is meant to be used with, for requests that do not choose their own.

A checkpoint may say: Hugging Face's `generation_config.json` beside the weights (temperature, top_k, top_p,
min_p, repetition_penalty), or a GGUF file's `general.sampling.*` keys (gguf-py's Keys.General.SAMPLING_*).
Where it says anything, its values are the defaults and what it leaves out stays neutral (as vLLM's
`--generation-config auto` does). Where it says nothing, llama.cpp's defaults apply (temperature 0.8, top-k 40,
top-p 0.95, min-p 0.05): what local-chat users get elsewhere, and what a small model needs. Sampling at plain
temperature 0.7, the embedded 135M model's first chat answer was 85 s of repetitive French; with these
filters the tail of the distribution is cut where such babble starts.

`LLM.chat`, `LLM.generate` without params, `mistral7b chat` and the server's requests (fields they leave out)
use them; `--generation-config none` (server) asks for OpenAI's neutral defaults instead (temperature 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from mistral7b.config import read_json
from mistral7b.errors import CheckpointError

SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    source: str = "neutral"

    def fields(self) -> dict[str, Any]:
        """The sampling fields, for SamplingParams(**...)."""
        return {k: getattr(self, k) for k in SAMPLING_FIELDS}  # per request: no deep copy (asdict)

    def describe(self) -> str:
        return (f"temperature {self.temperature:g}, top-k {self.top_k}, top-p {self.top_p:g}, "
                f"min-p {self.min_p:g}, repetition penalty {self.repetition_penalty:g} ({self.source})")


NEUTRAL = SamplingDefaults()
LLAMA_CPP = SamplingDefaults(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, source="llama.cpp's defaults")
# GGUF keys (gguf-py's Keys.General.SAMPLING_*) for each field
GGUF_KEYS = {"temperature": "general.sampling.temp", "top_k": "general.sampling.top_k",
             "top_p": "general.sampling.top_p", "min_p": "general.sampling.min_p",
             "repetition_penalty": "general.sampling.penalty_repeat"}


def _checked(found: dict[str, Any], where: str) -> SamplingDefaults:
    """A SamplingDefaults from the fields a checkpoint gives, each one in range (else one clear error)."""
    from mistral7b.engine.sampling_params import SamplingParams
    from mistral7b.errors import RequestError

    values: dict[str, Any] = {}
    for name, value in found.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CheckpointError(f"{where}: {name} must be a number, got {value!r}")
        values[name] = int(value) if name == "top_k" else float(value)
    if values.get("top_k", 0) < 0:  # some configs write -1 for "no top-k"
        values["top_k"] = 0
    try:
        SamplingParams(**values)
    except RequestError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return SamplingDefaults(**values, source=where)


def from_folder(folder: str) -> SamplingDefaults | None:
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        return None
    config = read_json(path)
    found = {name: config[name] for name in SAMPLING_FIELDS if config.get(name) is not None}
    return _checked(found, "generation_config.json") if found else None


def from_gguf(metadata: dict[str, Any]) -> SamplingDefaults | None:
    found = {name: metadata[key] for name, key in GGUF_KEYS.items() if metadata.get(key) is not None}
    return _checked(found, "the GGUF file's general.sampling keys") if found else None


def sampling_defaults(checkpoint: Any) -> SamplingDefaults:
    """The checkpoint's own sampling defaults, else llama.cpp's."""
    if checkpoint.format == "gguf":
        found = from_gguf(checkpoint.metadata)
    else:
        path = checkpoint.path
        found = from_folder(path if os.path.isdir(path) else os.path.dirname(path))
    return found or LLAMA_CPP
