"""The CPU extension's decode attention and fused ops (mistral7b/cpu) against the PyTorch path
(attention/torch_paged.py: gathered blocks, bmm, softmax, bmm; model/forward_plans.py TorchOps: norms, rotary and
SwiGLU).

bfloat16 attention (AVX-512 builds) rounds where oneDNN's avx512_core_bf16 matmuls round: the same bits as the
PyTorch path wherever oneDNN runs those kernels. On CPUs with AMX oneDNN takes its AMX kernels for some shapes,
which round 1-2 elements a call one ulp differently: there the in-process tests allow that, and
tests/cpu/test_capabilities.py runs this file again with oneDNN held to AVX512_CORE_BF16, where every bit must
match. float32 attention sums in its own order: within float32 rounding of the PyTorch path and of float64
attention. The fused ops give ATen's bits in both dtypes on every build.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
import torch.nn.functional as F

from mistral7b import attention, cpu
from mistral7b.attention.torch_paged import TorchAttention
from mistral7b.cache.paged import Span
from mistral7b.config import ModelArgs
from mistral7b.model import forward_ops, forward_plans

pytestmark = pytest.mark.skipif(cpu.load(notice=False) is None, reason="CPU extension not built")
EXACT_BF16 = cpu.load(notice=False) is not None and cpu.load(notice=False).EXACT_BF16_ATTENTION


def onednn_bf16_is_avx512() -> bool:
    """Whether oneDNN's bf16 matmuls here are its avx512_core_bf16 kernels (no AMX on this CPU, or oneDNN held
    below it by ONEDNN_MAX_CPU_ISA)."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    return not torch.cpu._is_amx_tile_supported() or ("AMX" not in isa and isa != "ALL")


