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
from mistral7b.model.rope import apply_rotary, inv_frequencies, rotary_freqs


class KVCache(Protocol):
    """What attention needs from a cache: store a step's keys/values and attend over what the step may see.

    The rolling buffer (cache/rolling.py) plans its own steps from positions (`prepare`); the paged cache
    (cache/paged.py) is planned by the engine, which passes the metadata to `Transformer.forward`.
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

    def forward(
        self, x: torch.Tensor, freqs: torch.Tensor | None, meta: Any, cache: KVCache | None, layer: int
    ) -> torch.Tensor:
        """`freqs` may be None on the kernel path with a fused projection (the kernel rotates)."""
        B, T, _ = x.shape
        if self.wqkv is not None and getattr(meta, "kernel", None) is not None:  # rotate + store + attend
            from mistral7b.kernels.gemv import project  # Triton: imported on this path only

            out = cache.attend_qkv(layer, self.wqkv, x, meta)  # type: ignore[union-attr]
            return project(self.wo, out.reshape(B, T, self.n_heads * self.head_dim))
        if self.wqkv is not None:  # one matmul, and one rotation for the q and k heads together
            qkv = self.wqkv(x).view(B, T, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
            n_qk = self.n_heads + self.n_kv_heads
            q, k = apply_rotary(qkv[:, :, :n_qk], freqs).split([self.n_heads, self.n_kv_heads], dim=2)
            v = qkv[:, :, n_qk:]
        else:
            q = apply_rotary(self.wq(x).view(B, T, self.n_heads, self.head_dim), freqs)
            k = apply_rotary(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), freqs)
            v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        out = attend_without_cache(q, k, v, meta) if cache is None else cache.attend(layer, q, k, v, meta)
        return self.wo(out.reshape(B, T, self.n_heads * self.head_dim))

    def forward_native(self, x: torch.Tensor, freqs: torch.Tensor, meta: Any, cache: Any, layer: int) -> torch.Tensor:
        """forward() with the fused projection on a CPU paged cache with the extension (cache.native): RoPE and
        the k/v store in one call (cache.attend_rotary). Part of Transformer._forward_cpu's hot loop, so the
        projections are called through forward: no hooks run here."""
        B, T, _ = x.shape
        wqkv, wo = self._modules["wqkv"], self._modules["wo"]
        assert wqkv is not None and wo is not None
        qkv = wqkv.forward(x).view(B, T, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        out = cache.attend_rotary(layer, qkv, freqs, meta)
        return wo.forward(out.reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w13: nn.Module | None = None  # w1, w3 fused for inference (model/fuse.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(
        self, x: torch.Tensor, freqs: torch.Tensor, meta: Any, cache: KVCache | None, layer: int
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs, meta, cache, layer)
        return h + self.feed_forward(self.ffn_norm(h))


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
        self.decode_stack: Any = None  # the extension's blocks for CPU decode steps (model/cpu_decode.prepare)
        self.tuning: Any = None  # kernels.tuning.DecodeTuning of one-token GPU steps, set by the engine; None: defaults

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
        if getattr(meta, "kernel", None) is not None and all(
                layer.attention.wqkv is not None and layer.feed_forward.w13 is not None for layer in self.layers):
            return self._forward_fused(h, meta, cache, logits_index)
        freqs = rotary_freqs(positions, self.inv_freq(tokens.device))
        ops = self._cpu_extension(h)
        if ops is not None:
            return self._forward_cpu(h, freqs, meta, cache, logits_index, ops)
        for i, layer in enumerate(self.layers):
            h = layer(h, freqs, meta, cache, i)
        if logits_index is not None:
            h = h.reshape(-1, h.shape[-1]).index_select(0, logits_index)
        return self.output(self.norm(h)).float()

    def _cpu_extension(self, h: torch.Tensor) -> Any:
        """The CPU extension (mistral7b/cpu) for float32 or bfloat16 inference on a CPU, where it is built; else
        None."""
        if h.device.type != "cpu" or h.dtype not in (torch.float32, torch.bfloat16) or torch.is_grad_enabled():
            return None
        from mistral7b import cpu

        return cpu.load(notice=False)

    def _forward_cpu(self, h: torch.Tensor, freqs: torch.Tensor, meta: Any, cache: KVCache | None,
                     logits_index: torch.Tensor | None, ops: Any) -> torch.Tensor:
        """The plain loop with each residual add fused into the RMSNorm after it, and SwiGLU's product in one
        call, by the CPU extension: one call where F.rms_norm and the add dispatch ~13 ops and chunk, silu and
        mul four (a 135M model's decode step: 61 norms, 30 products). The extension reproduces ATen's bits, so
        the results equal the plain loop's."""
        residual, delta = h.contiguous(), None
        native_cache = getattr(cache, "native", None) is not None and h.shape[0] == 1
        stack = self.decode_stack
        if stack is not None and native_cache and len(meta.groups) == 1 and meta.groups[0].native is not None:
            n = meta.groups[0].native  # a decode-only step: every block in one call, the same ops and bits
            residual, delta = stack.forward(residual[0], cache.k, cache.v,
                                            torch.view_as_real(freqs).reshape(h.shape[1], -1, 2), meta.slot_mapping,
                                            n.block_tables, n.first_blocks, n.seq_lens, cache.window or 0)
            return self._logits(residual[None], delta[None], logits_index, ops.add_rms_norm, self.output)
        for i, layer in enumerate(self.layers):
            # A decode step's hot loop: modules come from their dicts and run through forward (nn.Module's
            # __getattr__ and __call__ cost ~0.7 and ~2.5 us, ~12 and ~5 a layer on the 2-core machine); no hooks.
            modules = layer._modules
            norm, attention, ff = modules["attention_norm"], modules["attention"], modules["feed_forward"]
            residual, x = ops.add_rms_norm(residual, delta, norm._parameters["weight"], norm.eps)
            if native_cache and attention._modules.get("wqkv") is not None:
                attn = attention.forward_native(x, freqs, meta, cache, i)
            else:
                attn = attention.forward(x, freqs, meta, cache, i)
            norm = modules["ffn_norm"]
            residual, x = ops.add_rms_norm(residual, attn.contiguous(), norm._parameters["weight"], norm.eps)
            w13 = ff._modules.get("w13")
            if w13 is not None:  # SwiGLU's product in one call too
                delta = ff._modules["w2"].forward(ops.silu_mul(w13.forward(x).contiguous())).contiguous()
            else:
                delta = ff.forward(x).contiguous()
        return self._logits(residual, delta, logits_index, ops.add_rms_norm, self.output)

    def _forward_fused(self, h: torch.Tensor, meta: Any, cache: KVCache | None,
                       logits_index: torch.Tensor | None) -> torch.Tensor:
        """The same blocks on the GPU kernel path: each residual add is fused into the RMSNorm after it
        (kernels/norms.py), SwiGLU's product is one kernel, and a lone token's projections are GEMV kernels
        with the product folded into w2's (kernels/gemv.py); the results equal the plain loop's."""
        from mistral7b.kernels.gemv import project, project_swiglu, takes_kernel  # Triton: on this path only
        from mistral7b.kernels.norms import add_rms_norm

        if h.shape[0] * h.shape[1] == 1 and takes_kernel(self.output, h) and all(
                takes_kernel(m, h) for layer in self.layers
                for m in (layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w13, layer.feed_forward.w2)):
            return self._forward_one_token(h, meta, cache, logits_index)
        eps = self.args.norm_eps
        residual, delta = h, None
        for i, layer in enumerate(self.layers):
            residual, x = add_rms_norm(residual, delta, layer.attention_norm.weight, eps)
            attn = layer.attention(x, None, meta, cache, i)  # the rotation happens in the rotary-store kernel
            residual, x = add_rms_norm(residual, attn, layer.ffn_norm.weight, eps)
            ff = layer.feed_forward
            delta = project_swiglu(ff.w2, project(ff.w13, x))  # type: ignore[arg-type]
        return self._logits(residual, delta, logits_index, add_rms_norm, lambda x: project(self.output, x))

    def _forward_one_token(self, h: torch.Tensor, meta: Any, cache: Any,
                           logits_index: torch.Tensor | None) -> torch.Tensor:
        """A one-token step through GEMV kernels (kernels/gemv.py) that take their neighbours in: wqkv the
        attention norm, RoPE and the k/v store; wo the residual add and the first half of the norm before w13,
        w13 its second half and SwiGLU's product; w2 the residual add; the output the last norm, writing
        float32 logits. So a layer is six kernels (wqkv, attention and its split merge, wo, w13, w2) where the
        plain order has eight, and the last norm has none. Sums equal the plain loop's but for the normalised
        inputs of wqkv, w13 and the output: wqkv's and the output's are not rounded to the activation dtype,
        w13's is h * w_norm rounded, with 1 / rms(h) applied to the float32 sums."""
        from mistral7b.kernels import gemv as kernels
        from mistral7b.kernels.norms import add_rms_norm
        from mistral7b.kernels.tuning import DecodeTuning

        tuning = self.tuning or DecodeTuning()
        gemv, fold, swiglu, eps = kernels.gemv, tuning.fold_norms, tuning.swiglu_epilogue, self.args.norm_eps
        ffn_norm_in_wo = fold and tuning.ffn_norm_in_wo
        residual, delta = h, None  # [1, 1, dim], as every tensor of the loop: attend_qkv takes [1, N, dim]
        for i, layer in enumerate(self.layers):
            attention, ff = layer.attention, layer.feed_forward
            if fold:  # the residual stream itself into wqkv: its GEMV normalises it
                out = cache.attend_qkv(i, attention.wqkv, residual, meta, norm=(layer.attention_norm.weight, eps))
            else:
                residual, x = add_rms_norm(residual, delta, layer.attention_norm.weight, eps)
                out = cache.attend_qkv(i, attention.wqkv, x, meta)
            if ffn_norm_in_wo:  # h (the embeddings' fresh tensor at first) is added to in place
                residual, x, squares = kernels.gemv_residual_prenorm(out.reshape(1, -1), attention.wo.weight,
                                                                     residual, layer.ffn_norm.weight,
                                                                     tuning.early_epilogue)
                act = gemv(x, ff.w13.weight, swiglu=swiglu, rms=(squares, eps))
            else:
                residual, x = add_rms_norm(residual, gemv(out.reshape(1, -1), attention.wo.weight),
                                           layer.ffn_norm.weight, eps)  # a new residual tensor: w2 may add to it
                act = gemv(x, ff.w13.weight, swiglu=swiglu)
            if fold:
                gemv(act, ff.w2.weight, silu_mul=not swiglu, residual=residual)
            else:
                delta = gemv(act, ff.w2.weight, silu_mul=not swiglu)
        if not fold:
            _, residual = add_rms_norm(residual, delta, self.norm.weight, self.norm.eps)
        norm = (self.norm.weight, self.norm.eps) if fold else None
        logits = gemv(residual, self.output.weight, norm=norm, out_dtype=torch.float32)
        if logits_index is not None:  # [] or [0]: the one row's logits or none
            return logits.view(1, -1)[: logits_index.numel()]
        return logits

    def _logits(self, residual: torch.Tensor, delta: torch.Tensor, logits_index: torch.Tensor | None,
                add_rms_norm: Any, output: Any) -> torch.Tensor:
        """The fused loops' end: the last residual add and the final norm for the rows `logits_index` picks,
        then the output projection, in float32."""
        if logits_index is not None:
            residual = residual.reshape(-1, residual.shape[-1]).index_select(0, logits_index)
            delta = delta.reshape(-1, delta.shape[-1]).index_select(0, logits_index)
        _, normed = add_rms_norm(residual, delta, self.norm.weight, self.norm.eps)
        return output(normed).float()
