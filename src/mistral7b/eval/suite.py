"""The paper's benchmark suite (Table 2 of arXiv 2310.06825) as lm-eval tasks, with the paper's numbers.

Each row names the lm-eval task, the paper's few-shot setting, the metric we read, the score the paper
reports for Mistral 7B, and the Hugging Face datasets the task reads. Nothing can be downloaded here, so a
task runs only when its datasets are already in the local Hugging Face cache; the others are named.

Where lm-eval's task differs from the paper's setting, the `setting` column says so: MATH is lm-eval's
`minerva_math` (4-shot, greedy, so maj@1 rather than maj@4), GSM8K is the 8-shot chain-of-thought
self-consistency task cut to 8 samples (maj@8). HumanEval and MBPP execute generated code, so they run only
when the caller allows it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SuiteTask:
    name: str  # as the paper names it
    task: str | dict  # lm-eval task name, or a task config dict overriding a registered task
    shots: int
    metric: str  # lm-eval result key: "metric,filter"
    paper: float | None  # the paper's Mistral 7B score, percent
    datasets: tuple[str, ...]  # Hugging Face dataset repos the task reads
    setting: str = ""
    runs_code: bool = False


PAPER_TASKS: tuple[SuiteTask, ...] = (
    SuiteTask("MMLU", "mmlu", 5, "acc,none", 60.1, ("cais/mmlu",), "5-shot"),
    SuiteTask("HellaSwag", "hellaswag", 0, "acc_norm,none", 81.3, ("Rowan/hellaswag",), "0-shot"),
    SuiteTask("WinoGrande", "winogrande", 0, "acc,none", 75.3, ("allenai/winogrande",), "0-shot"),
    SuiteTask("PIQA", "piqa", 0, "acc_norm,none", 83.0, ("baber/piqa",), "0-shot"),
    SuiteTask("ARC-e", "arc_easy", 0, "acc_norm,none", 80.0, ("allenai/ai2_arc",), "0-shot"),
    SuiteTask("ARC-c", "arc_challenge", 0, "acc_norm,none", 55.5, ("allenai/ai2_arc",), "0-shot"),
    SuiteTask("NaturalQuestions", "nq_open", 5, "exact_match,remove_whitespace", 28.8,
              ("google-research-datasets/nq_open",), "5-shot"),
    SuiteTask("TriviaQA", "triviaqa", 5, "exact_match,remove_whitespace", 69.9, ("mandarjoshi/trivia_qa",),
              "5-shot"),
    SuiteTask("HumanEval", "humaneval", 0, "pass@1,create_test", 30.5, ("openai/openai_humaneval",), "0-shot",
              runs_code=True),
    SuiteTask("MBPP", "mbpp", 3, "pass_at_1,none", 47.5, ("google-research-datasets/mbpp",), "3-shot",
              runs_code=True),
    SuiteTask("MATH", "minerva_math", 4, "exact_match,none", 13.1, ("EleutherAI/hendrycks_math",),
              "4-shot maj@1 (paper: maj@4)"),
    SuiteTask("GSM8K", {"task": "gsm8k_cot_self_consistency", "repeats": 8}, 8, "exact_match,maj@8", 52.2,
              ("openai/gsm8k",), "8-shot maj@8"),
)


def hf_cache_dirs() -> list[str]:
    """Where Hugging Face keeps datasets on this machine: the hub cache and the datasets cache."""
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    data = os.environ.get("HF_DATASETS_CACHE") or os.path.join(home, "datasets")
    return [hub, data]


def dataset_is_local(repo: str, cache_dirs: Sequence[str] | None = None) -> bool:
    """A dataset repo is local when the hub cache or the datasets cache holds a folder for it."""
    org, _, name = repo.rpartition("/")
    wanted = {f"datasets--{repo.replace('/', '--')}".lower(), f"{org}___{name}".lower()}
    for folder in cache_dirs if cache_dirs is not None else hf_cache_dirs():
        if os.path.isdir(folder) and any(entry.lower() in wanted for entry in os.listdir(folder)):
            return True
    return False


def missing_datasets(task: SuiteTask, cache_dirs: Sequence[str] | None = None) -> list[str]:
    return [d for d in task.datasets if not dataset_is_local(d, cache_dirs)]


def select(names: Sequence[str] | None) -> list[SuiteTask]:
    """Paper tasks by name (case-insensitive), all of them for None; an unknown name is one clear error."""
    if not names:
        return list(PAPER_TASKS)
    from mistral7b.errors import RequestError

    by_name = {t.name.lower(): t for t in PAPER_TASKS}
    unknown = [n for n in names if n.lower() not in by_name]
    if unknown:
        raise RequestError(f"unknown task {', '.join(unknown)}; the paper's tasks are "
                           f"{', '.join(t.name for t in PAPER_TASKS)}")
    return [by_name[n.lower()] for n in names]


@dataclass
class SuiteRow:
    task: SuiteTask
    score: float | None = None  # percent
    status: str = ""  # why there is no score


@dataclass
class SuitePlan:
    runnable: list[SuiteTask] = field(default_factory=list)
    skipped: list[SuiteRow] = field(default_factory=list)


def plan(tasks: Sequence[SuiteTask], allow_code: bool, cache_dirs: Sequence[str] | None = None) -> SuitePlan:
    out = SuitePlan()
    for t in tasks:
        missing = missing_datasets(t, cache_dirs)
        if missing:
            out.skipped.append(SuiteRow(t, status=f"missing dataset {', '.join(missing)}"))
        elif t.runs_code and not allow_code:
            out.skipped.append(SuiteRow(t, status="runs generated code: pass --allow-code-execution"))
        else:
            out.runnable.append(t)
    return out


def run_task(lm: Any, task: SuiteTask, limit: float | None = None, task_manager: Any = None) -> float:
    """Run one task through lm-eval with our model instance; return its score in percent."""
    import lm_eval

    if task.runs_code:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    out = lm_eval.simple_evaluate(model=lm, tasks=[task.task], num_fewshot=task.shots, limit=limit,
                                  task_manager=task_manager, log_samples=False, bootstrap_iters=0,
                                  confirm_run_unsafe_code=task.runs_code)
    name = task.task["task"] if isinstance(task.task, dict) else task.task
    result = out["results"][name]
    if task.metric not in result:
        raise KeyError(f"{name}: lm-eval reported {sorted(k for k in result if ',' in k)}, not {task.metric}")
    return 100.0 * float(result[task.metric])


def run_suite(lm: Any, tasks: Sequence[SuiteTask], limit: float | None = None, task_manager: Any = None,
              on_row: Callable[[SuiteRow], None] | None = None) -> list[SuiteRow]:
    rows = []
    for t in tasks:
        try:
            row = SuiteRow(t, score=run_task(lm, t, limit, task_manager))
        except Exception as e:  # one failed task (a dataset that will not load offline) does not stop the rest
            row = SuiteRow(t, status=f"failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def table(rows: Sequence[SuiteRow]) -> str:
    """A plain-text table: task, setting, metric, our score, the paper's score, and any note."""
    head = ("task", "setting", "metric", "ours", "paper", "note")
    body = [(r.task.name, r.task.setting, r.task.metric.split(",")[0],
             "-" if r.score is None else f"{r.score:.1f}",
             "-" if r.task.paper is None else f"{r.task.paper:.1f}", r.status) for r in rows]
    widths = [max(len(str(x[i])) for x in (head, *body)) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in (head, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
