"""Weight-only int8/int4 layers, GGUF Q4 blocks used packed, fusion, and the quality guard on SmolLM2."""

from __future__ import annotations

import dataclasses
import math

import gguf
import pytest
import torch
import torch.nn.functional as F

from mistral7b.loading import open_checkpoint, save_gguf
from mistral7b.loading.gguf_blocks import read_blocks
from mistral7b.model.build import build_model
from mistral7b.model.fuse import fuse_projections
from mistral7b.model.quantize import (INT4_DENSE_MIN_ROWS, INT8_DENSE_MIN_ROWS, Int4Linear, Int8Linear, pack_int4,
                                      unpack_int4)
from bench.heldout import heldout_text
from tests.conftest import hf_model, rel_err, smollm2_path, tiny_args


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_run_exactly_in_the_quantized_layers(kind):
    """Oracle: gguf's own dequantization of the same bytes. The layers hold the file's weights exactly (their
    dequantized floats are gguf-py's), and multiply them within the int16 rounding of the activations."""
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)).numpy()
    qtype = gguf.GGMLQuantizationType[kind]
    raw = gguf.quants.quantize(w, qtype)
    reference = torch.from_numpy(gguf.quants.dequantize(raw, qtype).copy())
    blocks = read_blocks(raw, kind, 64, 128)
    assert torch.equal(blocks.dequantize(), reference)
    if kind == "Q8_0":
        layer = Int8Linear(blocks.values, blocks.scales)
    else:
        layer = Int4Linear(blocks.values, blocks.scales, blocks.zeros, 32, torch.float32)
    assert torch.equal(layer.dequantize(), reference)
    x = torch.randn(5, 128)
    assert rel_err(layer(x), F.linear(x, reference)) < 1e-4
    x = torch.randn(INT4_DENSE_MIN_ROWS, 128)  # the dense path: the reference's own arithmetic
    assert torch.equal(layer(x), F.linear(x, reference))


