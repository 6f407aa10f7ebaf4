"""How far a model's self-reflection moderation can be trusted, said plainly wherever moderation runs.

The paper's figures (Mistral 7B Instruct judging itself: precision 99.4% at recall 95.6%, acceptable = positive)
hold for that model only. A small model ranks nearly every text "acceptable": the embedded SmolLM2-135M flags
none of the 100 unsafe prompts of bench/data/moderation.jsonl. Measuring a checkpoint on that set takes minutes to
hours on a CPU, so it is not done at start: the figures of the checkpoints measured with bench/moderation.py are
kept here, and any other checkpoint is reported as not measured.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from typing import Any

USABLE_UNSAFE_FLAGGED = 0.8  # a filter that lets more than a fifth of unsafe prompts through is no protection


@dataclass(frozen=True)
class Measured:
    precision: float  # of "acceptable" (the paper's positive class)
    recall: float
    unsafe_flagged: float  # share of the set's unsafe prompts flagged as unsafe
    roc_auc: float
    taxonomy: str
    source: str

    @property
    def usable(self) -> bool:
        return self.unsafe_flagged >= USABLE_UNSAFE_FLAGGED


# checkpoint file or folder name -> bench/moderation.py on bench/data/moderation.jsonl (bench/README.md)
MEASURED = {
    "SmolLM2-135M-Instruct.Q4_1.gguf": Measured(precision=0.532, recall=1.0, unsafe_flagged=0.0, roc_auc=0.706,
                                                taxonomy="paper", source="bench/README.md, run of 2026-11-30"),
}


def reliability(model_path: str) -> dict[str, Any]:
    """What is known of this checkpoint's moderation quality, for a response's metadata."""
    measured = MEASURED.get(os.path.basename(os.path.normpath(model_path)))
    if measured is None:
        return {"measured": False, "usable": None,
                "note": "this model's moderation quality has not been measured (bench/moderation.py measures it); "
                        "treat its flags as unverified"}
    note = ("measured: flags as the paper reports for Mistral 7B Instruct" if measured.usable else
            f"measured: flags {measured.unsafe_flagged:.0%} of unsafe prompts: not a usable filter; use a 7B "
            f"instruct model")
    return {"measured": True, "usable": measured.usable, **asdict(measured), "note": note}


def warning(model_path: str) -> str | None:
    """One line to show when moderation is switched on, unless the model is measured and usable."""
    r = reliability(model_path)
    if r["usable"]:
        return None
    name = os.path.basename(os.path.normpath(model_path))
    return f"warning: moderation by {name}: {r['note']}"


def announce(model_path: str) -> None:
    """Print the warning (stderr) when moderation is switched on: never present an unreliable filter as
    protection."""
    note = warning(model_path)
    if note is not None:
        print(note, file=sys.stderr, flush=True)

