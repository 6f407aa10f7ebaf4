"""Oracle: Hugging Face transformers reads what we write, and we read what it writes, tensor for tensor."""

from __future__ import annotations

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaForCausalLM, MistralConfig, MistralForCausalLM  # noqa: E402

from mistral7b.loading import open_checkpoint, save_hf  # noqa: E402
from mistral7b.loading.layout import from_native_name  # noqa: E402


def hf_model(tied: bool = False) -> MistralForCausalLM:
    torch.manual_seed(0)
    config = MistralConfig(hidden_size=64, num_hidden_layers=2, head_dim=16, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=128, vocab_size=128, sliding_window=8,
                           rms_norm_eps=1e-5, rope_theta=1e4, tie_word_embeddings=tied)
    model = MistralForCausalLM(config)
    with torch.no_grad():  # norms are initialised to ones: make them distinguishable
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def expected_hf(name: str, tensor: torch.Tensor, args, permute) -> torch.Tensor:
    if name.endswith("attention.wq.weight"):
        return permute(tensor, args.n_heads)
    if name.endswith("attention.wk.weight"):
        return permute(tensor, args.n_kv_heads)
    return tensor


@pytest.mark.parametrize("shard", [None, "20KB"])
@pytest.mark.parametrize("tied", [False, True])
def test_open_checkpoint_reads_save_pretrained(tmp_path, permute, shard, tied):
    model = hf_model(tied)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path, **kwargs)
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard)
    ckpt = open_checkpoint(str(tmp_path))
    args = ckpt.args
    assert (args.dim, args.n_layers, args.head_dim, args.hidden_dim) == (64, 2, 16, 128)
    assert (args.n_heads, args.n_kv_heads, args.vocab_size, args.sliding_window) == (4, 2, 128, 8)
    assert args.tied_embeddings == tied and args.rope_theta == 1e4
    hf_state = model.state_dict()
    names = set()
    for name, tensor in ckpt.tensors():
        names.add(name)
        assert torch.equal(expected_hf(name, tensor, args, permute), hf_state[from_native_name(name, "hf")]), name
    assert ("output.weight" in names) == (not tied)
    assert len(names) == 2 * 9 + 2 + (0 if tied else 1)


def _rope_interleaved(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta / Mistral reference RoPE: rotate pairs (2i, 2i+1) as complex numbers. x: [seq, heads, head_dim]."""
    hd = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    angles = torch.polar(torch.ones(len(pos), hd // 2), pos[:, None].float() * freqs)
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], hd // 2, 2))
    return torch.view_as_real(xc * angles[:, None, :]).flatten(-2)


def test_rotary_layouts_agree_on_attention_scores(tmp_path):
    """Functional oracle for the q/k permutation: native rows + interleaved RoPE give the same attention
    scores as HF rows + transformers' own rotate_half RoPE."""
    from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding, apply_rotary_pos_emb

    model = hf_model()
    model.save_pretrained(tmp_path)
    ckpt = open_checkpoint(str(tmp_path))
    native = dict(ckpt.tensors())
    args = ckpt.args
    attn = model.model.layers[1].self_attn
    x = torch.randn(5, args.dim)
    pos = torch.arange(3, 8)

    qn = (x @ native["layers.1.attention.wq.weight"].T).view(5, args.n_heads, args.head_dim)
    kn = (x @ native["layers.1.attention.wk.weight"].T).view(5, args.n_kv_heads, args.head_dim)
    qn, kn = _rope_interleaved(qn, pos, args.rope_theta), _rope_interleaved(kn, pos, args.rope_theta)

    with torch.no_grad():
        qh = attn.q_proj(x).view(1, 5, args.n_heads, args.head_dim).transpose(1, 2)
        kh = attn.k_proj(x).view(1, 5, args.n_kv_heads, args.head_dim).transpose(1, 2)
        cos, sin = MistralRotaryEmbedding(model.config)(qh, pos[None])
        qh, kh = apply_rotary_pos_emb(qh, kh, cos, sin)
    group = args.n_heads // args.n_kv_heads
    scores_native = torch.einsum("qhd,khd->hqk", qn, kn.repeat_interleave(group, dim=1))
    scores_hf = torch.einsum("hqd,hkd->hqk", qh[0], kh[0].repeat_interleave(group, dim=0))
    torch.testing.assert_close(scores_native, scores_hf, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("window", [8, None])
def test_transformers_loads_save_hf(tmp_path, tiny_args, make_state, permute, tied, window):
    args = dataclasses.replace(tiny_args, tied_embeddings=tied, sliding_window=window)
    state = make_state(args, seed=1)
    save_hf(tmp_path, args, state, max_shard_bytes=30_000)
    cls = MistralForCausalLM if window else LlamaForCausalLM  # a Llama is a Mistral without a window
    model, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert type(model) is cls
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.tie_word_embeddings == tied
    assert getattr(model.config, "sliding_window", None) == window
    hf_state = model.state_dict()
    for name, tensor in state.items():
        assert torch.equal(hf_state[from_native_name(name, "hf")], expected_hf(name, tensor, args, permute)), name
    lm_head = hf_state["lm_head.weight"]
    assert torch.equal(lm_head, state["tok_embeddings.weight" if tied else "output.weight"])
