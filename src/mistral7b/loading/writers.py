"""Write a native-named state dict as a native, Hugging Face or GGUF checkpoint.

Used by the tests (to build checkpoints the readers and transformers must agree on) and by `convert`.
Each file is written under a temporary name and renamed into place, so a crash never leaves a
half-written file under a name a reader would trust.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from safetensors.torch import save_file

from mistral7b.config import ModelArgs
from mistral7b.loading import layout

GGUF_QTYPES: dict[str, QType] = {
    "F32": QType.F32, "F16": QType.F16, "BF16": QType.BF16,
    "Q8_0": QType.Q8_0, "Q4_0": QType.Q4_0, "Q4_1": QType.Q4_1,
}
_FILE_TYPE = {
    "F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
}


def _checked_state(args: ModelArgs, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of `state` the model has, in the model's order, after checking names and shapes."""
    expected = layout.expected_shapes(args)
    extra = set(state) - set(expected) - ({"output.weight"} if args.tied_embeddings else set())
    if extra:
        raise ValueError(f"state has tensors the config does not: {sorted(extra)[:5]}")
    out = {}
    for name, shape in expected.items():
        if name not in state:
            raise ValueError(f"state is missing tensor {name}")
        if tuple(state[name].shape) != shape:
            raise ValueError(f"tensor {name} has shape {list(state[name].shape)}, expected {list(shape)}")
        out[name] = state[name].detach().cpu().contiguous()
    return out


def _tmp(path: str) -> str:
    return os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp-{os.getpid()}")


def _write_json(path: str, data: dict[str, Any]) -> None:
    tmp = _tmp(path)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _write_safetensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    tmp = _tmp(path)
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)


def save_native(folder: str, args: ModelArgs, state: Mapping[str, torch.Tensor]) -> None:
    """params.json (rope_theta always explicit) + consolidated.safetensors."""
    tensors = _checked_state(args, state)
    os.makedirs(folder, exist_ok=True)
    _write_safetensors(os.path.join(folder, "consolidated.safetensors"), tensors)
    _write_json(os.path.join(folder, "params.json"), args.to_params_json())


def save_hf(folder: str, args: ModelArgs, state: Mapping[str, torch.Tensor],
            max_shard_bytes: int | None = None) -> None:
    """config.json + model.safetensors (or shards + model.safetensors.index.json), HF names, q/k permuted."""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in _checked_state(args, state).items():
        heads = layout.rotary_heads(name, args)
        tensors[layout.from_native_name(name, "hf")] = layout.permute_to_hf(tensor, heads) if heads else tensor
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    os.makedirs(folder, exist_ok=True)
    if len(shards) == 1:
        _write_safetensors(os.path.join(folder, "model.safetensors"), shards[0])
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            shard_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors(os.path.join(folder, shard_name), shard)
            weight_map.update(dict.fromkeys(shard, shard_name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        _write_json(os.path.join(folder, "model.safetensors.index.json"),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
    config = args.to_hf_config()
    config["dtype"] = str(tensors["model.embed_tokens.weight"].dtype).removeprefix("torch.")
    _write_json(os.path.join(folder, "config.json"), config)


def _gguf_kind(tensor: torch.Tensor, qtype: str) -> QType:
    """2-D matrices in `qtype`, vectors (norms) in F32; rows that do not fill whole blocks fall back to F16
    (as llama.cpp does)."""
    kind = GGUF_QTYPES[qtype] if tensor.ndim == 2 else QType.F32
    if tensor.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
        kind = QType.F16
    return kind


def _add_metadata(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        (writer.add_uint32 if 0 <= value < 2**32 else writer.add_int64)(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)) and value:
        writer.add_array(key, list(value))
    else:
        raise ValueError(f"cannot store metadata {key!r} of type {type(value).__name__} in GGUF")


def save_gguf(path: str, args: ModelArgs, state: Mapping[str, torch.Tensor], qtype: str = "F32",
              tokenizer_metadata: Mapping[str, Any] | None = None) -> None:
    """A llama.cpp GGUF (arch "llama", native q/k layout) with 2-D weights in `qtype` and norms in F32.

    Tensors are quantized and written one at a time after the header, so memory holds one tensor extra.
    Only the `tokenizer.*` keys of `tokenizer_metadata` are written (a GGUF's whole `Checkpoint.metadata`
    can be passed as is: the model keys come from `args`).
    """
    if qtype not in GGUF_QTYPES:
        raise ValueError(f"unsupported GGUF type {qtype!r}; choose one of {', '.join(GGUF_QTYPES)}")
    tensors = _checked_state(args, state)
    arch = "llama"
    tmp = _tmp(path)
    writer = gguf.GGUFWriter(tmp, arch)
    for key, value in {
        f"{arch}.context_length": args.max_seq_len or 32768,
        f"{arch}.embedding_length": args.dim,
        f"{arch}.block_count": args.n_layers,
        f"{arch}.feed_forward_length": args.hidden_dim,
        f"{arch}.attention.head_count": args.n_heads,
        f"{arch}.attention.head_count_kv": args.n_kv_heads,
        f"{arch}.attention.key_length": args.head_dim,
        f"{arch}.attention.value_length": args.head_dim,
        f"{arch}.rope.dimension_count": args.head_dim,
        f"{arch}.rope.freq_base": float(args.rope_theta),
        f"{arch}.attention.layer_norm_rms_epsilon": float(args.norm_eps),
        f"{arch}.vocab_size": args.vocab_size,
        "general.file_type": int(_FILE_TYPE[qtype]),
        "general.quantization_version": gguf.GGML_QUANT_VERSION,
    }.items():
        _add_metadata(writer, key, value)
    if args.sliding_window is not None:
        _add_metadata(writer, f"{arch}.attention.sliding_window", args.sliding_window)
    for key, value in (tokenizer_metadata or {}).items():
        if key.startswith("tokenizer."):
            _add_metadata(writer, key, value)

    # Declare every tensor (name, shape, type, size) first, so the header is written before any data.
    kinds = {name: _gguf_kind(tensor, qtype) for name, tensor in tensors.items()}
    for name, tensor in tensors.items():
        kind = kinds[name]
        block, type_size = gguf.GGML_QUANT_SIZES[kind]
        nbytes = tensor.numel() // block * type_size
        if kind in (QType.F32, QType.F16):
            writer.add_tensor_info(layout.from_native_name(name, "gguf"), tuple(tensor.shape),
                                   np.dtype(np.float32 if kind == QType.F32 else np.float16), nbytes)
        else:  # stored as raw bytes: [rows, bytes per row]
            writer.add_tensor_info(layout.from_native_name(name, "gguf"),
                                   gguf.quant_shape_to_byte_shape(tuple(tensor.shape), kind),
                                   np.dtype(np.uint8), nbytes, raw_dtype=kind)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, tensor in tensors.items():
            writer.write_tensor_data(gguf.quants.quantize(tensor.float().numpy(), kinds[name]))
        writer.close()
        os.replace(tmp, path)
    finally:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