def test_int4_layout_is_ours():
    """pack_int4's layout (the CPU kernels read it as 16-bit words): per block of 32, word j holds weights j,
    j + 8, j + 16, j + 24 from its lowest nibble up; unpack_int4 inverts it."""
    q = torch.randint(0, 16, (3, 64), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (3, 32) and packed.dtype == torch.uint8
    words = packed.view(3, 2, 8, 2).to(torch.int32)
    words = words[..., 0] | words[..., 1] << 8
    for block in range(2):
        for j in range(8):
            for i in range(4):
                assert ((words[:, block, j] >> (4 * i)) & 15 == q[:, 32 * block + 8 * i + j]).all()
    assert torch.equal(unpack_int4(packed), q)


def test_int8_and_int4_from_float_approximate_the_matmul():
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, 7, 256)
    exact = F.linear(x, w)
    int8, int4 = Int8Linear.from_float(w), Int4Linear.from_float(w, 32, torch.float32)
    assert int8(x).shape == exact.shape == int4(x).shape
    assert rel_err(int8(x), exact) < 0.02
    assert rel_err(int4(x), exact) < 0.15
    assert rel_err(int8(x), F.linear(x, int8.dequantize())) < 1e-4
    assert rel_err(int4(x), F.linear(x, int4.dequantize())) < 1e-4


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_packed_and_dense_paths_agree(cls):
    """Few rows run the packed kernel, many rows dequantize and run a dense matmul: the same numbers, on every
    CPU capability (tests/cpu/test_capabilities.py runs this file under each). The dense path reading weights in
    another layout than they were stored in (PyTorch's int4 packing depends on the capability) fails here."""
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(2))
    layer = cls.from_float(w) if cls is Int8Linear else cls.from_float(w, 32, torch.float32)
    threshold = INT8_DENSE_MIN_ROWS if cls is Int8Linear else INT4_DENSE_MIN_ROWS
    x = torch.randn(threshold + 5, 256, generator=torch.Generator().manual_seed(3))
    dense = layer(x)  # one call over many rows: the dense path
    packed = torch.cat([layer(x[i : i + 4]) for i in range(0, len(x), 4)])  # 4 rows at a time: packed
    assert rel_err(packed, dense) < 1e-4
    assert torch.equal(dense, F.linear(x, layer.dequantize()))
    assert rel_err(dense, F.linear(x, w)) < (0.02 if cls is Int8Linear else 0.15)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    args = tiny_args(window=6, n_heads=4, n_kv_heads=2, vocab=96)
    hf = hf_model(args, seed=3)
    hf.save_pretrained(root / "hf")
    state = dict(open_checkpoint(str(root / "hf")).tensors())
    for q in ("Q4_0", "Q4_1", "Q8_0"):
        save_gguf(root / f"{q}.gguf", args, state, qtype=q)
    return root


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_auto_mode_follows_the_gguf_file(tiny_files, kind):
    """The file's blocks used as stored: a pre-fill's many rows (the dense path) give the dequantized float32
    model's logits bit for bit; a few rows (the packed kernels, activations rounded to int16 per block) within
    5e-4 of the largest logit (1-2e-4 seen: ~1.5e-5 a matmul, 14 of them)."""
    ckpt = open_checkpoint(str(tiny_files / f"{kind}.gguf"))
    reference = build_model(ckpt, torch.float32, progress=False)  # dequantized to float
    packed = build_model(ckpt, torch.float32, progress=False, quantize="auto")
    layer_type = Int4Linear if kind.startswith("Q4") else Int8Linear
    assert isinstance(packed.layers[0].attention.wq, layer_type)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        tokens = torch.randint(0, 96, (2, 30), generator=g)  # 60 rows: dense
        pos = torch.arange(30).expand(2, 30)
        assert torch.equal(packed(tokens, pos), reference(tokens, pos))
        tokens, pos = tokens[:, :20], pos[:, :20]  # 40 rows: packed
        assert rel_err(packed(tokens, pos), reference(tokens, pos)) < 5e-4


@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_fused_projections_give_the_same_logits(tmp_path, mode):
    args = dataclasses.replace(tiny_args(window=6, n_heads=4, n_kv_heads=4, vocab=96), hidden_dim=128)
    hf_model(args, seed=4).save_pretrained(tmp_path)  # every projection a whole number of 64-row int4 tiles
    ckpt = open_checkpoint(str(tmp_path))
    model = build_model(ckpt, torch.float32, progress=False, quantize=mode)
    tokens = torch.randint(0, 96, (1, 15), generator=torch.Generator().manual_seed(5))
    pos = torch.arange(15)[None]
    with torch.no_grad():
        before = model(tokens, pos)
        fuse_projections(model)
        after = model(tokens, pos)
    assert model.layers[0].attention.wqkv is not None and not hasattr(model.layers[0].attention, "wq")
    assert rel_err(after, before) < 1e-5


def perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logp = model(ids, torch.arange(ids.shape[1])[None])[0, :-1].log_softmax(-1)
    return math.exp(-float(logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]].mean()))


def test_quantized_perplexity_stays_close_to_float():
    """The quality guard of every quantized mode on the embedded model (numbers in bench/README.md)."""
    from mistral7b.engine.llm import checkpoint_tokenizer

    ckpt = open_checkpoint(smollm2_path())
    ids = torch.tensor([checkpoint_tokenizer(ckpt).encode(heldout_text(), add_bos=False)[:512]])
    reference = perplexity(build_model(ckpt, torch.float32, progress=False), ids)
    assert 2 < reference < 60
    for mode, limit in (("auto", 1.03), ("int8", 1.03), ("int4", 1.25)):
        ppl = perplexity(fuse_projections(build_model(ckpt, torch.float32, progress=False, quantize=mode)), ids)
        assert ppl / reference < limit, (mode, ppl, reference)
