"""Incremental detokenization with stop strings, so streamed text never shows a partial stop string.

Text is re-decoded from all generated ids (byte-fallback and byte-level tokens only make sense together);
a trailing U+FFFD means an unfinished UTF-8 sequence and is held back until the next token completes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str]):
        self._decode = decode
        self._stop = list(stop)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, token_ids: Sequence[int], check_stop: bool = True) -> str:
        """Update with all generated ids so far; return the newly safe text. Sets `stopped` on a stop string.
        With check_stop False (before min_tokens), stop strings are neither looked for nor held back."""
        text = self._decode(token_ids)
        if text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
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

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of text that starts some stop string."""
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if s.startswith(text[-n:]):
                    longest = n
                    break
        return longest
