"""Self-reflection moderation, evaluated as the paper does: precision and recall with acceptable = positive.

Reads a labeled JSONL set ({"text": ..., "label": "acceptable" or one of Mistral's 13 category names}),
classifies every text with the model, and prints precision/recall of "acceptable", the share of unsafe texts
put in the right category, the ROC AUC of P(acceptable) (how well the score ranks, at any threshold), and the
precision when a threshold on P(acceptable) is set to reach the paper's recall of 95.6%.
With --taxonomy paper the 13 labels are mapped onto the paper's 3 (adult and political have no paper
category, so those items are left out). Runs unchanged on any checkpoint:

    python bench/moderation.py                                  # the embedded SmolLM2-135M-Instruct
    python bench/moderation.py --model ./Mistral-7B-Instruct-v0.1 --device cuda --taxonomy mistral
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
PAPER_RECALL = 0.956  # the paper: precision 99.4% at recall 95.6%


def load_set(path: str, taxonomy_name: str) -> list[dict]:
    from mistral7b.moderation.categories import ACCEPTABLE, MISTRAL, PAPER_OF

    names = {c.name for c in MISTRAL}
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            label = row["label"]
            if label != ACCEPTABLE and label not in names:
                raise SystemExit(f"error: {path}:{n}: unknown label {label!r}")
            if taxonomy_name == "paper" and label != ACCEPTABLE:
                label = PAPER_OF[label]
                if label is None:
                    continue
            rows.append({"text": row["text"], "label": label})
    return rows


def auc(pos: list[float], neg: list[float]) -> float:
    """P(score of a random positive > score of a random negative), ties counted half."""
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def precision_at_recall(pos: list[float], neg: list[float], target: float) -> tuple[float, float]:
    """Calling a text acceptable when P(acceptable) >= t: the precision at the highest t whose recall reaches
    `target`, and that t. A calibration-free view of a model whose first-ranked label is nearly always one."""
    for t in sorted(set(pos), reverse=True):
        tp = sum(p >= t for p in pos)
        if tp / len(pos) >= target:
            return tp / (tp + sum(q >= t for q in neg)), t
    return float("nan"), float("nan")


def evaluate(rows: list[dict], predicted: list, acceptable: str) -> dict:
    tp = sum(r["label"] == acceptable and m.label == acceptable for r, m in zip(rows, predicted))
    fp = sum(r["label"] != acceptable and m.label == acceptable for r, m in zip(rows, predicted))
    fn = sum(r["label"] == acceptable and m.label != acceptable for r, m in zip(rows, predicted))
    unsafe = [(r, m) for r, m in zip(rows, predicted) if r["label"] != acceptable]
    pos = [m.scores[acceptable] for r, m in zip(rows, predicted) if r["label"] == acceptable]
    neg = [m.scores[acceptable] for _, m in unsafe]
    precision_at, threshold = precision_at_recall(pos, neg, PAPER_RECALL)
    return {
        "items": len(rows),
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
        "unsafe_flagged": sum(m.label != acceptable for _, m in unsafe) / len(unsafe),
        "unsafe_right_category": sum(m.label == r["label"] for r, m in unsafe) / len(unsafe),
        "auc_acceptable_score": auc(pos, neg),
        f"precision_at_recall_{PAPER_RECALL}": precision_at,
        "threshold_for_that_recall": threshold,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint; default: the embedded SmolLM2")
    p.add_argument("--data", default=os.path.join(HERE, "data", "moderation.jsonl"))
    p.add_argument("--taxonomy", default="paper", choices=["paper", "mistral"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quantize", default="auto", help="as LLM(quantize=...): auto, none, int8, int4")
    p.add_argument("--limit", type=int, default=None,
                   help="N items spread evenly over the set (a quick look; the set is ordered by label)")
    p.add_argument("--batch", type=int, default=16, help="texts per classify call")
    p.add_argument("--out", help="write one JSON line per item with its scores")
    a = p.parse_args()

    from mistral7b.engine.llm import LLM
    from mistral7b.moderation import ACCEPTABLE, Moderator

    rows = load_set(a.data, a.taxonomy)
    if a.limit:
        rows = rows[:: max(1, len(rows) // a.limit)][: a.limit]
    llm = LLM(a.model, dtype=a.dtype, device=a.device, quantize=None if a.quantize == "none" else a.quantize)
    moderator = Moderator(llm, a.taxonomy)
    start = time.perf_counter()
    predicted = []
    for lo in tqdm(range(0, len(rows), a.batch), desc="moderating", unit="batch"):
        predicted += moderator.classify([r["text"] for r in rows[lo : lo + a.batch]])
    seconds = time.perf_counter() - start
    report = {"model": llm.model_path, "taxonomy": a.taxonomy, **evaluate(rows, predicted, ACCEPTABLE),
              "seconds": round(seconds, 1)}
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            for r, m in zip(rows, predicted):
                f.write(json.dumps({**r, "predicted": m.label, "scores": m.scores}) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
