"""lm-evaluation-harness model `mistral7b`: lm-eval's three request types served by our engine.

- `loglikelihood`: lm-eval's `TemplateLM` splits (context, continuation) into ids; `LLM.score_pairs` scores
  them as engine requests, each distinct context pre-filled once through the prefix cache.
- `loglikelihood_rolling`: a document's tokens in windows of `max_length` (lm-eval's rule, BOS as prefix),
  scored with the same function; every token is predicted exactly once.
- `generate_until`: `LLM.generate` in batches of equal settings, `until` as stop strings.

Importing this module registers the name with lm-eval's registry. lm-eval 0.4.x has no entry-point hook
for external models, so `python -m mistral7b.eval ...` / `mistral7b eval lm-eval ...` import it and then run
lm-eval's own command line; from Python, `import mistral7b.eval.lm_eval_model` before `simple_evaluate`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

# lm-eval fills its model registry only while it is empty: load its own models before ours is added, or
# `local-completions` and the rest would be unknown once this module is imported.
import lm_eval.models  # noqa: F401
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from mistral7b.engine.llm import LLM
from mistral7b.engine.sampling_params import MAX_STOP_STRINGS, SamplingParams
from mistral7b.errors import RequestError
from mistral7b.engine.scoring import rolling_windows

DEFAULT_GEN_TOKENS = 256
log = logging.getLogger(__name__)


def pick_device(device: str | None) -> str:
    """lm-eval sends device='cuda' unless told otherwise: like its HF model, fall back to the CPU then."""
    if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
        if device is not None:
            log.warning("device %s is not available: running on the CPU", device)
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _int_arg(name: str, value: Any, default: int) -> int:
    if value is None or value == "auto" or (isinstance(value, str) and value.startswith("auto")):
        return default
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise RequestError(f"{name} must be a positive integer, got {value!r}") from None
    if n < 1:
        raise RequestError(f"{name} must be a positive integer, got {value!r}")
    return n


@register_model("mistral7b")
class Mistral7BLM(TemplateLM):
    """`--model mistral7b --model_args model=PATH,dtype=bfloat16,device=cuda,max_length=4096,chunk_size=512`.

    Also: `quantize` (auto|none|int8|int4, as `LLM`), `sliding_window` (an integer or none), `max_gen_toks`.
    """

    def __init__(
        self,
        model: str | LLM | None = None,
        pretrained: str | None = None,  # lm-eval's usual name for the checkpoint
        dtype: str = "auto",
        device: str | None = None,
        batch_size: int | str | None = None,
        max_batch_size: int | str | None = None,
        max_length: int | None = None,
        chunk_size: int | None = None,
        sliding_window: int | str | None = "keep",
        max_gen_toks: int = DEFAULT_GEN_TOKENS,
        quantize: str | None = "auto",
        **unused: Any,
    ) -> None:
        super().__init__()
        if isinstance(model, LLM):
            self.llm = model
        else:
            window = None if isinstance(sliding_window, str) and sliding_window.lower() == "none" else sliding_window
            self.llm = LLM(model or pretrained, dtype=dtype, device=pick_device(device), chunk_size=chunk_size,
                           sliding_window=window, max_model_len=max_length, progress=False,
                           quantize=None if quantize in (None, "none") else quantize)
        if self.llm.tokenizer is None:
            raise RequestError(f"{self.llm.model_path} has no tokenizer: lm-eval sends text")
        self.tokenizer = self.llm.tokenizer
        self.batch_size = _int_arg("batch_size", batch_size, self.llm.max_batch_size)
        self.max_length = self.llm.max_model_len
        self.max_gen_toks = int(max_gen_toks)
        self._chats: dict[str, list[int]] = {}  # rendered chat text -> its exact ids (special tokens included)

    # ---- what TemplateLM needs ---------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return min(self.tokenizer.eos_ids)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.llm.model_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        if string in self._chats and add_special_tokens is not False:
            return list(self._chats[string])
        add_bos = self.tokenizer.add_bos if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(string, add_bos=add_bos)

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context in self._chats:  # a chat prompt: its ids are exact, the answer is plain text after it
            return list(self._chats[context]), self.tokenizer.encode(continuation, add_bos=False)
        return super()._encode_pair(context, continuation)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat's text; its exact ids (with special tokens, which text cannot carry) are kept by text."""
        ids = self.tokenizer.encode_chat(chat_history, add_generation_prompt=add_generation_prompt)
        text = self.tokenizer.decode(ids)
        self._chats[text] = ids
        return text

    # ---- the three request types --------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        bar = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm)
        scores = self.llm.score_pairs([(ctx, cont) for _, ctx, cont in requests], max_len=self.max_length,
                                      progress=bar.update)
        bar.close()
        out = [(s.logprob, s.greedy) for s in scores]
        for (key, _, _), res in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        pairs, owner = [], []
        for n, req in enumerate(requests):
            (string,) = req.args
            for ctx, cont in rolling_windows(self.tok_encode(string, add_special_tokens=False),
                                             self.prefix_token_id, self.max_length):
                pairs.append((ctx, cont))
                owner.append(n)
        bar = tqdm(total=len(pairs), desc="loglikelihood_rolling", disable=disable_tqdm)
        scores = self.llm.score_pairs(pairs, max_len=self.max_length, progress=bar.update)
        bar.close()
        totals = [0.0] * len(requests)
        for n, s in zip(owner, scores):
            totals[n] += s.logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _sampling(self, gen_kwargs: dict) -> tuple[SamplingParams, list[str]]:
        kw = dict(gen_kwargs)
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        eot = self.tok_decode([self.eot_token_id])
        if eot and eot not in until:
            until.append(eot)
        max_tokens = int(kw.pop("max_gen_toks", kw.pop("max_new_tokens", self.max_gen_toks)))
        do_sample = bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 0.0))
        if not do_sample:
            temperature = 0.0
        elif temperature == 0.0:
            temperature = 1.0
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                top_p=float(kw.pop("top_p", 1.0) or 1.0), top_k=int(kw.pop("top_k", 0) or 0),
                                seed=kw.pop("seed", None), stop=[s for s in until if s][:MAX_STOP_STRINGS])
        return params, until

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        prompts, settings = [], []
        for req in requests:
            context, gen_kwargs = req.args
            params, until = self._sampling(gen_kwargs)
            ids = self.tok_encode(context)
            room = self.max_length - params.max_tokens
            if room < 1:
                raise RequestError(f"max_gen_toks={params.max_tokens} leaves no room in the context of "
                                   f"{self.max_length}")
            prompts.append(ids[-room:])
            settings.append((params, until))
        # Longest prompts first: equal lengths share batches, and running out of memory happens early.
        order = sorted(range(len(requests)), key=lambda i: -len(prompts[i]))
        results: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for lo in range(0, len(order), self.batch_size):
            part = order[lo : lo + self.batch_size]
            outs = self.llm.generate([prompts[i] for i in part], [settings[i][0] for i in part])
            for i, out in zip(part, outs):
                text = out.outputs[0].text
                for stop in settings[i][1]:  # stop strings past the first 16 are cut here
                    if stop:
                        text = text.split(stop)[0]
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
            bar.update(len(part))
        bar.close()
        return results
