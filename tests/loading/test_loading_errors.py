"""Every way a checkpoint can be wrong gives ONE CheckpointError line naming the file and the problem."""

from __future__ import annotations

import json
import os

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mistral7b.errors import CheckpointError
from mistral7b.loading import open_checkpoint, save_gguf, save_hf, save_native


def error_of(path) -> str:
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(str(path))
    message = str(info.value)
    assert "\n" not in message
    return message


def cut_in_half(path) -> None:
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def write_raw_gguf(path, arch: str, meta: dict, tensors: dict[str, np.ndarray]) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        if isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_meta(args, arch="llama") -> dict:
    return {f"{arch}.context_length": 64, f"{arch}.embedding_length": args.dim, f"{arch}.block_count": args.n_layers,
            f"{arch}.feed_forward_length": args.hidden_dim, f"{arch}.attention.head_count": args.n_heads,
            f"{arch}.attention.head_count_kv": args.n_kv_heads, f"{arch}.rope.dimension_count": args.head_dim,
            f"{arch}.attention.layer_norm_rms_epsilon": 1e-5, f"{arch}.vocab_size": args.vocab_size}


# --- where the checkpoint is -------------------------------------------------------------------------

def test_missing_path(tmp_path):
    message = error_of(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in message and "no such file or folder" in message


def test_folder_without_checkpoint(tmp_path):
    (tmp_path / "README.md").write_text("hi")
    message = error_of(tmp_path)
    assert str(tmp_path) in message and "no recognizable checkpoint" in message


def test_not_a_checkpoint_file(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"x")
    message = error_of(tmp_path / "weights.npz")
    assert "weights.npz" in message and "not a checkpoint" in message


def test_several_gguf_files(tmp_path, tiny_args, tiny_state):
    save_gguf(str(tmp_path / "a.gguf"), tiny_args, tiny_state)
    save_gguf(str(tmp_path / "b.gguf"), tiny_args, tiny_state)
    message = error_of(tmp_path)
    assert str(tmp_path) in message and "a.gguf" in message and "pass the one" in message


def test_one_gguf_in_folder_is_found(tmp_path, tiny_args, tiny_state):
    save_gguf(str(tmp_path / "a.gguf"), tiny_args, tiny_state)
    assert open_checkpoint(str(tmp_path)).path == str(tmp_path / "a.gguf")


@pytest.mark.parametrize("layout", ["native", "hf", "bare"])
def test_pickle_only_folders_are_refused(tmp_path, tiny_args, layout):
    if layout == "native":
        (tmp_path / "params.json").write_text(json.dumps(tiny_args.to_params_json()))
        weights = "consolidated.00.pth"
    elif layout == "hf":
        (tmp_path / "config.json").write_text(json.dumps(tiny_args.to_hf_config()))
        weights = "pytorch_model.bin"
    else:
        weights = "model.pt"
    (tmp_path / weights).write_bytes(b"\x80\x02 not unpickled")
    message = error_of(tmp_path)
    assert str(tmp_path) in message and weights in message and "only safetensors and GGUF" in message


# --- config files ------------------------------------------------------------------------------------

@pytest.mark.parametrize("config_name", ["params.json", "config.json"])
def test_invalid_json(tmp_path, config_name):
    (tmp_path / config_name).write_text("{not json")
    message = error_of(tmp_path)
    assert str(tmp_path / config_name) in message and "not valid JSON" in message


def test_params_json_missing_key(tmp_path, tiny_args, tiny_state):
    save_native(tmp_path, tiny_args, tiny_state)
    params = tiny_args.to_params_json()
    del params["hidden_dim"]
    (tmp_path / "params.json").write_text(json.dumps(params))
    message = error_of(tmp_path)
    assert str(tmp_path / "params.json") in message and "missing key 'hidden_dim'" in message


def test_config_json_missing_key(tmp_path, tiny_args, tiny_state):
    save_hf(tmp_path, tiny_args, tiny_state)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["num_attention_heads"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    message = error_of(tmp_path)
    assert str(tmp_path / "config.json") in message and "missing key 'num_attention_heads'" in message


def test_unknown_hf_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    message = error_of(tmp_path)
    assert str(tmp_path / "config.json") in message and "unsupported architecture" in message and "GPT2" in message


def test_unknown_gguf_architecture(tmp_path, tiny_args):
    path = tmp_path / "gemma.gguf"
    write_raw_gguf(path, "gemma", llama_meta(tiny_args, "gemma"),
                   {"token_embd.weight": np.zeros((128, 64), np.float32)})
    message = error_of(path)
    assert str(path) in message and "unsupported architecture 'gemma'" in message


# --- safetensors files -------------------------------------------------------------------------------

def test_native_safetensors_missing(tmp_path, tiny_args):
    (tmp_path / "params.json").write_text(json.dumps(tiny_args.to_params_json()))
    message = error_of(tmp_path)
    assert str(tmp_path) in message and "no consolidated.safetensors" in message


def test_hf_safetensors_missing(tmp_path, tiny_args):
    (tmp_path / "config.json").write_text(json.dumps(tiny_args.to_hf_config()))
    message = error_of(tmp_path)
    assert str(tmp_path) in message and "no model.safetensors" in message


@pytest.mark.parametrize("fmt", ["native", "hf"])
def test_truncated_safetensors(tmp_path, tiny_args, tiny_state, fmt):
    if fmt == "native":
        save_native(tmp_path, tiny_args, tiny_state)
        file = tmp_path / "consolidated.safetensors"
    else:
        save_hf(tmp_path, tiny_args, tiny_state)
        file = tmp_path / "model.safetensors"
    cut_in_half(file)
    message = error_of(tmp_path)
    assert str(file) in message and "truncated" in message


def test_corrupt_safetensors_header(tmp_path, tiny_args, tiny_state):
    save_native(tmp_path, tiny_args, tiny_state)
    file = tmp_path / "consolidated.safetensors"
    data = bytearray(file.read_bytes())
    data[8:20] = b"#garbage####"
    file.write_bytes(bytes(data))
    message = error_of(tmp_path)
    assert str(file) in message and "corrupt" in message


def test_index_names_missing_shard(tmp_path, tiny_args, tiny_state):
    save_hf(tmp_path, tiny_args, tiny_state, max_shard_bytes=30_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    os.remove(tmp_path / shard)
    message = error_of(tmp_path)
    assert str(tmp_path / "model.safetensors.index.json") in message and shard in message and "missing" in message


def test_native_shard_missing(tmp_path, tiny_args, tiny_state):
    (tmp_path / "params.json").write_text(json.dumps(tiny_args.to_params_json()))
    save_file(dict(tiny_state), tmp_path / "consolidated-00001-of-00002.safetensors")
    message = error_of(tmp_path)
    assert "consolidated-00002-of-00002.safetensors" in message and "missing" in message


# --- tensors against the config ----------------------------------------------------------------------

def test_shape_inconsistent_with_config(tmp_path, tiny_args, tiny_state):
    save_native(tmp_path, tiny_args, tiny_state)
    params = tiny_args.to_params_json() | {"hidden_dim": 96}
    (tmp_path / "params.json").write_text(json.dumps(params))
    message = error_of(tmp_path)
    assert str(tmp_path / "consolidated.safetensors") in message
    assert "feed_forward.w" in message and ("[128, 64]" in message or "[64, 128]" in message)
    assert "expected" in message and "96" in message


def test_vocab_size_mismatch(tmp_path, tiny_args, tiny_state):
    save_hf(tmp_path, tiny_args, tiny_state)
    config = json.loads((tmp_path / "config.json").read_text()) | {"vocab_size": 200}
    (tmp_path / "config.json").write_text(json.dumps(config))
    message = error_of(tmp_path)
    assert str(tmp_path / "model.safetensors") in message and "vocab size" in message
    assert "200" in message and "128" in message


def test_missing_tensor(tmp_path, tiny_args, tiny_state):
    state = dict(tiny_state)
    save_native(tmp_path, tiny_args, state)
    del state["layers.1.ffn_norm.weight"]
    save_file(state, tmp_path / "consolidated.safetensors")
    message = error_of(tmp_path)
    assert str(tmp_path) in message and "missing tensor layers.1.ffn_norm.weight" in message


def test_missing_tensor_named_as_stored(tmp_path, tiny_args, tiny_state):
    save_hf(tmp_path, tiny_args, tiny_state)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    message = error_of(tmp_path)
    assert str(tmp_path) in message and "missing tensor lm_head.weight" in message


def test_unexpected_tensor(tmp_path, tiny_args, tiny_state):
    save_native(tmp_path, tiny_args, dict(tiny_state))
    state = dict(tiny_state) | {"layers.2.attention.wq.weight": torch.zeros(64, 64)}
    save_file(state, tmp_path / "consolidated.safetensors")
    message = error_of(tmp_path)
    assert str(tmp_path / "consolidated.safetensors") in message
    assert "unexpected tensor layers.2.attention.wq.weight" in message


def test_non_float_safetensors_dtype(tmp_path, tiny_args, tiny_state):
    save_native(tmp_path, tiny_args, tiny_state)
    state = dict(tiny_state) | {"norm.weight": torch.ones(64, dtype=torch.int32)}
    save_file(state, tmp_path / "consolidated.safetensors")
    message = error_of(tmp_path)
    assert "norm.weight" in message and "unsupported dtype I32" in message


# --- GGUF --------------------------------------------------------------------------------------------

def test_truncated_gguf(tmp_path, tiny_args, tiny_state):
    path = tmp_path / "m.gguf"
    save_gguf(str(path), tiny_args, tiny_state, qtype="Q8_0")
    cut_in_half(path)
    message = error_of(path)
    assert str(path) in message and "truncated" in message


def test_gguf_cut_inside_header(tmp_path, tiny_args, tiny_state):
    path = tmp_path / "m.gguf"
    save_gguf(str(path), tiny_args, tiny_state)
    path.write_bytes(path.read_bytes()[:300])
    message = error_of(path)
    assert str(path) in message and "truncated" in message


def test_not_a_gguf(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"NOPE" + bytes(100))
    message = error_of(path)
    assert str(path) in message and "GGUF" in message


def test_unsupported_gguf_tensor_type(tmp_path, tiny_args, tiny_state):
    path = tmp_path / "f64.gguf"
    arrays = {}
    for name, tensor in tiny_state.items():
        from mistral7b.loading.layout import from_native_name

        arrays[from_native_name(name, "gguf")] = tensor.numpy()
    arrays["blk.0.ffn_norm.weight"] = arrays["blk.0.ffn_norm.weight"].astype(np.float64)
    write_raw_gguf(path, "llama", llama_meta(tiny_args), arrays)
    message = error_of(path)
    assert str(path) in message and "blk.0.ffn_norm.weight" in message and "unsupported GGUF type F64" in message


def test_gguf_shape_and_missing_tensor(tmp_path, tiny_args, tiny_state):
    from mistral7b.loading.layout import from_native_name

    arrays = {from_native_name(n, "gguf"): t.numpy() for n, t in tiny_state.items()}
    wrong = dict(arrays) | {"blk.1.attn_k.weight": np.zeros((64, 64), np.float32)}
    write_raw_gguf(tmp_path / "shape.gguf", "llama", llama_meta(tiny_args), wrong)
    message = error_of(tmp_path / "shape.gguf")
    assert str(tmp_path / "shape.gguf") in message and "blk.1.attn_k.weight" in message
    assert "[64, 64]" in message and "expected [32, 64]" in message

    missing = {k: v for k, v in arrays.items() if k != "blk.1.ffn_up.weight"}
    write_raw_gguf(tmp_path / "missing.gguf", "llama", llama_meta(tiny_args), missing)
    message = error_of(tmp_path / "missing.gguf")
    assert str(tmp_path / "missing.gguf") in message and "missing tensor blk.1.ffn_up.weight" in message
