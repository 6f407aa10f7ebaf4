"""Streaming text with stop strings: nothing of a stop string is ever shown, nothing else is lost."""

from __future__ import annotations

from mistral7b.engine.detokenizer import IncrementalDetokenizer

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
