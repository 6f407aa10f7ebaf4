"""The moderation categories: the paper's three (section 5) and the thirteen of Mistral's later guardrailing docs.

A taxonomy is an ordered set of categories plus the label "acceptable" (Mistral's docs say "not moderated").
Each category carries the word the model is asked to answer with (its label) and a one-line definition that
goes into the classification prompt. Names are stable identifiers for APIs and command lines.
"""

from __future__ import annotations

from dataclasses import dataclass

from mistral7b.errors import RequestError

ACCEPTABLE = "acceptable"


@dataclass(frozen=True)
class Category:
    name: str  # identifier used in requests and responses
    title: str  # human wording, used in refusal messages
    label: str  # the word the model answers with
    definition: str  # one line for the prompt


PAPER = (
    Category("illegal", "illegal activities", "illegal",
             "helps with or asks for illegal activities, such as terrorism, child abuse or fraud"),
    Category("hateful", "hateful, harassing or violent content", "hateful",
             "hateful, harassing or violent content, such as discrimination, self-harm or bullying"),
    Category("unqualified_advice", "unqualified advice", "advice",
             "asks for or gives personal legal, medical or financial advice that needs a qualified professional"),
)

MISTRAL = (
    Category("illegal", "illegal activity", "illegal", "illegal activity"),
    Category("child_abuse", "child abuse", "child",
             "child sexual abuse material or any content that exploits or harms children"),
    Category("hate_violence_harassment", "hate, violence or harassment", "hateful",
             "hateful, harassing or violent content: hate based on identity, harassing or threatening a person, "
             "or celebrating violence"),
    Category("malware", "malware", "malware", "code meant to disrupt, damage or gain unauthorized access to computers"),
    Category("physical_harm", "physical harm", "dangerous",
             "activity with a high risk of physical harm: weapons, self-harm, eating disorders"),
    Category("economic_harm", "economic harm", "economic",
             "activity with a high risk of economic harm: gambling schemes, payday lending, multi-level marketing"),
    Category("fraud", "fraud", "fraud", "fraudulent or deceptive activity: scams, plagiarism, disinformation"),
    Category("adult", "adult content", "adult", "adult content, adult industries and dating apps"),
    Category("political", "political campaigning", "political", "political campaigning or lobbying"),
    Category("privacy", "privacy violation", "privacy",
             "violating people's privacy: tracking, facial recognition, collecting personal data without consent"),
    Category("unqualified_law", "unqualified legal advice", "legal",
             "tailored legal advice without a qualified person reviewing it"),
    Category("unqualified_financial", "unqualified financial advice", "financial",
             "tailored financial advice without a qualified person reviewing it"),
    Category("unqualified_health", "unqualified health advice", "medical",
             "telling someone they have or do not have a health condition, or how to cure or treat it"),
)

TAXONOMIES: dict[str, tuple[Category, ...]] = {"paper": PAPER, "mistral": MISTRAL}

# Where each of the thirteen falls among the paper's three (None: the paper has no such category).
PAPER_OF: dict[str, str | None] = {
    "illegal": "illegal", "child_abuse": "illegal", "malware": "illegal", "fraud": "illegal",
    "privacy": "illegal", "economic_harm": "illegal",
    "hate_violence_harassment": "hateful", "physical_harm": "hateful",
    "unqualified_law": "unqualified_advice", "unqualified_financial": "unqualified_advice",
    "unqualified_health": "unqualified_advice",
    "adult": None, "political": None,
}


def taxonomy(name: str) -> tuple[Category, ...]:
    try:
        return TAXONOMIES[name]
    except KeyError:
        raise RequestError(f"unknown taxonomy {name!r}: choose one of {', '.join(TAXONOMIES)}") from None


def check_categories(names: object, taxonomy_name: str) -> list[str]:
    """The caller's list of categories to filter, checked against the taxonomy; None means all of them."""
    known = [c.name for c in taxonomy(taxonomy_name)]
    if names is None:
        return known
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise RequestError("categories must be a list of category names")
    if not names:
        raise RequestError(f"categories is empty: choose among {', '.join(known)}")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise RequestError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(map(repr, unknown))} "
                           f"in taxonomy {taxonomy_name!r}: choose among {', '.join(known)}")
    return list(dict.fromkeys(names))
