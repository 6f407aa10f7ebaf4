"""GPU serving benchmark on a Mistral-7B-shaped model: batch-1 decode, 256-request throughput, long context.

One process, one GPU, random bf16 weights (no download): every tensor is drawn on the GPU from a generator
seeded by its native name (std 0.02, output layer 0.002 so the logits stay near uniform, norms 1) and written
as a native checkpoint (params.json + consolidated.safetensors, `loading.writers.save_native`, or the same two
files written directly when the writers cannot be imported: they import `gguf`). Ours loads that folder with
`LLM(folder, device="cuda", dtype="bfloat16", quantize=None)` (no tokenizer: prompts are token ids) and is driven
through `llm.engine` (add_request / step); Hugging Face transformers' `MistralForCausalLM` (sdpa, bf16) gets the
same tensors (q/k rows permuted to its half-split rotary layout, `loading.layout.permute_to_hf`).

Ceilings, measured first: copy bandwidth BW = 2 x bytes / time of a device-to-device copy of a 4 GiB bf16 tensor
(median of 10); matmul rate R = 2 n^3 / time of an n = 8192 bf16 matmul (mean of 10 after 3 warm-ups).

1. Batch-1 decode, 512-token prompt, 256 new tokens (greedy, ignore_eos), after a warm-up of the same shape.
   Ours: decode tok/s = 255 / (time of last token - time of first); end to end = 256 / (last token - start).
   HF: generate(max_new_tokens=256, min_new_tokens=256, do_sample=False), end to end; decode tok/s =
   255 / (that time - the time of the same generate with max_new_tokens=1).
   Floor: weight bytes Wb = every parameter but the embedding table (read as rows) x 2 bytes, read once per
   token; floor tok/s = BW / Wb (the KV cache at <= 768 tokens adds < 1% and is left out).
2. Throughput: 256 requests of 512 random ids, 256 new tokens each, ignore_eos, all added at once, engine stepped
   until done (after an unmeasured warm-up round of the same requests with 4 new tokens). Output tok/s =
   256 * 256 / wall; TTFT = first token time - start; TPOT = (last - first) / 255, per request.
   HF: batched generate at batch sizes 32, 64, 128 (equal-length prompts, no padding); ONE call per size is
   timed and its output tok/s (b * 256 / time) stands for the 256 / b calls that 256 requests would take.
   Roofline (L layers, H heads, Hkv kv heads, D head_dim, P = non-embedding parameters, Pout = output layer's,
   c(i) = min(i + 1, W) keys for the query at position i, attention FLOPs a(i) = 4 L H D c(i)):
     pre-fill time  = sum over requests of [sum_{i<512} (2 (P - Pout) + a(i)) + 2 Pout] / R
     decode step s  = 1 .. 255 (query position i = 511 + s, 256 rows):
                      max(256 (2 P + a(i)) / R,  (Wb + 256 c(i) 2 L Hkv D 2 bytes) / BW)
     roofline tok/s = 256 * 256 / (pre-fill time + sum of decode step times)
3. Long context: one 16384-token prompt (chunks of 4096, max_tokens=1) with the checkpoint's W = 4096 and again
   reloaded with sliding_window=None. Whole pre-fill = wall time of the request. Attention = the sum of CUDA
   event pairs around every call of the paged-attention kernel (`attend_stored`), all layers; beside it in the
   JSON the backend's entry points `attend` / `attend_heads` (which add the rotary and k/v store), measured on a
   second prompt of the same length so that the whole pre-fill above is timed unwrapped.
   KV per sequence: peak blocks held (sampled after every BlockManager.allocate) x PagedKVCache.block_bytes,
   beside the bound max_blocks_per_seq(...) x block_bytes, at 16K and 32K (at 32K also the blocks held in the
   last decode step, when the pre-fill chunk no longer counts). Decode at a 32K context: a 32768-
   token prompt then 32 new tokens, ms/token = median gap between successive tokens (mean in the JSON).

Targets (issue): batch-1 >= 90% of floor; throughput >= 70% of roofline and >= 4x HF's best batched generate;
attention at 16K >= 1.8x faster with W = 4096; KV per sequence bounded by W; 32K decode faster with the window.

Usage (GPU): PYTHONPATH=src python bench/gpu.py --out $OUT/gpu.json [--skip-hf] [--skip-long] [--skip-32k]
             [--no-cuda-graphs] [--no-async-scheduling] [--attention torch|triton] [--checkpoint DIR (kept, reused)]
CPU smoke test (tiny model, every code path, HF in float32): PYTHONPATH=src python bench/gpu.py --tiny
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.random_weights import native_tensor, random_hf_mistral  # noqa: E402

from mistral7b.cache.block_manager import max_blocks_per_seq
from mistral7b.cache.paged import PagedKVCache
from mistral7b.config import PRESETS, ModelArgs
from mistral7b.engine.llm import LLM
from mistral7b.engine.llm_engine import LLMEngine
from mistral7b.engine.sampling_params import SamplingParams
from mistral7b.loading import layout

GPU = {"prompt": 512, "new": 256, "requests": 256, "hf_batches": "32,64,128", "long_len": 16384,
       "long_chunk": 4096, "decode_len": 32768, "decode_tokens": 32, "copy_mib": 4096, "matmul_n": 8192, "warm_new": 4}
TINY = {"prompt": 48, "new": 16, "requests": 8, "hf_batches": "2,4", "long_len": 256, "long_chunk": 64,
        "decode_len": 512, "decode_tokens": 8, "copy_mib": 16, "matmul_n": 256, "warm_new": 2, "chunk_size": 32,
        "max_num_batched_tokens": 128}
TINY_MODEL = ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=160, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                       vocab_size=256, rope_theta=1e4, sliding_window=32, max_seq_len=8192)
T0 = time.perf_counter()
_rid = itertools.count()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_checkpoint(folder: str, args: ModelArgs, device: torch.device, dtype: torch.dtype) -> str:
    state = {n: native_tensor(n, s, device, dtype).cpu() for n, s in layout.expected_shapes(args).items()}
    try:
        from mistral7b.loading.writers import save_native
    except ImportError as e:  # writers.py imports gguf at module level; write the same two files here
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        save_file(state, os.path.join(folder, "consolidated.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(folder, "params.json"), "w", encoding="utf-8") as f:
            json.dump(args.to_params_json(), f, indent=2)
        return f"safetensors + params.json directly (writers unavailable: {e})"
    save_native(folder, args, state)
    return "loading.writers.save_native"


# ---------------------------------------------------------------------------------------------- ceilings


def timed(fn: Callable[[], Any], device: torch.device, reps: int) -> list[float]:
    """Seconds of each of `reps` calls (synchronized)."""
    out = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def ceilings(device: torch.device, dtype: torch.dtype, copy_mib: int, n: int) -> dict:
    """Copy bandwidth (read + write bytes, median of 10) and matmul rate (n^3, mean of 10 after 3)."""
    src = torch.ones(copy_mib * 2**20 // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    copy = timed(lambda: dst.copy_(src), device, 12)[2:]
    src = dst = torch.empty(0)  # free the copy buffers before the matmul
    x, y = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    mm = timed(lambda: x @ y, device, 13)[3:]
    return {"copy_bandwidth_GBps": 2 * copy_mib * 2**20 / statistics.median(copy) / 1e9,
            "matmul_TFLOPs": 2 * n**3 / statistics.mean(mm) / 1e12, "copy_bytes": copy_mib * 2**20, "matmul_n": n}


def weight_counts(args: ModelArgs) -> tuple[int, int]:
    """(P: parameters read per token = all but the embedding table, Pout: the output layer's)."""
    shapes = layout.expected_shapes(args)
    total = sum(torch.Size(s).numel() for n, s in shapes.items() if n != "tok_embeddings.weight")
    return total, args.vocab_size * args.dim


def roofline(args: ModelArgs, n_req: int, prompt: int, new: int, rate: float, bw: float, itemsize: int) -> dict:
    P, Pout = weight_counts(args)
    W = args.sliding_window or 1 << 62

    def attn(i: int) -> int:
        return 4 * args.n_layers * args.n_heads * args.head_dim * min(i + 1, W)

    prefill = n_req * (sum(2 * (P - Pout) + attn(i) for i in range(prompt)) + 2 * Pout) / rate
    kv_token = 2 * args.n_layers * args.n_kv_heads * args.head_dim * itemsize
    decode = 0.0
    for s in range(1, new):
        i = prompt - 1 + s
        decode += max(n_req * (2 * P + attn(i)) / rate, (P * itemsize + n_req * min(i + 1, W) * kv_token) / bw)
    return {"tok_s": n_req * new / (prefill + decode), "prefill_s": prefill, "decode_s": decode}


# ---------------------------------------------------------------------------------------------- ours


def engine_options(a: argparse.Namespace) -> dict[str, Any]:
    """CUDA graphs on unless --no-cuda-graphs (off on a CPU); --attention; async scheduling as the engine's
    default (on with CUDA graphs) unless --no-async-scheduling."""
    opts: dict[str, Any] = {"cuda_graphs": not a.no_cuda_graphs and a.device == "cuda",
                            "async_scheduling": False if a.no_async_scheduling else None}
    if a.attention:
        opts["attention"] = a.attention
    return opts


def load_llm(folder: str, a: argparse.Namespace, *, window: Any, max_model_len: int, max_batch_size: int,
             chunk: int, batched_tokens: int) -> LLM:
    return LLM(folder, dtype=a.dtype, device=a.device, chunk_size=chunk, sliding_window=window,
               max_model_len=max_model_len, max_batch_size=max_batch_size, progress=False, quantize=None,
               engine_options={"max_num_batched_tokens": batched_tokens, **engine_options(a)},
               tensor_parallel_size=a.tensor_parallel_size)


def drive(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> tuple[list[list], float, float]:
    """Add every prompt at once, step until done; per request [(time, token id)], start and end time."""
    t0 = time.perf_counter()
    rids = [("bench", next(_rid)) for _ in prompts]
    for rid, ids in zip(rids, prompts):
        engine.add_request(rid, ids, params)
    got: dict[Any, list] = {rid: [] for rid in rids}
    while engine.has_unfinished():
        events = engine.step()  # samples on the CPU: the step's GPU work is done when it returns
        now = time.perf_counter()
        for ev in events:
            if ev.token_id is not None:
                got[ev.request_id].append((now, ev.token_id))
    return [got[r] for r in rids], t0, time.perf_counter()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def mark(device: torch.device) -> Any:
    """A point in time on `device`'s stream: a recorded CUDA event, or perf_counter on a CPU (synchronous)."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


class AttentionTimer:
    """Times every call of the attention backend's entry points, `attend` and (from the fused projection:
    rotary + k/v store + attention) `attend_heads`, each shadowed by an instance attribute; and separately the
    attention over the stored pool alone (`attend_stored`, called by both)."""

    def __init__(self, cache: Any):
        self.cache, self.spans, self.kernel_spans = cache, [], []
        self.names = [n for n in ("attend", "attend_heads") if hasattr(cache, n)]
        for name in self.names:
            setattr(cache, name, self._wrap(getattr(cache, name), self.spans))
        if hasattr(cache, "attend_stored"):
            self.names.append("attend_stored")
            cache.attend_stored = self._wrap(cache.attend_stored, self.kernel_spans)

    def _wrap(self, inner: Callable[..., torch.Tensor], spans: list) -> Callable[..., torch.Tensor]:
        @torch.compiler.disable
        def timed_call(*args: Any, **kw: Any) -> torch.Tensor:
            start = mark(self.cache.device)
            out = inner(*args, **kw)
            spans.append((start, mark(self.cache.device)))
            return out

        return timed_call

    def seconds(self, kernel_only: bool = False) -> float:
        """Entry points' time (k/v store, rotary on the kernel path, attention); with kernel_only the attention
        kernel alone, where it ran (else the entry points' time)."""
        sync(self.cache.device)
        spans = self.kernel_spans if kernel_only and self.kernel_spans else self.spans
        return sum(e - s if isinstance(s, float) else s.elapsed_time(e) / 1e3 for s, e in spans)

    def remove(self) -> None:
        for name in self.names:
            delattr(self.cache, name)


def track_peak_blocks(blocks: Any) -> dict[str, int]:
    """Blocks referenced, sampled after every BlockManager.allocate: {"peak": the most (reset by hand), "last"}."""
    state, inner = {"peak": 0, "last": 0}, blocks.allocate

    def allocate(seq: Any, n: int) -> bool:
        ok = inner(seq, n)
        state["last"] = blocks.num_blocks - blocks.num_free
        state["peak"] = max(state["peak"], state["last"])
        return ok

    blocks.allocate = allocate
    return state


def ours_decode_and_throughput(folder: str, a: argparse.Namespace, vocab: int) -> dict:
    llm = load_llm(folder, a, window="keep", max_model_len=a.prompt + a.new + 8, max_batch_size=a.max_batch_size,
                   chunk=a.chunk_size, batched_tokens=a.max_num_batched_tokens)
    eng = llm.engine
    log(f"ours loaded: {eng.cache.num_blocks} KV blocks of {eng.config.block_size}, options {engine_options(a)}")
    drive(eng, random_prompts(1, a.prompt, vocab, 1), greedy(a.new))  # warm-up of the same shape (kernels, graphs)
    (toks,), t0, _ = drive(eng, [a.decode_prompt], greedy(a.new))
    times = [t for t, _ in toks]
    b1 = {"decode_tok_s": (len(times) - 1) / (times[-1] - times[0]), "e2e_tok_s": len(times) / (times[-1] - t0),
          "tokens": len(times), "first_ids": [t for _, t in toks[:16]]}
    log(f"ours batch-1: decode {b1['decode_tok_s']:.1f} tok/s, end to end {b1['e2e_tok_s']:.1f} tok/s")
    drive(eng, random_prompts(a.requests, a.prompt, vocab, 2), greedy(a.warm_new))
    log("ours throughput warm-up done")
    per_req, t0, t1 = drive(eng, random_prompts(a.requests, a.prompt, vocab, 3), greedy(a.new))
    ttft = [r[0][0] - t0 for r in per_req]
    tpot = [(r[-1][0] - r[0][0]) / (len(r) - 1) for r in per_req]
    n_out = sum(len(r) for r in per_req)
    tp = {"output_tok_s": n_out / (t1 - t0), "wall_s": t1 - t0, "output_tokens": n_out,
          "ttft_mean_s": statistics.mean(ttft), "ttft_median_s": statistics.median(ttft),
          "tpot_mean_ms": 1e3 * statistics.mean(tpot), "tpot_median_ms": 1e3 * statistics.median(tpot)}
    log(f"ours throughput: {tp['output_tok_s']:,.0f} output tok/s in {tp['wall_s']:.1f} s")
    llm.close()  # the tensor-parallel workers, if any
    del llm, eng
    free()
    return {"batch1": b1, "throughput": tp}


def long_context(folder: str, a: argparse.Namespace, args: ModelArgs, windowed: bool) -> dict:
    llm = load_llm(folder, a, window="keep" if windowed else None, max_batch_size=1, chunk=a.long_chunk,
                   max_model_len=max(a.long_len, a.decode_len) + a.decode_tokens + 8, batched_tokens=a.long_chunk)
    eng, vocab, W = llm.engine, args.vocab_size, llm.args.sliding_window
    bs = eng.config.block_size
    block_bytes = PagedKVCache.block_bytes(llm.args, bs, llm.model.dtype)
    peak = track_peak_blocks(eng.blocks)
    drive(eng, random_prompts(1, 2 * a.long_chunk, vocab, 10), greedy(4))  # warm-up: chunk-sized steps, decode
    peak["peak"] = 0
    _, t0, t1 = drive(eng, random_prompts(1, a.long_len, vocab, 11), greedy(1))
    out = {"window": W, "prefill_s": t1 - t0, "kv_peak_MiB_16k": peak["peak"] * block_bytes / 2**20,
           "kv_bound_MiB_16k": max_blocks_per_seq(a.long_len, a.long_chunk, bs, W) * block_bytes / 2**20,
           "kv_bound_MiB_32k": max_blocks_per_seq(a.decode_len + a.decode_tokens, a.long_chunk, bs, W) * block_bytes
           / 2**20}
    timer = AttentionTimer(eng.attention)
    _, t0, t1 = drive(eng, random_prompts(1, a.long_len, vocab, 12), greedy(1))
    out.update(attention_s=timer.seconds(kernel_only=True), attention_with_store_s=timer.seconds(),
               prefill_timed_pass_s=t1 - t0, attention_calls=len(timer.spans),
               attention_entry_points=timer.names)
    timer.remove()
    log(f"long W={W}: pre-fill {out['prefill_s']:.3f} s, attention {out['attention_s']:.3f} s")
    if not a.skip_32k:
        peak["peak"] = 0
        (toks,), t0, _ = drive(eng, random_prompts(1, a.decode_len, vocab, 13), greedy(a.decode_tokens))
        gaps = [y[0] - x[0] for x, y in itertools.pairwise(toks)]  # median: robust to a one-off graph capture
        out.update(decode_ms_32k=1e3 * statistics.median(gaps), decode_ms_32k_mean=1e3 * statistics.mean(gaps),
                   prefill_s_32k=toks[0][0] - t0, kv_peak_MiB_32k=peak["peak"] * block_bytes / 2**20,
                   kv_decode_MiB_32k=peak["last"] * block_bytes / 2**20)  # held in the last decode step
        log(f"long W={W}: 32K decode {out['decode_ms_32k']:.2f} ms/token")
    llm.close()
    del llm, eng, peak, timer
    free()
    return out


# ---------------------------------------------------------------------------------------------- hf


def hf_generate(model: Any, ids: torch.Tensor, new: int, device: torch.device) -> tuple[float, torch.Tensor]:
    sync(device)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, pad_token_id=0)
    sync(device)
    assert out.shape[1] == ids.shape[1] + new, out.shape
    return time.perf_counter() - t, out


def hf_peer(args: ModelArgs, a: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    import transformers

    model = random_hf_mistral(args, device, dtype).eval()
    log(f"HF transformers {transformers.__version__} model built")
    ids = torch.tensor([a.decode_prompt], device=device)
    hf_generate(model, ids, 8, device)
    t1, _ = hf_generate(model, ids, 1, device)
    t, out = hf_generate(model, ids, a.new, device)
    with torch.inference_mode():  # untimed: the first 16 greedy steps' logits, for the near-tie check
        scored = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                min_new_tokens=16, do_sample=False, pad_token_id=0, output_logits=True,
                                return_dict_in_generate=True)
    top2 = [step[0].float().topk(2).values for step in scored.logits]
    b1 = {"e2e_tok_s": a.new / t, "decode_tok_s": (a.new - 1) / (t - t1), "prefill_s": t1,
          "first_ids": out[0, ids.shape[1]:ids.shape[1] + 16].tolist(),
          "first_margins": [float(v[0] - v[1]) for v in top2]}
    log(f"HF batch-1: decode {b1['decode_tok_s']:.1f} tok/s, end to end {b1['e2e_tok_s']:.1f} tok/s")
    batched = []
    for b in [int(x) for x in a.hf_batches.split(",")]:
        try:
            ids = torch.tensor(random_prompts(b, a.prompt, args.vocab_size, 100 + b), device=device)
            hf_generate(model, ids, 2, device)
            t, _ = hf_generate(model, ids, a.new, device)
        except torch.OutOfMemoryError as e:
            log(f"HF batch {b}: out of memory, skipped ({str(e).splitlines()[0]})")
            batched.append({"batch": b, "error": "out of memory"})
            free()
            continue
        batched.append({"batch": b, "call_s": t, "output_tok_s": b * a.new / t,
                        "extrapolated_256_req_s": t * a.requests / b})
        log(f"HF batch {b}: {b * a.new / t:,.0f} output tok/s ({t:.1f} s per call)")
    del model
    free()
    return {"batch1": b1, "batched": batched}


# ---------------------------------------------------------------------------------------------- main


NEAR_TIE = 0.05  # a top-2 logit gap HF's own bf16 rounding can flip (a bf16 step is 0.03 at logit 4-8)


def greedy_agreement(ours: list[int], hf: dict) -> str:
    """Where our greedy tokens first leave HF's, and whether HF's top two logits there were a near-tie: with
    random weights many steps are, and then any change in bf16 summation order may pick the other token."""
    same = next((i for i, (x, y) in enumerate(zip(ours, hf["first_ids"])) if x != y), len(ours))
    if same == len(ours):
        return f"all {same} equal"
    margin = hf.get("first_margins", [float("nan")] * 16)[same]
    kind = "a near-tie within bf16 rounding" if margin < NEAR_TIE else "NOT a near-tie: a real difference"
    return f"first {same} equal; at token {same} HF's top-2 logit gap is {margin:.4f}, {kind}"


def device_info(device: torch.device) -> dict:
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0],
            "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def targets(r: dict) -> dict[str, dict]:
    ours, hf, lc = r.get("ours"), r.get("hf"), r.get("long", {})
    best_hf = max((h["output_tok_s"] for h in (hf or {}).get("batched", []) if "output_tok_s" in h), default=None)
    tp = ours and ours["throughput"]["output_tok_s"]
    w, nw = lc.get("window") or {}, lc.get("no_window") or {}
    w32 = w.get("kv_peak_MiB_32k")
    rows = [  # (name, value, passes, format)
        ("batch-1 decode / floor >= 90%", ours and ours["batch1"]["decode_tok_s"] / r["floor_tok_s"],
         lambda v: v >= 0.9, "{:.1%}"),
        ("throughput / roofline >= 70%", tp and tp / r["roofline"]["tok_s"], lambda v: v >= 0.7, "{:.1%}"),
        ("throughput / HF best batched >= 4x", tp and best_hf and tp / best_hf, lambda v: v >= 4, "{:.2f}x"),
        ("attention at 16K, no window / W >= 1.8x", w and nw and nw["attention_s"] / w["attention_s"],
         lambda v: v >= 1.8, "{:.2f}x"),
        ("whole pre-fill at 16K, no window / W (reported)", w and nw and nw["prefill_s"] / w["prefill_s"],
         None, "{:.2f}x"),
        ("KV per sequence with W at 32K <= bound and <= at 16K (MiB)", w32,
         lambda v: v <= w["kv_bound_MiB_32k"] and v <= w["kv_peak_MiB_16k"] * 1.01, "{:,.0f}"),
        ("KV per sequence at 32K, no window / W: peak", w32 and nw.get("kv_peak_MiB_32k", 0) / w32, None, "{:.2f}x"),
        ("KV per sequence at 32K, no window / W: while decoding (paper: 8x)", w.get("kv_decode_MiB_32k") and
         nw.get("kv_decode_MiB_32k", 0) / w["kv_decode_MiB_32k"], None, "{:.2f}x"),
        ("decode at 32K, no window / W > 1", w.get("decode_ms_32k") and nw.get("decode_ms_32k")
         and nw["decode_ms_32k"] / w["decode_ms_32k"], lambda v: v > 1, "{:.2f}x"),
    ]
    return {name: {"value": None if not v else fmt.format(v), "ok": None if not v or ok is None else bool(ok(v))}
            for name, v, ok, fmt in rows}


