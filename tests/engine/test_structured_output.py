"""Structured outputs (engine/structured_output.py) through the LLM on random-weight models with real
tokenizers: a random model cannot produce schema-valid JSON, a regex match or one of the choices by chance,
so every valid answer proves the constraint. Checked against `jsonschema` and `re`, greedy and sampled, n > 1,
for SentencePiece (Mistral v3), tekken and the embedded model's byte-level BPE."""

from __future__ import annotations

import json
import os
import re

import jsonschema
import pytest
import torch

from mistral7b.config import ModelArgs
from mistral7b.engine.sampling_params import SamplingParams
from mistral7b.engine.structured_output import Grammars, StructuredOutput, unpack_bitmask
from mistral7b.errors import RequestError

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "score": {"type": "number", "minimum": -1, "maximum": 1},
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}


def mistral_data(name: str) -> str:
    import mistral_common

    return os.path.join(os.path.dirname(mistral_common.__file__), "data", name)


NAMES = {"mistral_instruct_tokenizer_240323.model.v3": "tokenizer.model.v3", "tekken_240911.json": "tekken.json",
         "tokenizer.model.v1": "tokenizer.model.v1"}


def llm_for(folder, tokenizer_file: str, vocab: int, seed: int = 0):
    """The LLM over a native checkpoint of random weights with one of mistral-common's tokenizers beside it."""
    import shutil

    from mistral7b.engine.llm import LLM
    from mistral7b.loading.writers import save_native
    from tests.loading.conftest import random_state

    args = ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                     vocab_size=vocab, sliding_window=None, max_seq_len=1024)
    save_native(str(folder), args, random_state(args, seed=seed))
    shutil.copy(mistral_data(tokenizer_file), os.path.join(folder, NAMES[tokenizer_file]))
    return LLM(str(folder), progress=False, max_model_len=1024)


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    return llm_for(tmp_path_factory.mktemp("v3"), "mistral_instruct_tokenizer_240323.model.v3", 32768)


def texts(llm, prompt, params):
    (out,) = llm.generate([prompt], params)
    return [c.text for c in out.outputs], [c.finish_reason for c in out.outputs]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_answers_validate(v3, temperature):
    params = SamplingParams(max_tokens=400, temperature=temperature, seed=3, n=3,
                            structured=StructuredOutput.json_schema(SCHEMA))
    answers, reasons = texts(v3, "Describe a person as JSON.", params)
    for text, reason in zip(answers, reasons):
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)


def test_unconstrained_random_model_does_not_produce_json(v3):
    answers, _ = texts(v3, "Describe a person as JSON.", SamplingParams(max_tokens=60, temperature=0.0))
    with pytest.raises(ValueError):
        json.loads(answers[0])


