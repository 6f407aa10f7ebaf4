"""CPU benchmark: our engine against llama.cpp (llama-cpp-python) and HF transformers on the same GGUF.

One run measures, for each engine in its own fresh process (so peak RSS and load time are its own), with the
same thread count and the same prompt token ids: load time, pre-fill tok/s of a 500-token prompt, decode tok/s
of 256 greedy tokens after it (EOS ignored), and peak RSS; then the time from command to first token of
`mistral7b chat --message`, the decode floor (weight bytes read per token / measured copy bandwidth), and the
perplexity of each of our quantization modes on a held-out text. Medians of --repeats runs.

    python bench/cpu.py [--model FILE.gguf] [--threads 2] [--repeats 3] [--skip hf] [--isa avx2]

`--isa avx2` measures an AVX2 machine on an AVX-512 one: our engine and HF run with PyTorch, MKL and oneDNN
held to AVX2 (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA), and llama.cpp should be a build
without AVX-512 (--llama-python: a venv where llama-cpp-python was built with GGML_NATIVE=OFF GGML_AVX512=OFF).
Every row says which instruction sets its engine used.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

PROMPT_TOKENS = 500
DECODE_TOKENS = 256


def prompt_ids(model: str) -> list[int]:
    from bench.heldout import heldout_text
    from mistral7b.engine.llm import checkpoint_tokenizer
    from mistral7b.loading import open_checkpoint

    ids = checkpoint_tokenizer(open_checkpoint(model)).encode(heldout_text() * 3, add_bos=False)
    return ids[:PROMPT_TOKENS]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- workers: each runs in a fresh process and prints one JSON line -------------------------------------
def worker_ours(model: str, ids: list[int], threads: int, quantize: str) -> dict:
    from mistral7b.engine.llm import LLM
    from mistral7b.engine.sampling_params import SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model, quantize=None if quantize == "none" else quantize, threads=threads, progress=False,
              chunk_size=len(ids), engine_options={"enable_prefix_caching": False})
    load = time.perf_counter() - t0
    params = SamplingParams(temperature=0, max_tokens=DECODE_TOKENS, ignore_eos=True)
    for _ in llm.stream_ids([ids[:8]], [SamplingParams(temperature=0, max_tokens=2)]):
        pass  # warm-up: first calls into each kernel
    stamps = []
    start = time.perf_counter()  # the serving engine's path: pre-fill in one chunk, then decode
    for ev in llm.stream_ids([ids], [params]):
        if ev.token_id is not None:
            stamps.append(time.perf_counter())
    decode = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    import torch

    from mistral7b import cpu

    ops = cpu.load(notice=False)  # the C++ extension (mistral7b/cpu), built per CPU capability
    isa = f"ATen {torch.backends.cpu.get_cpu_capability()}, {llm.dtype}".replace("torch.", "")
    isa += f", C++ ops {ops.CAPABILITY}" if ops is not None else ", no C++ ops"
    return {"load_s": load, "prefill_tok_s": len(ids) / (stamps[0] - start), "decode_tok_s": 1 / decode,
            "peak_rss_mib": peak_rss_mib(), "version": "", "isa": isa}


def worker_llama(model: str, ids: list[int], threads: int) -> dict:
    import llama_cpp

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=model, n_threads=threads, n_threads_batch=threads, n_ctx=1024,
                          n_batch=512, flash_attn=True, verbose=False)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - t0
    stamps = []
    for _ in range(DECODE_TOKENS):
        token = llm.sample(top_k=1, temp=0.0)
        llm.eval([token])
        stamps.append(time.perf_counter())
    decode = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    info = llama_cpp.llama_print_system_info().decode()
    isa = " ".join(f for f in ("AVX2", "FMA", "F16C", "AVX512", "AVX512_VNNI", "AVX512_BF16", "AMX_INT8")
                   if f"{f} = 1" in info)
    return {"load_s": load, "prefill_tok_s": len(ids) / prefill, "decode_tok_s": 1 / decode,
            "peak_rss_mib": peak_rss_mib(), "version": llama_cpp.__version__, "isa": isa}


def worker_hf(model: str, ids: list[int], threads: int, dtype: str) -> dict:
    import torch
    import transformers

    torch.set_num_threads(threads)
    folder, name = os.path.split(model)
    t0 = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype)).eval()
    load = time.perf_counter() - t0
    x = torch.tensor([ids])
    with torch.inference_mode():
        t0 = time.perf_counter()
        hf(x)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=DECODE_TOKENS, min_new_tokens=DECODE_TOKENS,
                    do_sample=False, pad_token_id=0)
        total = time.perf_counter() - t0
    decode = (total - prefill) / (DECODE_TOKENS - 1)
    return {"load_s": load, "prefill_tok_s": len(ids) / prefill, "decode_tok_s": 1 / decode,
            "peak_rss_mib": peak_rss_mib(), "version": transformers.__version__,
            "isa": f"ATen {torch.backends.cpu.get_cpu_capability()}"}


# ---- the driver ----------------------------------------------------------------------------------------
LLAMA_PYTHON = sys.executable  # the interpreter with llama_cpp (--llama-python: e.g. the peer server's venv)
ISA_ENV: dict[str, str] = {}  # --isa avx2: PyTorch, MKL and oneDNN held to AVX2
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def cpu_flags() -> str:
    """The CPU's SIMD flags (Linux), for the table's heading."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return platform.machine()
    keep = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16")
    return " ".join(f for f in keep if f in flags)