def assert_same_as_pytorch(out, ref):
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    elif onednn_bf16_is_avx512():
        assert torch.equal(out, ref)
    else:  # AMX kernels: float32 sums in another order, so a few elements one bf16 ulp away (a few more where
        # the sum cancels to a small value: within float32 rounding of the head's largest output)
        diff = (out.float() - ref.float()).abs()
        head_max = ref.float().abs().amax(-1, keepdim=True)
        bound = torch.maximum(ref.float().abs() * 2.0**-7, head_max * 2.0**-16)
        assert (diff <= bound).all() and (diff > 0).sum() <= max(2, ref.numel() // 1000)


needs_exact_bf16 = pytest.mark.skipif(not EXACT_BF16, reason="bf16 attention: AVX-512 builds only")
DTYPES = [pytest.param(torch.bfloat16, marks=needs_exact_bf16, id="bf16"), pytest.param(torch.float32, id="f32")]


def make_cache(n_heads, n_kv_heads, window, block_size, num_blocks=160, head_dim=64, seed=0, dtype=torch.bfloat16):
    args = ModelArgs(dim=n_heads * head_dim, n_layers=1, head_dim=head_dim, hidden_dim=32, n_heads=n_heads,
                     n_kv_heads=n_kv_heads, norm_eps=1e-5, vocab_size=8, sliding_window=window)
    backend = attention.build(args, num_blocks, block_size, dtype, "cpu")
    g = torch.Generator().manual_seed(seed)
    for pool in (backend.cache.k[0], backend.cache.v[0]):  # every slot written: unwritten ones must be masked
        pool.copy_((2 * torch.randn(pool.shape, generator=g)).to(dtype))
    backend.cache.zero_blocks([0])
    return backend


def decode_spans(cache, lengths, seed=0, keep_released=False):
    """One decode span per context length (keys after the step), its blocks scattered over the pool."""
    rng = random.Random(seed)
    free = list(range(1, cache.cache.num_blocks))
    rng.shuffle(free)
    spans, bs = [], cache.block_size
    for n in lengths:
        pos = n - 1
        table = [free.pop() for _ in range(pos // bs + 1)]
        first = 0 if keep_released or cache.window is None else max(0, pos - cache.window + 1) // bs
        spans.append(Span(start=pos, n=1, block_table=table, first_live_block=first))
    return spans


def both_paths(cache, spans, seed=1, q_scale=2.0):
    g = torch.Generator().manual_seed(seed)
    S, H, H_kv, D, dtype = len(spans), cache.n_heads, cache.n_kv_heads, cache.head_dim, cache.cache.dtype
    q = (q_scale * torch.randn(1, S, H, D, generator=g)).to(dtype)
    k = (2 * torch.randn(1, S, H_kv, D, generator=g)).to(dtype)
    v = torch.randn(1, S, H_kv, D, generator=g).to(dtype)
    native_meta = cache.build(spans, [])
    assert native_meta.groups[0].native is not None
    out = cache.attend(0, q, k, v, native_meta)
    reference = TorchAttention(cache.cache, cache.args)  # the same pool, read through gathers and matmuls
    return out, reference.attend(0, q, k, v, reference.build(spans, []))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [1, 2, 15, 16, 17, 31, 33, 100, 500, 640, 757])
@pytest.mark.parametrize("heads", [(9, 3), (4, 4), (8, 2)])  # GQA groups of 3, 1 and 4
def test_bit_for_bit_over_context_lengths(length, heads, dtype):
    cache = make_cache(*heads, window=None, block_size=16, dtype=dtype)
    out, ref = both_paths(cache, decode_spans(cache, [length]))
    assert_same_as_pytorch(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [31, 32, 33, 34, 63, 64, 65, 96, 97, 300])
@pytest.mark.parametrize("keep_released", [False, True])
def test_bit_for_bit_with_a_sliding_window(length, keep_released, dtype):
    # positions around multiples of W = 32; released blocks kept in the row must be masked by the window rule
    cache = make_cache(9, 3, window=32, block_size=16, dtype=dtype)
    out, ref = both_paths(cache, decode_spans(cache, [length], keep_released=keep_released))
    assert_same_as_pytorch(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("window", [None, 40])
def test_bit_for_bit_batch_of_mixed_lengths(block_size, window, dtype):
    cache = make_cache(9, 3, window=window, block_size=block_size, dtype=dtype)
    spans = decode_spans(cache, [1, 17, 300, 64, 129, 40])
    out, ref = both_paths(cache, spans)
    assert_same_as_pytorch(out, ref)


@pytest.mark.parametrize("dtype,atol", [pytest.param(torch.bfloat16, 0.02, marks=needs_exact_bf16, id="bf16"),
                                        pytest.param(torch.float32, 1e-5, id="f32")])
def test_matches_float64_attention(dtype, atol):
    # an oracle outside both paths: float64 attention over each row's window of keys, up to the dtype's roundings
    # (small queries: a spread-out softmax, where one key too many or too few moves outputs by ~0.1)
    cache = make_cache(9, 3, window=24, block_size=16, dtype=dtype)
    spans = decode_spans(cache, [5, 50, 77])
    out, _ = both_paths(cache, spans, q_scale=0.1)
    g = torch.Generator().manual_seed(1)
    q = (0.1 * torch.randn(1, 3, 9, 64, generator=g)).to(dtype)
    for row, span in enumerate(spans):
        pos = torch.arange(max(0, span.start - 23), span.start + 1)
        slots = torch.tensor(span.block_table)[pos // 16] * 16 + pos % 16
        k = cache.cache.k[0].view(3, -1, 64)[:, slots].double().repeat_interleave(3, 0)
        v = cache.cache.v[0].view(3, -1, 64)[:, slots].double().repeat_interleave(3, 0)
        p = torch.softmax((k @ q[0, row].double()[:, :, None])[..., 0] / 8, -1)
        ref = (p[:, None] @ v)[:, 0]
        torch.testing.assert_close(out[0, row].double(), ref, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rejects_what_it_cannot_read(dtype):
    cache = make_cache(9, 3, window=None, block_size=16, dtype=dtype)
    ops = cpu.load()
    q = torch.zeros(1, 9, 64, dtype=dtype)
    lens = torch.tensor([40], dtype=torch.int32)
    table = torch.tensor([[1, 2]], dtype=torch.int32)  # 40 keys need 3 blocks
    firsts = torch.zeros(1, dtype=torch.int32)
    if dtype == torch.bfloat16 and not EXACT_BF16:
        assert cache.name != "cpu_native"
        with pytest.raises(RuntimeError, match="bfloat16 on an AVX-512 build"):
            ops.decode_attention(q, cache.cache.k[0], cache.cache.v[0], table, firsts, lens - 20, 0, 0.125)
        return
    with pytest.raises(RuntimeError, match="bad lengths"):
        ops.decode_attention(q, cache.cache.k[0], cache.cache.v[0], table, firsts, lens, 0, 0.125)
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    with pytest.raises(RuntimeError, match="of q's dtype|bfloat16 on an AVX-512 build"):
        ops.decode_attention(q.to(other), cache.cache.k[0], cache.cache.v[0], table, firsts, lens - 20, 0, 0.125)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(8, 8), (32, 8), (24, 4)])
def test_bit_for_bit_with_head_dim_128(heads, dtype):
    cache = make_cache(*heads, window=None, block_size=16, head_dim=128, dtype=dtype)
    out, ref = both_paths(cache, decode_spans(cache, [7, 300]))
    assert_same_as_pytorch(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32])
@pytest.mark.parametrize("head_dim, heads", [(16, (4, 2)), (32, (6, 2)), (48, (6, 2)), (64, (18, 2))])
def test_float32_takes_any_head_dim_of_whole_vectors(head_dim, heads, dtype):
    cache = make_cache(*heads, window=20, block_size=16, head_dim=head_dim, dtype=dtype)
    assert cache.name == "cpu_native"
    out, ref = both_paths(cache, decode_spans(cache, [3, 30, 90]))
    assert_same_as_pytorch(out, ref)


@needs_exact_bf16
@pytest.mark.parametrize("head_dim, heads", [(32, (6, 2)), (48, (6, 2)), (64, (18, 2))])
def test_other_shapes_stay_on_the_pytorch_path(head_dim, heads):
    # oneDNN sums head_dim 32 with one query head a kv head in another order; only checked shapes use the op
    cache = make_cache(*heads, window=None, block_size=16, head_dim=head_dim)
    assert cache.name != "cpu_native"
    with pytest.raises(RuntimeError, match="head_dim a multiple of"):
        cpu.load().decode_attention(torch.zeros(1, heads[0], head_dim, dtype=torch.bfloat16), cache.cache.k[0],
                                    cache.cache.v[0],
                                    torch.ones(1, 1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                                    torch.ones(1, dtype=torch.int32), 0, 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_engine_greedy_tokens_with_and_without_the_extension(monkeypatch, dtype):
    """bf16: every token and log-probability the same (where oneDNN's bf16 kernels are avx512_core_bf16's);
    float32: every greedy token the same, log-probabilities within float32 rounding."""
    from tests.conftest import engine_generate, random_model
    from mistral7b.engine.sampling_params import SamplingParams

    args = ModelArgs(dim=192, n_layers=2, head_dim=64, hidden_dim=256, n_heads=6, n_kv_heads=2, norm_eps=1e-5,
                     vocab_size=128, sliding_window=24, max_seq_len=4096)
    model = random_model(args, seed=5).to(dtype)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (3, 30, 61)]
    params = [SamplingParams(max_tokens=n, temperature=0, logprobs=True) for n in (40, 25, 12)]
    outs = {}
    for kind in ("auto", "torch"):
        if kind == "torch":  # the extension's norms off too: the plain PyTorch model
            monkeypatch.setattr(forward_plans, "choose", lambda *a, **k: None)
        outs[kind], engine = engine_generate(model, prompts, params, attention=kind, block_size=8,
                                             enable_prefix_caching=False)
        assert (engine.attention.name == "cpu_native") == (kind == "auto")
        assert (model.plans is None) == (kind == "torch")
    if dtype == torch.bfloat16 and onednn_bf16_is_avx512():
        assert outs["auto"] == outs["torch"]
        return
    for i in outs["auto"]:
        (tokens, logprobs), = outs["auto"][i]
        (ref_tokens, ref_logprobs), = outs["torch"][i]
        assert tokens == ref_tokens
        tol = 1e-4 if dtype == torch.float32 else 0.05
        assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs)) < tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dim", [576, 64, 96, 4096, 17])
@pytest.mark.parametrize("rows", [1, 3, 500])
def test_add_rms_norm_bit_for_bit(dim, rows, dtype):
    """The residual add and F.rms_norm (ATen's composite: its own float32 sum of squares, then rsqrt and two
    products), on rows of several widths (vectorised sums with and without scalar tails)."""
    ops = cpu.load()
    g = torch.Generator().manual_seed(dim + rows)
    x = (torch.randn(1, rows, dim, generator=g) * 3).to(dtype)
    delta = torch.randn(1, rows, dim, generator=g).to(dtype)
    w = (1 + 0.3 * torch.randn(dim, generator=g)).to(dtype)
    h, y = ops.add_rms_norm(x, delta, w, 1e-5)
    assert torch.equal(h, x + delta) and torch.equal(y, F.rms_norm(x + delta, (dim,), w, 1e-5))
    same, y = ops.add_rms_norm(x, None, w, 1e-6)
    assert same is x and torch.equal(y, F.rms_norm(x, (dim,), w, 1e-6))
    with pytest.raises(RuntimeError, match="weight"):
        ops.add_rms_norm(x, None, w.double(), 1e-5)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.add_rms_norm(x.half(), None, w.half(), 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("head_dim,heads", [(64, (9, 3)), (128, (8, 2)), (16, (4, 4))])
def test_rotate_store_bit_for_bit(tokens, head_dim, heads, dtype):
    """RoPE of q and k as apply_rotary rounds it (complex64 products without fused multiply-adds, then the
    dtype), k and v stored in their slots, nothing else touched."""
    from mistral7b.model.rope import apply_rotary, inv_frequencies, rotary_freqs

    H, H_kv = heads
    g = torch.Generator().manual_seed(tokens + head_dim)
    qkv = (torch.randn(1, tokens, H + 2 * H_kv, head_dim, generator=g) * 3).to(dtype)
    positions = torch.randint(0, 70000, (1, tokens), generator=g)
    freqs = rotary_freqs(positions, inv_frequencies(head_dim, 1e5, "cpu"))
    want = apply_rotary(qkv[:, :, : H + H_kv], freqs)[0]
    k_pool = torch.zeros(H_kv, 40, 8, head_dim, dtype=dtype)
    v_pool = torch.zeros_like(k_pool)
    slots = torch.randperm(320, generator=g)[:tokens]
    q = cpu.load().rotate_store(qkv[0].contiguous(), torch.view_as_real(freqs).reshape(tokens, -1, 2), k_pool, v_pool,
                                slots, H)
    assert torch.equal(q, want[:, :H])
    flat_k, flat_v = k_pool.view(H_kv, -1, head_dim), v_pool.view(H_kv, -1, head_dim)
    assert torch.equal(flat_k[:, slots].transpose(0, 1), want[:, H:])
    assert torch.equal(flat_v[:, slots].transpose(0, 1), qkv[0, :, H + H_kv :])
    untouched = torch.ones(320, dtype=torch.bool)
    untouched[slots] = False
    assert flat_k[:, untouched].abs().sum() == 0 and flat_v[:, untouched].abs().sum() == 0
    with pytest.raises(RuntimeError, match="outside the pool"):
        cpu.load().rotate_store(qkv[0, :1].contiguous(), torch.view_as_real(freqs)[0, :1].reshape(1, -1, 2), k_pool,
                                v_pool, torch.tensor([320]), H)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fused", [False, True])
def test_model_forward_with_and_without_the_extension(fused, monkeypatch, dtype):
    """The model's own loop (no cache: scoring, evaluation) with the fused add + RMSNorm (and SwiGLU's product
    where w1 and w3 are fused) gives the plain loop's logits bit for bit; with autograd on the plain loop runs."""
    from mistral7b.model.fuse import fuse_projections
    from tests.conftest import random_model

    args = ModelArgs(dim=192, n_layers=3, head_dim=64, hidden_dim=100, n_heads=6, n_kv_heads=2, norm_eps=1e-5,
                     vocab_size=128, sliding_window=None, max_seq_len=4096)
    model = random_model(args, seed=2).to(dtype)
    if fused:
        fuse_projections(model)
    tokens = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(40).expand(2, 40)
    calls = []
    norm = forward_ops.CpuExtensionOps.add_rms_norm
    monkeypatch.setattr(forward_ops.CpuExtensionOps, "add_rms_norm", lambda *a: calls.append(1) or norm(*a))
    model.plans = forward_plans.choose(model)
    assert isinstance(model.plans.plain, forward_ops.CpuExtensionOps)
    with torch.inference_mode():
        with_ext = model(tokens, positions)
        assert len(calls) == 2 * args.n_layers + 1
        model.plans = None
        without = model(tokens, positions)
    assert torch.equal(with_ext, without)
    calls.clear()
    model.plans = forward_plans.choose(model)
    model(tokens, positions).sum().backward()
    assert not calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hidden", [1536, 100, 65, 24])
@pytest.mark.parametrize("rows", [1, 64])
def test_silu_mul_bit_for_bit(hidden, rows, dtype):
    """F.silu(gate) * up of the fused w13 output: ATen's vectorised exp over the first multiple of two vectors
    of a row, std::exp on its tail (hidden 100, 65 and 24), each rounded to the dtype where ATen rounds."""
    g = torch.Generator().manual_seed(hidden + rows)
    gate_up = (torch.randn(1, rows, 2 * hidden, generator=g) * 4).to(dtype)
    gate, up = gate_up.chunk(2, -1)
    assert torch.equal(cpu.load().silu_mul(gate_up), F.silu(gate) * up)
    with pytest.raises(RuntimeError):
        cpu.load().silu_mul(gate_up[..., 1:])
