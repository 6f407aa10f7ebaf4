"""Write with our writers, read with open_checkpoint: same config, same tensors (within quantization error)."""

import dataclasses
import inspect
import itertools

import pytest
import torch

from mistral7b.loading import open_checkpoint, save_gguf, save_hf, save_native
from mistral7b.loading.layout import expected_shapes, permute_from_hf, permute_to_hf


def test_permutation_inverse_and_identity_for_one_pair():
    w = torch.randn(4 * 16, 8)
    assert torch.equal(permute_from_hf(permute_to_hf(w, 4), 4), w)
    assert not torch.equal(permute_to_hf(w, 4), w)
    two = torch.randn(2, 8)  # head_dim 2: nothing to permute
    assert torch.equal(permute_to_hf(two, 1), two)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_round_trip(tmp_path, tiny_args, make_state, loaded, dtype):
    state = make_state(tiny_args, dtype=dtype)
    save_native(tmp_path, tiny_args, state)
    ckpt = open_checkpoint(str(tmp_path))
    assert ckpt.format == "native" and ckpt.metadata == {}
    assert ckpt.args == tiny_args
    assert sorted(ckpt.tensor_names()) == sorted(state)
    assert inspect.isgenerator(ckpt.tensors())
    got = loaded(ckpt)
    for name, tensor in state.items():
        assert got[name].dtype == dtype
        assert torch.equal(got[name], tensor), name


def test_native_params_json_has_explicit_rope_theta(tmp_path, tiny_args, tiny_state):
    import json

    save_native(tmp_path, tiny_args, tiny_state)
    params = json.loads((tmp_path / "params.json").read_text())
    assert params["rope_theta"] == tiny_args.rope_theta
    assert params["sliding_window"] == 8


@pytest.mark.parametrize("shard", [None, 20_000])
def test_hf_round_trip(tmp_path, tiny_args, tiny_state, loaded, shard):
    save_hf(tmp_path, tiny_args, tiny_state, max_shard_bytes=shard)
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard is not None)
    ckpt = open_checkpoint(str(tmp_path))
    assert ckpt.format == "hf"
    assert dataclasses.replace(ckpt.args, max_seq_len=None) == tiny_args
    got = loaded(ckpt)
    assert got.keys() == tiny_state.keys()
    for name, tensor in tiny_state.items():
        assert torch.equal(got[name], tensor), name


def test_tied_round_trips(tmp_path, tied_args, make_state, loaded):
    state = make_state(tied_args)
    assert "output.weight" not in state
    save_native(tmp_path / "n", tied_args, state)
    save_hf(tmp_path / "h", tied_args, state)
    save_gguf(str(tmp_path / "g.gguf"), tied_args, state)
    for path in ("n", "h", "g.gguf"):
        ckpt = open_checkpoint(str(tmp_path / path))
        assert ckpt.args.tied_embeddings, path
        assert "output.weight" not in ckpt.tensor_names(), path
        assert loaded(ckpt).keys() == state.keys()


# Relative Frobenius error bounds for weights ~ N(0, 1/dim): 8-bit blocks ~0.5%, 4-bit blocks ~9%.
BOUNDS = {"F32": 0.0, "F16": 1e-3, "BF16": 5e-3, "Q8_0": 0.01, "Q4_0": 0.12, "Q4_1": 0.12}
MATRIX_DTYPE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@pytest.mark.parametrize("qtype", list(BOUNDS))
def test_gguf_round_trip(tmp_path, tiny_args, tiny_state, loaded, rel, qtype):
    path = str(tmp_path / f"tiny-{qtype}.gguf")
    save_gguf(path, tiny_args, tiny_state, qtype=qtype)
    ckpt = open_checkpoint(path)
    assert ckpt.format == "gguf" and ckpt.path == path
    assert ckpt.metadata["general.architecture"] == "llama"
    assert ckpt.metadata["llama.attention.sliding_window"] == 8
    args = dataclasses.replace(ckpt.args, norm_eps=tiny_args.norm_eps, max_seq_len=None)
    assert args == tiny_args
    assert ckpt.args.norm_eps == pytest.approx(tiny_args.norm_eps)
    got = loaded(ckpt)
    assert got.keys() == tiny_state.keys()
    for name, tensor in tiny_state.items():
        assert got[name].shape == tensor.shape, name
        if tensor.ndim == 1:  # norms stay F32
            assert got[name].dtype == torch.float32 and torch.equal(got[name], tensor), name
        else:
            assert got[name].dtype == MATRIX_DTYPE.get(qtype, torch.float32), name
            assert rel(got[name], tensor) <= BOUNDS[qtype], (name, rel(got[name], tensor))
    if qtype.startswith("Q"):  # quantization really happened
        assert max(rel(got[n], t) for n, t in tiny_state.items() if t.ndim == 2) > 0


