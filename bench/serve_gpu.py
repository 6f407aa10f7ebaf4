"""Serving benchmark of what clients send, beside the engine's own greedy rate in the same run.

GPU (default): a Mistral-7B-shaped checkpoint of random bf16 weights (bench/gpu.py's, written to --checkpoint or
reused from it) with Mistral's v1 tokenizer (mistral-common's copy), so the server detokenizes; CPU (--device
cpu): the embedded model. In order, each in its own section of the table:

1. engine: LLMEngine stepped in-process (bench/gpu.py's `drive`), --requests prompts of --input-len random ids,
   --output-len new tokens, greedy, ignore_eos: the reference every other row is a percentage of. Then
   `LLM.generate` of the same requests greedy and at temperature 1.0 / top_p 0.95.
2. server: `mistral7b serve` started as a process on a loopback port, driven by bench/serve.py (aiohttp,
   streaming /v1/completions with token-id prompts, stream_options.include_usage) at --concurrency clients:
   greedy; temperature 1.0 + top_p 0.95; a mix (seeded, presence and frequency penalties, logprobs: every
   request the same body, as bench/serve.py sends one); the sampled level again with a JSON schema
   (structured_outputs, a schema no answer completes within the output length); and batch 1 at temperature
   0.7 / top_p 0.9, without and with the schema. Output
   tok/s, TTFT and inter-token latency (median, p99). --profile records the server with py-spy during the
   greedy level (flame data in --out's folder).
3. grid (--grid, engine level, greedy): input/output lengths 128/128, 128/2048, 2048/128, 2048/2048, 1000/1000 with
   --grid-requests requests each (TensorRT-LLM's published H100 grid).

    python bench/serve_gpu.py --checkpoint /tmp/ckpt --out $OUT/serve_gpu.json [--grid] [--profile]
    python bench/serve_gpu.py --device cpu --requests 16 --concurrency 16 --input-len 128 --output-len 64
    python bench/serve_gpu.py --device cpu --tiny --requests 256 --concurrency 256 --input-len 32 --output-len 256

--tiny (CPU): a Mistral of 2 layers of width 64 with random float32 weights and the v1 tokenizer: its steps cost
next to nothing, so what the server adds per token (detokenization, events, JSON, HTTP) is what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.gpu import drive, free, greedy, random_prompts, write_checkpoint  # noqa: E402
from mistral7b.config import PRESETS, ModelArgs  # noqa: E402
from mistral7b.engine.llm import LLM  # noqa: E402
from mistral7b.engine.sampling_params import SamplingParams  # noqa: E402

SAMPLED = {"temperature": 1.0, "top_p": 0.95}
MIX = {"temperature": 0.8, "top_p": 0.9, "seed": 1234, "presence_penalty": 0.5, "frequency_penalty": 0.3,
       "logprobs": 1}
BATCH1 = {"temperature": 0.7, "top_p": 0.9}
# A JSON schema no answer can complete within --output-len tokens (200 objects), so constrained requests run
# as long as the others and the rates compare: the grammar's cost alone (engine/structured_output.py).
BENCH_SCHEMA = {"type": "array", "minItems": 200, "items": {
    "type": "object", "properties": {"id": {"type": "integer"}, "name": {"type": "string", "maxLength": 12},
                                     "kind": {"enum": ["alpha", "beta", "gamma"]}},
    "required": ["id", "name", "kind"], "additionalProperties": False}}
JSON_SAMPLED = {**SAMPLED, "structured_outputs": {"json": BENCH_SCHEMA}}
JSON_BATCH1 = {**BATCH1, "structured_outputs": {"json": BENCH_SCHEMA}}
TINY = ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                 vocab_size=32000, max_seq_len=4096)
GRID = [(128, 128), (128, 2048), (2048, 128), (2048, 2048), (1000, 1000)]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def llm_options(a: argparse.Namespace, max_model_len: int) -> dict[str, Any]:
    return dict(device=a.device, dtype="bfloat16" if a.device == "cuda" else "auto", progress=False,
                quantize=None if a.device == "cuda" else "auto", max_model_len=max_model_len,
                max_batch_size=a.max_num_seqs, chunk_size=a.chunk_size,
                engine_options={"max_num_batched_tokens": a.max_num_batched_tokens})


def engine_level(a: argparse.Namespace, model: str, vocab: int) -> dict:
    llm = LLM(model, **llm_options(a, a.input_len + a.output_len + 8))
    prompts = random_prompts(a.requests, a.input_len, vocab, 3)
    drive(llm.engine, prompts, greedy(4))  # warm-up: kernels and graphs of every batch size the run meets
    per_req, t0, t1 = drive(llm.engine, prompts, greedy(a.output_len))
    out = {"engine_greedy": sum(len(r) for r in per_req) / (t1 - t0)}
    log(f"engine greedy: {out['engine_greedy']:,.0f} output tok/s")
    for name, params in (("generate_greedy", greedy(a.output_len)),
                         ("generate_sampled", SamplingParams(max_tokens=a.output_len, ignore_eos=True, **SAMPLED))):
        t = time.perf_counter()
        results = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        out[name] = sum(len(r.outputs[0].token_ids) for r in results) / (time.perf_counter() - t)
        log(f"LLM.generate {name}: {out[name]:,.0f} output tok/s")
    llm.close()
    del llm
    free()
    return out


def grid(a: argparse.Namespace, model: str, vocab: int) -> dict:
    out = {}
    llm = LLM(model, **llm_options(a, 2048 + 2048 + 8))
    drive(llm.engine, random_prompts(8, 128, vocab, 1), greedy(4))
    for n_in, n_out in GRID:
        per_req, t0, t1 = drive(llm.engine, random_prompts(a.grid_requests, n_in, vocab, n_in + n_out),
                                greedy(n_out))
        out[f"{n_in}/{n_out}"] = sum(len(r) for r in per_req) / (t1 - t0)
        log(f"grid {n_in}/{n_out}: {out[f'{n_in}/{n_out}']:,.0f} output tok/s ({a.grid_requests} requests)")
    llm.close()
    del llm
    free()
    return out


def start_server(a: argparse.Namespace, model: str, port: int, log_path: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mistral7b", "serve", "--model", model, "--port", str(port), "--quiet",
           "--log-level", "warning", "--device", a.device, "--max-num-seqs", str(a.max_num_seqs),
           "--max-num-batched-tokens", str(a.max_num_batched_tokens), "--chunk-size", str(a.chunk_size),
           "--max-model-len", str(a.input_len + a.output_len + 8), "--max-queue", str(4 * a.requests)]
    if a.device == "cuda":
        cmd += ["--dtype", "bfloat16", "--quantize", "none"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        x for x in (os.path.join(ROOT, "src"), os.environ.get("PYTHONPATH")) if x)}
    proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env)
    import urllib.request

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {open(log_path).read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not come up in 600 s")


def client(a: argparse.Namespace, port: int, label: str, body: dict, concurrency: int, prompts: int,
           json_out: str, server_pid: int) -> dict:
    cmd = [sys.executable, os.path.join(HERE, "serve.py"), "--base-url", f"http://127.0.0.1:{port}/v1",
           "--label", label, "--input-len", str(a.input_len), "--output-len", str(a.output_len),
           "--concurrency", str(concurrency), "--num-prompts", str(prompts), "--prompt-mode", "ids",
           "--extra-body", json.dumps(body), "--json-out", json_out, "--no-detail", "--server-pid", str(server_pid)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"bench/serve.py failed ({done.returncode}): {done.stdout[-2000:]} {done.stderr[-3000:]}")
    with open(json_out) as f:
        summary = json.load(f)[-1]["summary"]
    if summary["failed"] or summary["len_mismatch"]:
        raise RuntimeError(f"{label}: {summary['failed']} failed, {summary['len_mismatch']} of the wrong length: "
                           f"{summary['errors']}")
    return summary


STALLS = ("engine_gc_pause_seconds_total", "api_gc_pause_seconds_total", "cuda_alloc_retries_total")


def stall_counters(port: int) -> dict[str, float]:
    """What could stall every stream at once, as the server counts it (server/pauses.py): GC pauses of its two
    processes, the CUDA allocator's retries."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        for name in STALLS:
            if line.startswith(f"mistral7b:{name}{{"):
                out[name] = float(line.rsplit(" ", 1)[1])
    return out


