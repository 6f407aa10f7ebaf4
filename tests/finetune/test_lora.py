"""LoRA against Hugging Face PEFT: our adapter files load in PEFT onto the HF model of the same checkpoint and
give our logits; the engine (`LLM(lora=...)`) and `mistral7b merge` give them too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mistral7b.finetune import lora
from mistral7b.finetune.lora import apply_lora, save_adapter
from mistral7b.loading.lora_adapter import merge_adapter, read_adapter
from tests.conftest import load_ours, rel_err, tiny_args

peft = pytest.importorskip("peft")


def _trained_adapter(folder: str, targets: list[str], out: str, rank: int = 4, alpha: float = 8.0):
    """Our model with random (non-zero) LoRA matrices, saved in PEFT format; returns the model."""
    model = load_ours(folder)
    apply_lora(model, rank, alpha, targets)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_A.copy_(0.3 * torch.randn(m.lora_A.shape, generator=g))
            m.lora_B.copy_(0.3 * torch.randn(m.lora_B.shape, generator=g))
    save_adapter(model, out, base_model=folder)
    return model.eval()


@pytest.mark.parametrize("targets, heads", [(list(lora.TARGETS), (4, 2)), (["wq", "wk"], (4, 1))])
def test_peft_loads_our_adapter_and_gives_our_logits(hf_checkpoint, tmp_path, targets, heads):
    args = tiny_args(window=6, n_heads=heads[0], n_kv_heads=heads[1])
    hf, folder = hf_checkpoint(args)
    ours = _trained_adapter(folder, targets, str(tmp_path / "adapter"))
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    tokens = torch.randint(0, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(24)[None].expand(2, -1)
    with torch.no_grad():
        want = peft_model(tokens).logits
        got = ours(tokens, positions)
        base = load_ours(folder)(tokens, positions)
    assert rel_err(base, want) > 1e-2  # the adapter changes the model a lot...
    assert rel_err(got, want) < 1e-4  # ...and PEFT agrees with us on how
    merged = load_ours(folder)
    merge_adapter(merged, str(tmp_path / "adapter"))
    with torch.no_grad():
        assert rel_err(merged(tokens, positions), want) < 1e-4


def test_engine_lora_and_merge_command_match_peft(hf_checkpoint, tmp_path):
    from mistral7b.engine.llm import LLM

    args = tiny_args(window=6)
    hf, folder = hf_checkpoint(args)
    _trained_adapter(folder, ["wq", "wv", "w2"], str(tmp_path / "adapter"))
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    prompt = [3, 17, 99, 4, 56, 23, 8, 71, 12, 5]
    with torch.no_grad():
        want = peft_model(torch.tensor([prompt])).logits[0, -1].argmax().item()
    llm = LLM(folder, lora=str(tmp_path / "adapter"), progress=False, dtype="float32")
    from mistral7b.engine.sampling_params import SamplingParams

    first = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))[0].outputs[0].token_ids[0]
    assert first == want
    p = subprocess.run([sys.executable, "-m", "mistral7b", "merge", "--model", folder, "--lora",
                        str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"), "--quiet"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    merged_hf = type(hf).from_pretrained(str(tmp_path / "merged")).eval()  # transformers reads our merge
    tokens = torch.tensor([prompt])
    with torch.no_grad():
        assert rel_err(merged_hf(tokens).logits, peft_model(tokens).logits) < 1e-4


def test_bad_adapter_is_one_line_error(hf_checkpoint, tmp_path):
    args = tiny_args(window=6)
    _, folder = hf_checkpoint(args)
    _trained_adapter(folder, ["wq"], str(tmp_path / "adapter"))
    other = tiny_args(window=6, n_layers=1)  # an adapter for 2 layers does not fit a 1-layer model
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"r": 4}))  # no lora_alpha
    shutil.copyfile(tmp_path / "adapter" / "adapter_model.safetensors", bad / "adapter_model.safetensors")
    for path, message in ((str(tmp_path / "nothing"), "not a LoRA adapter folder"),
                          (str(bad), "not a valid adapter config")):
        p = subprocess.run([sys.executable, "-m", "mistral7b", "generate", "--model", folder, "--lora", path,
                            "--prompt-ids", "1,2", "--quiet"], capture_output=True, text=True, timeout=120)
        assert p.returncode == 1 and p.stderr.strip().count("\n") == 0 and message in p.stderr, p.stderr
    from mistral7b.errors import CheckpointError

    with pytest.raises(CheckpointError, match="unexpected tensor"):
        read_adapter(str(tmp_path / "adapter"), other)
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")
