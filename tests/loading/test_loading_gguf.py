"""GGUF: transformers (which dequantizes and un-permutes q/k itself) reads what save_gguf writes, and the
real SmolLM2 GGUF that a package ships opens with the right config."""

from __future__ import annotations

import itertools

import pytest
import torch

from mistral7b.loading import save_gguf
from mistral7b.loading.layout import from_native_name


def _transformers_gguf_state(folder, filename) -> tuple[dict[str, torch.Tensor], object]:
    transformers = pytest.importorskip("transformers")
    try:
        import accelerate  # noqa: F401  (transformers' from_pretrained needs it for GGUF)
    except ImportError:  # the same dequantize + un-permute code path, without building through accelerate
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        path = str(folder / filename)
        config = dict(load_gguf_checkpoint(path)["config"])
        assert config.pop("model_type") == "llama"
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
        tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
        model.load_state_dict(tensors, strict=not model.config.tie_word_embeddings)
        return model.state_dict(), model.config
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=filename)
    return model.state_dict(), model.config


@pytest.mark.parametrize("qtype,bound", [("F32", 0.0), ("Q8_0", 0.01)])
@pytest.mark.parametrize("tied", [False, True])
def test_transformers_reads_save_gguf(tmp_path, tiny_args, make_state, permute, rel, qtype, bound, tied):
    import dataclasses

    args = dataclasses.replace(tiny_args, tied_embeddings=tied)
    state = make_state(args, seed=2)
    save_gguf(str(tmp_path / "tiny.gguf"), args, state, qtype=qtype)
    hf_state, config = _transformers_gguf_state(tmp_path, "tiny.gguf")
    assert (config.hidden_size, config.num_hidden_layers, config.head_dim) == (64, 2, 16)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (4, 2, 128)
    assert config.tie_word_embeddings == tied
    for name, tensor in state.items():
        if name.endswith("attention.wq.weight"):
            tensor = permute(tensor, args.n_heads)  # transformers turns GGUF's native rows into HF rows
        elif name.endswith("attention.wk.weight"):
            tensor = permute(tensor, args.n_kv_heads)
        got = hf_state[from_native_name(name, "hf")]
        assert got.shape == tensor.shape, name
        assert rel(got, tensor) <= bound, (name, rel(got, tensor))
    if tied:
        assert torch.equal(hf_state["lm_head.weight"], hf_state["model.embed_tokens.weight"])


def test_smollm2_gguf_opens(smollm):
    args = smollm.args
    assert smollm.format == "gguf"
    assert (args.n_layers, args.dim, args.n_heads, args.n_kv_heads, args.head_dim) == (30, 576, 9, 3, 64)
    assert args.vocab_size == 49152 and args.hidden_dim == 1536
    assert args.rope_theta == 1e5
    assert args.tied_embeddings and "output.weight" not in smollm.tensor_names()
    assert args.sliding_window is None
    assert len(smollm.tensor_names()) == 1 + 30 * 9 + 1
    tokens = smollm.metadata["tokenizer.ggml.tokens"]
    assert isinstance(tokens, list) and len(tokens) == 49152 and all(isinstance(t, str) for t in tokens[:10])
    assert smollm.metadata["tokenizer.ggml.model"] == "gpt2"


def test_smollm2_first_tensors_dequantize(smollm):
    shapes = {"tok_embeddings.weight": (49152, 576), "layers.0.feed_forward.w2.weight": (576, 1536),
              "layers.0.attention.wq.weight": (576, 576), "layers.0.attention.wk.weight": (192, 576)}
    for name, tensor in itertools.islice(smollm.tensors(), 10):
        assert tensor.dtype == torch.float32, name
        assert torch.isfinite(tensor).all(), name
        assert tensor.abs().sum() > 0, name
        if name in shapes:
            assert tuple(tensor.shape) == shapes[name]