def test_gguf_rows_not_multiple_of_block_fall_back_to_f16(tmp_path, make_state, loaded, rel):
    from mistral7b.config import ModelArgs

    args = ModelArgs(dim=64, n_layers=1, head_dim=16, hidden_dim=48, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                     vocab_size=32)
    state = make_state(args)
    path = str(tmp_path / "odd.gguf")
    save_gguf(path, args, state, qtype="Q4_0")
    got = loaded(path)
    assert got["layers.0.feed_forward.w2.weight"].dtype == torch.float16  # rows of 48: not whole 32-blocks
    assert rel(got["layers.0.feed_forward.w1.weight"], state["layers.0.feed_forward.w1.weight"]) > 1e-3


def test_sliding_window_override(tmp_path, tiny_args, tiny_state):
    path = str(tmp_path / "m.gguf")
    save_gguf(path, dataclasses.replace(tiny_args, sliding_window=None), tiny_state)
    assert open_checkpoint(path).args.sliding_window is None
    assert open_checkpoint(path, sliding_window=4096).args.sliding_window == 4096
    save_hf(tmp_path / "hf", tiny_args, tiny_state)
    assert open_checkpoint(str(tmp_path / "hf")).args.sliding_window == 8
    assert open_checkpoint(str(tmp_path / "hf"), sliding_window=None).args.sliding_window is None


def test_gguf_tokenizer_metadata_round_trip(tmp_path, tiny_args, tiny_state):
    path = str(tmp_path / "m.gguf")
    tokens = [f"t{i}" for i in range(tiny_args.vocab_size)]
    save_gguf(path, tiny_args, tiny_state, tokenizer_metadata={
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * len(tokens), "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.add_bos_token": True,
    })
    meta = open_checkpoint(path).metadata
    assert meta["tokenizer.ggml.tokens"] == tokens
    assert meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.add_bos_token"] is True


def test_hf_inv_freq_buffers_are_ignored(tmp_path, tiny_args, tiny_state, loaded):
    from safetensors.torch import load_file, save_file

    save_hf(tmp_path, tiny_args, tiny_state)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, tmp_path / "model.safetensors")
    assert loaded(str(tmp_path)).keys() == tiny_state.keys()


def test_native_consolidated_shards(tmp_path, tiny_args, tiny_state, loaded):
    import json

    from safetensors.torch import save_file

    names = list(tiny_state)
    save_file({n: tiny_state[n] for n in names[:10]}, tmp_path / "consolidated-00001-of-00002.safetensors")
    save_file({n: tiny_state[n] for n in names[10:]}, tmp_path / "consolidated-00002-of-00002.safetensors")
    (tmp_path / "params.json").write_text(json.dumps(tiny_args.to_params_json()))
    got = loaded(str(tmp_path))
    assert all(torch.equal(got[n], tiny_state[n]) for n in names)


def test_tensors_streams_one_at_a_time(tmp_path, tiny_args, tiny_state):
    save_native(tmp_path, tiny_args, tiny_state)
    stream = open_checkpoint(str(tmp_path)).tensors()
    (name, tensor), = itertools.islice(stream, 1)
    assert name in expected_shapes(tiny_args) and tensor.shape == tiny_state[name].shape
