"""The batched sampler's step time by request kind and candidate method, beside Hugging Face's warpers +
torch.multinomial
(the peer: what `transformers.generate` does a step) and the floor (reading the logits once at the device's copy rate).

Logits: rows of a Mistral-sized vocabulary (32,768) drawn as a real model's look (a few tokens well ahead, a long
flat tail: a scaled Gumbel sample, so the top-p 0.95 nucleus holds some hundreds to thousands of tokens), and a
flat variant (random-id prompts to a small model: the nucleus spans most of the vocabulary). Per (rows, kind):
ms per step of `Sampler.sample` with candidates auto / topk / threshold / sort, and the peer's.

    python bench/sampler.py --device cuda --out $OUT/sampler.json
    python bench/sampler.py --device cpu --rows 1,16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from bench.gpu import timed  # noqa: E402
from mistral7b import cpu  # noqa: E402
from mistral7b.engine.sampler import Sampler  # noqa: E402
from mistral7b.engine.sampling_params import SamplingParams  # noqa: E402

KINDS = {
    "T=1.0 top_p=0.95 (OpenAI-style)": SamplingParams(temperature=1.0, top_p=0.95),
    "T=0.8 top_k=40 top_p=0.95 min_p=0.05 (llama.cpp)": SamplingParams(temperature=0.8, top_k=40, top_p=0.95,
                                                                         min_p=0.05),
    "T=1.0 (plain)": SamplingParams(temperature=1.0),
    "greedy": SamplingParams(temperature=0),
}


def median_ms(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    for _ in range(3):
        fn()
    return 1e3 * statistics.median(timed(fn, device, reps))


def logits_for(rows: int, vocab: int, flat: bool, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if flat:
        x = torch.randn(rows, vocab, generator=g) * 0.5
    else:  # Gumbel(0, 1.5): a handful of tokens far ahead of a long tail
        u = torch.rand(rows, vocab, generator=g).clamp_(1e-12, 1 - 1e-7)
        x = -1.5 * torch.log(-torch.log(u))
    return x.to(device)


def hf_step(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    import transformers

    x = logits / p.temperature if p.temperature > 0 else logits
    if p.greedy:
        return x.argmax(-1)
    if p.top_k:
        x = transformers.TopKLogitsWarper(p.top_k)(None, x)
    if p.top_p < 1.0:
        x = transformers.TopPLogitsWarper(p.top_p)(None, x)
    if p.min_p:
        x = transformers.MinPLogitsWarper(p.min_p)(None, x)
    return torch.multinomial(x.softmax(-1), 1)[:, 0]


def copy_rate(device: torch.device) -> float:
    """Bytes/s of a device-to-device copy of 256 MiB (read + write counted): the floor's rate."""
    a = torch.empty(64 << 20, device=device)
    b = torch.empty_like(a)
    ms = median_ms(lambda: b.copy_(a), device, 10)
    return 2 * a.numel() * 4 / (ms / 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", default="1,16,64,256")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    device = torch.device(a.device)
    rate = copy_rate(device)
    threshold = device.type == "cpu" and hasattr(cpu.load(notice=False), "top_p_threshold")
    results = []
    print(f"## sampler step ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, vocab {a.vocab}, "
          f"{time.strftime('%Y-%m-%d %H:%M')})\n")
    print("| rows | logits | kind | auto | topk | threshold | sort | HF warpers + multinomial | floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rows in (int(r) for r in a.rows.split(",")):
        for flat in (False, True):
            logits = logits_for(rows, a.vocab, flat, device)
            floor = 1e3 * rows * a.vocab * 4 / rate
            for name, p in KINDS.items():
                s = Sampler(rows, a.vocab, device, seed=0)
                slots = torch.tensor([s.admit(i, p, [], [], []) for i in range(rows)], device=device)
                row: dict[str, Any] = {"rows": rows, "flat": flat, "kind": name, "floor_ms": floor}
                for method in ("auto", "topk", "threshold", "sort"):  # the threshold: the CPU extension's
                    row[method] = (median_ms(lambda: s.sample(logits, slots, candidates=method), device, a.reps)
                                   if method != "threshold" or threshold else float("nan"))
                row["hf"] = median_ms(lambda: hf_step(logits, p), device, a.reps)
                results.append(row)
                print(f"| {rows} | {'flat' if flat else 'peaked'} | {name} | {row['auto']:.3f} | {row['topk']:.3f} | "
                      f"{row['threshold']:.3f} | {row['sort']:.3f} | {row['hf']:.3f} | {floor:.4f} |", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": str(device), "vocab": a.vocab, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
