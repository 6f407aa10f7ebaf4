#!/usr/bin/env python3
"""Online-serving load generator for any OpenAI-compatible server (`vllm bench serve` conventions).

Standalone: the standard library plus aiohttp (no import of mistral7b), so it runs against our own
`mistral7b serve`, vLLM, llama.cpp's `llama-server` or llama-cpp-python's `llama_cpp.server` alike.
It runs from /work/main/.venv (aiohttp 3.14 is there) or from any venv with `pip install aiohttp`
(/tmp/llamacpp-venv got it that way, see bench/serve_peer.sh).

    python bench/serve.py --base-url http://127.0.0.1:8000/v1 --label mistral7b \
        --input-len 128 --output-len 128 --concurrency 1,4,16 --num-prompts 16,32,32 \
        --json-out /tmp/serve_results.json
    python bench/serve.py --table-from /tmp/serve_results.json     # one table over every saved run

What it does, per concurrency level of the sweep: sends --num-prompts streamed requests with at most
that many in flight (optionally paced by --request-rate, Poisson arrivals like vLLM), then reports

  * TTFT  time from sending the request to the first streamed chunk that carries text;
  * ITL   gaps between successive chunks that carry text (all requests pooled);
  * TPOT  (e2e - TTFT) / (output_tokens - 1) per request (requests with >= 2 output tokens);
  * E2E   request latency; and per level request throughput (completed / duration), output token
          throughput and total (prompt + output) token throughput.

Mean, median and p99 are in milliseconds. One markdown row per (label, concurrency).

Prompts (--prompt-mode):
  ids    seeded random token ids in [--id-low, --id-high), exactly --input-len of them, sent as
         `"prompt": [ids]` to /v1/completions (vLLM and llama.cpp's llama-server accept this);
  text   the same random ids turned into text through the server's detokenize endpoint, then adjusted
         (re-tokenize, cut or pad, repeat) until the text tokenizes to exactly --input-len tokens; used
         for servers that take only string prompts (llama-cpp-python's server: `prompt: str | list[str]`);
  words  seeded random English words; if the server has a tokenize endpoint the word count is adjusted
         to exactly --input-len tokens, otherwise it is --input-len words (the real count is reported
         from `usage.prompt_tokens`). The default for --endpoint chat (the chat template adds tokens).
  auto   (default) completions: ids if a 1-token probe with an id prompt succeeds, else text, else
         words; chat: words.
Tokenize endpoints probed: {root}/extras/tokenize + /extras/detokenize (llama-cpp-python),
{root}/tokenize + /detokenize (vLLM, llama-server), {base}/tokenize.

Output length: every request asks for max_tokens = --output-len, temperature 0, stream=true,
stream_options.include_usage, and `"ignore_eos": true` (a vLLM / llama-server extension). A server that
ignores unknown fields may still stop at an end-of-generation token, so the report counts requests whose
output length != --output-len ("len mismatch"). Ways to force the full length:
  --min-tokens          also send "min_tokens": output-len (vLLM; llama-cpp-python honours it, but only
                        for the one token it calls EOS, while it stops on every end-of-generation token);
  --ban-token-ids 0,2,4 send "logit_bias": {"0": -100, "2": -100, "4": -100}: the end-of-generation
                        tokens can never win a greedy step. SmolLM2's EOG set in llama.cpp is 0 <|endoftext|>,
                        2 <|im_end|> (the GGUF's eos) and 4 <reponame> (llama_vocab_is_eog). This is what
                        the llama-cpp-python run in bench/README.md uses (no measurable cost per token);
  --extra-body JSON     merged into every request body.
Output token counts come from the final `usage` chunk when the server sends one; otherwise (llama-cpp-
python 0.3.x ignores stream_options) from the number of text-carrying chunks, which equals the token
count for servers that stream one token per chunk (llama-cpp-python holds back incomplete UTF-8 bytes
and then sends 2 tokens in one chunk: rare; the `tokens from` column says which source was used).
Prompt token counts likewise come from `usage.prompt_tokens`, else from what was sent (for chat without
usage that is the user text only, not the chat template's extra tokens).

TTFT and ITL count only chunks that carry text (a chat server's first `{"role": "assistant"}` delta is
not a token); `vllm bench serve` counts any chunk with choices, which differs only for such servers.

On a machine shared with other jobs pass --server-pid (a local server): each level then reports the CPU
cores the server, this script and everything else used. llama.cpp with 2 threads on 2 cores slows down
by 100x or more when another process competes for a core (its threads spin at barriers), so a level
with other > ~0.1 cores should be rerun.

Errors (connection refused, HTTP 4xx/5xx, an SSE `error` object, a timeout) are counted per level and
the first few messages printed; they do not stop the sweep.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field

try:
    import aiohttp
except ImportError:  # pragma: no cover
    sys.exit("error: bench/serve.py needs aiohttp (pip install aiohttp); /work/main/.venv has it")

# 256 common English words; prompts in `words` mode are drawn from these.
_WORD_TEXT = """
the of and to in is that for it as was with be by on not he this are or his from at which but have
an they you were her she there been one all we their has would when if so no will more can out some
time what up into only other new could its may then first any these two man like our now made most
over after did many before must through years where much your way well down should because each
just those people how too little state good very make world still own see men work long get here
between both life being under never day same another know while last might great old year off come
since against go came right used take three states himself few house use during without again
place around however home small found thought went say part once general high upon school every
does got united left number course war until always away something fact though water less public
put think almost hand enough far took head yet government system better set told nothing night end
why called didn find going look asked later knew point next program city business give group toward
young days let room president side social present given several order national possible rather
second face per among form important often things looked early white case become large big need
four within felt along children saw best church ever least power development light thing seemed
family interest want members mind country area others done turned although open god service
"""
WORDS = _WORD_TEXT.split()

DEFAULT_HEADERS = {"User-Agent": "mistral7b-bench-serve/1", "Accept": "text/event-stream"}


# ------------------------------------------------------------------------------------------------
# results

@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int | None = None    # usage.prompt_tokens, else what we sent (ids / tokenized)
    output_tokens: int = 0
    tokens_from: str = "chunks"          # "usage" or "chunks"
    ttft: float = 0.0                    # seconds
    e2e: float = 0.0
    itl: list = field(default_factory=list)
    chunks: int = 0                      # text-carrying chunks
    done: bool = False                   # saw data: [DONE]
    finish_reason: str | None = None
    start: float = 0.0                   # perf_counter offsets from the level's start


def percentile(values, q):
    """numpy.percentile's default (linear interpolation)."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stats_ms(values):
    if not values:
        return {"mean": float("nan"), "median": float("nan"), "p99": float("nan")}
    return {"mean": 1e3 * sum(values) / len(values), "median": 1e3 * percentile(values, 50),
            "p99": 1e3 * percentile(values, 99)}


