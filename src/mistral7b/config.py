"""One config dataclass for every checkpoint format.

`ModelArgs` mirrors Mistral's `params.json` field for field (the names the reference uses), and is also built
from a Hugging Face `config.json` or GGUF metadata, so the model code sees one shape of config whatever the
file on disk. A Llama is a Mistral without a window: `sliding_window=None`.

The RoPE base is never guessed from the model version: a native `params.json` without `rope_theta` means
1e4 (Mistral 7B v0.1 ships without the key); see ../shared/MISTRAL7B.md.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from mistral7b.errors import CheckpointError

DEFAULT_ROPE_THETA = 10_000.0


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    vocab_size: int
    rope_theta: float = DEFAULT_ROPE_THETA
    sliding_window: int | None = None
    tied_embeddings: bool = False
    max_seq_len: int | None = None

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_params_json(self) -> dict[str, Any]:
        """The dict Mistral's `params.json` holds (explicit rope_theta, so no reader has to guess)."""
        out = {k: v for k, v in self.to_dict().items() if k not in ("max_seq_len",)}
        if out["sliding_window"] is None:
            del out["sliding_window"]
        return out

    @classmethod
    def from_params_json(cls, params: dict[str, Any], source: str = "params.json") -> ModelArgs:
        """Mistral native `params.json`. Unknown extra keys (e.g. `max_batch_size`) are ignored."""
        if params.get("moe") is not None:
            raise CheckpointError(f"{source}: mixture-of-experts checkpoints are not supported")
        if params.get("vision_encoder") is not None:
            raise CheckpointError(f"{source}: vision checkpoints are not supported")
        window = params.get("sliding_window", params.get("window_size"))
        if isinstance(window, list):
            if len(set(window)) != 1:
                raise CheckpointError(f"{source}: per-layer sliding windows {window} are not supported")
            window = window[0]
        try:
            return cls(
                dim=params["dim"],
                n_layers=params["n_layers"],
                head_dim=params.get("head_dim") or params["dim"] // params["n_heads"],
                hidden_dim=params["hidden_dim"],
                n_heads=params["n_heads"],
                n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
                norm_eps=float(params["norm_eps"]),
                vocab_size=params["vocab_size"],
                rope_theta=float(params.get("rope_theta") or DEFAULT_ROPE_THETA),
                sliding_window=window,
                tied_embeddings=bool(params.get("tied_embeddings", False)),
                max_seq_len=params.get("max_seq_len") or params.get("context_len"),
            )
        except KeyError as e:
            raise CheckpointError(f"{source}: missing key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: {e}") from None

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> ModelArgs:
        """Hugging Face `config.json` of a MistralForCausalLM or LlamaForCausalLM."""
        model_type = config.get("model_type")
        if model_type not in ("mistral", "llama"):
            arch = config.get("architectures") or model_type
            raise CheckpointError(f"{source}: unsupported architecture {arch!r} (expected mistral or llama)")
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise CheckpointError(f"{source}: attention/MLP biases are not supported")
        rope = config.get("rope_parameters") or {}
        scaling = config.get("rope_scaling") or {}
        rope_type = scaling.get("rope_type") or scaling.get("type") or rope.get("rope_type") or "default"
        if rope_type != "default":
            raise CheckpointError(f"{source}: RoPE scaling {rope_type!r} is not supported")
        theta = config.get("rope_theta") or rope.get("rope_theta") or DEFAULT_ROPE_THETA
        window = config.get("sliding_window") if model_type == "mistral" else None
        if config.get("use_sliding_window") is False:
            window = None
        try:
            n_heads = config["num_attention_heads"]
            return cls(
                dim=config["hidden_size"],
                n_layers=config["num_hidden_layers"],
                head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
                hidden_dim=config["intermediate_size"],
                n_heads=n_heads,
                n_kv_heads=config.get("num_key_value_heads") or n_heads,
                norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                vocab_size=config["vocab_size"],
                rope_theta=float(theta),
                sliding_window=window,
                tied_embeddings=bool(config.get("tie_word_embeddings", False)),
                max_seq_len=config.get("max_position_embeddings"),
            )
        except KeyError as e:
            raise CheckpointError(f"{source}: missing key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: {e}") from None

    def to_hf_config(self) -> dict[str, Any]:
        """A `config.json` that transformers' MistralForCausalLM (or Llama, without a window) reads."""
        mistral = self.sliding_window is not None
        return {
            "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
            "model_type": "mistral" if mistral else "llama",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "rms_norm_eps": self.norm_eps,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tied_embeddings,
            "max_position_embeddings": self.max_seq_len or 32768,
            "hidden_act": "silu",
            "bos_token_id": 1,
            "eos_token_id": 2,
        }

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], has_output: bool, source: str) -> ModelArgs:
        """GGUF `{arch}.*` keys (llama.cpp's names). GGUF has no window key for Mistral 7B: override it."""
        arch = meta.get("general.architecture")
        if arch not in ("llama", "mistral"):
            raise CheckpointError(f"{source}: unsupported architecture {arch!r} (expected llama or mistral)")
        if meta.get(f"{arch}.rope.scaling.type", "none") not in ("none", "linear") or (
            meta.get(f"{arch}.rope.scaling.type") == "linear" and meta.get(f"{arch}.rope.scaling.factor", 1.0) != 1.0
        ):
            raise CheckpointError(f"{source}: RoPE scaling is not supported")
        try:
            n_heads = int(meta[f"{arch}.attention.head_count"])
            dim = int(meta[f"{arch}.embedding_length"])
            vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
            return cls(
                dim=dim,
                n_layers=int(meta[f"{arch}.block_count"]),
                head_dim=int(meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count")
                             or dim // n_heads),
                hidden_dim=int(meta[f"{arch}.feed_forward_length"]),
                n_heads=n_heads,
                n_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv") or n_heads),
                norm_eps=float(meta[f"{arch}.attention.layer_norm_rms_epsilon"]),
                vocab_size=int(vocab),
                rope_theta=float(meta.get(f"{arch}.rope.freq_base") or DEFAULT_ROPE_THETA),
                sliding_window=meta.get(f"{arch}.attention.sliding_window") or None,
                tied_embeddings=not has_output,
                max_seq_len=meta.get(f"{arch}.context_length"),
            )
        except KeyError as e:
            raise CheckpointError(f"{source}: missing metadata key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: {e}") from None


_MISTRAL_7B = dict(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8, norm_eps=1e-5)

PRESETS: dict[str, ModelArgs] = {
    "mistral-7b-v0.1": ModelArgs(**_MISTRAL_7B, vocab_size=32000, rope_theta=1e4, sliding_window=4096,
                                 max_seq_len=8192),
    "mistral-7b-v0.2": ModelArgs(**_MISTRAL_7B, vocab_size=32000, rope_theta=1e6, sliding_window=None,
                                 max_seq_len=32768),
    "mistral-7b-v0.3": ModelArgs(**_MISTRAL_7B, vocab_size=32768, rope_theta=1e6, sliding_window=None,
                                 max_seq_len=32768),
}


def preset(name: str) -> ModelArgs:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


def read_json(path: str) -> dict[str, Any]:
    """Read a JSON config file, turning every failure into one CheckpointError line."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data