def report(r: dict, a: argparse.Namespace) -> list[str]:
    c, ours, hf, lc = r["ceilings"], r.get("ours"), r.get("hf"), r.get("long", {})
    floor, roof, nan = r["floor_tok_s"], r["roofline"]["tok_s"], float("nan")
    lines = [(f"ceilings: copy {c['copy_bandwidth_GBps']:,.0f} GB/s, matmul {c['matmul_TFLOPs']:,.1f} TFLOP/s; "
              f"{r['weight_bytes'] / 1e9:.2f} GB of weights a token -> batch-1 floor {floor:,.1f} tok/s; "
              f"throughput roofline {roof:,.0f} tok/s"), "",
             f"| batch 1 ({a.prompt} in, {a.new} out) | decode tok/s | % of floor | end-to-end tok/s |",
             "|---|---|---|---|"]
    for name, b1 in (("mistral7b (ours)", ours and ours["batch1"]), ("HF transformers", hf and hf["batch1"])):
        if b1:
            d = b1["decode_tok_s"]
            lines.append(f"| {name} | {d:,.1f} | {d / floor:.0%} | {b1['e2e_tok_s']:,.1f} |")
    lines += ["", f"| {a.requests} requests, {a.prompt} in / {a.new} out | output tok/s | % of roofline | "
              + "TTFT mean / median s | TPOT mean / median ms |", "|---|---|---|---|---|"]
    if ours:
        t = ours["throughput"]
        lines.append(f"| mistral7b (ours) | {t['output_tok_s']:,.0f} | {t['output_tok_s'] / roof:.0%} | "
                     f"{t['ttft_mean_s']:.2f} / {t['ttft_median_s']:.2f} | "
                     f"{t['tpot_mean_ms']:.1f} / {t['tpot_median_ms']:.1f} |")
    for h in (hf or {}).get("batched", []):
        if "output_tok_s" in h:
            lines.append(f"| HF generate, batch {h['batch']} (1 call timed, for {a.requests / h['batch']:g} calls) "
                         f"| {h['output_tok_s']:,.0f} | {h['output_tok_s'] / roof:.0%} | - | - |")
    lines += ["", f"| long context (chunks of {a.long_chunk}) | pre-fill {a.long_len} s | attention s | KV MiB/seq "
              + f"at {a.long_len} (bound) | at {a.decode_len}+{a.decode_tokens} (bound) | decode ms/token at "
              + f"{a.decode_len} |", "|---|---|---|---|---|---|"]
    for x in (lc.get("window"), lc.get("no_window")):
        if x:
            lines.append(f"| W = {x['window']} | {x['prefill_s']:.3f} | {x['attention_s']:.3f} | "
                         f"{x['kv_peak_MiB_16k']:,.1f} ({x['kv_bound_MiB_16k']:,.1f}) | "
                         f"{x.get('kv_peak_MiB_32k', nan):,.1f} ({x['kv_bound_MiB_32k']:,.1f}) | "
                         f"{x.get('decode_ms_32k', nan):.2f} |")
    verdict = {None: "-", True: "met", False: "NOT met"}
    return lines + ["", "targets:"] + [f"- {k}: {v['value']} -> {verdict[v['ok']]}" for k, v in r["targets"].items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a 2-layer dim-64 model on the CPU (smoke test of the script)")
    p.add_argument("--out", default=None, help="JSON file (default bench/data/gpu_<date>.json; --tiny: in /tmp)")
    p.add_argument("--checkpoint", default=None, help="native checkpoint folder: reused if it has params.json, "
                   "else the random one is written there and kept (default: a temp folder, deleted at the end)")
    p.add_argument("--chunk-size", type=int, default=2048)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-batch-size", type=int, default=256)
    p.add_argument("--no-async-scheduling", action="store_true", help="read each greedy decode step back before "
                   "launching the next (default with CUDA graphs: launch the next first)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="shard ours over N GPUs (started by LLM itself; compare with a run at 1)")
    p.add_argument("--hf-batches", default=None, help="HF generate batch sizes (default 32,64,128)")
    p.add_argument("--long-chunk", type=int, default=None, help="pre-fill chunk of the long-context runs (4096)")
    for flag in ("--skip-hf", "--skip-long", "--skip-32k", "--no-cuda-graphs"):
        p.add_argument(flag, action="store_true")
    p.add_argument("--attention", default=None, help="EngineConfig.attention: auto, torch or triton")
    a = p.parse_args()
    for key, value in (TINY if a.tiny else GPU).items():
        if a.tiny or getattr(a, key, None) is None:
            setattr(a, key, value)
    a.device, a.dtype = ("cpu", "float32") if a.tiny else ("cuda", "bfloat16")
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    args = TINY_MODEL if a.tiny else PRESETS["mistral-7b-v0.1"]
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --tiny for the CPU smoke test")
    out = a.out or (os.path.join(tempfile.gettempdir(), "gpu_bench_tiny.json") if a.tiny else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "data", f"gpu_{datetime.date.today().isoformat()}.json"))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    r: dict[str, Any] = {"device": device_info(device), "model": args.to_dict(), "settings": dict(vars(a)),
                         "engine_options": engine_options(a), "errors": []}
    log("device: " + json.dumps(r["device"]))

    def save() -> None:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(r, f, indent=2)

    def section(name: str, fn: Callable[[], dict]) -> dict | None:
        """Run one part; an exception is recorded (the other parts still run); the JSON is rewritten after each."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            r["errors"].append(f"{name}: {type(e).__name__}: {e}")
            free()
            return None
        finally:
            save()

    r["ceilings"] = c = ceilings(device, dtype, a.copy_mib, a.matmul_n)
    bw, rate = c["copy_bandwidth_GBps"] * 1e9, c["matmul_TFLOPs"] * 1e12
    itemsize = torch.empty(0, dtype=dtype).element_size()
    r["weight_bytes"] = weight_counts(args)[0] * itemsize
    r["floor_tok_s"] = bw / r["weight_bytes"]
    r["roofline"] = roofline(args, a.requests, a.prompt, a.new, rate, bw, itemsize)
    log(f"ceilings: {json.dumps(c)}; floor {r['floor_tok_s']:.1f} tok/s, roofline {r['roofline']['tok_s']:,.0f} tok/s")
    folder = a.checkpoint or tempfile.mkdtemp(prefix="mistral7b_gpu_bench_")
    try:
        if os.path.isfile(os.path.join(folder, "params.json")):
            log(f"reusing the checkpoint in {folder}")
        else:
            r["checkpoint_writer"] = write_checkpoint(folder, args, device, dtype)
            log(f"checkpoint written to {folder} ({r['checkpoint_writer']})")
        a.decode_prompt = random_prompts(1, a.prompt, args.vocab_size, 0)[0]
        r["ours"] = section("ours", lambda: ours_decode_and_throughput(folder, a, args.vocab_size))
        r["hf"] = None if a.skip_hf else section("hf", lambda: hf_peer(args, a, device, dtype))
        r["long"] = {} if a.skip_long else {
            key: section(f"long {key}", lambda w=w: long_context(folder, a, args, w))
            for key, w in (("window", True), ("no_window", False))}
    finally:
        if not a.checkpoint:
            shutil.rmtree(folder, ignore_errors=True)
    if r["ours"] and r["hf"]:
        r["greedy_first16_agree"] = r["ours"]["batch1"]["first_ids"] == r["hf"]["batch1"]["first_ids"]
        r["greedy"] = greedy_agreement(r["ours"]["batch1"]["first_ids"], r["hf"]["batch1"])
    r["targets"] = targets(r)
    r["total_s"] = time.perf_counter() - T0
    save()
    print("\n" + "\n".join(report(r, a) + [f"greedy first 16 tokens ours == HF: {r.get('greedy_first16_agree')}"
                                            f" ({r.get('greedy')})"]
                           + r["errors"] + [f"total {r['total_s']:.0f} s; JSON: {out}"]), flush=True)


if __name__ == "__main__":
    main()
