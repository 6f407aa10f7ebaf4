"""Incremental detokenization with stop strings, so streamed text never shows a partial stop string.

The text of a sequence is `decode(all its generated ids)` (byte-fallback and byte-level tokens only make sense
together; a SentencePiece decode drops the first piece's leading space), but decoding all of them at every
token costs O(n) a token: at 256 streams the server's engine thread spent a third of its time there
(bench/README.md). So each step decodes only a window: the last few ids whose text is already known (the
context) and the new ones; the new text is what the window's decode adds after the context's. The window
restarts a few tokens back once it grows, at a place where the text was complete. A tokenizer whose text of
earlier ids changes with later ones (Hugging Face's clean-up of spaces before punctuation, say) shows as a
window that no longer starts with its context: that step decodes everything, as before.

A trailing U+FFFD means an unfinished UTF-8 sequence: it is held back (and the ids behind it stay in the window)
until a later token completes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

WINDOW = 16  # ids a window may hold before it restarts
CONTEXT = 4  # ids of known text a restarted window keeps before the new ones


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str]):
        self._decode = decode
        self._stop = list(stop)
        # per stop string: its proper-prefix lengths n by the character s[n - 1] they end with, longest first, so
        # a step checks only the prefixes that can end the text
        self._prefix_ends = [_prefix_ends(s) for s in self._stop]
        self.text = ""
        self.emitted = 0
        self.stopped = False
        self._reset()

    def _reset(self) -> None:
        """An empty window at the first id."""
        self._start = 0  # the window: ids[_start:]
        self._read = 0  # ids[:_read] have complete text, `_done`
        self._done = ""
        self._context = ""  # decode(ids[_start:_read])
        self._marks: list[int] = [0]  # recent values of _read: where a window may restart

    def add(self, token_ids: Sequence[int], check_stop: bool = True) -> str:
        """Update with all generated ids so far; return the newly safe text. Sets `stopped` on a stop string.
        With check_stop False (before min_tokens), stop strings are neither looked for nor held back."""
        text = self._text_of(token_ids)
        for s in self._stop if check_stop else ():
            at = text.find(s, max(0, self.emitted - len(s)))
            if at != -1:
                text = text[:at]
                self.stopped = True
        self.text = text
        end = len(text) if self.stopped or not check_stop else len(text) - self._held_back(text)
        end = max(end, self.emitted)
        delta = text[self.emitted : end]
        self.emitted = end
        return delta

    def flush(self) -> str:
        """At the end of generation: whatever was held back for a possible stop string."""
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta

    def _text_of(self, ids: Sequence[int]) -> str:
        """decode(ids) without its trailing unfinished UTF-8, from a decode of the window alone."""
        if len(ids) < self._read:  # not a continuation of what came before: start over
            self._reset()
        window = self._decode(ids[self._start :])
        if window.startswith(self._context):
            new = window[len(self._context) :]
        else:  # earlier text changed with later ids: decode everything once, restart the window at 0
            self._reset()
            window = new = self._decode(ids)
        complete = new.rstrip("\ufffd")
        text = self._done + complete
        if len(complete) == len(new):  # nothing unfinished: every id so far has its text
            self._done, self._read, self._context = text, len(ids), window
            self._marks.append(self._read)
            if self._read - self._start > WINDOW:
                self._restart(ids)
        return text

    def _restart(self, ids: Sequence[int]) -> None:
        """Move the window's start to the latest mark at least CONTEXT ids back."""
        start = max((m for m in self._marks if m <= self._read - CONTEXT), default=self._start)
        if start > self._start:
            self._start = start
            self._context = self._decode(ids[start : self._read])
        self._marks = [m for m in self._marks if m >= self._start]

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of text that starts some stop string."""
        longest = 0
        if not text:
            return 0
        last = text[-1]
        for s, ends in zip(self._stop, self._prefix_ends):
            for n in ends.get(last, ()):
                if n <= longest:
                    break
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest


def _prefix_ends(stop: str) -> dict[str, list[int]]:
    ends: dict[str, list[int]] = {}
    for n in range(len(stop) - 1, 0, -1):
        ends.setdefault(stop[n - 1], []).append(n)
    return ends