def summarize(results, duration, output_len, nominal_input_len):
    good = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in good)
    in_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else nominal_input_len for r in good)
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in good if r.output_tokens > 1]
    itls = [x for r in good for x in r.itl]
    sources = sorted({r.tokens_from for r in good})
    return {
        "completed": len(good),
        "failed": len(results) - len(good),
        "len_mismatch": sum(1 for r in good if r.output_tokens != output_len),
        "no_done": sum(1 for r in good if not r.done),
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "mean_prompt_tokens": in_tokens / len(good) if good else float("nan"),
        "mean_output_tokens": out_tokens / len(good) if good else float("nan"),
        "request_throughput": len(good) / duration if duration > 0 else float("nan"),
        "output_throughput": out_tokens / duration if duration > 0 else float("nan"),
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration > 0 else float("nan"),
        "ttft_ms": stats_ms([r.ttft for r in good]),
        "tpot_ms": stats_ms(tpots),
        "itl_ms": stats_ms(itls),
        "e2el_ms": stats_ms([r.e2e for r in good]),
        "tokens_from": "+".join(sources) if sources else "-",
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }


# ------------------------------------------------------------------------------------------------
# HTTP helpers

def url_root(base_url):
    """http://host:port/v1 -> http://host:port"""
    b = base_url.rstrip("/")
    return b.removesuffix("/v1")


