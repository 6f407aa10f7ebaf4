"""A held-out English text for perplexity checks: documentation of a few Python standard-library modules.

Built at run time from docstrings (no file to ship, no download), deterministic for a given Python version,
and prose none of our models was tuned on.
"""

from __future__ import annotations

import inspect
import json
import math
import textwrap


def heldout_text() -> str:
    parts = [inspect.getdoc(m) or "" for m in (textwrap, json, inspect, math)]
    parts += [inspect.getdoc(f) or "" for f in (textwrap.wrap, textwrap.dedent, json.dumps, json.loads,
                                                 inspect.signature, inspect.getsource)]
    return "\n\n".join(parts)
