"""Evaluation throughput: multiple-choice log-likelihoods with `LLM.score_pairs` (each context pre-filled once,
through the engine's prefix cache) against scoring every (context + answer) sequence whole with `LLM.score`.

A 5-shot-like workload: N questions, each a context of C tokens with 4 answers of A tokens (random ids from
the model's vocabulary; throughput does not depend on the words). Both paths give the same log-likelihoods
(checked here to 1e-3); the table is the wall time of each. Medians of --repeats runs.

    python bench/eval_loglik.py [--model PATH] [--questions 16] [--context 400] [--answer 8] [--quantize none]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from mistral7b.engine.llm import LLM  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--context", type=int, default=400)
    ap.add_argument("--answer", type=int, default=8)
    ap.add_argument("--choices", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quantize", default="none", choices=["auto", "none", "int8", "int4"])
    a = ap.parse_args()
    llm = LLM(a.model, quantize=None if a.quantize == "none" else a.quantize, progress=False)
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(3, llm.args.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    pairs = [(ctx, rand(a.answer)) for ctx in (rand(a.context) for _ in range(a.questions)) for _ in range(a.choices)]

    def shared():
        return [s.logprob for s in llm.score_pairs(pairs)]

    def whole():
        scores = llm.score([c + k for c, k in pairs])
        return [sum(s.logprobs[len(c) - 1 :]) for (c, _), s in zip(pairs, scores)]

    times = {"shared": [], "whole": []}
    for _ in range(a.repeats):
        outs = {}
        for name, fn in (("shared", shared), ("whole", whole)):
            start = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - start)
        assert max(abs(x - y) for x, y in zip(outs["shared"], outs["whole"])) < 1e-3
    n_tokens = sum(len(c) + len(k) for c, k in pairs)
    print(f"model {llm.model_path} dtype {llm.dtype} threads {torch.get_num_threads()} quantize {a.quantize}")
    print(f"{a.questions} questions x {a.choices} answers, context {a.context} + answer {a.answer} tokens")
    for name, t in times.items():
        med = statistics.median(t)
        print(f"{name:6s} {med:7.2f} s  {len(pairs) / med:6.1f} requests/s  {n_tokens / med:7.0f} request tokens/s")
    print(f"speed-up {statistics.median(times['whole']) / statistics.median(times['shared']):.2f}x")


if __name__ == "__main__":
    main()
