"""Perplexity of a text file in rolling windows, with the throughput it was measured at.

The file is tokenized once (no BOS inside: BOS is the prefix of the first window) and cut into windows
that each read at most `max_length` tokens and predict every token exactly once (`rolling_windows`).
With the default stride = max_length the windows are disjoint, as lm-eval's `loglikelihood_rolling`
does; a smaller stride gives each window more context. Windows are scored by the engine (`LLM.score_pairs`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from tqdm import tqdm

from mistral7b.engine.llm import LLM
from mistral7b.errors import RequestError
from mistral7b.engine.scoring import rolling_windows


@dataclass
class PerplexityResult:
    tokens: int  # tokens predicted (the whole file)
    bytes: int  # UTF-8 bytes of the file
    windows: int
    nll: float  # total negative log-likelihood, nats
    seconds: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / self.bytes / math.log(2)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise RequestError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise RequestError(f"{path}: is a directory, not a text file") from None
    except UnicodeDecodeError as e:
        raise RequestError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise RequestError(f"{path}: cannot read ({e.strerror})") from None


def perplexity(llm: LLM, text: str, max_length: int | None = None, stride: int | None = None,
               progress: bool = True) -> PerplexityResult:
    if llm.tokenizer is None:
        raise RequestError(f"{llm.model_path} has no tokenizer, so it cannot read text")
    max_length = max_length or llm.max_model_len
    if max_length < 1 or max_length > llm.max_model_len:
        raise RequestError(f"max_length must be in [1, {llm.max_model_len}], got {max_length}")
    tokens = llm.tokenizer.encode(text, add_bos=False)
    if not tokens:
        raise RequestError("the text is empty: there is nothing to score")
    prefix = llm.tokenizer.bos_id if llm.tokenizer.bos_id is not None else min(llm.tokenizer.eos_ids)
    windows = rolling_windows(tokens, prefix, max_length, stride)
    bar = tqdm(total=len(windows), desc="perplexity", unit="window", disable=not progress)
    start = time.perf_counter()
    scores = llm.score_pairs(windows, max_len=max_length, progress=bar.update)
    seconds = time.perf_counter() - start
    bar.close()
    return PerplexityResult(tokens=len(tokens), bytes=len(text.encode("utf-8")), windows=len(windows),
                            nll=-sum(s.logprob for s in scores), seconds=seconds)