def run_worker(kind: str, model: str, threads: int, ids_file: str, extra: str = "") -> dict:
    python = LLAMA_PYTHON if kind == "llama" else sys.executable
    cmd = [python, __file__, "--worker", kind, "--model", model, "--threads", str(threads),
           "--ids-file", ids_file, "--extra", extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(ISA_ENV if kind != "llama" else {})}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_to_first_token(threads: int) -> float:
    """Seconds from starting `mistral7b chat --message` to the first byte of the answer on stdout."""
    cmd = [sys.executable, "-m", "mistral7b", "chat", "--message", "Hi!", "--max-tokens", "4", "--quiet",
           "--threads", str(threads), "--temperature", "0"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ,
                            "PYTHONUNBUFFERED": "1", **ISA_ENV})
    proc.stdout.read(1)
    first = time.perf_counter() - t0
    proc.wait(timeout=120)
    return first


def copy_bandwidth_gbs() -> float:
    import torch

    a = torch.empty(256 * 2**20, dtype=torch.uint8).fill_(1)
    b = torch.empty_like(a)
    b.copy_(a)
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() / best / 1e9  # read + write


def weight_bytes(model: str, quantize: str) -> int:
    """Bytes a decode step reads: every weight of our loaded model (the embedding: one row)."""
    from mistral7b.engine.llm import LLM

    llm = LLM(model, quantize=None if quantize == "none" else quantize, progress=False)
    total = 0
    for name, t in list(llm.model.named_parameters()) + list(llm.model.named_buffers()):
        total += t.numel() * t.element_size()
    emb = llm.model.tok_embeddings
    emb_bytes = sum(t.numel() * t.element_size() for t in list(emb.parameters()) + list(emb.buffers()))
    tied = llm.args.tied_embeddings and not hasattr(llm.model.output, "weight_int8") and \
        not hasattr(llm.model.output, "weight_int4")
    return total - (0 if tied else emb_bytes)