def server_levels(a: argparse.Namespace, model: str, out_dir: str) -> dict:
    port, results = 8800 + os.getpid() % 100, {}
    proc = start_server(a, model, port, os.path.join(out_dir, "serve_gpu_server.log"))
    json_out = os.path.join(tempfile.mkdtemp(), "levels.json")
    try:
        # warm-up at full size: the pre-fill kernels compile for the shapes the levels meet, not inside the first
        client(a, port, "warm-up", {"temperature": 0}, a.concurrency, a.requests, json_out, proc.pid)
        client(a, port, "warm-up json", JSON_SAMPLED, 4, 4, json_out, proc.pid)  # the schema compiled, once
        levels = [("greedy", {"temperature": 0}, a.concurrency, a.requests),
                  ("T=1.0 top_p=0.95", SAMPLED, a.concurrency, a.requests),
                  ("mix: seed, penalties, logprobs", MIX, a.concurrency, a.requests),
                  ("json schema, T=1.0 top_p=0.95", JSON_SAMPLED, a.concurrency, a.requests),
                  ("batch 1, T=0.7 top_p=0.9", BATCH1, 1, 4),
                  ("batch 1, json schema, T=0.7 top_p=0.9", JSON_BATCH1, 1, 4)]
        for label, body, concurrency, prompts in levels:
            spy = None
            if a.profile and label == "greedy":
                spy = subprocess.Popen(["py-spy", "record", "-p", str(proc.pid), "-d", "20", "-r", "100", "-f", "raw",
                                        "--nonblocking",
                                        "--threads", "-o", os.path.join(out_dir, "serve_gpu_pyspy.txt")],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            before = stall_counters(port)
            results[label] = client(a, port, label, body, concurrency, prompts, json_out, proc.pid)
            after = stall_counters(port)
            if spy is not None:
                spy.wait(timeout=120)
            r = results[label]
            r["stalls"] = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in STALLS}
            log(f"server {label}: {r['output_throughput']:,.0f} output tok/s, TTFT p99 {r['ttft_ms']['p99']:.0f} ms, "
                f"ITL median / p99 {r['itl_ms']['median']:.1f} / {r['itl_ms']['p99']:.1f} ms; GC engine / API "
                f"{r['stalls'][STALLS[0]]:.2f} / {r['stalls'][STALLS[1]]:.2f} s, allocator retries "
                f"{r['stalls'][STALLS[2]]:.0f}")
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--checkpoint", default=None, help="GPU: native checkpoint folder, written if it has none")
    p.add_argument("--out", default=None, help="JSON results (default: a temporary file)")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--chunk-size", type=int, default=2048)
    p.add_argument("--grid", action="store_true", help="also the engine-level input/output grid")
    p.add_argument("--grid-requests", type=int, default=256)
    p.add_argument("--skip", action="append", default=[], help="sections to skip: engine, server")
    p.add_argument("--profile", action="store_true", help="py-spy the server during the greedy level")
    p.add_argument("--tiny", action="store_true", help="CPU: a tiny random model, to measure the server's own cost")
    a = p.parse_args()
    out_path = a.out or os.path.join(tempfile.mkdtemp(), "serve_gpu.json")
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if a.device == "cuda" or a.tiny:
        args = TINY if a.tiny else PRESETS["mistral-7b-v0.1"]
        model = a.checkpoint or tempfile.mkdtemp(prefix="mistral7b_serve_gpu_")
        if not os.path.exists(os.path.join(model, "params.json")):
            log(f"writing a random checkpoint to {model}")
            write_checkpoint(model, args, torch.device(a.device), torch.float32 if a.tiny else torch.bfloat16)
            free()
        if not any(n.startswith(("tokenizer", "tekken")) for n in os.listdir(model)):
            # Mistral 7B's own tokenizer (its vocabulary is the preset's), so the server detokenizes as it would
            import shutil

            import mistral_common

            shutil.copy(os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1"), model)
        vocab = args.vocab_size
    else:
        from mistral7b.default_model import default_model_path

        model, vocab = default_model_path(), 49152
    r: dict[str, Any] = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
                         "config": vars(a), "date": time.strftime("%Y-%m-%d %H:%M")}
    if "engine" not in a.skip:
        r["engine"] = engine_level(a, model, vocab)
    if "server" not in a.skip:
        r["server"] = server_levels(a, model, out_dir)
    if a.grid:
        r["grid"] = grid(a, model, vocab)
    with open(out_path, "w") as f:
        json.dump(r, f, indent=2)
    base = r.get("engine", {}).get("engine_greedy")
    print(f"\n## serve_gpu ({r['device']}, {r['date']}, {a.requests} requests of {a.input_len} in / "
          f"{a.output_len} out, "
          f"{a.concurrency} concurrent clients)\n")
    print("| path | output tok/s | vs engine greedy | TTFT p99 ms | ITL median / p99 ms |")
    print("|---|---|---|---|---|")
    pct = (lambda v: f"{100 * v / base:.0f}%") if base else (lambda v: "")
    for name, value in r.get("engine", {}).items():
        print(f"| {name} | {value:,.0f} | {pct(value)} | | |")
    for label, s in r.get("server", {}).items():
        print(f"| server: {label} | {s['output_throughput']:,.0f} | {pct(s['output_throughput'])} | "
              f"{s['ttft_ms']['p99']:.0f} | {s['itl_ms']['median']:.1f} / {s['itl_ms']['p99']:.1f} |")
    for name, value in r.get("grid", {}).items():
        print(f"| grid {name} (engine, greedy) | {value:,.0f} | | | |")


if __name__ == "__main__":
    main()
