"""The operation sets a forward runs its blocks with (model/forward_plans.py chooses them once).

The transformer has one forward (model/transformer.py): a loop over the blocks in residual-stream form, each
block `residual, x = add_rms_norm(residual, delta)`, attention, `add_rms_norm` again, SwiGLU. What differs
between devices is how those few operations run, so a plan is a set of them:
- `TorchOps`: PyTorch ops; the reference, and the only plan with gradients (training, activation checkpointing).
- `CpuExtensionOps`: the CPU extension (mistral7b/cpu) fuses each residual add into the RMSNorm after it and
  SwiGLU's product into one call, where F.rms_norm and the add dispatch ~13 ops and chunk, silu and mul four,
  with ATen's bits.
- `TritonOps`: the same fusions as Triton kernels (kernels/norms.py), and a lone row's projections as GEMVs.
- `OneTokenOps` (model/one_token.py): a one-token GPU step whose GEMVs take their neighbours in.
- `DecodeStackOps` (model/cpu_decode.py): a decode-only CPU step with every block in one call of the extension.
Each gives the plain loop's results (the fused GEMVs' rounding is documented where they are).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class TorchOps:
    """PyTorch's ops. The residual add is done at the end of each block (`fuses_add` False), so a checkpointed
    block saves one tensor, as the textbook loop does."""

    fuses_add = False
    one_token = False
    whole_stack = False  # DecodeStackOps: the loop over the blocks is one call (`blocks`)
    needs_freqs = True

    def add_rms_norm(self, residual: torch.Tensor, delta: torch.Tensor | None,
                     norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        if delta is not None:
            residual = residual + delta
        return residual, norm(residual)

    def project(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return module(x)

    def swiglu_down(self, w2: nn.Module, w13_out: torch.Tensor) -> torch.Tensor:
        """w2(silu(gate) * up) of the fused w13's output [..., 2 * hidden]."""
        gate, up = w13_out.chunk(2, dim=-1)
        return self.project(w2, F.silu(gate) * up)

    def logits(self, model: Any, residual: torch.Tensor, delta: torch.Tensor | None,
               logits_index: torch.Tensor | None) -> torch.Tensor:
        """The loop's end: the last residual add and the final norm for the rows `logits_index` picks, then the
        output projection, in float32."""
        if logits_index is not None:
            residual = residual.reshape(-1, residual.shape[-1]).index_select(0, logits_index)
            if delta is not None:
                delta = delta.reshape(-1, delta.shape[-1]).index_select(0, logits_index)
        _, normed = self.add_rms_norm(residual, delta, model.norm)
        return self.project(model.output, normed).float()


class CpuExtensionOps(TorchOps):
    """The CPU extension's fused add + norm and SwiGLU product; modules run through `forward` (a CPU step's hot
    loop: nn.Module's __call__ costs ~2.5 us, ~5 a layer on the 2-core machine; no hooks run here)."""

    fuses_add = True

    def __init__(self, ext: Any):
        self.ext = ext

    def add_rms_norm(self, residual: torch.Tensor, delta: torch.Tensor | None,
                     norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ext.add_rms_norm(residual.contiguous(), None if delta is None else delta.contiguous(),
                                     norm._parameters["weight"], norm.eps)

    def project(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return module.forward(x)

    def swiglu_down(self, w2: nn.Module, w13_out: torch.Tensor) -> torch.Tensor:
        return w2.forward(self.ext.silu_mul(w13_out.contiguous()))


class TritonOps(TorchOps):
    """Triton's fused add + norm, and the GEMV kernel for lone rows (kernels/gemv.project); with a paged
    Triton backend, which rotates q and k itself (no freqs)."""

    fuses_add = True
    needs_freqs = False

    def __init__(self) -> None:
        from mistral7b.kernels import gemv, norms  # Triton: imported on this path only

        self._norm, self._project, self._project_swiglu = norms.add_rms_norm, gemv.project, gemv.project_swiglu

    def add_rms_norm(self, residual: torch.Tensor, delta: torch.Tensor | None,
                     norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return self._norm(residual, delta, norm.weight, norm.eps)

    def project(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self._project(module, x)

    def swiglu_down(self, w2: nn.Module, w13_out: torch.Tensor) -> torch.Tensor:
        return self._project_swiglu(w2, w13_out)


TORCH_OPS = TorchOps()
