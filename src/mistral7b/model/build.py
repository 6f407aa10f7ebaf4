"""Materialize a Transformer from a checkpoint without ever holding two copies of the weights.

The module tree is created on the meta device (no memory), then each tensor the checkpoint yields is
converted to the target dtype/device (or quantized) and put in place of its meta parameter, one at a time,
with a progress bar. Peak memory is the model plus one tensor.

Quantization (`quantize`):
- None: every weight in `dtype`.
- "int8" / "int4": the linear layers become weight-only int8 / int4 (groups of 32) modules; the output layer
  stays int8 in int4 mode (as llama.cpp keeps it wider); the embedding table is stored as int8 blocks
  (tied embeddings: the output layer's int8 rows serve the lookup too).
- "auto": follow a GGUF file tensor by tensor: Q4_0/Q4_1 layers are used packed and exactly as int4, Q8_0 as
  int8 (its own blocks, exactly), other quantized types are re-quantized to int8 (blocks of 32), float tensors
  stay float; a Q8_0/Q4 embedding table is kept exactly as it is stored. For other formats "auto" means None,
  and so it does on a CPU without the extension (mistral7b/cpu: its kernels are what make packed layers fast;
  PyTorch ops would dequantize every weight at every step).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from mistral7b import cpu
from mistral7b.model.tensor_parallel import Shard, local_args, parallelize, slice_spec, take_slice
from mistral7b.errors import CheckpointError
from mistral7b.loading import Checkpoint
from mistral7b.loading.gguf_blocks import PACKABLE, GGUFBlocks
from mistral7b.model import forward_plans
from mistral7b.model.quantize import Int4Linear, Int8Linear, QuantizedEmbedding, quantize_linear
from mistral7b.model.transformer import Transformer

QUANTIZE_MODES = (None, "auto", "int8", "int4")
_FLOAT_GGUF = {"F32", "F16", "BF16"}


def _linear_mode(name: str, stored_type: str, quantize: str | None, fmt: str) -> str | None:
    """How to store the linear weight `name`: None (float), "int8" or "int4"."""
    if quantize == "auto":
        if fmt != "gguf" or stored_type in _FLOAT_GGUF:
            return None
        return "int4" if stored_type in ("Q4_0", "Q4_1") else "int8"
    if quantize == "int4" and name != "output.weight":
        return "int4"
    return "int8" if quantize in ("int4", "int8") else None


def build_model(
    checkpoint: Checkpoint,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    progress: bool = True,
    quantize: str | None = None,
    shard: Shard | None = None,
) -> Transformer:
    """`shard`: build this tensor-parallel rank's part only (model/tensor_parallel.py): local sizes,
    only the rank's slices read, the communicating layers wrapped. Float weights only."""
    if quantize not in QUANTIZE_MODES:
        raise CheckpointError(f"unknown quantization {quantize!r} (expected int8, int4 or auto)")
    full_args = checkpoint.args
    args = full_args if shard is None else local_args(full_args, shard)
    if shard is not None and quantize is not None:
        raise CheckpointError("tensor parallelism loads float weights only: use quantize none")
    if quantize == "auto" and torch.device(device).type == "cpu" and cpu.load() is None:
        quantize = None  # without the CPU extension every packed matmul would dequantize: float is faster
    with torch.device("meta"):
        model = Transformer(args, init_embeddings=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    types = checkpoint.stored_types()
    linear_names = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    linear_modes = {n: _linear_mode(n, t, quantize, checkpoint.format) for n, t in types.items() if n in linear_names}
    if args.tied_embeddings:
        linear_modes["output.weight"] = _linear_mode("output.weight", types["tok_embeddings.weight"], quantize,
                                                     checkpoint.format)
    quantized = any(linear_modes.values())
    packed = PACKABLE if quantized and checkpoint.format == "gguf" else frozenset()
    select = None if shard is None else (lambda name: slice_spec(name, full_args, shard))
    for name, tensor in tqdm(
        checkpoint.tensors(packed, select), total=len(types), desc="loading weights", unit="tensor",
        disable=not progress, leave=False,
    ):
        if shard is not None and name in ("tok_embeddings.weight", "output.weight"):
            tensor = take_slice(tensor, None, rows=args.vocab_size)  # the last rank's share is zero-padded
        if name not in params:
            raise CheckpointError(f"{checkpoint.path}: unexpected tensor {name!r}")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise CheckpointError(
                f"{checkpoint.path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"config expects {tuple(params[name].shape)}"
            )
        module_name, _, attr = name.rpartition(".")
        if linear_modes.get(name) is not None:
            _set_module(model, module_name, _quantized_linear(tensor, linear_modes[name], dtype, device))
        elif name == "tok_embeddings.weight" and quantized:
            # With quantized layers a float table would dominate memory: keep it quantized (exactly, for GGUF).
            if args.tied_embeddings and linear_modes["output.weight"] is not None:
                model.output = _quantized_linear(tensor, linear_modes["output.weight"], dtype, device)
            if isinstance(model.output, Int8Linear) and args.tied_embeddings:
                # Tied: the lookup reads the output layer's int8 rows (one copy of the table, not two).
                out = model.output
                scales = out.scales.float()
                model.tok_embeddings = QuantizedEmbedding(out.weight_int8, scales, torch.zeros_like(scales), dtype)
            else:
                model.tok_embeddings = _quantized_embedding(tensor, dtype, device)
        else:
            value = tensor.dequantize() if isinstance(tensor, GGUFBlocks) else tensor
            module = model.get_submodule(module_name)
            setattr(module, attr, nn.Parameter(value.to(device=device, dtype=dtype), requires_grad=False))
    if args.tied_embeddings and isinstance(model.output, nn.Linear) and isinstance(model.tok_embeddings, nn.Embedding):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(f"{checkpoint.path}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    if shard is not None:
        parallelize(model, full_args, shard)
    model.plans = forward_plans.choose(model)  # the fast paths for the model as loaded (an engine chooses again)
    return model.eval()


def _quantized_linear(tensor: torch.Tensor | GGUFBlocks, mode: str, dtype: torch.dtype, device) -> nn.Module:
    if mode == "int4" and isinstance(tensor, GGUFBlocks) and tensor.kind in ("Q4_0", "Q4_1"):
        return Int4Linear(tensor.values.to(device), tensor.scales.to(device), tensor.zeros.to(device), 32, dtype)
    if mode == "int8" and isinstance(tensor, GGUFBlocks):
        if tensor.kind == "Q8_0":  # the file's own blocks, exactly
            return Int8Linear(tensor.values.to(device), tensor.scales.to(device))
        return Int8Linear.from_rows(tensor.shape[0], lambda lo, hi: tensor.dequantize(lo, hi).to(device))
    weight = tensor.dequantize() if isinstance(tensor, GGUFBlocks) else tensor
    return quantize_linear(weight.to(device), mode, dtype)


def _quantized_embedding(tensor: torch.Tensor | GGUFBlocks, dtype: torch.dtype, device) -> QuantizedEmbedding:
    if isinstance(tensor, GGUFBlocks):
        return QuantizedEmbedding(tensor.values.to(device), tensor.scales.to(device), tensor.zeros.to(device), dtype)
    return QuantizedEmbedding.from_float(tensor.to(device), dtype)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
