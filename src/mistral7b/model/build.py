"""Materialize a Transformer from a checkpoint without ever holding two copies of the weights.

The module tree is created on the meta device (no memory), then each tensor the checkpoint yields is
converted to the target dtype/device and assigned in place of its meta parameter, one at a time, with a
progress bar. Peak memory is the model plus one tensor.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from mistral7b.errors import CheckpointError
from mistral7b.loading import Checkpoint
from mistral7b.model.transformer import Transformer


def build_model(
    checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device | str = "cpu", progress: bool = True
) -> Transformer:
    with torch.device("meta"):
        model = Transformer(checkpoint.args)
    params = dict(model.named_parameters(remove_duplicate=False))
    names = checkpoint.tensor_names()
    for name, tensor in tqdm(
        checkpoint.tensors(), total=len(names), desc="loading weights", unit="tensor", disable=not progress,
        leave=False,
    ):
        if name not in params:
            raise CheckpointError(f"{checkpoint.path}: unexpected tensor {name!r}")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise CheckpointError(
                f"{checkpoint.path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"config expects {tuple(params[name].shape)}"
            )
        module_name, _, attr = name.rpartition(".")
        value = tensor.to(device=device, dtype=dtype)
        setattr(model.get_submodule(module_name), attr, nn.Parameter(value, requires_grad=False))
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(f"{checkpoint.path}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    return model.eval()
