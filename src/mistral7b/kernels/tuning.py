"""DecodeTuning: how the GPU's decode path is launched, in one frozen object.

An engine setting (EngineConfig.tuning), handed once at load to the model (its one-token loop), the paged cache
(attention launches), the decode graphs and the sampler; nothing reads a module-level switch. Every default is
the measured winner (bench/README.md); bench/gpu_ab.py builds engines with other values, in one process, to
measure what each is worth on the GPU at hand.
"""

from __future__ import annotations

from dataclasses import dataclass

from mistral7b.errors import RequestError


@dataclass(frozen=True)
class DecodeTuning:
    # What one-token steps (model/transformer.py, Transformer._forward_one_token) fold into their GEMVs:
    fold_norms: bool = True  # the RMSNorm before wqkv and the output in those GEMVs, w2's residual add in w2's
    swiglu_epilogue: bool = True  # SwiGLU's product in w13's GEMV (rather than in w2's)
    # with fold_norms: wo's GEMV adds to the residual and starts the norm before w13 (`gemv_residual_prenorm`),
    # w13's finishes it (`rms=`); False keeps kernels/norms.add_rms_norm between them
    ffn_norm_in_wo: bool = True
    early_epilogue: bool = True  # wo's epilogue loads before its loop; False: after it, as the others do
    rope_in_gemv: bool = True  # RoPE and the k/v store in wqkv's GEMV; False: the rotary-store kernel after it
    # Decode attention (kernels/paged_attention.py, cache/paged.py):
    # key splits of one sequence at most (few sequences: batch 1): batch-1 decode on an H200 (8 KV heads, ~768
    # keys) 254.9 tok/s with 16, 259.1 with 24 or 32 (one 32-key block a split), 258.5 with 64 of 16 keys
    max_splits: int = 32
    decode_warps: int = 1  # warps of an unsplit decode tile (a GQA group of 4 padded to 16 rows)
    kv_before_wait: bool = True  # a split's first key block of earlier steps loaded before PDL's wait
    # The step's ends (engine/cuda_graphs.py, engine/sampler.py):
    zero_copy: bool = True  # decode graphs read their inputs from pinned memory and make the greedy picks
    argmax_kernel: bool = True  # greedy picks by kernels/argmax.py; False: torch.argmax

    def validate(self) -> None:
        for name in ("max_splits", "decode_warps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RequestError(f"DecodeTuning.{name} must be a positive integer, got {value!r}")
