"""The bridge to lm-eval: import it with a clear message when it is missing, and run its command line."""

from __future__ import annotations

import sys

from mistral7b.errors import Mistral7BError, RequestError

INSTALL_HINT = "pip install 'mistral7b[eval]' (lm-eval>=0.4.13)"


def require_lm_eval() -> None:
    """Import lm-eval and register our model with it, or raise one clear line."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise RequestError(f"lm-evaluation-harness is not installed: {INSTALL_HINT}") from None
    import mistral7b.eval.lm_eval_model  # noqa: F401  (registers the model name `mistral7b`)


def run_lm_eval_cli(argv: list[str]) -> int:
    """Run `lm_eval ARGV` in this process after registering `mistral7b`; return its exit status."""
    try:
        require_lm_eval()
    except RequestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    except Mistral7BError as e:  # a bad model path or argument: one line, as everywhere else
        print(f"error: {e}", file=sys.stderr)
        return 1
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # lm-eval's own errors (an unknown task, a bad argument) are one line too
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"error: lm-eval: {type(e).__name__}: {first}", file=sys.stderr)
        return 1
    finally:
        sys.argv = saved
    return 0
