"""The paper's guardrail system prompt (section 5), verbatim; Mistral's `safe_prompt` switch prepends it."""

from __future__ import annotations

SAFE_PROMPT = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. "
    "Avoid harmful, unethical, prejudiced, or negative content. Ensure replies promote fairness and positivity."
)


def with_safe_prompt(messages: list[dict], safe_prompt: bool) -> list[dict]:
    """Put the guardrail prompt first, before any system prompt of the user's own."""
    if not safe_prompt:
        return list(messages)
    return [{"role": "system", "content": SAFE_PROMPT}, *messages]
