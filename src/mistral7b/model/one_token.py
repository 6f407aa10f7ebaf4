"""A one-token GPU step through GEMV kernels (kernels/gemv.py) that take their neighbours in: wqkv the attention
norm, RoPE and the k/v store; wo the residual add and the first half of the norm before w13, w13 its second half
and SwiGLU's product; w2 the residual add; the output the last norm, writing float32 logits. So a layer is six
kernels (wqkv, attention and its split merge, wo, w13, w2) where the plain order has eight, and the last norm
has none. Sums equal the plain loop's but for the normalised inputs of wqkv, w13 and the output: wqkv's and the
output's are not rounded to the activation dtype, w13's is h * w_norm rounded, with 1 / rms(h) applied to the
float32 sums. Which neighbours are folded is the engine's DecodeTuning (kernels/tuning.py).
"""

from __future__ import annotations

from typing import Any

import torch

from mistral7b.kernels import gemv as kernels
from mistral7b.kernels.norms import add_rms_norm
from mistral7b.kernels.tuning import DecodeTuning
from mistral7b.model.forward_ops import TritonOps


class OneTokenOps(TritonOps):
    one_token = True

    def __init__(self, tuning: DecodeTuning | None, eps: float, n_heads: int, head_dim: int):
        super().__init__()
        self.tuning = tuning or DecodeTuning()
        self.eps, self.n_heads, self.head_dim = eps, n_heads, head_dim

    @classmethod
    def for_model(cls, model: Any, tuning: DecodeTuning | None) -> OneTokenOps | None:
        """The plan where every projection takes the GEMV kernel (plain float16/bfloat16 nn.Linear on CUDA)."""
        x = torch.empty(1, 1, 1, dtype=model.dtype, device=model.norm.weight.device)
        modules = [model.output] + [m for layer in model.layers for m in (
            layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w13, layer.feed_forward.w2)]
        if not all(kernels.takes_kernel(m, x) for m in modules):
            return None
        args = model.args
        return cls(tuning, args.norm_eps, args.n_heads, args.head_dim)

    def _attend(self, layer: int, wqkv: Any, x: torch.Tensor, meta: Any, cache: Any,
                norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
        """The lone token's attention output; wqkv's GEMV rotates and stores (rope_in_gemv), else the rotary
        store kernel does."""
        if self.tuning.rope_in_gemv:
            q = kernels.gemv(x, wqkv.weight, rotary=cache.rotary(layer, meta), norm=norm)
            q = q.view(-1)[: self.n_heads * self.head_dim].view(1, self.n_heads, self.head_dim)
            return cache.attend_stored(layer, q, meta)
        assert norm is None, "the norm is folded into the GEMV only"
        qkv = kernels.gemv(x, wqkv.weight)
        return cache.attend_heads(layer, qkv.view(1, 1, -1, self.head_dim), None, meta)

    def block(self, layer: Any, residual: torch.Tensor, delta: torch.Tensor | None, meta: Any, cache: Any,
              index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One block on [1, 1, dim] tensors. With fold_norms the residual stream itself goes into wqkv (its GEMV
        normalises it) and w2 adds into it in place (the embeddings' fresh tensor at first): delta stays None."""
        tuning, eps, gemv = self.tuning, self.eps, kernels.gemv
        fold, swiglu = tuning.fold_norms, tuning.swiglu_epilogue
        attention, ff = layer.attention, layer.feed_forward
        if fold:
            out = self._attend(index, attention.wqkv, residual, meta, cache, norm=(layer.attention_norm.weight, eps))
        else:
            residual, x = add_rms_norm(residual, delta, layer.attention_norm.weight, eps)
            out = self._attend(index, attention.wqkv, x, meta, cache)
        if fold and tuning.ffn_norm_in_wo:
            residual, x, squares = kernels.gemv_residual_prenorm(out.reshape(1, -1), attention.wo.weight, residual,
                                                                 layer.ffn_norm.weight, tuning.early_epilogue)
            act = gemv(x, ff.w13.weight, swiglu=swiglu, rms=(squares, eps))
        else:
            residual, x = add_rms_norm(residual, gemv(out.reshape(1, -1), attention.wo.weight),
                                       layer.ffn_norm.weight, eps)  # a new residual tensor: w2 may add to it
            act = gemv(x, ff.w13.weight, swiglu=swiglu)
        if fold:
            gemv(act, ff.w2.weight, silu_mul=not swiglu, residual=residual)
            return residual, None
        return residual, gemv(act, ff.w2.weight, silu_mul=not swiglu)

    def logits(self, model: Any, residual: torch.Tensor, delta: torch.Tensor | None,
               logits_index: torch.Tensor | None) -> torch.Tensor:
        if self.tuning.fold_norms:
            norm = (model.norm.weight, model.norm.eps)
        else:
            _, residual = add_rms_norm(residual, delta, model.norm.weight, model.norm.eps)
            norm = None
        logits = kernels.gemv(residual, model.output.weight, norm=norm, out_dtype=torch.float32)
        if logits_index is not None:  # [] or [0]: the one row's logits or none
            return logits.view(1, -1)[: logits_index.numel()]
        return logits