def perplexities(model: str, n_tokens: int = 1024) -> dict[str, float]:
    import torch

    from mistral7b.engine.llm import LLM

    ids = None
    out = {}
    for mode in ("none", "auto", "int8", "int4"):
        llm = LLM(model, quantize=None if mode == "none" else mode, progress=False)
        if ids is None:
            ids = prompt_ids(model)[:n_tokens]
        scores = llm.score([ids])[0]
        out[mode] = math.exp(-sum(scores.logprobs) / len(scores.logprobs))
        del llm
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip", action="append", default=[], help="engines to skip: llama, hf")
    p.add_argument("--worker")
    p.add_argument("--ids-file")
    p.add_argument("--extra", default="")
    p.add_argument("--isa", choices=["native", "avx2"], default="native",
                   help="avx2: run our engine and HF as on an AVX2 machine (see the module docstring)")
    p.add_argument("--llama-python", default=sys.executable,
                   help="Python with llama_cpp installed (default: this one), e.g. /tmp/llamacpp-venv/bin/python")
    a = p.parse_args()
    global LLAMA_PYTHON
    LLAMA_PYTHON = a.llama_python
    if a.isa == "avx2":
        ISA_ENV.update(AVX2_ENV)
        os.environ.update(AVX2_ENV)  # this process's own measurements (weights, perplexity) too
    if a.model is None:
        from mistral7b.default_model import default_model_path

        a.model = default_model_path()
    if a.worker:
        with open(a.ids_file) as f:
            ids = json.load(f)
        fn = {"ours": lambda: worker_ours(a.model, ids, a.threads, a.extra or "auto"),
              "llama": lambda: worker_llama(a.model, ids, a.threads),
              "hf": lambda: worker_hf(a.model, ids, a.threads, a.extra or "float32")}[a.worker]
        print(json.dumps(fn()))
        return

    ids = prompt_ids(a.model)
    ids_file = os.path.join(HERE, ".cpu_bench_ids.json")
    with open(ids_file, "w") as f:
        json.dump(ids, f)
    engines = [("mistral7b (auto: file's quantization)", "ours", "auto"), ("mistral7b int8", "ours", "int8"),
               ("mistral7b int4", "ours", "int4"), ("mistral7b float32 (exact)", "ours", "none")]
    if "llama" not in a.skip:
        engines.append(("llama.cpp (llama-cpp-python, flash attn)", "llama", ""))
    if "hf" not in a.skip:
        engines += [("HF transformers float32", "hf", "float32"), ("HF transformers bfloat16", "hf", "bfloat16")]
    rows = []
    for label, kind, extra in engines:
        runs = [run_worker(kind, a.model, a.threads, ids_file, extra) for _ in range(a.repeats)]
        ok = [r for r in runs if "error" not in r]
        if not ok:
            rows.append((label, runs[0]))
            continue
        med = {k: statistics.median(r[k] for r in ok) for k in ("load_s", "prefill_tok_s", "decode_tok_s",
                                                                  "peak_rss_mib")}
        med["version"] = ok[0].get("version", "")
        med["isa"] = ok[0].get("isa", "")
        rows.append((label, med))
        print(f"{label}: {med}", file=sys.stderr)
    os.remove(ids_file)

    bw = copy_bandwidth_gbs()
    floor = {m: bw * 1e9 / weight_bytes(a.model, m) for m in ("auto", "none")}
    ttft = statistics.median(time_to_first_token(a.threads) for _ in range(a.repeats))
    ppl = perplexities(a.model)

    print(f"\n## CPU benchmark ({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores ({cpu_flags()}), {a.threads} threads, --isa {a.isa}, "
          f"{os.path.basename(a.model)}, prompt {len(ids)} tokens, {DECODE_TOKENS} decoded, median of {a.repeats})\n")
    print("| engine | instruction sets | load s | pre-fill tok/s | decode tok/s | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for label, r in rows:
        if "error" in r:
            print(f"| {label} | | failed: {r['error'][:80]} | | | |")
        else:
            print(f"| {label} {r.get('version', '')} | {r.get('isa', '')} | {r['load_s']:.2f} | "
                  f"{r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {r['peak_rss_mib']:.0f} |")
    print(f"\nCopy bandwidth {bw:.1f} GB/s; decode floor (weight bytes / bandwidth): "
          f"{floor['auto']:.0f} tok/s with the file's quantization, {floor['none']:.0f} tok/s in float32.")
    print(f"Command to first token of `mistral7b chat --message`: {ttft:.2f} s.")
    print("\n| quantization | perplexity (held-out, 1024 tokens) | vs float32 |")
    print("|---|---|---|")
    for mode, value in ppl.items():
        print(f"| {mode} | {value:.3f} | {100 * (value / ppl['none'] - 1):+.2f}% |")


if __name__ == "__main__":
    main()
