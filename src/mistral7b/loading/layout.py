"""The one place that maps weights between formats: names, shapes and the rotary row order of wq/wk.

Native (Mistral) names are the model's parameter names. Hugging Face renames them and stores q/k rows
permuted for the half-split ("rotate_half") rotary layout; GGUF (llama.cpp) renames them but keeps the
native interleaved-pairs layout (llama.cpp's converter undoes the HF permutation).
"""

from __future__ import annotations

import re

import torch

from mistral7b.config import ModelArgs

_LAYER_PARTS = (
    # native suffix, HF suffix, GGUF suffix
    ("attention.wq.weight", "self_attn.q_proj.weight", "attn_q.weight"),
    ("attention.wk.weight", "self_attn.k_proj.weight", "attn_k.weight"),
    ("attention.wv.weight", "self_attn.v_proj.weight", "attn_v.weight"),
    ("attention.wo.weight", "self_attn.o_proj.weight", "attn_output.weight"),
    ("feed_forward.w1.weight", "mlp.gate_proj.weight", "ffn_gate.weight"),
    ("feed_forward.w2.weight", "mlp.down_proj.weight", "ffn_down.weight"),
    ("feed_forward.w3.weight", "mlp.up_proj.weight", "ffn_up.weight"),
    ("attention_norm.weight", "input_layernorm.weight", "attn_norm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight", "ffn_norm.weight"),
)
_GLOBAL_PARTS = (
    ("tok_embeddings.weight", "model.embed_tokens.weight", "token_embd.weight"),
    ("norm.weight", "model.norm.weight", "output_norm.weight"),
    ("output.weight", "lm_head.weight", "output.weight"),
)
_PREFIX = {"hf": "model.layers.", "gguf": "blk."}
_COLUMN = {"hf": 1, "gguf": 2}
_LAYER_RE = re.compile(r"^(?:model\.layers|blk|layers)\.(\d+)\.(.+)$")

# Buffers some checkpoints carry that are not parameters (recomputed by the model).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Native name -> shape of every parameter the model has, in the model's order."""
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (q, args.dim),
            p + "attention.wk.weight": (kv, args.dim),
            p + "attention.wv.weight": (kv, args.dim),
            p + "attention.wo.weight": (args.dim, q),
            p + "feed_forward.w1.weight": (args.hidden_dim, args.dim),
            p + "feed_forward.w2.weight": (args.dim, args.hidden_dim),
            p + "feed_forward.w3.weight": (args.hidden_dim, args.dim),
            p + "attention_norm.weight": (args.dim,),
            p + "ffn_norm.weight": (args.dim,),
        })
    shapes["norm.weight"] = (args.dim,)
    if not args.tied_embeddings:
        shapes["output.weight"] = (args.vocab_size, args.dim)
    return shapes


def to_native_name(name: str, fmt: str) -> str | None:
    """Native name of a stored HF/GGUF tensor name, or None when the name is not one we know."""
    col = _COLUMN[fmt]
    m = _LAYER_RE.match(name)
    if m and name.startswith(_PREFIX[fmt]):
        for parts in _LAYER_PARTS:
            if parts[col] == m.group(2):
                return f"layers.{m.group(1)}.{parts[0]}"
        return None
    for parts in _GLOBAL_PARTS:
        if parts[col] == name:
            return parts[0]
    return None


def from_native_name(name: str, fmt: str) -> str:
    """The HF/GGUF name of a native name (KeyError for a name the model does not have)."""
    col = _COLUMN[fmt]
    m = _LAYER_RE.match(name)
    if m and name.startswith("layers."):
        for parts in _LAYER_PARTS:
            if parts[0] == m.group(2):
                return f"{_PREFIX[fmt]}{m.group(1)}.{parts[col]}"
    for parts in _GLOBAL_PARTS:
        if parts[0] == name:
            return parts[col]
    raise KeyError(name)


def rotary_heads(name: str, args: ModelArgs) -> int | None:
    """Number of heads whose rows need the rotary permutation (wq: n_heads, wk: n_kv_heads), else None."""
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Native interleaved-pairs rows -> HF half-split rows (what transformers' conversion script does)."""
    rows, dim = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF half-split rows -> native interleaved-pairs rows (inverse of permute_to_hf)."""
    rows, dim = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, dim).transpose(1, 2).reshape(rows, dim)