@pytest.mark.parametrize("kind,spec,check", [
    ("regex", r"[0-9]{3}-[a-z]{2,4}", lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
    ("choice", ("positive", "negative", "neutral"), lambda t: t in ("positive", "negative", "neutral")),
    ("grammar", 'start: "yes" | "no" | "maybe " NUM\nNUM: /[0-9]+/',
     lambda t: re.fullmatch(r"yes|no|maybe [0-9]+", t)),
])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_regex_choice_object_and_grammar(v3, kind, spec, check, temperature):
    params = SamplingParams(max_tokens=120, temperature=temperature, seed=5, n=2,
                            structured=StructuredOutput(kind, spec))
    answers, reasons = texts(v3, "Answer:", params)
    for text, reason in zip(answers, reasons):
        assert check(text), (kind, text)
        assert reason == "stop"


def test_json_object(v3):
    """Any JSON object: keys and strings are unbounded, so a random model may run to max_tokens ("length", an
    open object); an answer that stops is one object."""
    params = SamplingParams(max_tokens=200, temperature=0.0, n=2, seed=1, structured=StructuredOutput("json_object"))
    answers, reasons = texts(v3, "JSON:", params)
    for text, reason in zip(answers, reasons):
        assert text.lstrip().startswith("{")
        if reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            assert reason == "length"


def test_max_tokens_before_the_grammar_completes_is_length(v3):
    params = SamplingParams(max_tokens=5, temperature=0.0, structured=StructuredOutput.json_schema(SCHEMA))
    (text,), (reason,) = texts(v3, "JSON:", params)
    assert reason == "length"
    with pytest.raises(ValueError):
        json.loads(text)  # incomplete, and not claimed complete


def test_constrained_and_free_requests_share_a_batch(v3):
    """A constrained sequence beside free ones: its answer validates, theirs equal their answers alone."""
    free = SamplingParams(max_tokens=20, temperature=0.0)
    alone = v3.generate(["One", "Two"], free)
    mixed = v3.generate(["One", "JSON:", "Two"], [free, SamplingParams(
        max_tokens=300, temperature=0.0, structured=StructuredOutput.json_schema(SCHEMA)), free])
    assert [o.outputs[0].token_ids for o in (mixed[0], mixed[2])] == [o.outputs[0].token_ids for o in alone]
    jsonschema.validate(json.loads(mixed[1].outputs[0].text), SCHEMA)


@pytest.mark.parametrize("tokenizer_file,vocab", [("tekken_240911.json", 131072), ("tokenizer.model.v1", 32000)])
def test_other_mistral_tokenizers(tmp_path, tokenizer_file, vocab):
    llm = llm_for(tmp_path, tokenizer_file, vocab, seed=2)
    params = SamplingParams(max_tokens=300, temperature=0.7, seed=1, structured=StructuredOutput.json_schema(SCHEMA))
    (text,), (reason,) = texts(llm, "JSON:", params)
    assert reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


def test_embedded_model_byte_level_bpe():
    from tests.conftest import smollm2_path

    path = smollm2_path()
    if path is None:
        pytest.skip("the embedded model is not installed")
    from mistral7b.engine.llm import LLM

    llm = LLM(path, max_model_len=1024)
    params = SamplingParams(max_tokens=200, temperature=0.0, structured=StructuredOutput.json_schema(SCHEMA))
    (out,) = llm.chat([[{"role": "user", "content": "Give me a person as JSON."}]], params)
    jsonschema.validate(json.loads(out.outputs[0].text), SCHEMA)


def test_bad_constraints_are_request_errors(v3):
    grammars = v3.engine.grammars
    for output, match in ((StructuredOutput("regex", "([a-"), "regex"),
                          (StructuredOutput.json_schema({"type": "frobnicate"}), "json"),
                          (StructuredOutput("grammar", "start: undefined_rule"), "grammar"),
                          (StructuredOutput("choice", ()), "choice"),
                          (StructuredOutput("yaml", "x"), "kind")):
        with pytest.raises(RequestError, match=match):
            grammars.check(output)
    with pytest.raises(RequestError, match="not valid JSON"):
        StructuredOutput.json_schema("{not json")
    with pytest.raises(RequestError, match="structured"):
        SamplingParams(structured={"type": "json"})


def test_bitmask_allows_exactly_what_the_grammar_allows(v3):
    """The packed mask against llguidance's own per-token check, for every id of the vocabulary."""
    grammars: Grammars = v3.engine.grammars
    matcher = grammars.matcher(StructuredOutput("choice", ("alpha", "beta")))
    allowed = unpack_bitmask(grammars.bitmask([None, matcher]), grammars.vocab_size)
    assert allowed[0].all()
    ids = allowed[1].nonzero()[:, 0].tolist()
    assert 0 < len(ids) < 200
    for i in range(grammars.vocab_size):
        assert (matcher.validate_tokens([i]) == 1) == (i in ids)
    assert torch.equal(unpack_bitmask(grammars.bitmask([matcher]), grammars.vocab_size)[0], allowed[1])


def test_a_typical_schema_compiles_fast_and_once(v3):
    import time

    grammars: Grammars = v3.engine.grammars
    grammars.lltokenizer()
    schema = {"type": "object", "properties": {f"field{i}": {"type": ["string", "integer", "boolean"][i % 3]}
                                               for i in range(10)}, "required": [f"field{i}" for i in range(10)]}
    output = StructuredOutput.json_schema(schema)
    start = time.perf_counter()
    grammars.matcher(output)
    first = time.perf_counter() - start
    start = time.perf_counter()
    grammars.matcher(output)
    again = time.perf_counter() - start
    assert grammars._compiled.cache_info().hits >= 1
    assert first < 0.5 and again < first + 0.05  # the bench records the numbers; this guards against a regression


def test_warm_builds_the_vocabulary_in_the_background():
    from mistral7b.tokenizer.mistral import MistralCommonTokenizer

    grammars = Grammars(MistralCommonTokenizer(mistral_data("tokenizer.model.v1")), 32000)
    thread = grammars.warm()
    thread.join(timeout=60)
    assert grammars._lltokenizer is not None and grammars._lltokenizer.vocab_size == 32000
    assert Grammars(None, 10).warm() is None
    with pytest.raises(RequestError, match="no tokenizer"):
        Grammars(None, 10).check(StructuredOutput("regex", "a"))


def test_preempted_constrained_sequences_keep_their_grammar(v3):
    """A KV cache too small for the batch: constrained sequences are preempted and recomputed, their matchers
    keep their place, and every answer equals its answer alone (and validates where it completed)."""
    from mistral7b.engine.llm_engine import EngineConfig, LLMEngine

    schema = {"type": "object", "properties": {"word": {"type": "string", "maxLength": 30},
                                               "n": {"type": "integer"}}, "required": ["word", "n"],
              "additionalProperties": False}
    params = SamplingParams(max_tokens=60, temperature=0.0, structured=StructuredOutput.json_schema(schema))
    prompts = [v3.tokenizer.encode(f"Item {i}: give a word and a number as JSON.") for i in range(6)]
    engine = LLMEngine(v3.model, v3.tokenizer, EngineConfig(max_model_len=128, chunk_size=16, block_size=4,
                                                            num_blocks=24, enable_prefix_caching=False))
    for i, p in enumerate(prompts):
        engine.add_request(i, p, params)
    tokens = {i: [] for i in range(6)}
    while engine.has_unfinished():
        for e in engine.step():
            if e.token_id is not None:
                tokens[e.request_id].append(e.token_id)
    assert engine.scheduler.num_preemptions > 0
    for i, p in enumerate(prompts):
        (alone,) = v3.generate({"prompt_token_ids": p}, params)
        assert tokens[i] == alone.outputs[0].token_ids
        if alone.outputs[0].finish_reason == "stop":  # else "length": a random model may pad to max_tokens
            jsonschema.validate(json.loads(alone.outputs[0].text), schema)


def test_async_scheduling_draws_constrained_rows_after_their_grammar_has_the_last_token(v3):
    """With async scheduling a step is launched before the last one's tokens are read; constrained rows are
    drawn once their grammars took those tokens (the masks are filled while the step runs): the tokens equal
    the synchronous engine's, free rows beside them included."""
    from mistral7b.engine.llm_engine import EngineConfig, LLMEngine

    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "y"]}},
              "required": ["a", "b"], "additionalProperties": False}
    constrained = SamplingParams(max_tokens=40, temperature=0.8, seed=4,
                                 structured=StructuredOutput.json_schema(schema))
    free = SamplingParams(max_tokens=25, temperature=0.0)
    prompts = [v3.tokenizer.encode(t) for t in ("One", "Two, as JSON", "Three", "Four, as JSON")]
    runs = {}
    for overlap in (False, True):
        engine = LLMEngine(v3.model, v3.tokenizer, EngineConfig(max_model_len=256, async_scheduling=overlap))
        for i, p in enumerate(prompts):
            engine.add_request(i, p, constrained if i % 2 else free)
        tokens = {i: [] for i in range(4)}
        overlapped = 0
        while engine.has_unfinished():
            overlapped += engine._pending is not None
            for e in engine.step():
                if e.token_id is not None:
                    tokens[e.request_id].append(e.token_id)
        runs[overlap] = tokens
        assert (overlapped > 0) == overlap
    assert runs[True] == runs[False]
