"""The `mistral7b` command: chat, generate, tokenize, info.

Every command takes `--model PATH` (a checkpoint folder or a .gguf file; default: the embedded SmolLM2).
Errors a user can fix print as one line `error: ...` with exit status 1, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mistral7b.commands.options import add_model_options, add_parallel_option, build_llm, window
from mistral7b.errors import Mistral7BError, RequestError


MODEL_DEFAULT = "default: the model's, as above"


def _sampling_options(p: argparse.ArgumentParser, temperature: float | None, max_tokens: int) -> None:
    g = p.add_argument_group(
        "sampling", "Options left out take the model's sampling defaults: its generation_config.json or GGUF "
        "general.sampling.* keys where it has them, else llama.cpp's (temperature 0.8, top-k 40, top-p 0.95, "
        "min-p 0.05, repetition penalty 1). The embedded model (no --model) has none: llama.cpp's apply. "
        "chat prints the sampling it runs with, and /help repeats it.")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=temperature,
                   help="0 = greedy (" + ("default: 0" if temperature == 0 else MODEL_DEFAULT) + ")")
    g.add_argument("--top-p", type=float, default=None, help=MODEL_DEFAULT)
    g.add_argument("--top-k", type=int, default=None, help=f"0 = off ({MODEL_DEFAULT})")
    g.add_argument("--min-p", type=float, default=None, help=MODEL_DEFAULT)
    g.add_argument("--repetition-penalty", type=float, default=None, help=MODEL_DEFAULT)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    c = g.add_mutually_exclusive_group()
    c.add_argument("--json-schema", metavar="FILE", help="answers follow this JSON schema (a .json file)")
    c.add_argument("--regex", help="answers match this regular expression")
    c.add_argument("--choice", action="append", help="answers are one of these strings (repeatable)")


def _structured(a: argparse.Namespace) -> Any:
    """The constraint the options ask for (engine/structured_output.py), or None."""
    from mistral7b.engine.structured_output import StructuredOutput
    from mistral7b.errors import RequestError

    if getattr(a, "json_schema", None):
        try:
            with open(a.json_schema, encoding="utf-8") as f:
                return StructuredOutput.json_schema(f.read())
        except OSError as e:
            raise RequestError(f"--json-schema {a.json_schema}: {e.strerror}") from None
    if getattr(a, "regex", None):
        return StructuredOutput("regex", a.regex)
    if getattr(a, "choice", None):
        return StructuredOutput("choice", tuple(a.choice))
    return None


def _sampling(a: argparse.Namespace, llm: Any = None, logprobs: bool = False):
    """The request's SamplingParams: the options given, the model's defaults for the rest (with `llm`; without,
    neutral ones: to check the options before the model loads)."""
    from mistral7b.engine.generation_config import SAMPLING_FIELDS
    from mistral7b.engine.sampling_params import SamplingParams

    fields = {name: getattr(a, name) for name in SAMPLING_FIELDS if getattr(a, name) is not None}
    fields.update(max_tokens=a.max_tokens, seed=a.seed, stop=a.stop, logprobs=logprobs, structured=_structured(a))
    return llm.default_sampling_params(**fields) if llm is not None else SamplingParams(**fields)


def cmd_generate(a: argparse.Namespace) -> int:
    if (a.prompt is None) == (a.prompt_ids is None):
        raise RequestError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    prompt: Any = a.prompt
    if a.prompt_ids is not None:
        try:
            prompt = [int(x) for x in a.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise RequestError(f"--prompt-ids must be comma-separated integers, got {a.prompt_ids!r}") from None
    _sampling(a, logprobs=a.json)  # bad options fail before the model loads
    llm = build_llm(a)
    params = _sampling(a, llm, logprobs=a.json)
    if a.json:
        out = llm.generate(prompt, params)[0]
        c = out.outputs[0]
        print(json.dumps({"prompt_token_ids": out.prompt_token_ids, "token_ids": c.token_ids, "text": c.text,
                          "logprobs": c.logprobs, "finish_reason": c.finish_reason}))
        return 0
    for ev in llm.stream(prompt, params):
        sys.stdout.write(ev.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _answer(llm, history: list[dict], a: argparse.Namespace, params, guard=None) -> str | None:
    """Stream the answer to the screen; with a moderation guard, None when the exchange is refused/withheld."""
    ids = llm.encode_chat(history, safe_prompt=a.safe_prompt)
    notice = guard.check_input(history) if guard is not None else None
    hold = guard is not None and guard.output  # an answer to be checked is shown only once checked
    parts: list[str] = []
    try:
        for ev in [] if notice else llm.stream_ids([ids], [params]):
            parts.append(ev.text)
            if not hold:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write(" [interrupted]")
    if notice:  # the prompt was refused
        sys.stdout.write(notice)
    elif hold:
        notice = guard.check_output(history, "".join(parts))
        sys.stdout.write(notice or "".join(parts))
    sys.stdout.write("\n")
    sys.stdout.flush()
    return None if notice else "".join(parts)


def cmd_chat(a: argparse.Namespace) -> int:
    from mistral7b.moderation.chat import chat_guard

    _sampling(a)
    make_guard = chat_guard(a)  # --moderate and sampling options are checked before the model loads
    llm = build_llm(a)
    params = _sampling(a, llm)
    guard = make_guard(llm) if make_guard else None
    start = [{"role": "system", "content": a.system}] if a.system else []
    history = list(start)
    if a.message is not None:
        history.append({"role": "user", "content": a.message})
        _answer(llm, history, a, params, guard)
        return 0
    commands = "/reset clears the history, /help lists the commands, /exit quits (or Ctrl-D)"
    print(f"Chat with the model. Commands: {commands}.", file=sys.stderr)
    print(f"Sampling: {_describe(params)}.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = list(start)
            print("(history cleared)", file=sys.stderr)
            continue
        if text == "/help":
            print(f"Commands: {commands}. Sampling: {_describe(params)}. A line that starts with // is sent "
                  f"with one / less.", file=sys.stderr)
            continue
        if text.startswith("//"):
            line = line.replace("/", "", 1)
        elif text.startswith("/") and text[1:].split(" ", 1)[0].isalpha():
            print(f"unknown command {text.split(' ', 1)[0]} (/help lists them; start with // to send it to the "
                  f"model)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        try:
            reply = _answer(llm, history, a, params, guard)
        except RequestError as e:
            history.pop()
            print(f"error: {e}", file=sys.stderr)
            continue
        if reply is None:  # refused or withheld: the exchange stays out of the history
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})


def _describe(p: Any) -> str:
    """The sampling settings a chat runs with, as the user would set them."""
    if p.temperature == 0:
        return "greedy"
    parts = [f"temperature {p.temperature:g}"]
    parts += [f"top-k {p.top_k}"] if p.top_k else []
    parts += [f"top-p {p.top_p:g}"] if p.top_p < 1 else []
    parts += [f"min-p {p.min_p:g}"] if p.min_p else []
    parts += [f"repetition penalty {p.repetition_penalty:g}"] if p.repetition_penalty != 1 else []
    return ", ".join(parts) + f", at most {p.max_tokens} tokens a reply"


def cmd_tokenize(a: argparse.Namespace) -> int:
    if (a.text is None) == (a.messages is None):
        raise RequestError("give exactly one of --text TEXT or --messages FILE.json")
    from mistral7b.engine.llm import checkpoint_tokenizer
    from mistral7b.guardrails import with_safe_prompt
    from mistral7b.loading import open_checkpoint

    checkpoint = open_checkpoint(a.model or _default_model())
    tokenizer = checkpoint_tokenizer(checkpoint)
    if tokenizer is None:
        raise RequestError(f"{checkpoint.path} has no tokenizer")
    if a.text is not None:
        ids = tokenizer.encode(a.text, add_bos=tokenizer.add_bos and not a.no_bos)  # as generate and /tokenize
    else:
        try:
            with open(a.messages, encoding="utf-8") as f:
                messages = json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"{a.messages}: cannot read messages JSON ({e})") from None
        ids = tokenizer.encode_chat(with_safe_prompt(messages, a.safe_prompt), add_generation_prompt=True)
    print(json.dumps(ids))
    return 0


def _default_model() -> str:
    from mistral7b.default_model import default_model_path

    return default_model_path()


def cmd_info(a: argparse.Namespace) -> int:
    from mistral7b.loading import open_checkpoint

    checkpoint = open_checkpoint(a.model or _default_model(), sliding_window=a.sliding_window)
    info = {"path": checkpoint.path, "format": checkpoint.format, **checkpoint.args.to_dict(),
            "tensors": len(checkpoint.tensor_names())}
    print(json.dumps(info, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mistral7b", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("chat", help="chat with a model (interactive, streaming)")
    add_model_options(p)
    add_parallel_option(p)
    _sampling_options(p, temperature=None, max_tokens=512)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--safe-prompt", action="store_true", help="prepend the paper's guardrail system prompt")
    p.add_argument("--message", help="answer this one message and exit")
    from mistral7b.moderation.chat import add_chat_options

    add_chat_options(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="continue a prompt")
    add_model_options(p)
    add_parallel_option(p)
    _sampling_options(p, temperature=0.0, max_tokens=64)
    p.add_argument("--prompt", help="prompt text (BOS is added as the tokenizer says)")
    p.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--json", action="store_true", help="print one JSON object with ids, text and logprobs")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("tokenize", help="print the token ids of a text or a chat")
    p.add_argument("--model")
    p.add_argument("--text")
    p.add_argument("--messages", help="JSON file: [{\"role\": ..., \"content\": ...}, ...]")
    p.add_argument("--no-bos", action="store_true",
                   help="with --text: no BOS even where the checkpoint adds one (its tokenizer settings decide, "
                   "as for generate --prompt and the server)")
    p.add_argument("--safe-prompt", action="store_true", help="with --messages: prepend the guardrail prompt")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("info", help="print the resolved model config")
    p.add_argument("--model")
    p.add_argument("--sliding-window", type=window, default="keep")
    p.set_defaults(func=cmd_info)

    from mistral7b.commands import register_all

    register_all(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except Mistral7BError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        code = 130
    from mistral7b.distributed.launch import end_torchrun_driver

    end_torchrun_driver(code)  # rank 0 of a torchrun group ends here (no-op otherwise)
    return code


if __name__ == "__main__":
    sys.exit(main())
