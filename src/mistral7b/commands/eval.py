"""`mistral7b eval`: perplexity of a text file, the paper's benchmark suite, and lm-eval's own CLI.

    mistral7b eval perplexity FILE [--max-length N] [--stride N] [--json]
    mistral7b eval suite [--tasks MMLU,HellaSwag] [--limit N] [--allow-code-execution] [--list]
    mistral7b eval lm-eval --model mistral7b --model_args model=PATH --tasks hellaswag   (lm-eval's arguments)
"""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from mistral7b.commands.options import add_model_options

    p = sub.add_parser("eval", help="evaluate: perplexity, the paper's benchmark suite, lm-eval")
    verbs = p.add_subparsers(dest="eval_command", required=True)

    q = verbs.add_parser("perplexity", help="perplexity of a UTF-8 text file, in rolling windows")
    q.add_argument("file")
    add_model_options(q)
    q.add_argument("--max-length", type=int, default=None,
                   help="tokens each window reads (default: the model's context length)")
    q.add_argument("--stride", type=int, default=None,
                   help="new tokens per window (default: --max-length, disjoint windows as lm-eval does)")
    q.add_argument("--batch-size", type=int, default=None, help="windows scored together")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.set_defaults(func=cmd_perplexity)

    s = verbs.add_parser("suite", help="the paper's benchmarks through lm-eval, beside the paper's numbers")
    add_model_options(s)
    s.add_argument("--tasks", default=None, help="comma-separated paper task names (default: all)")
    s.add_argument("--limit", type=float, default=None, help="examples per task (or a fraction), for a quick look")
    s.add_argument("--batch-size", type=int, default=None, help="requests per batch")
    s.add_argument("--allow-code-execution", action="store_true",
                   help="run HumanEval and MBPP, which execute the generated code")
    s.add_argument("--list", action="store_true", help="print the task list and which datasets are local, then exit")
    s.set_defaults(func=cmd_suite)

    h = verbs.add_parser("lm-eval", help="lm-eval's command line with the model 'mistral7b' registered",
                         add_help=False)
    h.__class__ = _PassThrough  # argparse's REMAINDER drops leading --options: hand everything over as is


class _PassThrough(argparse.ArgumentParser):
    """A sub-parser that parses nothing: all its arguments go to lm-eval unchanged."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        return argparse.Namespace(args=list(args or []), func=cmd_lm_eval), []


def _llm(a: argparse.Namespace):
    from mistral7b.commands.options import build_llm as build
    from mistral7b.errors import RequestError

    if a.batch_size is not None and a.batch_size < 1:
        raise RequestError(f"--batch-size must be a positive integer, got {a.batch_size}")
    llm = build(a)
    if a.batch_size:
        llm.max_batch_size = a.batch_size
    return llm


def cmd_perplexity(a: argparse.Namespace) -> int:
    from mistral7b.eval.perplexity import perplexity, read_text

    from mistral7b.errors import RequestError

    for name in ("max_length", "stride"):  # checked before the model loads, so a typo fails at once
        value = getattr(a, name)
        if value is not None and value < 1:
            raise RequestError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if a.stride is not None and a.max_length is not None and a.stride > a.max_length:
        raise RequestError(f"--stride ({a.stride}) cannot exceed --max-length ({a.max_length})")
    text = read_text(a.file)
    if not text:
        raise RequestError(f"{a.file}: the file is empty: there is nothing to score")
    r = perplexity(_llm(a), text, max_length=a.max_length, stride=a.stride, progress=not a.quiet)
    if a.json:
        print(json.dumps({"file": a.file, "tokens": r.tokens, "bytes": r.bytes, "windows": r.windows, "nll": r.nll,
                          "perplexity": r.perplexity, "bits_per_byte": r.bits_per_byte, "seconds": r.seconds,
                          "tokens_per_second": r.tokens_per_second}))
    else:
        print(f"{a.file}: perplexity {r.perplexity:.4f}  bits/byte {r.bits_per_byte:.4f}  "
              f"({r.tokens} tokens in {r.windows} windows, {r.tokens_per_second:.1f} tokens/s)")
    return 0


def cmd_suite(a: argparse.Namespace) -> int:
    from mistral7b.errors import RequestError
    from mistral7b.eval import suite

    tasks = suite.select([n.strip() for n in a.tasks.split(",") if n.strip()] if a.tasks else None)
    todo = suite.plan(tasks, allow_code=a.allow_code_execution)
    if a.list:
        print(suite.table([suite.SuiteRow(t, status="ready") for t in todo.runnable] + todo.skipped))
        return 0
    if not todo.runnable:
        missing = sorted({d for r in todo.skipped for d in suite.missing_datasets(r.task)})
        why = f"these datasets are not in the local Hugging Face cache: {', '.join(missing)}" if missing else \
            "; ".join(f"{r.task.name}: {r.status}" for r in todo.skipped)
        raise RequestError(f"no task of the suite can run offline: {why} "
                           f"(download them on a connected machine, e.g. `datasets.load_dataset(NAME)`, "
                           f"and copy ~/.cache/huggingface here)")
    from mistral7b.eval.harness import require_lm_eval

    require_lm_eval()
    from mistral7b.eval.lm_eval_model import Mistral7BLM

    lm = Mistral7BLM(_llm(a))

    def show(row) -> None:
        score = "-" if row.score is None else f"{row.score:.1f}"
        print(f"{row.task.name}: {score} (paper {row.task.paper}) {row.status}".rstrip(), file=sys.stderr)

    rows = suite.run_suite(lm, todo.runnable, limit=a.limit, on_row=show)
    order = {t.name: i for i, t in enumerate(tasks)}
    print(suite.table(sorted(rows + todo.skipped, key=lambda r: order[r.task.name])))
    return 0 if any(r.score is not None for r in rows) else 1


def cmd_lm_eval(a: argparse.Namespace) -> int:
    from mistral7b.eval.harness import run_lm_eval_cli

    return run_lm_eval_cli(a.args)