async def get_json(session, url, headers):
    async with session.get(url, headers=headers) as r:
        if r.status != 200:
            raise RuntimeError(f"GET {url}: HTTP {r.status}: {(await r.text())[:200]}")
        return await r.json(content_type=None)


async def post_json(session, url, body, headers):
    async with session.post(url, json=body, headers=headers) as r:
        text = await r.text()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {text[:200]}")
        return json.loads(text)


class Tokenizer:
    """The server's own tokenize/detokenize endpoints, whichever flavour answers."""

    def __init__(self, session, base_url, model, headers):
        self.session, self.model, self.headers = session, model, headers
        self.root, self.base = url_root(base_url), base_url.rstrip("/")
        self.flavour = None

    async def probe(self):
        flavours = [
            ("llama-cpp-python", f"{self.root}/extras/tokenize", f"{self.root}/extras/detokenize"),
            ("vllm", f"{self.root}/tokenize", f"{self.root}/detokenize"),
            ("llama-server", f"{self.root}/tokenize", f"{self.root}/detokenize"),
            ("v1", f"{self.base}/tokenize", f"{self.base}/detokenize"),
        ]
        for name, tok_url, detok_url in flavours:
            self.flavour = (name, tok_url, detok_url)
            try:
                ids = await self.tokenize("hello world")
                if ids and all(isinstance(i, int) for i in ids):
                    return name
            except Exception:  # noqa: BLE001, S112 (a flavour that does not answer is skipped)
                continue
        self.flavour = None
        return None

    def _tok_body(self, text):
        name = self.flavour[0]
        if name == "llama-cpp-python":
            return {"input": text, "model": self.model}
        if name == "llama-server":
            return {"content": text, "add_special": False}
        return {"model": self.model, "prompt": text, "add_special_tokens": False}

    async def tokenize(self, text):
        data = await post_json(self.session, self.flavour[1], self._tok_body(text), self.headers)
        toks = data.get("tokens")
        if toks and isinstance(toks[0], dict):  # llama-server with_pieces
            toks = [t["id"] for t in toks]
        return toks

    async def detokenize(self, ids):
        name = self.flavour[0]
        body = {"tokens": ids} if name in ("llama-cpp-python", "llama-server") else {"model": self.model, "tokens": ids}
        data = await post_json(self.session, self.flavour[2], body, self.headers)
        for key in ("text", "prompt", "content"):
            if isinstance(data.get(key), str):
                return data[key]
        raise RuntimeError(f"unexpected detokenize answer {str(data)[:100]}")


# ------------------------------------------------------------------------------------------------
# prompts

def random_ids(rng, n, lo, hi):
    return [rng.randrange(lo, hi) for _ in range(n)]


