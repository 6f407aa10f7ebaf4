"""`mistral7b moderate`: self-reflection moderation from the command line, one JSON result per text.

    mistral7b moderate "How do I kill a linux process?"
    mistral7b moderate --file texts.jsonl --taxonomy mistral --categories fraud,malware
    mistral7b moderate "What is the best medicine for a cold?" --answer "Take two of my pills."

Each output line is one entry of OpenAI's moderation `results` (flagged, categories, category_scores) plus
the input text. In --file, a line is a JSON string or an object with "text" (and optionally "answer"); other
keys (such as a "label") are ignored.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from mistral7b.errors import RequestError


def register(sub: argparse._SubParsersAction) -> None:
    from mistral7b.commands.options import add_model_options

    p = sub.add_parser("moderate", help="classify texts as acceptable or as a harmful category (self-reflection)")
    add_model_options(p)
    p.add_argument("text", nargs="?", help="the text to classify")
    p.add_argument("--answer", help="judge this answer to TEXT (the prompt) instead of TEXT itself")
    p.add_argument("--file", help="JSONL file of texts to classify")
    p.add_argument("--taxonomy", default="paper", choices=["paper", "mistral"],
                   help="paper: 3 categories; mistral: the 13 of Mistral's docs")
    p.add_argument("--categories", help="comma-separated categories to filter (default: all of the taxonomy)")
    p.set_defaults(func=run)


def _read_file(path: str) -> list[Any]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RequestError(f"{path}: cannot read ({e})") from None
    items: list[Any] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RequestError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if isinstance(row, dict) and "text" in row:
            items.append((row["text"], row["answer"]) if row.get("answer") is not None else row["text"])
        elif isinstance(row, str):
            items.append(row)
        else:
            raise RequestError(f"{path}:{n}: expected a JSON string or an object with a \"text\" field")
    if not items:
        raise RequestError(f"{path}: no texts in the file")
    return items


def run(a: argparse.Namespace) -> int:
    from mistral7b.commands.options import build_llm
    from mistral7b.moderation import Moderator, Policy
    from mistral7b.moderation.classifier import check_item
    from mistral7b.moderation.reliability import announce

    if (a.text is None) == (a.file is None):
        raise RequestError("give exactly one of a TEXT argument or --file FILE.jsonl")
    if a.answer is not None and a.file is not None:
        raise RequestError("--answer goes with a TEXT argument; in --file put \"answer\" in each line")
    policy = Policy(a.taxonomy, a.categories)  # checked before the model loads
    items = _read_file(a.file) if a.file else [a.text if a.answer is None else (a.text, a.answer)]
    for i, item in enumerate(items):
        check_item(i, item)  # empty texts fail before the model loads
    llm = build_llm(a)
    announce(llm.model_path)
    moderator = Moderator(llm, a.taxonomy)
    for start in range(0, len(items), 16):
        batch = items[start : start + 16]
        for item, m in zip(batch, moderator.classify(batch)):
            text, answer = item if isinstance(item, tuple) else (item, None)
            line = {"input": text, **({"answer": answer} if answer is not None else {}), **policy.result(m)}
            print(json.dumps(line), flush=True)
    return 0
