"""The one batched sampler: every row of a step's logits turned into its next token on the model's device, as
tensors for the whole batch (per-row parameters), with no per-row host work and no read-back.

Each running sequence holds a slot in device tables (its SamplingParams, the ids it may not draw before
min_tokens, its logit bias, its token counts for the penalties): written once when it is admitted, so a step
uploads only its rows' slot indices. Per step, in order:

1. logit_bias added, ids banned before min_tokens set to -inf, penalties (CTRL repetition over prompt and
   output; OpenAI presence/frequency over the output) from the slot's counts; ids a row's grammar does not
   allow set to -inf (a packed bitmask the host fills: engine/structured_output.py);
2. greedy rows (temperature 0, or top-k 1): the argmax of the processed logits, the raw logits' exact argmax
   when nothing processed them;
3. sampled rows: logits / temperature, then by the row's kind (_draw): top-k rows among the batch's largest
   top-k candidates by one `topk` (no sort of the vocabulary); top-p rows without top-k on a CPU among the
   1,024 most likely tokens (a sort only for rows whose nucleus is wider), on a GPU over the sorted vocabulary
   (as vLLM without FlashInfer) or by a bisected threshold, by measurement; rows with neither over the whole
   vocabulary. The draw is the inverse
   of the kept probabilities' cumulative sum at u * total, with one uniform u a row: a seeded sequence's is a
   hash of its seed and the number of tokens it has drawn (`counter_uniforms`: the same tokens alone, in any
   batch, and after a preemption), computed for all seeded rows at once; the others' from the sampler's
   generator;
4. the slots' counts updated with the drawn tokens, on the device.

Log-probabilities reported to the user are those of the model's raw distribution (before penalties and
truncation), as vLLM reports them, so they are comparable across sampling settings.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from mistral7b import cpu, kernels
from mistral7b.engine.sampling_params import MAX_LOGIT_BIAS, SamplingParams
from mistral7b.engine.structured_output import unpack_bitmask

# the parameter table's columns
TEMPERATURE, TOP_K, TOP_P, MIN_P, REPETITION, PRESENCE, FREQUENCY, MIN_TOKENS = range(8)
NUM_PARAMS = 8
MAX_BANNED = 80  # EOS ids and stop_token_ids (at most 64) banned before min_tokens


@dataclass
class SamplerOutput:
    """A step's draws, on the device: tokens [B] int64; with logprobs, the raw log-probability of each token
    [B]; with top_logprobs, the k most likely raw ones [B, k] (ids and log-probabilities)."""

    tokens: torch.Tensor
    logprobs: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)  # splitmix64's constants, as the signed int64 PyTorch multiplies
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _shift_right(x: torch.Tensor, n: int) -> torch.Tensor:
    """x >> n as an unsigned 64-bit shift (PyTorch's >> on int64 copies the sign bit)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def counter_uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) (float32, 24 random bits as torch.rand's) from int64 seeds and draw counters, one per
    element: splitmix64's finalizer of seed * golden ratio + counter, a counter-based generator (as Philox is),
    so a seeded sequence's k-th draw depends on nothing but its seed and k. One batched computation for every
    seeded row of a step; a generator per sequence cost two launches a row (256 seeded rows: ~512 launches a
    step on a GPU)."""
    x = seeds * _GOLDEN + counters  # int64 arithmetic wraps modulo 2^64
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    x = x ^ _shift_right(x, 31)
    return _shift_right(x, 40).to(torch.float32) * 2.0**-24


class Sampler:
    def __init__(self, slots: int, vocab_size: int, device: torch.device | str, seed: int | None = None,
                 argmax_kernel: bool = True):
        """`slots`: sequences that can hold a slot at once (the engine's running batch at most).
        `argmax_kernel` (DecodeTuning.argmax_kernel): greedy picks by our kernels rather than torch.argmax."""
        self.vocab, self.device, self.argmax_kernel = vocab_size, torch.device(device), argmax_kernel
        self.params = torch.zeros(slots, NUM_PARAMS, device=self.device)
        self.generated = torch.zeros(slots, dtype=torch.long, device=self.device)  # output tokens so far
        self.seeds = torch.zeros(slots, dtype=torch.long, device=self.device)  # a seeded sequence's seed
        self.seeded = torch.zeros(slots, dtype=torch.bool, device=self.device)
        self.banned = torch.zeros(slots, MAX_BANNED, dtype=torch.long, device=self.device)
        self.banned_on = torch.zeros(slots, MAX_BANNED, dtype=torch.bool, device=self.device)
        self.bias_ids: torch.Tensor | None = None  # [slots, MAX_LOGIT_BIAS], made when a request first has one
        self.bias_values: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None  # [slots, vocab] int32 output counts (penalties)
        self.seen: torch.Tensor | None = None  # [slots, vocab] bool: in the prompt (repetition penalty)
        self.generator = torch.Generator(self.device)
        self.generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,))))
        self.free = list(range(slots - 1, -1, -1))
        self.owner: list[object | None] = [None] * slots
        # what the occupied slots ask for, so that a step skips what no row needs without looking at the rows
        self.top_ks: Counter[int] = Counter()
        self.uses: Counter[str] = Counter()

    # ---- slots --------------------------------------------------------------------------------------------
    def admit(self, owner: object, params: SamplingParams, prompt: list[int], output: list[int],
              banned: list[int], seed: int | None = None) -> int:
        """A slot for a sequence about to be sampled: its parameters, the ids banned before min_tokens, and for
        the penalties its prompt and output so far (a preempted sequence comes back with some). `seed`: the
        sequence's own (a request's n completions take seed, seed + 1, ...); default params.seed."""
        slot = self.free.pop()
        self.seeded[slot] = params.seed is not None
        if params.seed is not None:
            self.seeds[slot] = (params.seed if seed is None else seed) % 2**63
        self.owner[slot] = owner
        row = [params.temperature, params.top_k, params.top_p, params.min_p, params.repetition_penalty,
               params.presence_penalty, params.frequency_penalty, params.min_tokens]
        self.params[slot] = torch.tensor(row, dtype=torch.float32)
        self.generated[slot] = len(output)
        banned = [t for t in banned if 0 <= t < self.vocab][:MAX_BANNED]
        self.banned[slot] = 0
        self.banned_on[slot] = False
        if banned and params.min_tokens > len(output):
            self.banned[slot, : len(banned)] = torch.tensor(banned)
            self.banned_on[slot, : len(banned)] = True
        for name, used in self._needs(params):
            if used:
                self.uses[name] += 1
        if not params.greedy and params.top_k:
            self.top_ks[params.top_k] += 1
        if params.logit_bias and self.bias_ids is None:
            shape = (len(self.owner), MAX_LOGIT_BIAS)
            self.bias_ids = torch.zeros(shape, dtype=torch.long, device=self.device)
            self.bias_values = torch.zeros(shape, device=self.device)
        if self.bias_ids is not None:  # a reused slot keeps no bias of its last owner's (rows add 0 at id 0)
            self.bias_values[slot] = 0.0
            ids = [t for t in params.logit_bias if 0 <= t < self.vocab]
            if ids:
                self.bias_ids[slot] = 0
                self.bias_ids[slot, : len(ids)] = torch.tensor(ids)
                self.bias_values[slot, : len(ids)] = torch.tensor([params.logit_bias[t] for t in ids])
        if params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty:
            if self.counts is None:
                self.counts = torch.zeros(len(self.owner), self.vocab, dtype=torch.int32, device=self.device)
                self.seen = torch.zeros(len(self.owner), self.vocab, dtype=torch.bool, device=self.device)
            self.counts[slot] = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=self.vocab).to(
                device=self.device, dtype=torch.int32)
            self.seen[slot] = False
            if prompt:
                self.seen[slot, torch.tensor(prompt, dtype=torch.long, device=self.device)] = True
        return slot

    def release(self, slot: int, params: SamplingParams) -> None:
        self.owner[slot] = None
        self.free.append(slot)
        for name, used in self._needs(params):
            if used:
                self.uses[name] -= 1
        if not params.greedy and params.top_k:
            self.top_ks[params.top_k] -= 1
            if not self.top_ks[params.top_k]:
                del self.top_ks[params.top_k]

    @staticmethod
    def _needs(p: SamplingParams) -> list[tuple[str, bool]]:
        penalties = p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)
        sampled = not p.greedy
        return [("bias", bool(p.logit_bias)), ("ban", p.min_tokens > 0), ("penalty", penalties),
                ("seeded", sampled and p.seed is not None),
                ("sampled", sampled), ("plain", sampled and not p.top_k and p.top_p >= 1.0),
                ("top_p_only", sampled and not p.top_k and p.top_p < 1.0)]

    # ---- a step -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, slots: torch.Tensor, logprobs: bool = False, top_logprobs: int = 0,
               candidates: str = "auto", allowed: torch.Tensor | None = None) -> SamplerOutput:
        """Next tokens for logits [B, vocab] (float32, on the device) of the sequences in `slots` [B] (on the
        device). `candidates`: how top-k and
        top-p rows find their candidates: "topk" (top-k rows by one topk; top-p rows among the 1,024 most
        likely, sorting only rows whose nucleus is wider, which reads back), "threshold" (top-k rows by topk;
        top-p rows by the CPU extension's threshold over the whole vocabulary, no sort), "sort" (a full sort for
        both), or "auto": "threshold" on a CPU with the extension, else "topk" on a CPU and "sort" on a GPU
        (bench/README.md's sampler table). `allowed`: a packed bitmask [B, ceil(vocab / 32)] int32 of the ids
        each row may draw (a grammar's, engine/structured_output.py); the others' logits become -inf first."""
        p = self.params[slots]  # [B, NUM_PARAMS]
        x = self._process(logits, p, slots)
        if allowed is not None:
            native = _native_draws(x)
            if native is not None and hasattr(native, "masked_logits"):  # one pass: 67 -> ~3 ms for 256 rows
                x = native.masked_logits(x.contiguous(), allowed)
            else:
                x = x.masked_fill(~unpack_bitmask(allowed, x.shape[1]), float("-inf"))
        greedy = (p[:, TEMPERATURE] == 0) | (p[:, TOP_K] == 1)
        picks = _greedy(x, self.argmax_kernel)  # the raw logits' exact argmax where nothing processed them
        if self.uses["sampled"]:
            sampled = self._draw(x, p, slots, candidates)
            picks = torch.where(greedy, picks, sampled)
        self.generated[slots] += 1
        if self.uses["penalty"]:
            self.counts.index_put_((slots, picks), torch.ones_like(picks, dtype=torch.int32), accumulate=True)
        out = SamplerOutput(picks)
        if logprobs or top_logprobs:
            raw = logits.log_softmax(-1)
            if logprobs:
                out.logprobs = raw.gather(1, picks[:, None])[:, 0]
            if top_logprobs == 1:  # a row's maximum: topk(1) sorts candidates (5x slower on a CPU)
                out.top_logprobs, out.top_ids = raw.max(-1, keepdim=True)
            elif top_logprobs:
                out.top_logprobs, out.top_ids = raw.topk(min(top_logprobs, self.vocab), dim=-1)
        return out

    def penalized(self, logits: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The logits after step 1 (bias, bans, penalties), before any draw: what greedy rows take the argmax of."""
        return self._process(logits, self.params[slots], slots)

    def _process(self, logits: torch.Tensor, p: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        x = logits
        if self.uses["bias"]:
            x = x.scatter_add(1, self.bias_ids[slots], self.bias_values[slots])
        if self.uses["ban"]:
            on = self.banned_on[slots] & (self.generated[slots] < p[:, MIN_TOKENS].long())[:, None]
            x = x.scatter_add(1, self.banned[slots], torch.where(on, float("-inf"), 0.0))
        if self.uses["penalty"]:
            x = self._penalize(x, p, slots)
        return x

    def _penalize(self, x: torch.Tensor, p: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        native = _native_draws(x)
        if native is not None and hasattr(native, "penalize"):  # one pass, no [B, vocab] gathers: same bits
            return native.penalize(x.contiguous(), self.counts, self.seen, slots, p[:, REPETITION].contiguous(),
                                   p[:, PRESENCE].contiguous(), p[:, FREQUENCY].contiguous())
        counts = self.counts[slots]  # [B, vocab]
        present = counts > 0
        penalty = p[:, REPETITION, None]
        repeated = present | self.seen[slots]
        x = torch.where(repeated, torch.where(x > 0, x / penalty, x * penalty), x)
        return x - p[:, PRESENCE, None] * present.to(x.dtype) - p[:, FREQUENCY, None] * counts.to(x.dtype)

    def _uniforms(self, slots: torch.Tensor) -> torch.Tensor:
        """One uniform a row: a seeded sequence's from its seed and its draws so far, the others' from the
        sampler's generator."""
        u = torch.rand(slots.shape[0], generator=self.generator, device=self.device)
        if self.uses["seeded"]:
            u = torch.where(self.seeded[slots], counter_uniforms(self.seeds[slots], self.generated[slots]), u)
        return u

    def _draw(self, x: torch.Tensor, p: torch.Tensor, slots: torch.Tensor, candidates: str) -> torch.Tensor:
        """Draws for every row (the greedy rows' are dropped by the caller), each row by its kind: with top-k,
        among the batch's largest top-k candidates (top-p and min-p renormalised over its top-k, as Hugging
        Face's warpers apply them after top-k); with top-p and no top-k, over the whole sorted vocabulary; with
        neither, over the whole vocabulary (min-p relative to its most likely token). A path runs only where an
        occupied slot needs it, so no step reads anything back."""
        B, V = x.shape
        temperature = torch.where(p[:, TEMPERATURE] > 0, p[:, TEMPERATURE], 1.0)
        scaled = x / temperature[:, None]
        u = self._uniforms(slots)
        top_k, top_p = p[:, TOP_K].long(), p[:, TOP_P]
        picks = None
        native = _native_draws(scaled)
        method = _top_p_method(candidates, scaled) if self.uses["top_p_only"] else None
        probs = None  # the softmax, once for the paths below that take it
        if self.uses["plain"] or method == "threshold":
            probs = scaled.softmax(-1)
            if native is not None:  # a broken row (NaN logits) must not stop the batch
                probs = probs.nan_to_num_(0.0)
        if self.uses["plain"]:  # neither top-k nor top-p
            if native is not None:  # min-p as a limit per row, drawn without a cumulative sum
                picks = _or_argmax(native.draw_above(probs, p[:, MIN_P] * probs.amax(-1), u), scaled)
            else:
                picks = _inverse_cdf(_min_p(probs, p[:, MIN_P]), u)
        k_max = max(self.top_ks, default=0)
        if k_max:  # rows with top-k
            if candidates == "sort" or k_max >= V:
                values, ids = scaled.sort(dim=-1, descending=True)
                values, ids = values[:, :k_max], ids[:, :k_max]
            else:
                values, ids = scaled.topk(k_max, dim=-1)
            position = torch.arange(values.shape[1], device=self.device)[None]
            drawn = _nucleus(values.masked_fill(position >= top_k[:, None], float("-inf")), ids, top_p,
                             p[:, MIN_P], u)
            picks = drawn if picks is None else torch.where(top_k > 0, drawn, picks)
        if method is not None:  # rows with top-p and no top-k: over the whole vocabulary
            if method == "threshold":  # top-p's threshold, min-p's if higher, one pass to draw
                limit = torch.maximum(native.top_p_threshold(probs, top_p.contiguous()), p[:, MIN_P] * probs.amax(-1))
                drawn = _or_argmax(native.draw_above(probs, limit, u), scaled)
            elif method == "topk" and V > CPU_CANDIDATES:
                drawn = _top_p_candidates(scaled, top_p, p[:, MIN_P], u)
            else:
                values, ids = scaled.sort(dim=-1, descending=True)
                drawn = _nucleus(values, ids, top_p, p[:, MIN_P], u)
            picks = drawn if picks is None else torch.where((top_k <= 0) & (top_p < 1.0), drawn, picks)
        return picks


def _greedy(logits: torch.Tensor, kernel: bool = True) -> torch.Tensor:
    """logits [n, vocab].argmax(-1) (the first of equal maxima; a NaN wins): on a GPU through kernels/argmax (a
    third of PyTorch's time at batch 1), on a CPU through the extension's (ATen's is a scalar loop: 64 us a row
    of 49,152); with `kernel` False through PyTorch's."""
    if not kernel:
        return logits.argmax(-1)
    if logits.device.type == "cuda" and kernels.available():
        from mistral7b.kernels.argmax import greedy_picks

        return greedy_picks(logits)
    ops = cpu.load(notice=False) if logits.device.type == "cpu" and logits.dtype == torch.float32 else None
    if ops is not None and ops.CAPABILITY != "DEFAULT" and logits.numel():  # the portable build is scalar too
        return ops.argmax_rows(logits)
    return logits.argmax(-1)


def _min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    return probs * (probs >= min_p[:, None] * probs.amax(-1, keepdim=True))


def _nucleus(values: torch.Tensor, ids: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
             u: torch.Tensor) -> torch.Tensor:
    """A draw from candidates sorted by value [B, C] (-inf: not candidates): probabilities renormalised over
    them, top-p keeps those whose more probable candidates hold less than p (the first always), min-p those
    with p >= min_p * the first's."""
    probs = values.softmax(-1)
    keep = (probs.cumsum(-1) - probs) < top_p[:, None]
    keep &= probs >= min_p[:, None] * probs[:, :1]
    return ids.gather(1, _inverse_cdf(probs * keep, u)[:, None])[:, 0]


CPU_CANDIDATES = 1024  # a CPU without the extension tries top-p among these first (a real nucleus usually fits)


def _native_draws(scaled: torch.Tensor) -> Any:
    """The CPU extension where it can draw these rows (float32 on a CPU): its draw_above takes a row's kept
    tokens as those at or above a limit and draws in one pass, where masking and a cumulative sum cost ~3 ms
    for 16 rows of 49,152 (elementwise ops on bool masks are slow in ATen on a CPU)."""
    if scaled.device.type != "cpu" or scaled.dtype != torch.float32:
        return None
    ops = cpu.load(notice=False)
    return ops if ops is not None and hasattr(ops, "draw_above") else None


def _or_argmax(drawn: torch.Tensor, scaled: torch.Tensor) -> torch.Tensor:
    """draw_above's picks, rows that had nothing to draw from (-1: NaN or no finite logit) taking their argmax,
    as greedy rows do (the PyTorch path draws some index there too, never an error for the whole batch)."""
    if bool((drawn < 0).any()):
        drawn = torch.where(drawn < 0, scaled.argmax(-1), drawn)
    return drawn


def _top_p_method(candidates: str, scaled: torch.Tensor) -> str:
    """How rows with top-p and no top-k find their nucleus. The CPU extension's radix select (cpu/sample.cpp)
    keeps the sorted rule's set without sorting: 2-3x faster than the 1,024 candidates on a CPU (16 rows of
    32,768: 1.4 ms against 2.2 peaked and 5.2 flat). A GPU sorts (a sort beat a bisected threshold at every batch
    size measured on an H100)."""
    if candidates != "auto":
        return candidates
    if scaled.device.type != "cpu":
        return "sort"
    return "threshold" if _native_draws(scaled) is not None else "topk"


def _top_p_candidates(scaled: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Top-p (no top-k) among the CPU_CANDIDATES most likely tokens, their probabilities normalised over the
    whole vocabulary; rows whose candidates hold less than top_p of the mass (a flat distribution) are drawn
    over the sorted vocabulary. Reads the rows' coverage back: only for a CPU, where nothing runs ahead of the
    host. The path of a CPU without the extension."""
    values, ids = scaled.topk(CPU_CANDIDATES, dim=-1)
    probs = (values - scaled.logsumexp(-1, keepdim=True)).exp()
    keep = ((probs.cumsum(-1) - probs) < top_p[:, None]) & (probs >= min_p[:, None] * probs[:, :1])
    picks = ids.gather(1, _inverse_cdf(probs * keep, u)[:, None])[:, 0]
    wide = (probs.sum(-1) < top_p).nonzero()[:, 0]
    if len(wide):
        values, ids = scaled[wide].sort(dim=-1, descending=True)
        picks[wide] = _nucleus(values, ids, top_p[wide], min_p[wide], u[wide])
    return picks


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """For each row, the index i with cdf[i - 1] <= u * total < cdf[i]: index i drawn with probability
    weights[i] / total (a zero weight is never drawn)."""
    cdf = weights.cumsum(-1)
    target = (u * cdf[:, -1])[:, None]
    index = torch.searchsorted(cdf, target, right=True)[:, 0]
    return index.clamp(max=weights.shape[1] - 1)
