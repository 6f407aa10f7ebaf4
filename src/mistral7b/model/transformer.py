"""The Mistral 7B transformer: pre-norm decoder blocks with GQA, sliding-window attention, RoPE, SwiGLU.

Attribute names equal the native checkpoint keys (`tok_embeddings`, `layers.N.attention.wq`,
`feed_forward.w1`, `attention_norm`, ...), so a state dict in native names loads with no renaming table.
No biases anywhere. A cache is optional: without one, `forward` is one causal pass over the given tokens.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mistral7b.config import ModelArgs
from mistral7b.model.attention import AttentionMetadata, attend_without_cache
from mistral7b.model.forward_ops import TORCH_OPS, TorchOps
from mistral7b.model.forward_plans import ForwardPlans
from mistral7b.model.rope import apply_rotary, inv_frequencies, rotary_freqs


class KVCache(Protocol):
    """What attention needs from a cache: store a step's keys/values and attend over what the step may see.

    The rolling buffer (cache/rolling.py) plans its own steps from positions (`prepare`); a paged attention
    backend (mistral7b/attention) is planned by the engine, which passes the metadata to `Transformer.forward`.
    """

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: Any) -> torch.Tensor: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op; accumulates in float32


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.wqkv: nn.Module | None = None  # wq, wk, wv fused for inference (model/fuse.py)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor | None, meta: Any, cache: KVCache | None, layer: int,
                ops: TorchOps = TORCH_OPS) -> torch.Tensor:
        """`freqs` may be None where the cache rotates q and k itself (`cache.rotates`)."""
        B, T, _ = x.shape
        H, H_kv, D = self.n_heads, self.n_kv_heads, self.head_dim
        if self.wqkv is not None:  # one matmul, and one rotation for the q and k heads together
            qkv = ops.project(self.wqkv, x).view(B, T, H + 2 * H_kv, D)
            if cache is not None and getattr(cache, "rotates", False):  # rotate + store in one kernel, attend
                out = cache.attend_heads(layer, qkv, freqs, meta)  # type: ignore[attr-defined]
                return ops.project(self.wo, out.reshape(B, T, H * D))
            q, k = apply_rotary(qkv[:, :, : H + H_kv], freqs).split([H, H_kv], dim=2)
            v = qkv[:, :, H + H_kv :]
        else:
            q = apply_rotary(ops.project(self.wq, x).view(B, T, H, D), freqs)
            k = apply_rotary(ops.project(self.wk, x).view(B, T, H_kv, D), freqs)
            v = ops.project(self.wv, x).view(B, T, H_kv, D)
        out = attend_without_cache(q, k, v, meta) if cache is None else cache.attend(layer, q, k, v, meta)
        return ops.project(self.wo, out.reshape(B, T, H * D))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w13: nn.Module | None = None  # w1, w3 fused for inference (model/fuse.py)

    def forward(self, x: torch.Tensor, ops: TorchOps = TORCH_OPS) -> torch.Tensor:
        if self.w13 is not None:
            return ops.swiglu_down(self.w2, ops.project(self.w13, x))
        return ops.project(self.w2, F.silu(ops.project(self.w1, x)) * ops.project(self.w3, x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, residual: torch.Tensor, delta: torch.Tensor | None, freqs: torch.Tensor | None, meta: Any,
                cache: KVCache | None, layer: int,
                ops: TorchOps = TORCH_OPS) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The residual stream after this block is residual + delta (delta None: residual): plans that fuse the
        add into the next norm leave it to the next block (`ops.fuses_add`); PyTorch's adds it here."""
        if ops.one_token:
            return ops.block(self, residual, delta, meta, cache, layer)  # type: ignore[attr-defined]
        residual, x = ops.add_rms_norm(residual, delta, self.attention_norm)
        attn = self.attention.forward(x, freqs, meta, cache, layer, ops)
        residual, x = ops.add_rms_norm(residual, attn, self.ffn_norm)
        delta = self.feed_forward.forward(x, ops)
        return (residual, delta) if ops.fuses_add else (residual + delta, None)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, init_embeddings: bool = True):
        """`init_embeddings=False` leaves the table uninitialised, for weights loaded next (model/build.py): on
        the meta device nn.Embedding's random init imports torch._dynamo, 1.3 s of a command's first token."""
        super().__init__()
        self.args = args
        table = None if init_embeddings else torch.empty(args.vocab_size, args.dim)
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, _weight=table)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tied_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self._inv_freq: torch.Tensor | None = None
        self.plans: ForwardPlans | None = None  # the fast paths (model/forward_plans.choose); None: PyTorch's ops

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: that of the residual stream (embeddings may be stored narrower)."""
        return self.norm.weight.dtype

    def tie_weights(self) -> None:
        """Share the output matrix with the embeddings again (after weights were assigned)."""
        if self.args.tied_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = inv_frequencies(self.args.head_dim, self.args.rope_theta, device)
        return self._inv_freq

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        logits_index: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        meta: Any = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] in float32 for tokens [B, T] at absolute positions [B, T] (-1 = padding).

        With a cache, the tokens continue what the cache holds; `meta` is the step's attention metadata when
        the caller planned it (the paged cache), else the cache plans it from the positions. `logits_index`
        [M] picks M tokens by flat index into B * T (e.g. each prompt's last: row * T + column) and returns
        [M, vocab], skipping the output matmul for the rest. `segment_ids` [B, T] (no cache) packs several
        examples in a row: positions restart at 0 for each segment and no token attends across segments
        (training on packed sequences).
        """
        if meta is None and cache is not None:
            meta = cache.prepare(positions)
        elif meta is None:
            meta = AttentionMetadata.without_cache(positions, self.args.sliding_window, segment_ids)
        # The residual stream runs in the norms' dtype (embeddings may be stored narrower when quantized).
        h = self.tok_embeddings(tokens).to(self.norm.weight.dtype)
        ops = TORCH_OPS if self.plans is None else self.plans.pick(h, cache, meta)
        freqs = rotary_freqs(positions, self.inv_freq(tokens.device)) if ops.needs_freqs else None
        if ops.whole_stack:
            residual, delta = ops.blocks(h, freqs, meta, cache)  # type: ignore[attr-defined]
        else:
            residual, delta = h, None
            for i, layer in enumerate(self.layers):
                # through forward: the hot loop of a CPU step skips nn.Module's __call__ (~2.5 us); activation
                # checkpointing replaces a block's forward itself (finetune/trainer.py)
                residual, delta = layer.forward(residual, delta, freqs, meta, cache, i, ops)
        return ops.logits(self, residual, delta, logits_index)