class TextIds:
    """Random ids that decode to whole UTF-8 text on their own.

    A byte-level BPE vocabulary has tokens that are a fragment of a multi-byte character; llama-cpp-python's
    /extras/detokenize answers HTTP 500 for them (vLLM writes U+FFFD). Ids are checked in batches and a
    failing batch is bisected, so each id is tested about once; bad ones are redrawn."""

    def __init__(self, tok, rng, lo, hi):
        self.tok, self.rng, self.lo, self.hi = tok, rng, lo, hi
        self.good, self.bad = set(), set()

    async def _check(self, ids):
        if not ids:
            return
        try:
            text = await self.tok.detokenize(ids)
            ok = "\ufffd" not in text
        except RuntimeError:
            ok = False
        if ok:
            self.good.update(ids)
        elif len(ids) == 1:
            self.bad.add(ids[0])
        else:
            await self._check(ids[: len(ids) // 2])
            await self._check(ids[len(ids) // 2:])

    async def draw(self, n):
        out = []
        while len(out) < n:
            ids = [i for i in random_ids(self.rng, n - len(out), self.lo, self.hi) if i not in self.bad]
            await self._check(sorted({i for i in ids if i not in self.good}))
            out += [i for i in ids if i in self.good]
        return out


async def text_from_ids(tok, ids_src, n, tries=12):
    """vLLM's random dataset trick: decode random ids, re-encode, cut or pad until exactly n tokens."""
    ids = await ids_src.draw(n)
    text = await tok.detokenize(ids)
    for _ in range(tries):
        got = await tok.tokenize(text)
        if len(got) == n:
            return text, n
        ids = got[:n] if len(got) > n else got + await ids_src.draw(n - len(got))
        try:
            text = await tok.detokenize(ids)
        except RuntimeError:  # a cut that splits a character
            ids = ids[:-1] + await ids_src.draw(1)
            text = await tok.detokenize(ids)
    got = await tok.tokenize(text)
    return text, len(got)


async def words_prompt(tok, rng, n, tries=40):
    words = [rng.choice(WORDS) for _ in range(n)]
    if tok is None:
        return " ".join(words), None
    count = None
    for _ in range(tries):
        count = len(await tok.tokenize(" ".join(words)))
        if count == n:
            break
        if count > n:
            del words[-max(1, (count - n) // 2):]
        else:
            words += [rng.choice(WORDS) for _ in range(max(1, (n - count) // 2))]
    return " ".join(words), count


# ------------------------------------------------------------------------------------------------
# one request

def make_body(args, model, prompt):
    body = {"model": model, "max_tokens": args.output_len, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.min_tokens:
        body["min_tokens"] = args.output_len
    if args.ban_token_ids:
        body["logit_bias"] = {str(t): -100 for t in args.ban_token_ids}
    if args.extra_body:
        body.update(args.extra_body)
    return body


def chunk_text(choice, chat):
    if chat:
        delta = choice.get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")
    return choice.get("text") or ""


async def lines_then_rest(stream):
    """aiohttp's line iterator, then b"" once at the end so that a last line without a newline is read."""
    async for raw in stream:
        yield raw
    yield b""


async def send_request(session, url, headers, body, chat, sent_prompt_tokens, t0, timeout):
    res = RequestResult(prompt_tokens=sent_prompt_tokens)
    st = time.perf_counter()
    res.start = st - t0
    last = st
    usage_tokens = None
    try:
        async with session.post(url, json=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:160]}"
                return res
            buf = b""
            async for raw in lines_then_rest(resp.content):
                buf += raw
                if raw and not buf.endswith(b"\n"):
                    continue                   # a line split across reads
                line, buf = buf.strip(), b""
                if not line or line.startswith(b":"):
                    continue                   # blank separator or SSE comment (ping)
                if not line.startswith(b"data:"):
                    continue                   # event:/id:/retry: fields
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    res.done = True
                    break
                data = json.loads(payload)
                if "error" in data and not data.get("choices"):
                    err = data["error"]
                    message = err.get("message", str(err)) if isinstance(err, dict) else str(err)
                    res.error = "stream error: " + message[:160]
                    return res
                now = time.perf_counter()
                for choice in data.get("choices") or []:
                    if chunk_text(choice, chat):
                        if res.chunks == 0:
                            res.ttft = now - st
                        else:
                            res.itl.append(now - last)
                        last = now
                        res.chunks += 1
                    if choice.get("finish_reason"):
                        res.finish_reason = choice["finish_reason"]
                usage = data.get("usage")
                if usage:
                    if usage.get("completion_tokens") is not None:
                        usage_tokens = usage["completion_tokens"]
                    if usage.get("prompt_tokens"):
                        res.prompt_tokens = usage["prompt_tokens"]
        res.e2e = time.perf_counter() - st
        if usage_tokens is not None:
            res.output_tokens, res.tokens_from = usage_tokens, "usage"
        else:
            res.output_tokens, res.tokens_from = res.chunks, "chunks"
        if res.chunks == 0:
            res.error = "no text in the stream"
            return res
        res.ok = True
    except TimeoutError:
        res.error = f"timeout after {timeout} s"
    except Exception as exc:  # noqa: BLE001 (connection refused, reset, bad JSON: counted, not fatal)
        res.error = f"{type(exc).__name__}: {str(exc)[:160]}"
    return res


async def run_level(session, args, url, headers, model, prompts, concurrency):
    sem = asyncio.Semaphore(concurrency)
    rng = random.Random(args.seed + concurrency)
    t0 = time.perf_counter()

    async def one(p):
        async with sem:
            return await send_request(session, url, headers, make_body(args, model, p[0]),
                                      args.endpoint == "chat", p[1], t0, args.timeout)

    tasks = []
    for p in prompts:
        tasks.append(asyncio.create_task(one(p)))
        if args.request_rate != float("inf"):
            await asyncio.sleep(rng.expovariate(args.request_rate))
    results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------
# table

def fmt(x, nd=1):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def table(records):
    head = ("| label | conc | ok/failed | len mismatch | in/out tok | dur s | req/s | out tok/s | total tok/s "
            "| TTFT mean / med / p99 ms | TPOT mean / med / p99 ms | ITL mean / med / p99 ms | E2E mean ms |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        s = r["summary"]
        t, p, i = s["ttft_ms"], s["tpot_ms"], s["itl_ms"]
        lines.append(
            f"| {r['label']} | {r['concurrency']} | {s['completed']}/{s['failed']} | {s['len_mismatch']} "
            f"| {fmt(s['mean_prompt_tokens'], 0)}/{fmt(s['mean_output_tokens'], 1)} ({s['tokens_from']}) "
            f"| {fmt(s['duration_s'])} | {fmt(s['request_throughput'], 2)} | {fmt(s['output_throughput'])} "
            f"| {fmt(s['total_token_throughput'])} "
            f"| {fmt(t['mean'])} / {fmt(t['median'])} / {fmt(t['p99'])} "
            f"| {fmt(p['mean'], 2)} / {fmt(p['median'], 2)} / {fmt(p['p99'], 2)} "
            f"| {fmt(i['mean'], 2)} / {fmt(i['median'], 2)} / {fmt(i['p99'], 2)} "
            f"| {fmt(s['e2el_ms']['mean'])} |")
    return "\n".join(lines)


def load_records(path):
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        text = f.read().strip()
    if not text:
        return []
    data = json.loads(text)
    return data if isinstance(data, list) else [data]


# ------------------------------------------------------------------------------------------------
# main

def loadavg():
    """1-minute load average of this machine (None where unknown): a shared machine skews every number."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def cpu_seconds(pid=None):
    """(machine busy CPU-seconds, this process's, the server's) from /proc (Linux; None elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        machine = (sum(v[:8]) - v[3] - v[4]) / tick          # all but idle and iowait
    except (OSError, ValueError):
        return None
    t = os.times()
    server = None
    if pid:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            server = (int(fields[11]) + int(fields[12])) / tick   # utime + stime
        except (OSError, ValueError, IndexError):
            server = None
    return machine, t.user + t.system, server


def cpu_use(before, after, duration):
    """CPU use over a level in cores: the server's, ours, and everything else's (other jobs on a shared box)."""
    if not before or not after or duration <= 0:
        return None
    m, me, srv = (a - b if a is not None and b is not None else None for a, b in zip(after, before))
    out = {"machine": round(m / duration, 2), "bench": round(me / duration, 2)}
    if srv is not None:
        out["server"] = round(srv / duration, 2)
        out["other"] = round((m - me - srv) / duration, 2)
    return out


def int_list(s):
    return [int(x) for x in str(s).split(",") if x.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server's /v1 URL")
    ap.add_argument("--model", default=None, help="model name to send (default: first id of GET /v1/models)")
    ap.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--num-prompts", type=int_list, default=[32],
                    help="requests per level: one number, or one per --concurrency level (e.g. 16,32,32)")
    ap.add_argument("--concurrency", type=int_list, default=[1],
                    help="sweep of max requests in flight, e.g. 1,4,16")
    ap.add_argument("--request-rate", type=float, default=float("inf"),
                    help="Poisson arrival rate in req/s (default inf: all at once, concurrency-capped)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    ap.add_argument("--label", default=None, help="engine name for the table (default: the model name)")
    ap.add_argument("--json-out", default=None, help="append one record per level to this JSON list file")
    ap.add_argument("--warmup", type=int, default=1, help="untimed requests before the sweep")
    ap.add_argument("--prompt-mode", choices=["auto", "ids", "text", "words"], default="auto")
    ap.add_argument("--id-low", type=int, default=1000)
    ap.add_argument("--id-high", type=int, default=30000)
    ap.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                    help='send "ignore_eos": true (default on)')
    ap.add_argument("--min-tokens", action="store_true", help='also send "min_tokens": output-len')
    ap.add_argument("--ban-token-ids", type=int_list, default=[],
                    help='logit_bias -100 on these ids (SmolLM2 end-of-generation ids: 0,2,4)')
    ap.add_argument("--extra-body", type=json.loads, default=None, help="JSON merged into each request")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per request")
    ap.add_argument("--server-pid", type=int, default=None,
                    help="the server's pid, when it runs on this machine: reports the cores it used and "
                         "what other jobs used during each level (a shared machine skews the numbers)")
    ap.add_argument("--no-detail", action="store_true", help="leave per-request numbers out of --json-out")
    ap.add_argument("--table-from", default=None, help="only print the table of a saved --json-out file")
    args = ap.parse_args(argv)
    if len(args.num_prompts) == 1:
        args.num_prompts = args.num_prompts * len(args.concurrency)
    if len(args.num_prompts) != len(args.concurrency):
        ap.error("--num-prompts takes one number or one per --concurrency level")
    return args


async def build_prompts(session, args, model, headers, url, count):
    """Returns (mode, [(prompt, prompt_token_count_or_None)], tokenizer flavour)."""
    rng = random.Random(args.seed)
    tok = Tokenizer(session, args.base_url, model, headers)
    flavour = await tok.probe()
    mode = args.prompt_mode
    if mode == "auto":
        mode = "words" if args.endpoint == "chat" else None
        if mode is None:
            probe = dict(make_body(args, model, random_ids(random.Random(-1), 8, args.id_low, args.id_high)),
                         max_tokens=1, stream=False)
            probe.pop("stream_options", None)
            probe.pop("min_tokens", None)
            try:
                data = await post_json(session, url, probe, headers)
                mode = "ids" if data.get("choices") else None
            except Exception as exc:  # noqa: BLE001
                print(f"# token-id prompts refused ({str(exc)[:120]}); using text prompts", flush=True)
            if mode is None:
                mode = "text" if flavour else "words"
    if mode == "ids" and args.endpoint == "chat":
        sys.exit("error: --prompt-mode ids needs --endpoint completions")
    if mode == "text" and not flavour:
        sys.exit("error: --prompt-mode text needs a tokenize/detokenize endpoint; none answered")
    prompts = []
    ids_src = TextIds(tok, rng, args.id_low, args.id_high) if mode == "text" else None
    for _ in range(count):
        if mode == "ids":
            prompts.append((random_ids(rng, args.input_len, args.id_low, args.id_high), args.input_len))
        elif mode == "text":
            prompts.append(await text_from_ids(tok, ids_src, args.input_len))
        else:
            prompts.append(await words_prompt(tok if flavour else None, rng, args.input_len))
    return mode, prompts, flavour


async def main_async(args):
    headers = dict(DEFAULT_HEADERS)
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    base = args.base_url.rstrip("/")
    url = f"{base}/chat/completions" if args.endpoint == "chat" else f"{base}/completions"
    limit = max(args.concurrency) + 4
    # A new connection per request: llama-server closes idle keep-alive connections, and a request written to
    # one fails ("Can not write request body"); a loopback handshake costs well under a millisecond.
    connector = aiohttp.TCPConnector(limit=limit, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        model = args.model
        if model is None:
            try:
                model = (await get_json(session, f"{base}/models", headers))["data"][0]["id"]
            except Exception as exc:  # noqa: BLE001
                sys.exit(f"error: cannot list models at {base}/models ({exc}); pass --model")
        label = args.label or model
        total = sum(args.num_prompts) + args.warmup
        mode, prompts, flavour = await build_prompts(session, args, model, headers, url, total)
        counts = [c for _, c in prompts if c is not None]
        print(f"# {label}: model {model!r}, {url}, prompt mode {mode}, tokenizer endpoint {flavour or 'none'}, "
              f"prompt tokens {min(counts) if counts else '?'}..{max(counts) if counts else '?'} "
              f"(target {args.input_len}), output {args.output_len}", flush=True)

        load = loadavg()
        if load is not None and load > 0.5 * (os.cpu_count() or 1):
            print(f"# warning: load average {load} on {os.cpu_count()} CPUs before the run: if the server shares "
                  f"this machine, other work skews the numbers", flush=True)
        warm, prompts = prompts[: args.warmup], prompts[args.warmup:]
        for p in warm:
            r = await send_request(session, url, headers, make_body(args, model, p[0]),
                                   args.endpoint == "chat", p[1], time.perf_counter(), args.timeout)
            print(f"# warmup: {'ok' if r.ok else 'FAILED ' + r.error}, {r.output_tokens} tokens "
                  f"({r.tokens_from}), e2e {r.e2e:.2f} s, finish {r.finish_reason}", flush=True)

        records = []
        for conc, n in zip(args.concurrency, args.num_prompts):
            level_prompts, prompts = prompts[:n], prompts[n:]
            load0, cpu0 = loadavg(), cpu_seconds(args.server_pid)
            results, duration = await run_level(session, args, url, headers, model, level_prompts, conc)
            load1, cpu = loadavg(), cpu_use(cpu0, cpu_seconds(args.server_pid), duration)
            summary = summarize(results, duration, args.output_len, args.input_len)
            rec = {
                "label": label, "concurrency": conc, "num_prompts": n, "model": model,
                "base_url": args.base_url, "endpoint": args.endpoint, "prompt_mode": mode,
                "input_len": args.input_len, "output_len": args.output_len,
                "request_rate": None if args.request_rate == float("inf") else args.request_rate,
                "seed": args.seed, "ignore_eos": args.ignore_eos, "min_tokens": args.min_tokens,
                "ban_token_ids": args.ban_token_ids, "extra_body": args.extra_body,
                "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(),
                "cpus": os.cpu_count(), "loadavg_1m_before_after": [load0, load1], "cpu_cores_used": cpu,
                "summary": summary,
            }
            if not args.no_detail:
                rec["requests"] = [asdict(r) for r in results]
            records.append(rec)
            s = summary
            print(f"# c={conc}: {s['completed']} ok, {s['failed']} failed, {s['len_mismatch']} length "
                  f"mismatches, {s['duration_s']:.1f} s, {s['output_throughput']:.1f} out tok/s, "
                  f"load average {load0} -> {load1}, CPU cores busy {cpu}", flush=True)
            for e in s["errors"]:
                print(f"#   error: {e}", flush=True)
            if s["len_mismatch"]:
                lens = sorted({r.output_tokens for r in results if r.ok and r.output_tokens != args.output_len})
                print(f"#   output lengths != {args.output_len}: {lens[:10]} (see --ban-token-ids / --min-tokens)",
                      flush=True)

    return records


def save_records(path, records):
    saved = load_records(path) + records
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(saved, f, indent=1)
    os.replace(tmp, path)


def main(argv=None):
    args = parse_args(argv)
    if args.table_from:
        print(table(load_records(args.table_from)))
        return 0
    records = asyncio.run(main_async(args))
    if args.json_out:
        save_records(args.json_out, records)
    print()
    print(table(records))
    return 0 if all(r["summary"]["completed"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
